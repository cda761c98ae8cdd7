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

import discord
from discord.ext import commands

from bot.discord_front.client import TavernBot
from bot.discord_front.keys import channel_key
from bot.discord_front.replies import SAVE_FAILED_NOTICE, ReplyChannel, context_of
from persistence.errors import DuplicateMessage
from persistence.records import Role

log = logging.getLogger(__name__)


class Roleplay(commands.Cog):
    """Listens to messages in roleplay channels."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Store a roleplay message as a turn, then ask for a reply."""
        if not self.bot.intake.is_person_message(message):
            return
        if not self.bot.accepting or not isinstance(message.channel, ReplyChannel):
            return
        try:
            # The lock is taken before the first await: handlers reach it in gateway order (asyncio locks
            # are FIFO), so a burst is stored in the order it was sent even when lookups finish out of order.
            async with self.bot.replies.storing(message.channel.id):
                session = await self.bot.repo.get_active_session(channel_key(message.channel.id))
                taken = self.bot.intake.take(message, session)
                if taken is None:
                    return
                assert session is not None
                if not await self.bot.cooldown.admit(message):
                    return  # over the member's message limit: told so, neither stored nor answered
                speaker, text = taken
                await self.bot.service.add_user_turn(session, speaker, text, message_id=message.id)
                replied_to = await self._replied_character(message)
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
        self.bot.replies.request_reply(message.channel, message.author, replied_to=replied_to)

    async def _replied_character(self, message: discord.Message) -> int | None:
        """The character whose message this one replies to, if any (it then answers)."""
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        turn = await self.bot.repo.turn_by_message(reference.message_id)
        return turn.character_id if turn is not None and turn.role is Role.MODEL else None

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A member who edits a stored message changes that turn; an edit that leaves no visible text or
        makes the message out of character takes the turn out of the story."""
        message = payload.message
        if "content" not in payload.data or not self.bot.intake.is_person_message(message):
            return  # the bot's own streaming edits, other bots, embeds being unfurled
        try:
            turn = await self.bot.repo.turn_by_message(message.id)
            if turn is None or turn.role is not Role.USER:
                return
            session = await self.bot.repo.get_active_session(channel_key(payload.channel_id))
            if session is not None and session.id != turn.session_id:
                session = None  # a turn of an archived session: the configured prefix applies
            text = self.bot.intake.edited_text(message, session)
            if text is None:
                await self.bot.repo.delete_turn(turn.id)
                log.debug("turn %s removed by an edit of message %s", turn.id, message.id)
            elif text != turn.content:
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
        if self.bot.accepting and not self.bot.sharding.sharded:
            await self.bot.recovery.resume(self.bot.get_channel)

    @commands.Cog.listener()
    async def on_shard_ready(self, shard_id: int) -> None:
        """The same for the guilds of one shard (a sharded bot gets no `on_ready` when one shard reconnects)."""
        if self.bot.accepting:
            await self.bot.recovery.resume(self.bot.get_channel, self.bot.shard_guilds(shard_id))


async def setup(bot: TavernBot) -> None:
    """Extension entry point."""
    await bot.add_cog(Roleplay(bot))
