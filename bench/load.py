"""Load test: many roleplay channels hit by a burst of messages, through SimCord, the real bot and SQLite.

    python -m bench.load [--engine fake|model] [--model PATH] [--channels 20] [--messages 10]
                         [--soak-rounds N] [--join poll|settle] [--trace-memory] [--json PATH]

Every channel has an active session and a few members. A round sends `--messages` messages into every
channel at once (round-robin over the channels), then waits until the bot has nothing left to do.
The first round is the burst; `--soak-rounds` more rounds follow, with resident memory read after each.
The fake engine replies with 22 one-byte tokens at `--token-delay` seconds each, so replies overlap
as they do on a model; `--engine model` runs llama.cpp (the demo model unless `--model`) with
n_ctx 1024, 24 new tokens, on the engine `bot.app.model_engine` picks (by default the batched one:
2 sequences of one context computing with all cores).

How the burst is made: a SimCord actor (`member.send`) settles before it returns, i.e. it waits for
the whole reply, and actor calls cannot overlap. So the messages are created with SimCord's backend
(`env.backend.create_message`, which is not public API): each call stores the message in the channel
and emits its MESSAGE_CREATE at once, exactly what `member.send` does minus the permission check and
the settle. The bot sees all of them arrive together.

How a round waits for its replies (`--join`):
- `poll` (default): sleep in real time, checking every 20 ms whether every message is in the window
  of a finished generation, then `env.settle()` for the last edits and saves. The bot runs as it would
  in production. A plain settle is not used for the whole round because SimCord re-examines every
  pending task each time one of them finishes: with 200 handlers in flight that costs seconds of
  event-loop time, which would be measured as the bot's wait.
- `settle`: one `env.settle()` right after the burst, as the replay-based tests do. The busy event
  loop makes a stress test of its own.

Checked after every round, over the whole history (a failure is a violation):
- stored exactly once: every message is one user turn (by message id), nothing else is stored;
- order: each channel's user turns are in the order the messages were sent;
- answered exactly once: stored replies are complete and each follows new user turns; each reply's
  prompt window ends with exactly the user turns stored before it; no message is in the window of
  two stored replies; every message is in some reply's window (with the fake engine also: every
  message is in the newest user run of exactly one prompt the backend was given);
- the channel shows the stored replies and, for each empty generation, the "nothing to say" notice;
  nothing else from the bot is left (queue notices were removed);
- no channel starved: every channel had a reply generated in every round; nothing was logged as an
  error and the bot raised nothing.
A model may write nothing (the bot then posts the notice and keeps the messages unanswered until the
next one): such outcomes are listed as findings, not violations.

Measured: the wait from a message's arrival to the start of the generation that covers it (per
channel max and median), each round's time and replies, and resident memory (VmRSS) after setup,
before the soak and after it. `--trace-memory` also traces Python allocations during the soak and
says which packages hold the growth. The engine's `generate` and the chat service's `reply` are
wrapped on the running objects to timestamp each reply; nothing else in the bot is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import discord
import simcord

from bot.config import Settings
from bot.core.scene import Character
from bot.core.sessions import ChatService, ReplyStream
from bot.discord_front.client import TavernBot, create_bot
from bot.discord_front.keys import channel_key
from bot.discord_front.replies import EMPTY_NOTICE, split_message
from bot.inference.api import Chunk, Finished, GenerationRequest, Started, Text
from bot.inference.engine import Engine, Generation
from bot.inference.local.batched import batched_engine
from bot.inference.local.llama import llama_engine, state_cache
from bot.inference.local.state_cache import StateCache
from bot.prompt.builder import MODEL, USER, Conversation
from bot.prompt.stops import clean_reply
from persistence.database import Database
from persistence.records import ChannelSession, Role, Turn, TurnStatus
from tests.fake_backend import FakeBackend, fake_engine

EngineKind = Literal["fake", "model"]
JoinKind = Literal["poll", "settle"]

DEFAULT_JSON = Path(__file__).parent / "results" / "load.json"
PERSONA_NAME = "Mira"
PERSONA = (
    "Mira is the innkeeper of the Crooked Lantern: warm, quick-witted, and fond of answering questions "
    "with stories about her adventuring days."
)
MEMBER_NAMES = ("Alice", "Bob", "Chen", "Dara", "Emeka", "Freya")
LINES = (
    "I push open the door and shake the rain off my cloak.",
    "What is the special tonight, Mira?",
    "I slide a silver coin across the counter.",
    "Who owns the black horse outside?",
    "Have you heard about the missing caravan?",
    "That bard's song is terrible, isn't it?",
    "A mug of spiced cider, please.",
    "What does that map on the wall show?",
    "Is the north road safe these days?",
    "I sit down by the fire and wait.",
)
# Every message ends with a tag naming its round, channel and index, so it can be told apart anywhere.
_TAG = re.compile(r"\((r\d+ c\d+ m\d+)\)")
# Waiting for a round polls the probe this often; a round whose engine stays idle this long is over.
POLL_SECONDS = 0.02
IDLE_EXIT = 5.0
# How a generation ended when it raised instead of finishing.
_FINISHED = ("eos", "stop", "length")


# --- configuration and results --------------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    """What to run: sizes, engine, and how the bot is set up for it."""

    engine: EngineKind = "fake"
    model_path: str = ""
    channels: int = 20
    messages: int = 10
    soak_rounds: int = 10
    members: int = 4
    workers: int = 2
    threads: int = 0  # model.threads: all cores for the one batched context
    n_ctx: int = 1024
    max_new_tokens: int = 24
    seed: int = 7
    token_delay: float = 0.01  # fake engine: seconds per generated token
    edit_interval: float = 1.0  # the bot's default pause between streaming edits
    settle_timeout: float = 900.0
    join: JoinKind = "poll"  # how a round waits for its replies (see the module docstring)
    trace_memory: bool = False


@dataclass
class SentMessage:
    """A message of the load, as it was sent."""

    round: int
    channel_id: int
    message_id: int
    author: str
    content: str
    arrived: float  # time.perf_counter() when the gateway event was emitted

    @property
    def tag(self) -> str:
        """`rRR cCC mMM`, unique in the run."""
        found = _TAG.search(self.content)
        assert found is not None
        return found[1]


@dataclass
class ReplyRecord:
    """One generation the bot asked the engine for, with the user turns it answers."""

    channel_key: str
    round: int
    covered: tuple[str, ...]  # texts of the newest user turns of the prompt window, oldest first
    requested: float
    started: float | None = None
    finished: float | None = None
    stop_reason: str | None = None  # or the name of the exception it raised
    turn_id: int | None = None  # the model turn reserved for the reply
    text: str = ""  # what the engine streamed (already cut at stop strings)
    speakers: tuple[str, ...] = ()  # the names a reply is cut at, as the bot cuts it

    @property
    def empty(self) -> bool:
        """The model finished without writing anything the bot would keep."""
        return self.stop_reason in _FINISHED and not clean_reply(self.text, self.speakers)


@dataclass
class ChannelFigures:
    """One channel in one round."""

    channel: str
    messages: int
    stored: int
    replies: int  # stored replies
    empty: int  # generations that wrote nothing
    generations: int
    max_wait: float
    p50_wait: float


@dataclass
class RoundFigures:
    """One round of messages into every channel."""

    round: int
    messages: int
    replies: int
    empty: int
    seconds: float
    max_wait: float
    p50_wait: float
    rss_bytes: int
    python_blocks: int  # sys.getallocatedblocks(): Python objects alive, apart from native memory
    reply_views: int  # button views discord.py still keeps for reply messages
    state_cache_bytes: int | None  # saved channel states in RAM (model engine)
    simcord_records: int  # HTTP requests and gateway events SimCord has recorded so far
    channels: list[ChannelFigures] = field(default_factory=list)


@dataclass
class LoadReport:
    """Everything measured; `violations` is empty when every invariant holds."""

    engine: str
    model: str
    channels: int
    messages_per_channel: int
    workers: int
    join: str
    burst: RoundFigures
    soak: list[RoundFigures]
    rss_setup: int
    rss_soak_start: int
    rss_soak_end: int
    total_seconds: float
    total_messages: int
    total_replies: int
    total_empty: int
    soak_growth_by_package: dict[str, int]  # bytes of Python allocations gained over the soak (traced)
    violations: list[str]
    findings: list[str]

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON data."""
        return asdict(self)


