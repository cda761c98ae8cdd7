"""Characters speaking through channel webhooks, under their own name and avatar.

`CharacterVoices.poster` gives the `Poster` a reply of a character goes through:

- With Manage Webhooks in the channel (the parent channel for a thread or forum post), one webhook
  per (channel, character), named after the character, its avatar uploaded as image bytes. Messages
  carry `username=` (the exact name) and, in a thread, `thread=`; they can carry the persistent
  Regenerate/Continue view because the webhook belongs to the bot's application and is bound to the
  client's state. A character renamed, or given a new avatar (`avatar_sha` differs), edits its webhook.
- Without Manage Webhooks, the bot posts as itself with the name in bold, and tells the channel once
  how to enable webhooks. At Discord's webhook limit of a channel it does the same, after a warning.

A webhook deleted by a moderator (Unknown Webhook, 10015) is dropped and created again once; the
reply goes on in new messages (`render.MessageLost`). Every webhook used is added to the intake's
`own_webhook_ids`, so the bot never answers its own characters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import discord
from discord.utils import MISSING

from bot.discord_front.replies.render import BotPoster, MessageLost, Poster, ReplyChannel
from persistence.records import CharacterWebhook
from persistence.repository import Repository

log = logging.getLogger(__name__)

UNKNOWN_WEBHOOK = 10015
MAX_WEBHOOKS = 30007
NAME_LIMIT = 80
FALLBACK_NAME = "Character"
PERMISSION_TIP = (
    "Tip for admins: give me the Manage Webhooks permission here and characters will speak with their own "
    "name and avatar."
)
LIMIT_NOTICE = (
    "This channel has reached Discord's limit of webhooks, so characters speak through me here. "
    "Admins can delete unused webhooks in the channel settings (Integrations)."
)
WEBHOOK_REASON = "Tavernkeep character voice"

_NO_MENTIONS = discord.AllowedMentions.none()
# Discord refuses webhook names and per-message usernames containing these words (any case).
_RESERVED = re.compile(r"clyde|discord", re.IGNORECASE)
# Look-alike letters (Cyrillic) that make a reserved word acceptable while it still reads the same.
_LOOKALIKE = str.maketrans("eEoO", "еЕоО")
_WHITESPACE = re.compile(r"\s+")


def voice_name(name: str) -> str:
    """The name as Discord accepts it for a webhook and for `username=`: 1-80 characters, whitespace
    folded, and "clyde"/"discord" written with a look-alike letter (nothing else changes)."""
    text = _WHITESPACE.sub(" ", name).strip()[:NAME_LIMIT].strip()
    text = _RESERVED.sub(lambda m: m[0].translate(_LOOKALIKE), text)
    return text or FALLBACK_NAME


class Character(Protocol):
    """The character a reply speaks for."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def avatar_sha(self) -> str | None: ...


class WebhookRecord(Protocol):
    """A stored mapping of (channel, character) to the webhook speaking for it."""

    @property
    def channel_id(self) -> int: ...

    @property
    def persona_id(self) -> int: ...

    @property
    def webhook_id(self) -> int: ...

    @property
    def token(self) -> str: ...

    @property
    def avatar_sha(self) -> str | None: ...


class WebhookStore(Protocol):
    """Where the (channel, character) -> webhook mappings are kept (the database in the bot)."""

    async def get(self, channel_id: int, persona_id: int) -> WebhookRecord | None: ...

    async def save(self, record: CharacterWebhook) -> None: ...

    async def delete(self, webhook_id: int) -> None: ...

    async def ids(self) -> set[int]: ...


