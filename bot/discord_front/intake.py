"""Which Discord messages roleplay takes, and the text the model reads for them.

One filter serves the live `on_message` path, edits, and the catch-up on messages sent while the bot
was away (`bot.discord_front.recovery`), so a message is taken on restart exactly when it would have
been taken live.

Taken: plain messages and replies in a server from people, including messages that PluralKit,
Tupperbox and similar proxies repost through a webhook (attributed to the webhook's display name,
which is the proxied character's name). Not taken: other bots, this bot's own messages and
webhooks, system messages, DMs, out-of-character messages (the channel's ignore prefix), messages
with no visible text, and, in "mention" mode, messages that neither mention the bot nor reply to it.
"""

from __future__ import annotations

import re

import discord

from bot.config import DiscordSettings
from bot.core.sessions import Speaker
from bot.prompt.builder import has_visible_text
from persistence.records import ChannelSession

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_SPACES = re.compile(r"[ \t]{2,}")

def prompt_text(message: discord.Message, bot_id: int) -> str:
    """The message as the model should read it: the bot's mention removed, other mentions as names.

    Empty when nothing visible is left.
    """
    users = {user.id: user.display_name for user in message.mentions}
    roles = {role.id: role.name for role in message.role_mentions}
    channels = {channel.id: getattr(channel, "name", "channel") for channel in message.channel_mentions}

    def user(match: re.Match[str]) -> str:
        user_id = int(match[1])
        return "" if user_id == bot_id else "@" + users.get(user_id, "someone")

    text = _USER_MENTION.sub(user, message.content)
    text = _ROLE_MENTION.sub(lambda m: "@" + roles.get(int(m[1]), "role"), text)
    text = _CHANNEL_MENTION.sub(lambda m: "#" + channels.get(int(m[1]), "channel"), text)
    text = _SPACES.sub(" ", text).strip()
    return text if has_visible_text(text) else ""


def mentions_bot(message: discord.Message, bot_id: int) -> bool:
    """True if the message mentions the bot or replies to one of its messages."""
    if any(user.id == bot_id for user in message.mentions):
        return True
    resolved = message.reference.resolved if message.reference else None
    return isinstance(resolved, discord.Message) and resolved.author.id == bot_id


class Intake:
    """Decides which messages roleplay takes and what is stored for them."""

    def __init__(self, client: discord.Client, settings: DiscordSettings) -> None:
        self.client = client
        self.settings = settings
        # Webhooks this bot posts through itself (character webhooks): their messages are the bot's own.
        self.own_webhook_ids: set[int] = set()

    @property
    def bot_id(self) -> int:
        """The bot's user id (known once logged in)."""
        assert self.client.user is not None
        return self.client.user.id

    def is_own(self, message: discord.Message) -> bool:
        """True for a message the bot posted: as itself, through its webhooks, or as an interaction reply."""
        if self.client.user is not None and message.author.id == self.client.user.id:
            return True
        if message.webhook_id is None:
            return False
        application_id = self.client.application_id
        return message.webhook_id in self.own_webhook_ids or (
            application_id is not None
            and (message.webhook_id == application_id or message.application_id == application_id)
        )

    def is_person_message(self, message: discord.Message) -> bool:
        """A plain (or reply) message a person wrote in a server, directly or through a proxy webhook."""
        if message.guild is None or self.is_own(message):
            return False
        if message.author.bot and message.webhook_id is None:
            return False  # another bot
        return message.type in (discord.MessageType.default, discord.MessageType.reply)

    def speaker(self, message: discord.Message) -> Speaker:
        """Who said it: the member, or for a proxied message the webhook's name (the character's)."""
        return Speaker(message.author.id, message.author.display_name)

    def text(self, message: discord.Message, session: ChannelSession | None) -> str | None:
        """The text to store for the message in this session, or None if roleplay does not take it."""
        if session is None or not session.active or not self.is_person_message(message):
            return None
        text = prompt_text(message, self.bot_id)
        if not text or self.out_of_character(message, text, session):
            return None
        mode = session.settings.get("reply_mode", self.settings.reply_mode)
        if mode == "mention" and not mentions_bot(message, self.bot_id):
            return None
        return text

    def take(self, message: discord.Message, session: ChannelSession | None) -> tuple[Speaker, str] | None:
        """What to store for the message (its speaker and text), or None if roleplay does not take it."""
        text = self.text(message, session)
        return None if text is None else (self.speaker(message), text)

    def edited_text(self, message: discord.Message, session: ChannelSession | None) -> str | None:
        """The new text of a stored message after an edit, or None if the edit takes it out of the story
        (no visible text left, or it now starts with the out-of-character prefix). `session` is the one the
        message was stored in, if it is still open (else the configured prefix applies)."""
        text = prompt_text(message, self.bot_id)
        if not text or self.out_of_character(message, text, session):
            return None
        return text

    def out_of_character(self, message: discord.Message, text: str, session: ChannelSession | None) -> bool:
        """True if the message starts with the channel's ignore prefix."""
        overrides = session.settings if session is not None else {}
        prefix = str(overrides.get("ignore_prefix", self.settings.ignore_prefix))
        return bool(prefix) and (message.content.lstrip().startswith(prefix) or text.startswith(prefix))