# --- probes ---------------------------------------------------------------------------------------


def newest_user_texts(conversation: Conversation) -> tuple[str, ...]:
    """Texts of the user turns after the last model turn: what a reply to this window answers."""
    texts: list[str] = []
    for turn in reversed(conversation.turns):
        if turn.role != "user":
            break
        texts.append(turn.text)
    return tuple(reversed(texts))


def final_user_block(prompt: str) -> str:
    """The newest user run of a rendered prompt (the text between the last user and model markers)."""
    body = prompt.removesuffix(MODEL)
    return body.rsplit(MODEL, 1)[-1].rsplit(USER, 1)[-1]


class _TimedGeneration:
    """A Generation that notes when its worker started, what it wrote and how it ended."""

    def __init__(self, inner: Generation, record: ReplyRecord) -> None:
        self._inner = inner
        self._record = record

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            self._record.finished = time.perf_counter()
            self._record.stop_reason = type(exc).__name__
            raise
        if isinstance(chunk, Started) and self._record.started is None:
            self._record.started = time.perf_counter()
        elif isinstance(chunk, Text):
            self._record.text += chunk.text
        elif isinstance(chunk, Finished):
            self._record.finished = time.perf_counter()
            self._record.stop_reason = chunk.stats.stop_reason
        return chunk

    async def __aenter__(self) -> _TimedGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Cancel the wrapped generation."""
        self._inner.cancel()


class ReplyProbe:
    """Records every reply of a running bot: its window's newest user turns, its reserved turn, its times.

    Wraps `engine.generate` and `service.reply` on the objects themselves; the bot is otherwise untouched.
    """

    def __init__(self, service: ChatService) -> None:
        self.records: list[ReplyRecord] = []
        self.round = 0
        self._by_request: dict[int, ReplyRecord] = {}
        engine, generate, reply = service.engine, service.engine.generate, service.reply

        def timed_generate(request: GenerationRequest) -> Generation:
            generation = generate(request)
            # What the window covers and who speaks in it are filled in by `noted_reply`.
            record = ReplyRecord(request.key, self.round, (), time.perf_counter())
            self.records.append(record)
            self._by_request[id(request)] = record
            return _TimedGeneration(generation, record)  # type: ignore[return-value]

        async def noted_reply(
            session: ChannelSession, *, reserve: bool = False, speaker: Character | None = None
        ) -> ReplyStream:
            stream = await reply(session, reserve=reserve, speaker=speaker)
            record = self._by_request.pop(id(stream.request), None)
            if record is not None:
                record.covered = newest_user_texts(stream.conversation)
                record.speakers = stream.speakers
                if stream.into is not None:
                    record.turn_id = stream.into.id
            return stream

        engine.generate = timed_generate  # type: ignore[method-assign]
        service.reply = noted_reply  # type: ignore[method-assign]


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def logged_errors() -> Iterator[_ErrorLog]:
    """Collect every ERROR log record (the bot logs unexpected failures instead of raising them)."""
    handler = _ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS), after a full garbage collection."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reply_views(bot: TavernBot) -> int:
    """Message-bound entries in discord.py's view store (private state, read for the memory report)."""
    store = getattr(getattr(bot, "_connection", None), "_view_store", None)
    views = getattr(store, "_views", None)
    return sum(1 for key in views if key is not None) if isinstance(views, dict) else -1


