"""Roleplay in channels with an active session: store what people say, keep history in sync with edits
and deletions, and ask for replies.

A message is stored as a turn before any reply is generated. Messages that arrive while a reply is
being written are stored at once and answered together by the next reply, which reads them after the
reply they interrupted (see `bot.discord_front.replies`). A replayed gateway event (same message id) is
ignored. Messages sent while the bot was away are read back from the channel on READY (see
`bot.discord_front.recovery`).
"""

from __future__ import annotations

import logging
import re

import discord
from discord.ext import commands

from bot.core.sessions import Speaker
from bot.discord_front.client import TavernBot
from bot.discord_front.keys import channel_key
from bot.discord_front.replies import SAVE_FAILED_NOTICE, ReplyChannel, context_of
from persistence.errors import DuplicateMessage
from persistence.records import ChannelSession, Role

log = logging.getLogger(__name__)

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_SPACES = re.compile(r"[ \t]{2,}")


def prompt_text(message: discord.Message, bot_id: int) -> str:
    """The message as the model should read it: the bot's mention removed, other mentions as names."""
    users = {user.id: user.display_name for user in message.mentions}
    roles = {role.id: role.name for role in message.role_mentions}
    channels = {channel.id: getattr(channel, "name", "channel") for channel in message.channel_mentions}

    def user(match: re.Match[str]) -> str:
        user_id = int(match[1])
        return "" if user_id == bot_id else "@" + users.get(user_id, "someone")

    text = _USER_MENTION.sub(user, message.content)
    text = _ROLE_MENTION.sub(lambda m: "@" + roles.get(int(m[1]), "role"), text)
    text = _CHANNEL_MENTION.sub(lambda m: "#" + channels.get(int(m[1]), "channel"), text)
    return _SPACES.sub(" ", text).strip()


def mentions_bot(message: discord.Message, bot_id: int) -> bool:
    """True if the message mentions the bot or replies to one of its messages."""
    if any(user.id == bot_id for user in message.mentions):
        return True
    resolved = message.reference.resolved if message.reference else None
    return isinstance(resolved, discord.Message) and resolved.author.id == bot_id


def is_person_message(message: discord.Message) -> bool:
    """A plain (or reply) message a person wrote in a server: the only kind roleplay takes."""
    if message.author.bot or message.webhook_id is not None or message.guild is None:
        return False
    return message.type in (discord.MessageType.default, discord.MessageType.reply)


class Roleplay(commands.Cog):
    """Listens to messages in roleplay channels."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @property
    def _bot_id(self) -> int:
        assert self.bot.user is not None
        return self.bot.user.id

    def _wants(self, session: ChannelSession | None, message: discord.Message, text: str) -> bool:
        """Whether the session's channel settings let this message in."""
        if session is None or not session.active or not text:
            return False
        defaults = self.bot.settings.discord
        prefix = str(session.settings.get("ignore_prefix", defaults.ignore_prefix))
        if prefix and (message.content.lstrip().startswith(prefix) or text.startswith(prefix)):
            return False  # out of character
        mode = session.settings.get("reply_mode", defaults.reply_mode)
        return mode != "mention" or mentions_bot(message, self._bot_id)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Store a roleplay message as a turn, then ask for a reply."""
        if not is_person_message(message):
            return
        if not self.bot.accepting or not isinstance(message.channel, ReplyChannel):
            return
        try:
            # The lock is taken before the first await: handlers reach it in gateway order (asyncio locks
            # are FIFO), so a burst is stored in the order it was sent even when lookups finish out of order.
            async with self.bot.replies.storing(message.channel.id):
                session = await self.bot.repo.get_active_session(channel_key(message.channel.id))
                text = prompt_text(message, self._bot_id)
                if not self._wants(session, message, text):
                    return
                assert session is not None
                if not await self.bot.cooldown.admit(message):
                    return  # over the member's message limit: told so, neither stored nor answered
                speaker = Speaker(message.author.id, message.author.display_name)
                await self.bot.service.add_user_turn(session, speaker, text, message_id=message.id)
        except DuplicateMessage:
            return  # a replayed MESSAGE_CREATE: this message was stored (and answered) already
        except Exception:
            # Nothing is answered that is not stored (e.g. a read-only or full disk): say so instead.
            log.exception("cannot store message %s (%s)", message.id, context_of(message.channel, message.author))
            try:
                await message.channel.send(SAVE_FAILED_NOTICE)
            except discord.HTTPException as exc:
                log.warning("cannot tell channel %s that a message was not saved: %s", message.channel.id, exc)
            return
        self.bot.replies.request_reply(message.channel, message.author)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A user who edits a stored message changes that turn."""
        message = payload.message
        if "content" not in payload.data or message.author.bot or message.webhook_id is not None:
            return  # the bot's own streaming edits, embeds being unfurled
        try:
            turn = await self.bot.repo.turn_by_message(message.id)
            if turn is None or turn.role is not Role.USER:
                return
            text = prompt_text(message, self._bot_id)
            if text and text != turn.content:
                await self.bot.repo.edit_turn(turn.id, text)
        except Exception:
            log.exception("cannot apply a message edit (%s)", context_of(message.channel, message.author))

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """Deleting a user's message removes that turn; deleting part of a reply removes the reply."""
        await self._deleted(payload.channel_id, [payload.message_id])

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """A bulk delete removes every turn it touches."""
        await self._deleted(payload.channel_id, sorted(payload.message_ids))

    async def _deleted(self, channel_id: int, message_ids: list[int]) -> None:
        channel = self.bot.get_channel(channel_id)
        repo = self.bot.repo
        try:
            for message_id in message_ids:
                if self.bot.replies.claim_own_delete(message_id):
                    continue
                turn = await repo.turn_by_message(message_id)
                if turn is None or not await repo.delete_turn(turn.id):
                    continue
                log.debug("turn %s removed with message %s", turn.id, message_id)
                rest = [m for m in turn.message_ids if m != message_id and m not in message_ids]
                if turn.role is Role.MODEL and rest and isinstance(channel, ReplyChannel):
                    await self.bot.replies.delete_messages(channel, rest)
        except Exception:
            log.exception("cannot apply a message deletion (channel=%s, messages=%s)", channel_id, message_ids)

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """After a restart or a new gateway session: answer what a crash or the time away left hanging."""
        if self.bot.accepting:
            await self.bot.recovery.resume(self.bot.get_channel, self.missed_turn)

    def missed_turn(self, message: discord.Message, session: ChannelSession) -> tuple[Speaker, str] | None:
        """What to store for a message sent while the bot was away, or None if it would not be taken live."""
        if not is_person_message(message):
            return None
        text = prompt_text(message, self._bot_id)
        if not self._wants(session, message, text):
            return None
        return Speaker(message.author.id, message.author.display_name), text


async def setup(bot: TavernBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Roleplay(bot))
