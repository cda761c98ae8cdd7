"""The reply flow: one job queue per channel, and what each job (reply, regenerate, continue) does.

Every channel has a small job queue worked by one task. A new message is stored at once (by the
roleplay cog) and asks for a reply; Regenerate and Continue clicks rework the latest reply. Requests
for a reply that arrive while one is waiting are merged into it: everything said meanwhile is
answered by the next reply, so a busy channel costs one generation per round, not one per message.
A reply waits `reply_delay` seconds after it is asked for before it reads the history, so a message
a proxy (PluralKit, Tupperbox) deletes and reposts through a webhook at once is answered once, as the
repost. A reply reserves its model turn when it reads the history (under the channel's storing lock),
so messages sent while it is written come after it in the history, as they do in the channel, and
the next reply sees them after it.

A reply is shown by posting a message at the first text and editing it about once per
`edit_interval` seconds (measured with `time.perf_counter`); the final edit carries the exact text
and the Regenerate/Continue buttons (`bot.discord_front.replies.render`, `.buttons`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import discord

from bot.core.characters import SessionStart
from bot.core.scene import Character, choose_speakers
from bot.core.sessions import ChatService, ReplyStream
from bot.discord_front.errors import send_error
from bot.discord_front.keys import channel_key
from bot.discord_front.replies.buttons import SLOW_DOWN, JobKind, PressCooldown, ReplyButtons
from bot.discord_front.replies.render import (
    LOADING_NOTICE,
    QUEUE_NOTICE,
    BotPoster,
    MessageLost,
    Poster,
    QueueNotice,
    ReplyChannel,
    ReplyDeleted,
    ReplyMessages,
    context_of,
    is_transient,
    typing_in,
)
from bot.errors import EngineClosed, TavernError
from bot.inference.api import Queued, Started, Text, Waiting
from bot.prompt.builder import MessageTooLarge, PromptTooLarge
from persistence.records import ChannelSession, Role, Turn

if TYPE_CHECKING:
    from bot.discord_front.webhooks import CharacterVoices

log = logging.getLogger(__name__)

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


def describe_error(error: BaseException) -> str:
    """The short text shown for an expected failure of a reply."""
    if isinstance(error, TavernError):
        return error.user_message
    return f"I can't reply: {error}"


# --- the per-channel queue ------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    kind: JobKind
    channel: ReplyChannel
    user: discord.abc.User | None
    interaction: discord.Interaction | None = None
    message_id: int | None = None
    # Event-loop time before which a reply does not read the history (see `reply_delay`).
    not_before: float = field(default=0.0)
    # The character whose message the newest one replies to (it answers), or who is asked to speak.
    replied_to: int | None = None
    character: Character | None = None
    turn_id: int | None = None  # the greeting to post


class ChannelReplies:
    """Writes replies into Discord channels: one job at a time per channel, all through one renderer."""

    def __init__(
        self,
        service: ChatService,
        *,
        edit_interval: float = 1.0,
        queue_limit: int = 4,
        reply_delay: float = 0.0,
    ) -> None:
        self.service = service
        self.edit_interval = edit_interval
        self.queue_limit = queue_limit
        self.reply_delay = reply_delay
        # Per-member limit on Regenerate/Continue presses.
        self.presses = PressCooldown()
        self.closed = False
        self._jobs: dict[int, deque[_Job]] = {}
        self._runners: dict[int, asyncio.Task[None]] = {}
        # Held while a channel's message is stored and while a reply reads its history and reserves its
        # turn, so every message is either in a reply's prompt or stored after that reply.
        self._storing: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Messages the bot deletes itself (queue notices, surplus parts): their delete events are not
        # a user removing a turn.
        self._own_deletes: set[int] = set()
        # Characters speaking through webhooks: without `voices` replies are posted by the bot as itself.
        self.voices: CharacterVoices | None = None
        self.rng = random.Random()  # talkativeness rolls

    # --- entry points -----------------------------------------------------------------------------

    def request_reply(
        self, channel: ReplyChannel, user: discord.abc.User | None, *, replied_to: int | None = None
    ) -> None:
        """Ask for a reply to everything stored so far (merged into a reply already waiting).

        `replied_to` is the character whose message the newest one replies to: it then answers.
        """
        if self.closed:
            return
        for job in self._jobs.get(channel.id, ()):
            if job.kind == "reply":
                job.user, job.replied_to = user, replied_to
                return
        not_before = asyncio.get_running_loop().time() + self.reply_delay if self.reply_delay > 0 else 0.0
        self._enqueue(_Job("reply", channel, user, not_before=not_before, replied_to=replied_to))

    async def after_start(self, channel: object, started: SessionStart) -> None:
        """Post the greeting a session start stored, if any."""
        if started.greeting is not None and isinstance(channel, ReplyChannel):
            self.post_greeting(channel, started.greeting)

    def post_greeting(self, channel: ReplyChannel, turn_id: int) -> None:
        """Queue the posting of a stored greeting (a character's first message) behind the channel's jobs."""
        if not self.closed:
            self._enqueue(_Job("greeting", channel, None, turn_id=turn_id))

    async def on_speak(self, interaction: discord.Interaction, character: Character) -> None:
        """`/character speak`: queue a reply by `character` (the press limit of the buttons applies)."""
        channel = interaction.channel
        refusal = EngineClosed.user_message if self.closed else None
        if refusal is None and not isinstance(channel, ReplyChannel):
            refusal = NOT_IN_SESSION
        elif refusal is None:
            in_thread = isinstance(channel, discord.Thread)
            permissions = interaction.permissions
            if not (permissions.send_messages_in_threads if in_thread else permissions.send_messages):
                refusal = CANNOT_TALK
            elif len(self._jobs.get(channel.id, ())) >= self.queue_limit:
                refusal = CHANNEL_BUSY
            elif (limited := self.presses.check(interaction)) is not None:
                refusal = SLOW_DOWN.format(wait=max(1.0, limited[0]))
        if refusal is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        assert isinstance(channel, ReplyChannel)
        await interaction.response.send_message(f"{discord.utils.escape_markdown(character.name)} will speak.",
                                                ephemeral=True)
        self._enqueue(_Job("speak", channel, interaction.user, character=character))

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
        if not message_ids:
            return
        poster = await self._poster_of(channel, message_ids, deleting=True)
        if poster is not None:
            await self._target(poster, message_ids).discard()

    async def poster_for(self, channel: ReplyChannel, character: Character | None) -> Poster:
        """Who posts a new reply in `channel`: the character's webhook, or the bot (naming a stored
        character in bold when it cannot use a webhook there)."""
        if character is None or character.id is None:
            return BotPoster(channel)
        if self.voices is None:
            return BotPoster(channel, character.name)
        return await self.voices.poster(channel, character)  # type: ignore[arg-type]

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
        except (discord.HTTPException, discord.RateLimited):
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
            if job.kind in ("reply", "speak"):
                await self._reply(job)
            elif job.kind == "greeting":
                await self._greet(job)
            elif job.kind in ("swipe_prev", "swipe_next"):
                await self._swipe(job)
            else:
                await self._rework(job)
        except ReplyDeleted:
            log.info("a reply in channel %s was deleted while being written; dropped it", job.channel.id)
        except discord.Forbidden as exc:
            await self.pause(job.channel, exc)
            if job.interaction is not None:
                await self.tell(job.interaction, PAUSED_NOTICE)
        except Exception as exc:
            if isinstance(exc, discord.HTTPException | discord.RateLimited) and is_transient(exc):
                # discord.py's retries are spent: say so plainly instead of a generic apology.
                log.warning("%s gave up after repeated Discord errors (%s): %s", job.kind,
                            context_of(job.channel, job.user), exc)
                status = exc.status if isinstance(exc, discord.HTTPException) else 429
                await self._notice(job, DISCORD_TROUBLE_NOTICE.format(status=status))
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
        except (discord.HTTPException, discord.RateLimited):
            log.exception("cannot post a notice (%s)", context_of(job.channel, job.user))

    # --- jobs -------------------------------------------------------------------------------------

    async def _reply(self, job: _Job) -> None:
        if self.closed:
            return
        wait = job.not_before - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)  # messages (and proxy reposts) arriving meanwhile join this reply
            if self.closed:
                return
        repo = self.service.repo
        session = await repo.get_active_session(channel_key(job.channel.id))
        if session is None or not session.active:
            return
        async with self.storing(job.channel.id):
            recent = await repo.recent_turns(session.id, RECENT_LOOKBACK)
            if job.kind == "reply" and (not recent or recent[-1].role is not Role.USER):
                return  # everything said was answered already (merged requests, deleted messages)
            if job.character is not None:
                speakers = [job.character]
            else:
                speakers = choose_speakers(
                    await self.service.cast(session), recent[-1].content, replied_to=job.replied_to,
                    limit=self.service.settings.characters.max_speakers, rng=self.rng,
                )
        previous = next((t.message_ids[-1] for t in reversed(recent) if t.role is Role.MODEL and t.message_ids),
                        None)
        # Each chosen character answers the same message in turn; none answers another's reply.
        for speaker in speakers:
            if self.closed:
                return
            posted = await self._speak(job, session, speaker, previous)
            if posted is None:
                return
            previous = posted

    async def _speak(self, job: _Job, session: ChannelSession, speaker: Character, previous: int | None) -> int | None:
        """One character's reply: reserve its turn, stream, store; the id of its last message (None: stop)."""
        repo = self.service.repo
        refused: TavernError | None = None
        async with self.storing(job.channel.id):
            try:
                stream = await self.service.reply(session, reserve=True, speaker=speaker)
            except TavernError as exc:
                refused = exc
        if refused is not None:
            await self._notice(job, refused.user_message)
            return None
        posted: int | None = None
        try:
            posted = await self._write_reply(job, stream, previous)
        finally:
            stream.cancel()
            if posted is None and stream.into is not None:
                await repo.delete_turn(stream.into.id)  # nothing of the reply is shown or kept
        return posted

    async def _write_reply(self, job: _Job, stream: ReplyStream, previous: int | None) -> int | None:
        """Show and store a new reply; the id of its last message once it is stored, else None."""
        target = self._target(await self.poster_for(job.channel, stream.character))
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
            return target.ids[-1] if kept and target.ids else None
        if not text:
            await target.discard()
            await self._notice(job, self._empty_notice(stream))
            return None
        await target.finish(text, self._buttons())
        await stream.save(target.ids)
        await self._after(job, stream)
        if previous is not None:
            await self._remove_buttons(job.channel, previous)
        return target.ids[-1] if target.ids else None

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
        try:
            if job.kind == "regenerate":
                stream = await self.service.regenerate(session, turn)
            else:
                stream = await self.service.continue_reply(session, turn)
        except TavernError as exc:
            await self._notice(job, exc.user_message)
            return
        target = await self._rework_target(job, turn, stream.character)
        shown = self._buttons(turn)
        try:
            text = await self._pump(job.channel, stream, target)
        except (TavernError, PromptTooLarge, MessageTooLarge) as exc:
            await target.finish(turn.content, shown)
            await self._notice(job, describe_error(exc))
            return
        finally:
            stream.cancel()
        if job.kind == "regenerate":
            if not text:
                await target.finish(turn.content, shown)
                await self._notice(job, self._empty_notice(stream) if stream.interrupted else NOTHING_NEW_NOTICE)
                return
            versions = max(turn.swipe_count, 1) + 1  # the new text becomes the last version, shown
            await target.finish(text, self._buttons(swipe=(versions - 1, versions)))
            await stream.save(target.ids)
        else:
            await target.finish(text or turn.content, shown)
            if not stream.raw.strip():
                await self._notice(job, NOTHING_TO_ADD_NOTICE)
                return
            await stream.save(target.ids)
        await self._after(job, stream)

    async def _greet(self, job: _Job) -> None:
        """Post a stored greeting as the main character, with its alternate greetings as swipes."""
        repo = self.service.repo
        session = await repo.get_active_session(channel_key(job.channel.id))
        if session is None or not session.active:
            return
        turn = await repo.latest_turn(session.id)
        if turn is None or turn.id != job.turn_id or turn.message_ids:
            return  # talked over, reset or posted already
        cast = await self.service.cast(session)
        target = self._target(await self.poster_for(job.channel, cast[0]))
        await target.finish(turn.content, self._buttons(turn))
        if target.ids:
            await repo.add_turn_messages(turn.id, target.ids)

    async def _swipe(self, job: _Job) -> None:
        """◀ / ▶: show the previous or next stored version of the latest reply; the history holds that one."""
        checked = await self._latest_reply(job.channel.id, job.message_id or 0, job.kind)
        if isinstance(checked, str):
            await self._notice(job, checked)
            return
        session, turn = checked
        number = turn.swipe + (1 if job.kind == "swipe_next" else -1)
        chosen = await self.service.repo.select_swipe(turn.id, number) if 0 <= number < turn.swipe_count else None
        if chosen is None:
            return  # at either end: nothing to show (the button is disabled there)
        cast = await self.service.cast(session)
        target = await self._rework_target(job, turn, self.service.speaker_of(cast, turn))
        await target.finish(chosen.content, self._buttons(chosen))
        new_ids = [m for m in target.ids if m not in chosen.message_ids]
        if new_ids:
            await self.service.repo.add_turn_messages(chosen.id, new_ids)

    # --- rendering --------------------------------------------------------------------------------

    def _target(self, poster: Poster, message_ids: Sequence[int] = (), text: str | None = None) -> ReplyMessages:
        return ReplyMessages(poster, self._own_deletes, message_ids=message_ids, text=text)

    async def _rework_target(self, job: _Job, turn: Turn, character: Character | None) -> ReplyMessages:
        """The messages of a reply to rework, through the poster of their author (the clicked message's).

        Messages no poster can change any more (their webhook is gone) are left; the reply is posted anew.
        """
        clicked = job.interaction.message if job.interaction is not None else None
        poster: Poster | None = BotPoster(job.channel)
        if self.voices is not None and clicked is not None:
            poster = await self.voices.poster_of(job.channel, clicked, character)
        if poster is None:
            return self._target(await self.poster_for(job.channel, character))
        return self._target(poster, turn.message_ids, turn.content)

    async def _poster_of(
        self, channel: ReplyChannel, message_ids: Sequence[int], *, deleting: bool = False
    ) -> Poster | None:
        """The poster that can change these messages of one reply (None if none can): the bot for its
        own, else the character webhook that posted them (read from the first one still there).

        `deleting`: messages whose webhook is gone (deleted while the bot was away, or out of reach
        without Manage Webhooks) are deleted by the bot as itself, which Manage Messages allows.
        """
        if self.voices is None:
            return BotPoster(channel)
        for message_id in message_ids:
            try:
                message = await channel.fetch_message(message_id)
            except discord.NotFound:
                continue
            except (discord.HTTPException, discord.RateLimited) as exc:
                log.warning("cannot read message %s in channel %s to change it: %s", message_id, channel.id, exc)
                return None
            poster = await self.voices.poster_of(channel, message, None)
            return BotPoster(channel) if poster is None and deleting else poster
        return None

    async def _pump(self, channel: ReplyChannel, stream: ReplyStream, target: ReplyMessages) -> str:
        """Stream into `target`, editing at most about once per `edit_interval`; return the final text."""
        notice = QueueNotice(channel, self._own_deletes)
        next_edit = 0.0
        failures = 0
        try:
            async with typing_in(channel):
                async for chunk in stream:
                    if isinstance(chunk, Text) and notice.message is not None:
                        await notice.remove()  # the model was loading: its text has come
                    if isinstance(chunk, Queued):
                        await notice.show(QUEUE_NOTICE.format(position=chunk.position))
                    elif isinstance(chunk, Waiting):
                        await notice.show(LOADING_NOTICE)
                    elif isinstance(chunk, Started):
                        await notice.remove()
                    elif isinstance(chunk, Text) and time.perf_counter() >= next_edit:
                        if not target.ids and not stream.text:
                            continue  # nothing to show yet (a name being echoed): do not wait to show it
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
        if text and target.ids:
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

    def _buttons(self, turn: Turn | None = None, *, swipe: tuple[int, int] | None = None) -> ReplyButtons:
        """The buttons for a reply (◀ n/m ▶ when `turn` has several versions, or as `swipe` says), as a
        finished view: discord.py then sends its components without keeping a copy per message (which
        would never be freed); the view registered at start (`TavernBot.setup_hook`) answers every click."""
        if swipe is None and turn is not None and turn.swipe_count > 1:
            swipe = (turn.swipe, turn.swipe_count)
        view = ReplyButtons(self, swipe)
        view.stop()
        return view

    async def _remove_buttons(self, channel: ReplyChannel, message_id: int) -> None:
        """Take the buttons off the previous reply (a new one was posted), through the poster of its author
        (only a webhook can edit its own messages)."""
        poster = await self._poster_of(channel, [message_id])
        if poster is None:
            return
        try:
            await poster.edit(message_id, view=None)
        except (discord.NotFound, MessageLost):
            pass  # the old reply is gone, or its webhook: its buttons cannot be changed
        except (discord.HTTPException, discord.RateLimited) as exc:
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
            verbs = {"regenerate": "regenerated", "continue": "continued"}
            return NOT_LATEST.format(verb=verbs.get(kind, "swiped"))
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