def package_of(filename: str) -> str:
    """Who allocated: a project package, an installed distribution, or the standard library."""
    path = Path(filename)
    if "site-packages" in path.parts:
        return path.parts[path.parts.index("site-packages") + 1].removesuffix(".py")
    root = Path(__file__).resolve().parent.parent
    if path.is_relative_to(root):
        rest = path.relative_to(root)
        return rest.parts[0] if rest.parts[0] != "bot" else f"bot/{rest.name}"
    return "(stdlib)" if path.is_absolute() else "(generated)"


def growth_by_package(snapshot: tracemalloc.Snapshot) -> dict[str, int]:
    """Bytes still held per allocating package, largest first."""
    totals: Counter[str] = Counter()
    for stat in snapshot.statistics("filename"):
        totals[package_of(stat.traceback[0].filename)] += stat.size
    return dict(totals.most_common())


# --- the world ------------------------------------------------------------------------------------


@dataclass
class World:
    """The guild under load: channels with sessions, the members who talk in them."""

    guild: simcord.GuildHandle
    channels: list[simcord.ChannelHandle]
    members: list[simcord.MemberActor]


def load_settings(config: LoadConfig, db_url: str) -> Settings:
    """Settings for the load: nothing refused by queue limits or the per-member rate limit."""
    return Settings.model_validate({
        "model": {
            "n_ctx": config.n_ctx, "max_new_tokens": config.max_new_tokens, "workers": config.workers,
            "threads": config.threads, "seed": config.seed,
        },
        "engine": {"queue_size": 10000, "per_channel_queue": 100},
        "discord": {"cooldown_messages": 0},
        "database": {"url": db_url},
    })