class RepositoryWebhooks:
    """The `WebhookStore` of the bot: the mappings live in the database."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    async def get(self, channel_id: int, persona_id: int) -> CharacterWebhook | None:
        """The stored webhook of a character in a channel."""
        return await self.repo.get_character_webhook(channel_id, persona_id)

    async def save(self, record: CharacterWebhook) -> None:
        """Store (or replace) a mapping."""
        await self.repo.save_character_webhook(record)

    async def delete(self, webhook_id: int) -> None:
        """Forget a webhook (deleted by a moderator)."""
        await self.repo.delete_character_webhook(webhook_id)

    async def ids(self) -> set[int]:
        """Every webhook id the bot posts through."""
        return await self.repo.character_webhook_ids()


AvatarSource = Callable[[int], Awaitable[bytes | None]]
WebhookChannel = discord.TextChannel | discord.VoiceChannel | discord.StageChannel | discord.ForumChannel


def home_of(channel: ReplyChannel) -> WebhookChannel | None:
    """The channel whose webhooks post in `channel`: itself, or a thread's (forum post's) parent."""
    home = channel.parent if isinstance(channel, discord.Thread) else channel
    return home if isinstance(home, WebhookChannel) else None


def _is_unknown_webhook(error: discord.HTTPException) -> bool:
    return isinstance(error, discord.NotFound) and error.code == UNKNOWN_WEBHOOK


def _no_components() -> discord.ui.View:
    """An empty view, to remove components: discord.py sends `with_components` for a webhook edit only
    with a view, and without it Discord ignores the `components` of the edit."""
    view = discord.ui.View(timeout=None)
    view.stop()
    return view


@dataclass
class _Voice:
    webhook: discord.Webhook
    name: str
    avatar_sha: str | None


class WebhookPoster:
    """Posts a character's reply through its webhook (in a thread: the parent's, with `thread=`).

    Only the webhook that posted a message can edit or delete it. When the webhook turns out deleted
    (Unknown Webhook), `character`'s webhook is created again once and `MessageLost` is raised: the
    messages posted before are lost, and the caller posts the reply anew. Without `character` (a
    poster found for an old message), nothing is recreated.
    """

    def __init__(
        self,
        voices: CharacterVoices,
        channel: ReplyChannel,
        webhook: discord.Webhook,
        *,
        username: str | None,
        character: Character | None = None,
    ) -> None:
        self.channel = channel
        self.prefix = ""
        self.webhook = webhook
        self.username = username
        self._voices = voices
        self._character = character
        self._thread: Any = channel if isinstance(channel, discord.Thread) else MISSING
        self._fallback: BotPoster | None = None
        self._renewed = False
        # Messages posted since the webhook was created again: the only ones still ours to change.
        self._posted: set[int] | None = None

    async def send(self, content: str, view: discord.ui.View | None) -> discord.Message:
        if self._fallback is not None:
            message = await self._fallback.send(content, view)
        else:
            options: dict[str, Any] = {"thread": self._thread} if self._thread is not MISSING else {}
            if view is not None:
                options["view"] = view
            if self.username:
                options["username"] = self.username
            try:
                message = await self.webhook.send(content, wait=True, allowed_mentions=_NO_MENTIONS, **options)
            except discord.NotFound as exc:
                await self._lost(exc)
                raise
        if self._posted is not None:
            self._posted.add(message.id)
        return message

    async def edit(self, message_id: int, *, content: Any = MISSING, view: Any = MISSING) -> None:
        self._check(message_id)
        if self._fallback is not None:
            await self._fallback.edit(message_id, content=content, view=view)
            return
        try:
            await self.webhook.edit_message(
                message_id, content=content, view=_no_components() if view is None else view,
                allowed_mentions=_NO_MENTIONS, thread=self._thread,
            )
        except discord.NotFound as exc:
            await self._lost(exc)
            raise

    async def delete(self, message_id: int) -> None:
        self._check(message_id)
        if self._fallback is not None:
            await self._fallback.delete(message_id)
            return
        try:
            await self.webhook.delete_message(message_id, thread=self._thread)
        except discord.NotFound as exc:
            await self._lost(exc)
            raise

    def _check(self, message_id: int) -> None:
        if self._posted is not None and message_id not in self._posted:
            raise MessageLost()

    async def _lost(self, error: discord.NotFound) -> None:
        """After a 404: if the webhook is gone, create it again (once) and raise `MessageLost`."""
        if not _is_unknown_webhook(error):
            return  # the message is gone, not the webhook: the caller's NotFound stands
        if self._renewed or self._character is None:
            raise MessageLost() from error
        self._renewed = True
        self._posted = set()
        replacement = await self._voices.renew(self.channel, self._character, self.webhook.id)
        if isinstance(replacement, WebhookPoster):
            self.webhook = replacement.webhook
        else:
            self._fallback = replacement
            self.prefix = replacement.prefix
        raise MessageLost() from error


class CharacterVoices:
    """The webhooks characters speak through, one per (channel, character), for one bot.

    The permission tip and the webhook-limit notice are told once per channel per process: a restart
    may tell a channel again.
    """

    def __init__(
        self,
        client: discord.Client,
        store: WebhookStore,
        avatar: AvatarSource,
        own_webhook_ids: set[int],
    ) -> None:
        self.client = client
        self.store = store
        self.avatar = avatar
        # The intake's set: messages of these webhooks are the bot's own.
        self.own_webhook_ids = own_webhook_ids
        self._voices: dict[tuple[int, int], _Voice] = {}
        self._by_id: dict[int, discord.Webhook] = {}
        self._tipped: set[int] = set()
        self._limited: set[int] = set()

    async def load(self) -> None:
        """Note every stored webhook as the bot's own (call before messages are taken)."""
        self.own_webhook_ids.update(await self.store.ids())

    async def poster(self, channel: ReplyChannel, character: Character) -> Poster:
        """The poster of a new reply of `character` in `channel`: its webhook if it can have one, else the bot."""
        home = home_of(channel)
        if home is None:
            return BotPoster(channel, character.name)
        if not self._can_manage(home):
            await self._tip(channel)
            return BotPoster(channel, character.name)
        try:
            webhook = await self._webhook(home, character)
        except discord.Forbidden as exc:
            log.info("cannot manage webhooks in channel %s: %s", home.id, exc)
            await self._tip(channel)
            return BotPoster(channel, character.name)
        except discord.HTTPException as exc:
            if exc.code != MAX_WEBHOOKS:
                raise
            await self._at_limit(channel, home, exc)
            return BotPoster(channel, character.name)
        return WebhookPoster(self, channel, webhook, username=voice_name(character.name), character=character)

    async def poster_of(
        self, channel: ReplyChannel, message: discord.Message, character: Character | None
    ) -> Poster | None:
        """The poster that can change `message` (a reply of the bot's), or None if none can any more.

        The bot for its own messages (with `character`'s name in bold); else the webhook that posted it
        (recreated for `character` if it turns out deleted).
        """
        if message.webhook_id is None:
            return BotPoster(channel, character.name if character is not None else None)
        webhook = await self._known(channel, message.webhook_id)
        if webhook is None:
            return None
        username = voice_name(character.name) if character is not None else None
        return WebhookPoster(self, channel, webhook, username=username, character=character)

    async def renew(self, channel: ReplyChannel, character: Character, dead_id: int) -> Poster:
        """Forget a deleted webhook and give `character` a new one (or the bot, if it cannot have one)."""
        log.warning("the webhook %s of character %s in channel %s was deleted; creating it again",
                    dead_id, character.id, channel.id)
        await self.store.delete(dead_id)
        self._by_id.pop(dead_id, None)
        for key in [k for k, voice in self._voices.items() if voice.webhook.id == dead_id]:
            del self._voices[key]
        return await self.poster(channel, character)

    # --- webhooks ---------------------------------------------------------------------------------

    def _can_manage(self, home: WebhookChannel) -> bool:
        me = home.guild.me
        return me is not None and home.permissions_for(me).manage_webhooks

    async def _webhook(self, home: WebhookChannel, character: Character) -> discord.Webhook:
        """The character's webhook in `home`: cached, stored, or created; edited if the look changed."""
        key = (home.id, character.id)
        name = voice_name(character.name)
        voice = self._voices.get(key) or await self._stored(home, character)
        if voice is None:
            voice = await self._create(home, character, name)
        elif voice.name != name or voice.avatar_sha != character.avatar_sha:
            voice = await self._update(home, character, voice, name)
        self._voices[key] = voice
        self._by_id[voice.webhook.id] = voice.webhook
        self.own_webhook_ids.add(voice.webhook.id)
        return voice.webhook

    async def _stored(self, home: WebhookChannel, character: Character) -> _Voice | None:
        """The stored webhook, read once per process for its current name (and to see it still exists)."""
        record = await self.store.get(home.id, character.id)
        if record is None:
            return None
        self.own_webhook_ids.add(record.webhook_id)
        webhook = discord.Webhook.partial(record.webhook_id, record.token, client=self.client,
                                          bot_token=self.client.http.token)
        try:
            fetched = await webhook.fetch()
        except discord.NotFound:
            log.info("the stored webhook %s of channel %s is gone; creating a new one", record.webhook_id, home.id)
            await self.store.delete(record.webhook_id)
            return None
        return _Voice(webhook, fetched.name or "", record.avatar_sha)

    async def _create(self, home: WebhookChannel, character: Character, name: str) -> _Voice:
        avatar = await self.avatar(character.id)
        webhook = await home.create_webhook(name=name, avatar=avatar, reason=WEBHOOK_REASON)
        assert webhook.token is not None  # an incoming webhook created by the bot comes with its token
        self.own_webhook_ids.add(webhook.id)
        await self.store.save(CharacterWebhook(home.id, character.id, webhook.id, webhook.token, character.avatar_sha))
        log.info("created webhook %s for character %s in channel %s", webhook.id, character.id, home.id)
        return _Voice(webhook, name, character.avatar_sha)

    async def _update(self, home: WebhookChannel, character: Character, voice: _Voice, name: str) -> _Voice:
        changes: dict[str, Any] = {"name": name}
        if voice.avatar_sha != character.avatar_sha:
            changes["avatar"] = await self.avatar(character.id)
        try:
            await voice.webhook.edit(reason=WEBHOOK_REASON, **changes)
        except discord.NotFound:
            await self.store.delete(voice.webhook.id)
            return await self._create(home, character, name)
        token = voice.webhook.token
        assert token is not None
        await self.store.save(CharacterWebhook(home.id, character.id, voice.webhook.id, token, character.avatar_sha))
        return _Voice(voice.webhook, name, character.avatar_sha)

    async def _known(self, channel: ReplyChannel, webhook_id: int) -> discord.Webhook | None:
        """One of the bot's webhooks by id, with its token (from the channel's webhooks if not seen yet)."""
        webhook = self._by_id.get(webhook_id)
        home = home_of(channel)
        if webhook is not None or home is None or webhook_id not in self.own_webhook_ids:
            return webhook
        if not self._can_manage(home):
            return None
        try:
            found = [w for w in await home.webhooks() if w.id == webhook_id and w.token is not None]
        except discord.HTTPException as exc:
            log.warning("cannot list the webhooks of channel %s: %s", home.id, exc)
            return None
        if found:
            self._by_id[webhook_id] = found[0]
        return found[0] if found else None

    # --- telling the channel ----------------------------------------------------------------------

    async def _tip(self, channel: ReplyChannel) -> None:
        if channel.id in self._tipped:
            return
        self._tipped.add(channel.id)
        await self._tell(channel, PERMISSION_TIP)

    async def _at_limit(self, channel: ReplyChannel, home: WebhookChannel, error: discord.HTTPException) -> None:
        if home.id in self._limited:
            return
        self._limited.add(home.id)
        log.warning("channel %s (guild %s) has reached Discord's webhook limit; characters speak through the "
                    "bot there (%s)", home.id, home.guild.id, error)
        await self._tell(channel, LIMIT_NOTICE)

    async def _tell(self, channel: ReplyChannel, text: str) -> None:
        try:
            await channel.send(text)
        except (discord.HTTPException, discord.RateLimited) as exc:
            log.warning("cannot post a notice in channel %s: %s", channel.id, exc)
