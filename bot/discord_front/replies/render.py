"""Showing a reply in Discord: split it at the message limit, post it, edit it while it streams.

Retries are discord.py's own: every call waits out short rate limits and retries Discord's server
errors itself. A rate limit longer than the client's `max_ratelimit_timeout` raises
`discord.RateLimited`; a streaming edit that meets one is skipped (`is_transient`), and the final
edit, which must land, reports it like any other lasting failure.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import aiohttp
import discord
from discord.utils import MISSING

log = logging.getLogger(__name__)

ReplyChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel | discord.StageChannel

MESSAGE_LIMIT = 2000
QUEUE_NOTICE = "Waiting for the model — position {position}"
LOADING_NOTICE = "Waiting for the model server to load its model — the reply follows"


# --- splitting ------------------------------------------------------------------------------------

# The end of a sentence: punctuation, any closing quotes/brackets/markdown, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’»)\]*_~]*(?=\s)")


def _cut_point(text: str, limit: int) -> int:
    """Length of the first part of `text` (longer than `limit`, not starting with whitespace)."""
    # A boundary in the first half would make a needlessly short message; prefer a finer one.
    floor = limit // 2
    for separator in ("\n\n", "\n"):
        # The separator must start within the limit; it is dropped with the split whitespace.
        index = text.rfind(separator, 1, limit + len(separator))
        if index >= floor:
            return index
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, limit + 1) if m.end() <= limit]
    if ends and ends[-1] >= floor:
        return ends[-1]
    for index in range(limit, 0, -1):
        if text[index].isspace():
            return index
    return limit


def split_message(text: str, limit: int = MESSAGE_LIMIT, *, first_limit: int | None = None) -> list[str]:
    """Split `text` into Discord messages of at most `limit` characters (`first_limit` for the first).

    Cuts fall at a paragraph break, else a line break, else a sentence end, else a space, else
    mid-word. The whitespace at each cut and around the whole text is dropped (Discord trims it
    anyway); nothing else is. Blank text gives no parts.
    """
    first = limit if first_limit is None else first_limit
    if limit < 1 or first < 1:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > (first if not parts else limit):
        cut = _cut_point(rest, first if not parts else limit)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


# --- Discord helpers ------------------------------------------------------------------------------


def is_transient(error: BaseException) -> bool:
    """True for failures that outlasted discord.py's own retries but may pass: a long rate limit,
    Discord server errors, network trouble."""
    if isinstance(error, discord.RateLimited | aiohttp.ClientError | TimeoutError):
        return True
    return isinstance(error, discord.HTTPException) and (error.status == 429 or error.status >= 500)


def context_of(channel: discord.abc.Messageable | None, user: discord.abc.User | None) -> str:
    """`guild=… channel=… user=…` for log lines."""
    guild = getattr(channel, "guild", None)
    return (
        f"guild={guild.id if guild else None} channel={getattr(channel, 'id', None)} "
        f"user={user.id if user else None}"
    )


@asynccontextmanager
async def typing_in(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show the typing indicator while the block runs; a failure to show it never fails the reply."""
    async with AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(channel.typing())
        except (discord.HTTPException, discord.RateLimited, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot show typing in channel %s: %s", getattr(channel, "id", None), exc)
        yield


class ReplyDeleted(Exception):
    """A message of the reply was deleted while it was being written."""


class MessageLost(Exception):
    """A message of the reply can no longer be changed, though nobody deleted the reply: the webhook
    that posted it was deleted. The reply goes on in new messages."""


class Poster(Protocol):
    """Posts, edits and deletes the messages of replies in one channel, as the bot or as a character.

    `prefix` goes before the first part of a reply (it counts against the message limit and is never
    part of the reply's text). `edit`'s `view` is left alone when not given; None removes it.
    `edit` and `delete` raise `discord.NotFound` for a message that is gone, `MessageLost` for one
    that can no longer be changed.
    """

    channel: ReplyChannel
    prefix: str

    async def send(self, content: str, view: discord.ui.View | None) -> discord.Message: ...

    async def edit(self, message_id: int, *, content: str = ..., view: discord.ui.View | None = ...) -> None: ...

    async def delete(self, message_id: int) -> None: ...


def speaker_prefix(name: str | None) -> str:
    """`**Name**` and a line break: who speaks, for replies the bot posts as itself for a character."""
    return f"**{discord.utils.escape_markdown(name)}**\n" if name else ""


class BotPoster:
    """The bot posting as itself; for a character, its name in bold opens every reply."""

    def __init__(self, channel: ReplyChannel, name: str | None = None) -> None:
        self.channel = channel
        self.prefix = speaker_prefix(name)

    async def send(self, content: str, view: discord.ui.View | None) -> discord.Message:
        # The client's default `allowed_mentions` (none) applies to every send and edit.
        return await (self.channel.send(content, view=view) if view else self.channel.send(content))

    async def edit(self, message_id: int, *, content: Any = MISSING, view: Any = MISSING) -> None:
        changes: dict[str, Any] = {}
        if content is not MISSING:
            changes["content"] = content
        if view is not MISSING:
            changes["view"] = view
        await self.channel.get_partial_message(message_id).edit(**changes)

    async def delete(self, message_id: int) -> None:
        await self.channel.get_partial_message(message_id).delete()


class ReplyMessages:
    """The Discord messages that show one reply; posts, edits and trims them to match its text.

    `show` is the best-effort streaming update (a transient failure raises for the caller to skip
    it); `finish` is the exact final state. A lock keeps the two apart. Every message goes through
    `poster`. If the poster loses the reply's messages (`MessageLost`: a moderator deleted the
    character's webhook), the reply starts over in new messages, once per call; the old ones stay.
    """

    def __init__(
        self,
        poster: Poster,
        own_deletes: set[int],
        *,
        message_ids: Sequence[int] = (),
        text: str | None = None,
        on_post: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.poster = poster
        self.channel = poster.channel
        # Awaited with the id of every message posted for the reply, as soon as it is up.
        self.on_post = on_post
        self.messages = list(message_ids)
        # What each message shows now (without the prefix); "" when unknown.
        parts = self.parts(text) if text is not None else []
        self.shown = [parts[i] if i < len(parts) else "" for i in range(len(self.messages))]
        self.created: list[int] = []
        self._own_deletes = own_deletes
        self._view_on = self.messages[-1] if self.messages else None
        self._lock = asyncio.Lock()

    @property
    def ids(self) -> tuple[int, ...]:
        """Ids of the reply's messages, in order."""
        return tuple(self.messages)

    def parts(self, text: str) -> list[str]:
        """`text` split into messages, the first one leaving room for the poster's prefix."""
        return split_message(text, first_limit=MESSAGE_LIMIT - len(self.poster.prefix))

    async def show(self, text: str) -> None:
        """Streaming update: edit the parts that changed, post new ones; never removes anything."""
        async with self._lock:
            try:
                await self._show(text)
            except MessageLost:
                await self._start_over()
                await self._show(text)

    async def finish(self, text: str, view: discord.ui.View | None) -> None:
        """Final update: exact text, `view` on the last message only, surplus messages deleted."""
        async with self._lock:
            try:
                await self._finish(text, view)
            except MessageLost:
                await self._start_over()
                await self._finish(text, view)

    async def discard(self) -> None:
        """Delete every message of the reply (it came out empty after all)."""
        async with self._lock:
            messages, self.messages, self.shown = self.messages, [], []
            for message_id in messages:
                await self._delete(message_id)

    async def _show(self, text: str) -> None:
        for index, part in enumerate(self.parts(text)):
            if index < len(self.messages):
                if self.shown[index] != part:
                    await self._edit(index, part, MISSING)
            else:
                await self._post(part, None)

    async def _finish(self, text: str, view: discord.ui.View | None) -> None:
        parts = self.parts(text)
        last = len(parts) - 1
        for index, part in enumerate(parts):
            if index >= len(self.messages):
                await self._post(part, view if index == last else None)
            elif index == last:
                await self._edit(index, part, view)
            elif self.shown[index] != part or self.messages[index] == self._view_on:
                await self._edit(index, part, None)
        surplus = self.messages[len(parts):]
        del self.messages[len(parts):], self.shown[len(parts):]
        for message_id in surplus:
            await self._delete(message_id)

    async def _start_over(self) -> None:
        """Forget the messages posted so far, removing those that can still be removed."""
        log.info("the messages of a reply in channel %s were lost with their webhook; posting it anew",
                 self.channel.id)
        messages, self.messages, self.shown, self._view_on = self.messages, [], [], None
        for message_id in messages:
            await self._delete(message_id)

    def _content(self, index: int, part: str) -> str:
        return self.poster.prefix + part if index == 0 else part

    async def _edit(self, index: int, part: str, view: Any) -> None:
        try:
            await self.poster.edit(self.messages[index], content=self._content(index, part), view=view)
        except discord.NotFound as exc:
            raise ReplyDeleted() from exc
        self.shown[index] = part

    async def _post(self, part: str, view: discord.ui.View | None) -> None:
        message = await self.poster.send(self._content(len(self.messages), part), view)
        self.messages.append(message.id)
        self.shown.append(part)
        self.created.append(message.id)
        if self.on_post is not None:
            await self.on_post(message.id)

    async def _delete(self, message_id: int) -> None:
        await delete_own(self.poster, message_id, self._own_deletes)


async def delete_own(poster: Poster, message_id: int, own_deletes: set[int]) -> None:
    """Delete a message of the bot, noting it so its delete event is not taken for a user's."""
    own_deletes.add(message_id)
    try:
        await poster.delete(message_id)
    except (discord.NotFound, MessageLost):
        own_deletes.discard(message_id)
    except (discord.HTTPException, discord.RateLimited) as exc:
        own_deletes.discard(message_id)
        log.warning("cannot delete message %s of the bot in channel %s: %s", message_id, poster.channel.id, exc)


class QueueNotice:
    """The "Waiting for the model" message of one reply (its queue position, or a model loading)."""

    def __init__(self, channel: ReplyChannel, own_deletes: set[int]) -> None:
        self.channel = channel
        self.message: discord.Message | None = None
        self._own_deletes = own_deletes

    async def show(self, text: str) -> None:
        """Post or update the notice; a transient failure only skips this update."""
        try:
            if self.message is None:
                self.message = await self.channel.send(text)
            else:
                self.message = await self.message.edit(content=text)
        except discord.NotFound:
            self.message = None
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.info("skipped a queue notice update in channel %s: %s", self.channel.id, exc)

    async def remove(self) -> None:
        """Delete the notice if it is up."""
        message, self.message = self.message, None
        if message is not None:
            await delete_own(BotPoster(self.channel), message.id, self._own_deletes)