def fake_reply(prompt: str) -> str:
    """A short reply naming the newest message it answers (22 bytes, one token each)."""
    tags = _TAG.findall(final_user_block(prompt))
    return f"Mira nods. ({tags[-1] if tags else '?'})"


def build_engine(config: LoadConfig, settings: Settings) -> tuple[Engine, FakeBackend | None, StateCache | None]:
    """An unstarted engine: a FakeBackend one with a per-token delay, or llama.cpp on `model_path`."""
    if config.engine == "fake":
        backend = FakeBackend(fake_reply, n_ctx=4096, token_delay=config.token_delay)
        engine = fake_engine(backend, workers=config.workers, queue_size=settings.engine.queue_size,
                             per_key_queue=settings.engine.per_channel_queue)
        return engine, backend, None
    if not config.model_path:
        raise ValueError("the model engine needs model_path")
    cache = state_cache(settings.cache)
    engine = (batched_engine if settings.model.batched else llama_engine)(settings, config.model_path, cache)
    return engine, None, cache


async def build_world(env: simcord.Env, bot: TavernBot, config: LoadConfig) -> World:
    """A guild with `config.channels` channels, each with an active session, and `config.members` members."""
    guild = env.create_guild("Load Tavern")
    gm = guild.create_role("GM", permissions=discord.Permissions(manage_guild=True))
    admin = guild.add_member(env.create_user("Admin"), roles=[gm])
    members = [guild.add_member(env.create_user(name)) for name in MEMBER_NAMES[: config.members]]
    await bot.repo.create_persona(guild.id, PERSONA_NAME, PERSONA)
    channels = [guild.create_text_channel(f"scene-{index:02d}") for index in range(config.channels)]
    for channel in channels:
        result = await admin.slash(channel, "session start", character=PERSONA_NAME)
        session = await bot.repo.get_active_session(channel_key(channel.id))
        if session is None or not session.active:
            response = result.response.content if result.response else None
            raise RuntimeError(f"/session start failed in #{channel.name}: {response!r}")
    return World(guild, channels, members)


def message_text(round_index: int, channel_number: int, index: int) -> str:
    """A roleplay line, unique in the run by its tag."""
    line = LINES[(channel_number * 3 + index + round_index) % len(LINES)]
    tag = f"r{round_index:02d} c{channel_number:02d} m{index:02d}"
    return f"{line} ({tag})"


def send_burst(env: simcord.Env, world: World, round_index: int, messages: int) -> list[SentMessage]:
    """Create `messages` messages in every channel at once, round-robin; nothing is settled."""
    sent: list[SentMessage] = []
    for index in range(messages):
        for number, channel in enumerate(world.channels):
            author = world.members[(number + index) % len(world.members)]
            content = message_text(round_index, number, index)
            arrived = time.perf_counter()
            # What `member.send` does, minus its settle: store the message and emit MESSAGE_CREATE.
            message = env.backend.create_message(channel.id, author.id, content)
            sent.append(SentMessage(round_index, channel.id, message.id, author.name, content, arrived))
    return sent


# --- checks ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the checks of one channel found."""

    violations: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


async def session_turns(bot: TavernBot, session: ChannelSession) -> list[Turn]:
    """Every turn of the session, oldest first."""
    turns: list[Turn] = []
    while page := await bot.repo.session_turns(session.id, after_id=turns[-1].id if turns else 0):
        turns.extend(page)
    return turns


