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

import aiohttp
import discord

log = logging.getLogger(__name__)

ReplyChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel | discord.StageChannel

MESSAGE_LIMIT = 2000
QUEUE_NOTICE = "Waiting for the model — position {position}"


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


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split `text` into Discord messages of at most `limit` characters.

    Cuts fall at a paragraph break, else a line break, else a sentence end, else a space, else
    mid-word. The whitespace at each cut and around the whole text is dropped (Discord trims it
    anyway); nothing else is. Blank text gives no parts.
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = _cut_point(rest, limit)
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


class ReplyMessages:
    """The Discord messages that show one reply; posts, edits and trims them to match its text.

    `show` is the best-effort streaming update (a transient failure raises for the caller to skip
    it); `finish` is the exact final state. A lock keeps the two apart.
    """

    def __init__(
        self,
        channel: ReplyChannel,
        own_deletes: set[int],
        *,
        messages: Sequence[discord.Message | discord.PartialMessage] = (),
        shown: Sequence[str] = (),
        on_post: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.channel = channel
        # Awaited with the id of every message posted for the reply, as soon as it is up.
        self.on_post = on_post
        self.messages = list(messages)
        self.shown = list(shown)
        self.created: list[int] = []
        self._own_deletes = own_deletes
        self._view_on = self.messages[-1].id if self.messages else None
        self._lock = asyncio.Lock()

    @property
    def ids(self) -> tuple[int, ...]:
        """Ids of the reply's messages, in order."""
        return tuple(m.id for m in self.messages)

    async def show(self, text: str) -> None:
        """Streaming update: edit the parts that changed, post new ones; never removes anything."""
        async with self._lock:
            for index, part in enumerate(split_message(text)):
                if index < len(self.messages):
                    if self.shown[index] != part:
                        try:
                            await self.messages[index].edit(content=part)
                        except discord.NotFound as exc:
                            raise ReplyDeleted() from exc
                        self.shown[index] = part
                else:
                    await self._post(part, None)

    async def finish(self, text: str, view: discord.ui.View | None) -> None:
        """Final update: exact text, `view` on the last message only, surplus messages deleted."""
        async with self._lock:
            parts = split_message(text)
            last = len(parts) - 1
            for index, part in enumerate(parts):
                if index >= len(self.messages):
                    await self._post(part, view if index == last else None)
                    continue
                message = self.messages[index]
                if index == last:
                    edit = message.edit(content=part, view=view)
                elif self.shown[index] != part or message.id == self._view_on:
                    edit = message.edit(content=part, view=None)
                else:
                    continue
                try:
                    await edit
                except discord.NotFound as exc:
                    raise ReplyDeleted() from exc
                self.shown[index] = part
            surplus = self.messages[len(parts):]
            del self.messages[len(parts):], self.shown[len(parts):]
            for message in surplus:
                await self._delete(message)

    async def discard(self) -> None:
        """Delete every message of the reply (it came out empty after all)."""
        async with self._lock:
            messages, self.messages, self.shown = self.messages, [], []
            for message in messages:
                await self._delete(message)

    async def _post(self, part: str, view: discord.ui.View | None) -> None:
        message = await (self.channel.send(part, view=view) if view else self.channel.send(part))
        self.messages.append(message)
        self.shown.append(part)
        self.created.append(message.id)
        if self.on_post is not None:
            await self.on_post(message.id)

    async def _delete(self, message: discord.Message | discord.PartialMessage) -> None:
        await delete_own(message, self._own_deletes, self.channel.id)


async def delete_own(message: discord.Message | discord.PartialMessage, own_deletes: set[int], channel_id: int) -> None:
    """Delete a message of the bot, noting it so its delete event is not taken for a user's."""
    own_deletes.add(message.id)
    try:
        await message.delete()
    except discord.NotFound:
        own_deletes.discard(message.id)
    except (discord.HTTPException, discord.RateLimited) as exc:
        own_deletes.discard(message.id)
        log.warning("cannot delete message %s of the bot in channel %s: %s", message.id, channel_id, exc)


class QueueNotice:
    """The "Waiting for the model — position N" message of one reply."""

    def __init__(self, channel: ReplyChannel, own_deletes: set[int]) -> None:
        self.channel = channel
        self.message: discord.Message | None = None
        self._own_deletes = own_deletes

    async def show(self, position: int) -> None:
        """Post or update the notice; a transient failure only skips this update."""
        text = QUEUE_NOTICE.format(position=position)
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
            await delete_own(message, self._own_deletes, self.channel.id)
