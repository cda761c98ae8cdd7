"""Discord replies: stream a ReplyStream into channel messages, one reply per channel at a time.

Every channel has a small job queue worked by one task. A new message is stored at once (by the
roleplay cog) and asks for a reply; Regenerate and Continue clicks rework the latest reply. Requests
for a reply that arrive while one is waiting are merged into it: everything said meanwhile is
answered by the next reply, so a busy channel costs one generation per round, not one per message.
A reply reserves its model turn when it reads the history (under the channel's storing lock), so
messages sent while it is written come after it in the history, as they do in the channel, and the
next reply sees them after it.

A reply is shown by posting a message at the first text and editing it about once per
`edit_interval` seconds (measured with `time.perf_counter`); the final edit carries the exact text
and the Regenerate/Continue buttons. Replies longer than Discord's limit continue in follow-up
messages, split by `split_message`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

import aiohttp
import discord

from bot.core.sessions import ChatService, ReplyStream
from bot.discord_front.errors import TavernView, send_error
from bot.discord_front.keys import channel_key
from bot.errors import EngineClosed, TavernError
from bot.inference.engine import Queued, Started, Text
from bot.prompt.builder import MessageTooLarge, PromptTooLarge
from persistence.records import ChannelSession, Role, Turn

log = logging.getLogger(__name__)

T = TypeVar("T")
JobKind = Literal["reply", "regenerate", "continue"]
ReplyChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel | discord.StageChannel

MESSAGE_LIMIT = 2000
REGENERATE_ID = "tavernkeep:regenerate"
CONTINUE_ID = "tavernkeep:continue"

QUEUE_NOTICE = "Waiting for the model — position {position}"
EMPTY_NOTICE = "*The character has nothing to say. Try again or rephrase.*"
TIMEOUT_NOTICE = "*The reply hit the time limit and was cut short.*"
CANCELLED_NOTICE = "*The reply was cancelled.*"
FAILED_NOTICE = "Something went wrong while writing the reply. It has been logged."
SAVE_FAILED_NOTICE = "I couldn't save that message, so I can't answer it. Please try again in a moment."
DISCORD_TROUBLE_NOTICE = "Discord kept failing while I posted the reply (HTTP {status}). Please try again in a moment."
NOTHING_NEW_NOTICE = "The model had nothing new to say; the reply is unchanged."
NOTHING_TO_ADD_NOTICE = "The character has nothing to add."
NOT_LATEST = "Only the latest reply of this channel's session can be {verb}."
NOT_IN_SESSION = "This reply is not part of an active roleplay session."
CANNOT_TALK = "You can't talk in this channel."
PAUSED_NOTICE = (
    "I'm missing permissions in this channel, so its roleplay session is paused. Someone with Manage Server "
    "can fix my permissions and run /session start."
)
CHANNEL_BUSY = "This channel already has too many replies waiting. Please wait for them first."

# Newest turns read to find the last user turn and the previous reply (whose buttons go away).
RECENT_LOOKBACK = 16
# Longest pause between streaming edits after repeated transient failures.
MAX_EDIT_BACKOFF = 30.0


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
    """True for failures worth retrying: rate limits, Discord server errors, network trouble."""
    if isinstance(error, discord.RateLimited | aiohttp.ClientError | TimeoutError):
        return True
    return isinstance(error, discord.HTTPException) and (error.status == 429 or error.status >= 500)


def describe_error(error: BaseException) -> str:
    """The short text shown for an expected failure of a reply."""
    if isinstance(error, TavernError):
        return error.user_message
    return f"I can't reply: {error}"


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
        except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot show typing in channel %s: %s", getattr(channel, "id", None), exc)
        yield


async def with_retries(call: Callable[[], Awaitable[T]], delays: Sequence[float], channel_id: int) -> T:
    """Await `call()`, retrying transient Discord failures after each of `delays` seconds."""
    for delay in (*delays, None):
        try:
            return await call()
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            log.warning("transient Discord error in channel %s (%s); retrying in %.2fs", channel_id, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class ReplyDeleted(Exception):
    """A message of the reply was deleted while it was being written."""


class ReplyMessages:
    """The Discord messages that show one reply; posts, edits and trims them to match its text.

    `show` is the best-effort streaming update (a transient failure raises for the caller to skip
    it); `finish` is the exact final state, retried with backoff. A lock keeps the two apart.
    """

    def __init__(
        self,
        channel: ReplyChannel,
        own_deletes: set[int],
        *,
        messages: Sequence[discord.Message | discord.PartialMessage] = (),
        shown: Sequence[str] = (),
        retry_delays: Sequence[float] = (0.5, 1.0, 2.0),
        on_post: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.channel = channel
        # Awaited with the id of every message posted for the reply, as soon as it is up.
        self.on_post = on_post
        self.messages = list(messages)
        self.shown = list(shown)
        self.created: list[int] = []
        self.retry_delays = tuple(retry_delays)
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
                    await self._retry(partial(self._post, part, view if index == last else None))
                    continue
                message = self.messages[index]
                if index == last:
                    edit = partial(message.edit, content=part, view=view)
                elif self.shown[index] != part or message.id == self._view_on:
                    edit = partial(message.edit, content=part, view=None)
                else:
                    continue
                try:
                    await self._retry(edit)
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
        self._own_deletes.add(message.id)
        try:
            await self._retry(message.delete)
        except discord.NotFound:
            self._own_deletes.discard(message.id)
        except discord.HTTPException as exc:
            self._own_deletes.discard(message.id)
            log.warning("cannot delete reply message %s in channel %s: %s", message.id, self.channel.id, exc)

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(call, self.retry_delays, self.channel.id)


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
        if message is None:
            return
        self._own_deletes.add(message.id)
        try:
            await message.delete()
        except discord.NotFound:
            self._own_deletes.discard(message.id)
        except discord.HTTPException as exc:
            self._own_deletes.discard(message.id)
            log.warning("cannot remove the queue notice in channel %s: %s", self.channel.id, exc)


# --- buttons --------------------------------------------------------------------------------------


class ReplyButtons(TavernView):
    """Regenerate and Continue under the latest reply; persistent, the message says which reply."""

    def __init__(self, replies: ChannelReplies) -> None:
        super().__init__(timeout=None)
        self.replies = replies

    @discord.ui.button(label="Regenerate", emoji="🔄", style=discord.ButtonStyle.secondary, custom_id=REGENERATE_ID)
    async def regenerate(self, interaction: discord.Interaction, _button: discord.ui.Button[ReplyButtons]) -> None:
        """Write the latest reply again."""
        await self.replies.on_button(interaction, "regenerate")

    @discord.ui.button(label="Continue", emoji="➡️", style=discord.ButtonStyle.secondary, custom_id=CONTINUE_ID)
    async def continue_(self, interaction: discord.Interaction, _button: discord.ui.Button[ReplyButtons]) -> None:
        """Make the latest reply longer."""
        await self.replies.on_button(interaction, "continue")


# --- the per-channel queue ------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    kind: JobKind
    channel: ReplyChannel
    user: discord.abc.User | None
    interaction: discord.Interaction | None = None
    message_id: int | None = None


class ChannelReplies:
    """Writes replies into Discord channels: one job at a time per channel, all through one renderer."""

    def __init__(
        self,
        service: ChatService,
        *,
        edit_interval: float = 1.0,
        queue_limit: int = 4,
        retry_delays: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        self.service = service
        self.edit_interval = edit_interval
        self.queue_limit = queue_limit
        self.retry_delays = tuple(retry_delays)
        self.closed = False
        self._jobs: dict[int, deque[_Job]] = {}
        self._runners: dict[int, asyncio.Task[None]] = {}
        # Held while a channel's message is stored and while a reply reads its history and reserves its
        # turn, so every message is either in a reply's prompt or stored after that reply.
        self._storing: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Messages the bot deletes itself (queue notices, surplus parts): their delete events are not
        # a user removing a turn.
        self._own_deletes: set[int] = set()

    # --- entry points -----------------------------------------------------------------------------

    def request_reply(self, channel: ReplyChannel, user: discord.abc.User | None) -> None:
        """Ask for a reply to everything stored so far (merged into a reply already waiting)."""
        if self.closed:
            return
        for job in self._jobs.get(channel.id, ()):
            if job.kind == "reply":
                job.user = user
                return
        self._enqueue(_Job("reply", channel, user))

    async def on_button(self, interaction: discord.Interaction, kind: JobKind) -> None:
        """Handle a Regenerate/Continue click: check it, acknowledge it, queue it behind the channel."""
        refusal = await self._refusal(interaction, kind)
        if refusal is None and len(self._jobs.get(interaction.channel_id or 0, ())) >= self.queue_limit:
            refusal = CHANNEL_BUSY
        if refusal is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        assert interaction.message is not None and isinstance(interaction.channel, ReplyChannel)
        await interaction.response.defer()
        self._enqueue(_Job(kind, interaction.channel, interaction.user, interaction, interaction.message.id))

    def storing(self, channel_id: int) -> asyncio.Lock:
        """The lock to hold while storing a message of the channel (see `ChatService.reply(reserve=)`)."""
        return self._storing[channel_id]

    def claim_own_delete(self, message_id: int) -> bool:
        """True (once) if the bot deleted this message itself."""
        if message_id in self._own_deletes:
            self._own_deletes.discard(message_id)
            return True
        return False

    async def delete_messages(self, channel: ReplyChannel, message_ids: Sequence[int]) -> None:
        """Delete the bot's own messages (the rest of a reply whose turn was removed)."""
        target = self._target(channel, [channel.get_partial_message(m) for m in message_ids])
        await target.discard()

    async def announce(self, channel: ReplyChannel, text: str) -> None:
        """Post a short notice in the channel (a missing permission there pauses its session)."""
        await self._notice(_Job("reply", channel, None), text)

    async def pause(self, channel: ReplyChannel, error: discord.Forbidden) -> None:
        """Pause the channel's session after Discord refused the bot there, and drop its waiting jobs.

        The other channels carry on; `/session start` resumes this one once the permissions are fixed.
        """
        dropped = list(self._jobs.get(channel.id, ()))
        if channel.id in self._jobs:
            self._jobs[channel.id].clear()
        guild = getattr(channel, "guild", None)
        where = f"channel {channel.id} (#{getattr(channel, 'name', '?')}, guild {guild.id if guild else None})"
        try:
            session = await self.service.repo.get_active_session(channel_key(channel.id))
            if session is not None and session.active:
                await self.service.repo.set_session_active(session.id, False)
        except Exception:
            log.exception("cannot pause the roleplay session of %s", where)
        log.warning("missing permissions in %s: %s; paused its roleplay session until /session start", where, error)
        for job in dropped:
            if job.interaction is not None:
                await self.tell(job.interaction, PAUSED_NOTICE)

    async def tell(self, interaction: discord.Interaction, text: str) -> None:
        """Send `text` to the clicker only, whether or not the click was answered already."""
        try:
            await send_error(interaction, text)
        except discord.HTTPException:
            log.exception("cannot answer an interaction (%s)", context_of(interaction.channel, interaction.user))

    async def stop_accepting(self) -> None:
        """Take no new work; drop the jobs that have not started (telling clickers why)."""
        self.closed = True
        dropped = [job for jobs in self._jobs.values() for job in jobs]
        for jobs in self._jobs.values():
            jobs.clear()
        for job in dropped:
            if job.interaction is not None:
                await self.tell(job.interaction, EngineClosed.user_message)

    async def drain(self, grace: float) -> None:
        """Wait for the running jobs to store what they produced; cancel them after `grace` seconds."""
        runners = set(self._runners.values())
        if not runners:
            return
        _, late = await asyncio.wait(runners, timeout=grace)
        for task in late:
            log.warning("%s did not finish within %.0fs of shutdown; cancelling it", task.get_name(), grace)
            task.cancel()
        if late:
            await asyncio.wait(late)

    # --- the queue --------------------------------------------------------------------------------

    def _enqueue(self, job: _Job) -> None:
        channel_id = job.channel.id
        self._jobs.setdefault(channel_id, deque()).append(job)
        if channel_id not in self._runners:
            self._runners[channel_id] = asyncio.get_running_loop().create_task(
                self._run_channel(channel_id), name=f"replies-{channel_id}"
            )

    async def _run_channel(self, channel_id: int) -> None:
        jobs = self._jobs[channel_id]
        try:
            while jobs:
                await self._run_job(jobs.popleft())
        finally:
            # No await between the last check and here, so no job can be queued behind our back.
            del self._runners[channel_id]
            if not jobs:
                del self._jobs[channel_id]

    async def _run_job(self, job: _Job) -> None:
        try:
            if job.kind == "reply":
                await self._reply(job)
            else:
                await self._rework(job)
        except ReplyDeleted:
            log.info("a reply in channel %s was deleted while being written; dropped it", job.channel.id)
        except discord.Forbidden as exc:
            await self.pause(job.channel, exc)
            if job.interaction is not None:
                await self.tell(job.interaction, PAUSED_NOTICE)
        except Exception as exc:
            if isinstance(exc, discord.HTTPException) and is_transient(exc):
                # The retries are spent: say so plainly instead of a generic apology.
                log.warning("%s gave up after repeated Discord errors (%s): %s", job.kind,
                            context_of(job.channel, job.user), exc)
                await self._notice(job, DISCORD_TROUBLE_NOTICE.format(status=exc.status))
                return
            log.exception("%s failed (%s)", job.kind, context_of(job.channel, job.user))
            await self._notice(job, FAILED_NOTICE)

    async def _notice(self, job: _Job, text: str) -> None:
        """Tell the channel (or, for a click, the clicker) about the outcome of a job."""
        if job.interaction is not None:
            await self.tell(job.interaction, text)
            return
        try:
            await job.channel.send(text)
        except discord.Forbidden as exc:
            await self.pause(job.channel, exc)
        except discord.HTTPException:
            log.exception("cannot post a notice (%s)", context_of(job.channel, job.user))

    # --- jobs -------------------------------------------------------------------------------------

    async def _reply(self, job: _Job) -> None:
        if self.closed:
            return
        repo = self.service.repo
        session = await repo.get_active_session(channel_key(job.channel.id))
        if session is None or not session.active:
            return
        refused: TavernError | None = None
        async with self.storing(job.channel.id):
            recent = await repo.recent_turns(session.id, RECENT_LOOKBACK)
            if not recent or recent[-1].role is not Role.USER:
                return  # everything said was answered already (merged requests, deleted messages)
            previous = next((t.message_ids[-1] for t in reversed(recent) if t.role is Role.MODEL and t.message_ids),
                            None)
            try:
                stream = await self.service.reply(session, reserve=True)
            except TavernError as exc:
                refused = exc
        if refused is not None:
            await self._notice(job, refused.user_message)
            return
        saved = False
        try:
            saved = await self._write_reply(job, stream, previous)
        finally:
            stream.cancel()
            if not saved and stream.into is not None:
                await repo.delete_turn(stream.into.id)  # nothing of the reply is shown or kept

    async def _write_reply(self, job: _Job, stream: ReplyStream, previous: int | None) -> bool:
        """Show and store a new reply; True once it is stored."""
        target = self._target(job.channel)
        if stream.into is not None:
            # Each message is mapped to the reserved turn as soon as it is posted: after a crash the
            # restarted bot can then find the half-written reply and take it down (`bot.discord_front.recovery`).
            target.on_post = partial(self._record_part, stream.into.id, job.channel.id)
        try:
            text = await self._pump(job.channel, stream, target)
        except (TavernError, PromptTooLarge, MessageTooLarge) as exc:
            kept = await self._keep_partial(stream, target)
            await self._notice(job, describe_error(exc))
            if kept and previous is not None:
                await self._remove_buttons(job.channel, previous)
            return kept
        if not text:
            await target.discard()
            await self._notice(job, self._empty_notice(stream))
            return False
        await target.finish(text, self._buttons())
        await stream.save(target.ids)
        await self._after(job, stream)
        if previous is not None:
            await self._remove_buttons(job.channel, previous)
        return True

    async def _record_part(self, turn_id: int, channel_id: int, message_id: int) -> None:
        try:
            await self.service.repo.add_turn_messages(turn_id, [message_id])
        except Exception as exc:
            # Not fatal: `save()` maps every message of the reply again when it is stored.
            log.warning("cannot map message %s to its reply in channel %s yet: %s", message_id, channel_id, exc)

    async def _rework(self, job: _Job) -> None:
        checked = await self._latest_reply(job.channel.id, job.message_id or 0, job.kind)
        if isinstance(checked, str):
            await self._notice(job, checked)
            return
        session, turn = checked
        target = self._target(
            job.channel, [job.channel.get_partial_message(m) for m in turn.message_ids], split_message(turn.content)
        )
        try:
            if job.kind == "regenerate":
                stream = await self.service.regenerate(session, turn)
            else:
                stream = await self.service.continue_reply(session, turn)
        except TavernError as exc:
            await self._notice(job, exc.user_message)
            return
        try:
            text = await self._pump(job.channel, stream, target)
        except (TavernError, PromptTooLarge, MessageTooLarge) as exc:
            await target.finish(turn.content, self._buttons())
            await self._notice(job, describe_error(exc))
            return
        finally:
            stream.cancel()
        if job.kind == "regenerate":
            if not text:
                await target.finish(turn.content, self._buttons())
                await self._notice(job, self._empty_notice(stream) if stream.interrupted else NOTHING_NEW_NOTICE)
                return
            await target.finish(text, self._buttons())
            await stream.save(target.ids)
        else:
            await target.finish(text or turn.content, self._buttons())
            if not stream.raw.strip():
                await self._notice(job, NOTHING_TO_ADD_NOTICE)
                return
            await stream.save(target.ids)
        await self._after(job, stream)

    # --- rendering --------------------------------------------------------------------------------

    def _target(
        self,
        channel: ReplyChannel,
        messages: Sequence[discord.Message | discord.PartialMessage] = (),
        shown: Sequence[str] | None = None,
    ) -> ReplyMessages:
        return ReplyMessages(channel, self._own_deletes, messages=messages,
                             shown=[""] * len(messages) if shown is None else shown, retry_delays=self.retry_delays)

    async def _pump(self, channel: ReplyChannel, stream: ReplyStream, target: ReplyMessages) -> str:
        """Stream into `target`, editing at most about once per `edit_interval`; return the final text."""
        notice = QueueNotice(channel, self._own_deletes)
        next_edit = 0.0
        failures = 0
        try:
            async with typing_in(channel):
                async for chunk in stream:
                    if isinstance(chunk, Queued):
                        await notice.show(chunk.position)
                    elif isinstance(chunk, Started):
                        await notice.remove()
                    elif isinstance(chunk, Text) and time.perf_counter() >= next_edit:
                        try:
                            await target.show(stream.text)
                            failures = 0
                        except ReplyDeleted:
                            raise
                        except Exception as exc:
                            if not is_transient(exc):
                                raise
                            failures += 1
                            log.info("skipped a streaming edit in channel %s: %s", channel.id, exc)
                        # Back off after failed edits: a rate limit only gets worse when pushed.
                        pause = min(self.edit_interval * 2**failures, max(self.edit_interval, MAX_EDIT_BACKOFF))
                        next_edit = time.perf_counter() + pause
        finally:
            await notice.remove()
        return stream.text

    async def _keep_partial(self, stream: ReplyStream, target: ReplyMessages) -> bool:
        """After a failure mid-reply, keep what was shown (stored as interrupted) or remove it."""
        text = stream.text
        if text and target.messages:
            await target.finish(text, self._buttons())
            await stream.save(target.ids)
            return True
        await target.discard()
        return False

    def _empty_notice(self, stream: ReplyStream) -> str:
        if stream.interrupted:
            return EngineClosed.user_message if self.closed else CANCELLED_NOTICE
        return EMPTY_NOTICE

    async def _after(self, job: _Job, stream: ReplyStream) -> None:
        if stream.stats is not None and stream.stats.stop_reason == "timeout":
            await self._notice(job, TIMEOUT_NOTICE)

    # --- latest reply and its buttons -------------------------------------------------------------

    def _buttons(self) -> ReplyButtons:
        """The buttons for a reply, as a finished view: discord.py then sends its components without
        keeping a copy per message (which would never be freed); the view registered at start
        (`TavernBot.setup_hook`) answers every click."""
        view = ReplyButtons(self)
        view.stop()
        return view

    async def _remove_buttons(self, channel: ReplyChannel, message_id: int) -> None:
        """Take the buttons off the previous reply (a new one was posted)."""
        edit = partial(channel.get_partial_message(message_id).edit, view=None)
        try:
            await with_retries(edit, self.retry_delays, channel.id)
        except discord.NotFound:
            pass  # the old reply is gone, and its buttons with it
        except discord.HTTPException as exc:
            log.warning("cannot remove the buttons of message %s in channel %s: %s", message_id, channel.id, exc)

    async def _latest_reply(
        self, channel_id: int, message_id: int, kind: JobKind
    ) -> tuple[ChannelSession, Turn] | str:
        """The session and model turn of a clicked reply, or why it cannot be reworked."""
        repo = self.service.repo
        turn = await repo.turn_by_message(message_id)
        session = await repo.get_active_session(channel_key(channel_id))
        if turn is None or session is None or not session.active or turn.session_id != session.id:
            return NOT_IN_SESSION
        latest = await repo.latest_turn(session.id)
        if turn.role is not Role.MODEL or latest is None or latest.id != turn.id:
            return NOT_LATEST.format(verb="regenerated" if kind == "regenerate" else "continued")
        return session, turn

    async def _refusal(self, interaction: discord.Interaction, kind: JobKind) -> str | None:
        if self.closed:
            return EngineClosed.user_message
        channel = interaction.channel
        if interaction.guild is None or interaction.message is None or not isinstance(channel, ReplyChannel):
            return NOT_IN_SESSION
        permissions = interaction.permissions
        in_thread = isinstance(channel, discord.Thread)
        if not (permissions.send_messages_in_threads if in_thread else permissions.send_messages):
            return CANNOT_TALK
        checked = await self._latest_reply(channel.id, interaction.message.id, kind)
        return checked if isinstance(checked, str) else None