def check_turns(name: str, turns: list[Turn], sent: list[SentMessage]) -> list[str]:
    """Stored exactly once and in send order; every stored reply is complete and follows new user turns."""
    problems: list[str] = []
    users = [t for t in turns if t.role is Role.USER]
    stored = Counter(m for t in users for m in t.message_ids)
    expected = [m.message_id for m in sent]
    for message in sent:
        if stored[message.message_id] != 1:
            problems.append(f"{name}: message {message.tag} stored {stored[message.message_id]} times")
    unknown = set(stored) - set(expected)
    if unknown:
        problems.append(f"{name}: {len(unknown)} stored user turns belong to no sent message")
    if any(len(t.message_ids) != 1 for t in users):
        problems.append(f"{name}: a user turn is mapped to other than one message")
    order = [t.message_ids[0] for t in users if t.message_ids]
    if order != expected and sorted(order) == sorted(expected):
        problems.append(f"{name}: user turns stored out of send order")
    new_turns = 0
    for turn in turns:
        if turn.role is Role.USER:
            new_turns += 1
        elif turn.role is Role.MODEL:
            if new_turns == 0:
                problems.append(f"{name}: reply turn {turn.id} answers no new message (double answer)")
            if turn.status is not TurnStatus.COMPLETE or not turn.content:
                problems.append(f"{name}: reply turn {turn.id} is {turn.status.value}, {len(turn.content)} chars")
            new_turns = 0
    return problems


def check_coverage(name: str, turns: list[Turn], sent: list[SentMessage], records: list[ReplyRecord]) -> Outcome:
    """Each reply's window ends with exactly the user turns stored before it; each message is answered once."""
    outcome = Outcome()
    by_turn = {r.turn_id: r for r in records if r.turn_id is not None}
    replies = {t.id for t in turns if t.role is Role.MODEL}
    group: list[str] = []
    for turn in turns:
        if turn.role is Role.USER:
            group.append(turn.content)
        elif turn.role is Role.MODEL:
            record = by_turn.get(turn.id)
            if record is None:
                outcome.violations.append(f"{name}: reply turn {turn.id} has no recorded generation")
            elif list(record.covered) != group:
                outcome.violations.append(
                    f"{name}: reply turn {turn.id} was written for the {len(record.covered)} newest messages "
                    f"but follows {len(group)}"
                )
            group = []
    answered = [r for r in records if r.turn_id in replies]
    for record in records:
        if record.turn_id not in replies and not record.empty:
            outcome.violations.append(
                f"{name}: a generation ({record.stop_reason}, {len(record.text)} chars) left no stored reply"
            )
    answers = Counter(text for r in answered for text in r.covered)
    windows = Counter(text for r in records for text in r.covered)
    for message in sent:
        if answers[message.content] > 1:
            outcome.violations.append(f"{name}: message {message.tag} answered by {answers[message.content]} replies")
        elif windows[message.content] == 0:
            outcome.violations.append(f"{name}: message {message.tag} was never in a reply's window")
    unanswered = [m for m in sent if answers[m.content] == 0 and windows[m.content] > 0]
    if unanswered:
        outcome.findings.append(
            f"{name}: {len(unanswered)} messages unanswered, every generation for them wrote nothing"
        )
    repeats = sum(1 for before, after in pairwise(records) if before.empty and after.covered == before.covered)
    if repeats:
        outcome.findings.append(f"{name}: {repeats} times the same window was generated again after an empty reply")
    return outcome


def check_channel_view(
    name: str,
    channel: simcord.ChannelHandle,
    turns: list[Turn],
    records: list[ReplyRecord],
    bot_id: int,
    webhook_ids: set[int],
) -> list[str]:
    """The channel shows exactly the stored replies, one notice per empty generation, and nothing else.

    The bot's messages are its own and those of its character webhooks (`webhook_ids`): replies are
    posted through a character's webhook, notices by the bot.
    """
    problems: list[str] = []
    shown = {
        m.id: m.content for m in channel.history() if m.author.id == bot_id or m.webhook_id in webhook_ids
    }
    replies = [t for t in turns if t.role is Role.MODEL]
    reply_ids = {m for t in replies for m in t.message_ids}
    others = Counter(content for mid, content in shown.items() if mid not in reply_ids)
    empty = sum(1 for r in records if r.empty)
    if others[EMPTY_NOTICE] != empty:
        problems.append(f"{name}: {others[EMPTY_NOTICE]} 'nothing to say' notices for {empty} empty generations")
    stray = [content for content in others if content != EMPTY_NOTICE]
    if stray:
        problems.append(f"{name}: {len(stray)} bot messages that are no reply, e.g. {stray[0][:60]!r}")
    for turn in replies:
        parts = [shown.get(m) for m in turn.message_ids]
        if parts != split_message(turn.content):
            problems.append(f"{name}: reply turn {turn.id} shows {parts!r}, stored {turn.content!r}")
    return problems


