"""Coming back after a crash or an outage: answer what was left hanging, once.

Two things can leave a roleplay channel without an answer when the bot starts again:

- A crash mid-reply. A reply reserves its model turn (empty, pending) when it starts and maps each
  message it posts to that turn at once (see `ChatService.reply(reserve=True)` and
  `bot.discord_front.replies`); the text is only stored when the reply is done. After a crash the turn is
  still reserved: nothing half-written is ever stored as a reply. `scan` finds such turns in
  `setup_hook`, before any event is handled, so a reply this process starts is never mistaken for
  one. On the first `on_ready` the half-written messages are deleted, the reserved turn is dropped,
  and, if the crash was at most `discord.recovery_max_age_seconds` ago, the message it was answering
  gets a fresh reply or a short notice (`discord.after_crash`). Only a reserved turn proves a crash:
  a channel whose newest turn is a user turn for any other reason (its reply was refused with a notice:
  queue full, message too large, empty reply) is left alone.
- Messages sent while the bot was away. On every `on_ready` (a restart, or a reconnect with a new
  gateway session) each active channel's history is read back, at most `discord.catch_up_limit`
  messages, newest first. Messages newer than the newest one stored for the session are stored in
  order and answered by one reply, or left alone when `discord.catch_up` is "skip". Message ids are
  unique in the store and the channel's storing lock is held throughout, so nothing is stored or
  answered twice, however often `on_ready` fires.

A sharded bot does both for the guilds of its own shards only (other processes run the rest over
the same database), shard by shard as each becomes ready (`on_shard_ready`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import discord

from bot.config import DiscordSettings
from bot.core.sessions import ChatService
from bot.discord_front.intake import Intake
from bot.discord_front.keys import channel_id_of
from bot.discord_front.replies import ChannelReplies, ReplyChannel
from persistence.errors import DuplicateMessage
from persistence.records import ChannelSession, Role, Turn, TurnStatus

log = logging.getLogger(__name__)

CRASH_NOTICE = "*I was restarted before I could finish my reply. Say something to carry on.*"
# Meta key of the newest user turn a crash notice was posted for: one notice per unanswered turn.
NOTICE_KEY = "recovery.crash_notice.{session_id}"
# Newest turns read per session to find a reply cut short by a crash.
SCAN_TURNS = 16

ChannelLookup = Callable[[int], object]
# Picks guilds by id (None: direct messages).
GuildFilter = Callable[[int | None], bool]


def is_reserved_leftover(turn: Turn) -> bool:
    """True for a model turn reserved by a reply that never stored its text (the one crash predicate)."""
    return turn.status is TurnStatus.PENDING


@dataclass(frozen=True, slots=True)
class CrashLeftover:
    """What a crash left in one session: reserved turns to drop, and the message left unanswered."""

    session: ChannelSession
    reserved: tuple[Turn, ...]
    unanswered: Turn | None


class Recovery:
    """Crash recovery (once per process) and catch-up (on every `on_ready`) for Discord channels."""

    def __init__(
        self,
        service: ChatService,
        replies: ChannelReplies,
        intake: Intake,
        settings: DiscordSettings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        owns: GuildFilter = lambda _guild_id: True,
    ) -> None:
        self.service = service
        self.replies = replies
        self.intake = intake
        self.settings = settings
        self._clock = clock
        self._owns = owns
        self._leftovers: dict[int, CrashLeftover] | None = None
        self._lock = asyncio.Lock()

    async def scan(self) -> None:
        """Note what a previous process left unanswered. Call before any event is handled; runs once."""
        if self._leftovers is not None:
            return
        self._leftovers = {}
        oldest = self._clock() - timedelta(seconds=self.settings.recovery_max_age_seconds)
        for session in await self._own_sessions():
            channel_id = channel_id_of(session.channel_key)
            if channel_id is None:
                continue
            try:
                leftover = await self._scan_session(session, oldest)
            except Exception:
                log.exception("cannot check channel %s (session %s) for a reply cut short; checking the others",
                              channel_id, session.id)
                continue
            if leftover is not None:
                self._leftovers[channel_id] = leftover
        if self._leftovers:
            log.info("%d channel(s) were left unanswered by the previous run", len(self._leftovers))

    async def _scan_session(self, session: ChannelSession, oldest: datetime) -> CrashLeftover | None:
        """The crash leftover of one session: its reserved turns, and the user turn the newest of them
        was answering if the crash was after `oldest`."""
        turns = await self.service.repo.recent_turns(session.id, SCAN_TURNS)
        reserved = tuple(t for t in turns if is_reserved_leftover(t))
        if not reserved:
            return None
        rest = [t for t in turns if not is_reserved_leftover(t)]
        unanswered = rest[-1] if rest and rest[-1].role is Role.USER else None
        if reserved[-1].created_at < oldest:
            log.info("a reply in session %s was cut short at %s, too long ago to answer now",
                     session.id, reserved[-1].created_at.isoformat(timespec="seconds"))
            unanswered = None
        return CrashLeftover(session, reserved, unanswered)

    async def resume(self, get_channel: ChannelLookup, guilds: GuildFilter = lambda _guild_id: True) -> None:
        """After READY (of the shard whose guilds `guilds` picks): clear crash leftovers (once each),
        catch up on missed messages, answer."""
        async with self._lock:
            if self._leftovers is None:
                await self.scan()
            assert self._leftovers is not None
            for session in await self._own_sessions():
                channel_id = channel_id_of(session.channel_key)
                if channel_id is None or not guilds(session.guild_id):
                    continue
                channel = get_channel(channel_id)
                if not isinstance(channel, ReplyChannel):
                    log.debug("channel %s of session %s is not reachable", channel_id, session.id)
                    if channel_id in self._leftovers:  # kept: a later READY may bring the channel
                        log.warning("channel %s was left unanswered by the last run but is not reachable now",
                                    channel_id)
                    continue
                leftover = self._leftovers.pop(channel_id, None)
                try:
                    await self._resume_channel(channel, session, leftover)
                except Exception:
                    log.exception("cannot resume roleplay in channel %s (session %s)", channel_id, session.id)

    async def _own_sessions(self) -> list[ChannelSession]:
        """The active sessions of the guilds this process runs (all, unless the bot is sharded)."""
        return [s for s in await self.service.repo.list_active_sessions() if self._owns(s.guild_id)]

    async def _resume_channel(
        self, channel: ReplyChannel, session: ChannelSession, leftover: CrashLeftover | None
    ) -> None:
        repo = self.service.repo
        async with self.replies.storing(channel.id):
            if leftover is not None:
                for turn in leftover.reserved:
                    if turn.message_ids:
                        await self.replies.delete_messages(channel, turn.message_ids)
                    await repo.delete_turn(turn.id)
                    log.info("dropped a reply cut short by a crash in channel %s (turn %s, %d message(s))",
                             channel.id, turn.id, len(turn.message_ids))
            caught = await self._catch_up(channel, session)
            latest = await repo.latest_turn(session.id)
        if caught:
            self.replies.request_reply(channel, None)  # one reply answers the missed messages (and any crash)
            return
        if leftover is None or leftover.unanswered is None or latest is None or latest.id != leftover.unanswered.id:
            return  # answered meanwhile, or a live message has started a new reply
        if self.settings.after_crash == "reply":
            log.info("answering the message a crash left unanswered in channel %s", channel.id)
            self.replies.request_reply(channel, None)
            return
        key = NOTICE_KEY.format(session_id=session.id)
        if await repo.get_meta(key) == str(latest.id):
            return  # told already (an earlier restart)
        await self.replies.announce(channel, CRASH_NOTICE)
        await repo.set_meta(key, str(latest.id))

    async def _catch_up(self, channel: ReplyChannel, session: ChannelSession) -> int:
        """Store the messages sent since the newest stored one (oldest first); return how many."""
        if self.settings.catch_up == "skip":
            return 0
        repo = self.service.repo
        newest = await repo.newest_message_id(session.id)
        if newest is None:
            if session.created_at is None:
                return 0
            newest = discord.utils.time_snowflake(session.created_at)
        missed: list[discord.Message] = []
        try:
            async for message in channel.history(limit=self.settings.catch_up_limit):
                if message.id <= newest:
                    break
                missed.append(message)
        except discord.HTTPException as exc:
            log.warning("cannot read the history of channel %s to catch up: %s", channel.id, exc)
            return 0
        stored = 0
        for message in reversed(missed):
            parsed = self.intake.take(message, session)
            if parsed is None:
                continue
            speaker, text = parsed
            try:
                await self.service.add_user_turn(session, speaker, text, message_id=message.id)
            except DuplicateMessage:
                continue
            stored += 1
        if stored:
            log.info("caught up on %d message(s) sent while away in channel %s", stored, channel.id)
        return stored