def check_prompts(prompts: list[str], sent: list[SentMessage]) -> list[str]:
    """With the fake engine: every message is in the newest user run of exactly one prompt."""
    seen = Counter(tag for prompt in prompts for tag in _TAG.findall(final_user_block(prompt)))
    return [f"prompts: message {m.tag} is newest in {seen[m.tag]} prompts" for m in sent if seen[m.tag] != 1]


# --- running --------------------------------------------------------------------------------------


@dataclass
class Harness:
    """The running bot in SimCord and what the rounds keep between them."""

    config: LoadConfig
    env: simcord.Env
    bot: TavernBot
    world: World
    probe: ReplyProbe
    backend: FakeBackend | None
    cache: StateCache | None
    history: list[SentMessage] = field(default_factory=list)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


async def wait_for_replies(probe: ReplyProbe, engine: Engine, sent: list[SentMessage], deadline: float) -> None:
    """Wait in real time until every message is in the window of a finished generation.

    Also returns once the engine has been idle for `IDLE_EXIT` seconds (something went wrong: the
    checks will say what) or at `deadline`. The caller settles afterwards to join the tail.
    """
    wanted = {m.content for m in sent}
    first = len(probe.records)
    idle_since: float | None = None
    while (now := time.perf_counter()) < deadline:
        done = {text for r in probe.records[first:] if r.finished is not None for text in r.covered}
        if wanted <= done:
            return
        if engine.running or engine.queue_depth:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= IDLE_EXIT:
            return
        await asyncio.sleep(POLL_SECONDS)


async def run_round(h: Harness, round_index: int) -> tuple[RoundFigures, Outcome]:
    """Send one round, wait for its replies, check the whole history, and measure the round."""
    h.probe.round = round_index
    began = time.perf_counter()
    sent = send_burst(h.env, h.world, round_index, h.config.messages)
    if h.config.join == "poll":
        await wait_for_replies(h.probe, h.bot.engine, sent, began + h.config.settle_timeout)
    await h.env.settle()
    seconds = time.perf_counter() - began
    h.history.extend(sent)

    outcome = Outcome()
    figures: list[ChannelFigures] = []
    all_waits: list[float] = []
    assert h.bot.user is not None
    webhook_ids = await h.bot.repo.character_webhook_ids()
    for channel in h.world.channels:
        name = f"#{channel.name}"
        key = channel_key(channel.id)
        session = await h.bot.repo.get_active_session(key)
        if session is None:
            outcome.violations.append(f"{name}: no active session")
            continue
        turns = await session_turns(h.bot, session)
        mine = [m for m in h.history if m.channel_id == channel.id]
        records = [r for r in h.probe.records if r.channel_key == key]
        outcome.violations += check_turns(name, turns, mine)
        coverage = check_coverage(name, turns, mine, records)
        outcome.violations += coverage.violations
        outcome.findings += coverage.findings
        outcome.violations += check_channel_view(name, channel, turns, records, h.bot.user.id, webhook_ids)

        now = [m for m in sent if m.channel_id == channel.id]
        ids = {m.message_id for m in now}
        this_round = [r for r in records if r.round == round_index]
        starts: dict[str, float] = {}
        for record in this_round:  # the first generation that covers a message starts its reply
            for text in record.covered:
                if record.started is not None:
                    starts.setdefault(text, record.started)
        waits = [starts[m.content] - m.arrived for m in now if m.content in starts]
        reply_ids = {t.id for t in turns if t.role is Role.MODEL}
        if not any(r.started is not None for r in this_round):
            outcome.violations.append(f"{name}: starved, no reply generated in this round")
        all_waits += waits
        figures.append(ChannelFigures(
            channel=name,
            messages=len(now),
            stored=sum(1 for t in turns if t.role is Role.USER and ids.intersection(t.message_ids)),
            replies=sum(1 for r in this_round if r.turn_id in reply_ids),
            empty=sum(1 for r in this_round if r.empty),
            generations=len(this_round),
            max_wait=max(waits, default=0.0),
            p50_wait=_median(waits),
        ))
    if h.backend is not None:
        outcome.violations += check_prompts(list(h.backend.prompts), h.history)
    result = RoundFigures(
        round=round_index,
        messages=len(sent),
        replies=sum(f.replies for f in figures),
        empty=sum(f.empty for f in figures),
        seconds=seconds,
        max_wait=max(all_waits, default=0.0),
        p50_wait=_median(all_waits),
        rss_bytes=rss_bytes(),
        python_blocks=sys.getallocatedblocks(),
        reply_views=reply_views(h.bot),
        state_cache_bytes=h.cache.ram_used if h.cache is not None else None,
        simcord_records=len(h.env.http_requests) + len(getattr(h.env.backend, "transcript", ())),
        channels=figures,
    )
    label = f"round {round_index}: "
    return result, Outcome([label + v for v in outcome.violations], [label + f for f in outcome.findings])


async def run_load(config: LoadConfig, *, db_url: str | None = None) -> LoadReport:
    """Run the burst and the soak against the real bot in SimCord; return the figures and any violations."""
    with tempfile.TemporaryDirectory(prefix="tavernkeep-load-") as scratch:
        url = db_url or f"sqlite+aiosqlite:///{Path(scratch) / 'load.db'}"
        settings = load_settings(config, url)
        with logged_errors() as errors:
            return await _run(config, settings, errors)


async def _run(config: LoadConfig, settings: Settings, errors: _ErrorLog) -> LoadReport:
    began = time.perf_counter()
    outcome = Outcome()
    growth: dict[str, int] = {}
    database = await Database.open(settings.database.url)
    try:
        engine, backend, cache = build_engine(config, settings)
        await engine.start()
        try:
            bot = create_bot(settings, engine=engine, database=database, edit_interval=config.edit_interval)
            probe = ReplyProbe(bot.service)
            async with simcord.run(bot, settle_timeout=config.settle_timeout) as env:
                world = await build_world(env, bot, config)
                h = Harness(config, env, bot, world, probe, backend, cache)
                rss_setup = rss_bytes()
                burst, found = await run_round(h, 0)
                outcome.violations += found.violations
                outcome.findings += found.findings
                soak: list[RoundFigures] = []
                tracing = config.trace_memory and config.soak_rounds > 0 and not tracemalloc.is_tracing()
                if tracing:
                    tracemalloc.start()
                try:
                    for round_index in range(1, config.soak_rounds + 1):
                        figures, found = await run_round(h, round_index)
                        soak.append(figures)
                        outcome.violations += found.violations
                        outcome.findings += found.findings
                    if tracing:
                        growth = growth_by_package(tracemalloc.take_snapshot())
                finally:
                    if tracing:
                        tracemalloc.stop()
                outcome.violations += [f"bot raised: {error!r}" for error in env.errors]
        finally:
            await engine.close(grace=0)
    finally:
        await database.close()
    outcome.violations += [f"logged: {message}" for message in errors.messages]
    return LoadReport(
        engine=config.engine,
        model=Path(config.model_path).name if config.engine == "model" else "fake",
        channels=config.channels,
        messages_per_channel=config.messages,
        workers=config.workers,
        join=config.join,
        burst=burst,
        soak=soak,
        rss_setup=rss_setup,
        rss_soak_start=burst.rss_bytes,
        rss_soak_end=soak[-1].rss_bytes if soak else burst.rss_bytes,
        total_seconds=time.perf_counter() - began,
        total_messages=len(h.history),
        total_replies=burst.replies + sum(r.replies for r in soak),
        total_empty=burst.empty + sum(r.empty for r in soak),
        soak_growth_by_package=growth,
        violations=outcome.violations,
        findings=outcome.findings,
    )


# --- output ---------------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def format_report(report: LoadReport) -> str:
    """The burst per channel, then the soak and memory, as a plain-text table."""
    burst = report.burst
    lines = [
        f"Tavernkeep load — {report.engine} engine ({report.model}), {report.channels} channels × "
        f"{report.messages_per_channel} messages in one burst, {report.workers} workers, join={report.join}",
        "",
        f"{'channel':<11}{'msgs':>6}{'stored':>8}{'replies':>9}{'empty':>7}{'max wait':>11}{'p50 wait':>11}",
    ]
    for ch in burst.channels:
        lines.append(f"{ch.channel:<11}{ch.messages:>6}{ch.stored:>8}{ch.replies:>9}{ch.empty:>7}"
                     f"{ch.max_wait:>10.2f}s{ch.p50_wait:>10.2f}s")
    maxima = [ch.max_wait for ch in burst.channels]
    lines += [
        "",
        f"burst: {burst.messages} messages, {burst.replies} replies (+{burst.empty} empty) in {burst.seconds:.1f} s; "
        f"wait to reply start: max {burst.max_wait:.2f} s, p50 {burst.p50_wait:.2f} s; "
        f"channel maxima {min(maxima, default=0):.2f}–{max(maxima, default=0):.2f} s",
    ]
    rounds = [burst, *report.soak]
    if report.soak:
        lines.append(
            f"soak: {len(report.soak)} more rounds, {sum(r.messages for r in report.soak)} messages, "
            f"{sum(r.replies for r in report.soak)} replies (+{sum(r.empty for r in report.soak)} empty), "
            f"{sum(r.seconds for r in report.soak):.1f} s; max wait {max(r.max_wait for r in report.soak):.2f} s"
        )
    growth = report.rss_soak_end - report.rss_soak_start
    lines.append(
        f"RSS: {_mib(report.rss_setup)} after setup, {_mib(report.rss_soak_start)} at soak start, "
        f"{_mib(report.rss_soak_end)} at soak end ({growth / 2**20:+.1f} MiB)"
    )
    if report.soak:
        lines.append("RSS per round (MiB): " + " ".join(f"{r.rss_bytes / 2**20:.0f}" for r in rounds))
        lines.append(
            f"Python blocks {burst.python_blocks:,} -> {rounds[-1].python_blocks:,}; reply button views kept "
            f"by discord.py {burst.reply_views} -> {rounds[-1].reply_views}; SimCord records "
            f"{burst.simcord_records:,} -> {rounds[-1].simcord_records:,}"
        )
        if burst.state_cache_bytes is not None and rounds[-1].state_cache_bytes is not None:
            lines.append("saved channel states (MiB): "
                         + " ".join(f"{(r.state_cache_bytes or 0) / 2**20:.0f}" for r in rounds))
    if report.soak_growth_by_package:
        top = list(report.soak_growth_by_package.items())[:8]
        lines.append("traced Python growth over the soak: " + ", ".join(f"{k} {v / 2**10:.0f} KiB" for k, v in top))
    lines.append(
        f"total: {report.total_messages} messages, {report.total_replies} replies, "
        f"{report.total_empty} empty generations, {report.total_seconds:.1f} s"
    )
    if report.findings:
        lines.append(f"findings ({len(report.findings)}; replies the model left empty, not violations):")
        lines += [f"  {f}" for f in report.findings[:20]]
    if report.violations:
        lines.append(f"VIOLATIONS ({len(report.violations)}):")
        lines += [f"  {v}" for v in report.violations[:40]]
    else:
        lines.append("invariants: all hold (stored once, send order, answered once, no channel starved)")
    return "\n".join(lines)


def write_json(report: LoadReport, path: Path) -> None:
    """Store the report under its engine's name, keeping the other engine's last report in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data[report.engine] = report.as_dict()
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("fake", "model"), default="fake")
    parser.add_argument("--model", default="", help="GGUF file for --engine model (default: the demo model)")
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10, help="messages per channel and round")
    parser.add_argument("--soak-rounds", type=int, default=10, help="rounds after the burst")
    parser.add_argument("--join", choices=("poll", "settle"), default="poll", help="how a round waits")
    parser.add_argument("--token-delay", type=float, default=0.01, help="fake engine: seconds per token")
    parser.add_argument("--trace-memory", action="store_true", help="attribute Python memory growth over the soak")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model_path = ""
    if args.engine == "model":
        from bot.inference.local.demo_model import ensure_demo_model

        model_path = args.model or str(ensure_demo_model(report=lambda msg: print(msg, file=sys.stderr)))
    config = LoadConfig(
        engine=args.engine, model_path=model_path, channels=args.channels, messages=args.messages,
        soak_rounds=args.soak_rounds, token_delay=args.token_delay, join=args.join, trace_memory=args.trace_memory,
    )
    report = asyncio.run(run_load(config))
    print(format_report(report))
    write_json(report, Path(args.json))
    print(f"figures written to {args.json}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
