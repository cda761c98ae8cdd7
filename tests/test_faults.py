"""Faults injected around the real bot (SimCord, real SQLite, the real engine over a FakeBackend).

Each test injects one fault and checks what is stored and what users see: gateway replays after a
restart, messages sent while the bot was away, Discord API errors (429, 5xx, 403), model failures and
time limits, and a database that cannot be written. Concurrent writers never see "database is
locked": `tests/test_persistence.py::test_concurrent_writers_do_not_lock` and
`::test_concurrent_writers_across_engines` cover that. Killing the process and SIGTERM are in
`tests/test_crash.py`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import discord
import pytest
import simcord
from simcord.backend.models import Overwrite
from simcord.enums import OverwriteType
from sqlalchemy import event, select
from sqlalchemy.engine import make_url

from bot.config import Settings
from bot.discord_front.keys import channel_key
from bot.discord_front.replies import DISCORD_TROUBLE_NOTICE, SAVE_FAILED_NOTICE, TIMEOUT_NOTICE
from bot.errors import GenerationFailed
from bot.inference.api import Sampling
from persistence import Database
from persistence.models import TurnMessageRow
from persistence.records import Role, TurnStatus
from tests.discord_fixtures import BotEnv, bot_env, replay, start_session, stored_turns, tavern_guild
from tests.fake_backend import FakeBackend


def bot_messages(channel: simcord.ChannelHandle) -> list[discord.Message]:
    return [m for m in channel.history() if m.author.bot]


def said_while_away(env: simcord.Env, channel: simcord.ChannelHandle, member: simcord.MemberActor, text: str) -> Any:
    """A message posted while the bot was not connected: in the channel, never delivered to the bot.

    SimCord's actors always deliver, so this goes through its backend (not public API).
    """
    return env.backend.create_message(channel.id, member.id, text, broadcast=False)


def user_turns(turns: list[Any]) -> list[tuple[str, str]]:
    return [(turn.author_name, turn.content) for turn in turns if turn.role is Role.USER]


async def stored_message_ids(db_url: str) -> list[int]:
    """Every message id mapped to a turn, read through a database of its own (as another process would)."""
    async with await Database.open(db_url, migrate=False) as db:
        return await db.run(lambda s: list(s.scalars(select(TurnMessageRow.message_id))))


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait in real time (the worker thread runs on) until `condition()` holds."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


# --- 2. replayed gateway events --------------------------------------------------------------------


async def test_message_create_replayed_after_a_restart_is_not_taken_again(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        said = await tavern.alice.send(tavern.channel, "Just once, even after a restart.")
        await t.restart()
        replay(t.env, said)  # the new gateway session delivers the old event again
        await t.env.settle()
        assert len(await stored_turns(t, tavern.channel)) == 2
        assert len(bot_messages(tavern.channel)) == 1 and len(t.backend.prompts) == 1
    ids = await stored_message_ids(db_url)
    assert len(ids) == len(set(ids)) == 2


# --- 3. messages sent while the bot was away ---------------------------------------------------------


async def test_messages_sent_while_away_are_answered_once_in_order(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")  # no session here
        await tavern.bob.send(tavern.channel, "Is this thing on?")  # before the session: never taken
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello, Mira.")
        away = [
            said_while_away(t.env, tavern.channel, tavern.alice, "We ride at dawn."),
            said_while_away(t.env, tavern.channel, tavern.bob, "// brb, tea"),  # out of character
            said_while_away(t.env, tavern.channel, tavern.bob, "I'll saddle the horses."),
        ]
        said_while_away(t.env, cellar, tavern.bob, "Anyone down here?")

        await t.restart()

        turns = await stored_turns(t, tavern.channel)
        assert user_turns(turns) == [
            ("Alice", "Hello, Mira."), ("Alice", "We ride at dawn."), ("Bob", "I'll saddle the horses.")
        ]
        assert turns[-1].role is Role.MODEL and turns[-1].status is TurnStatus.COMPLETE
        assert len(t.backend.prompts) == 2  # one reply for everything missed
        assert t.backend.prompts[-1].endswith("<|user|>Alice: We ride at dawn.\nBob: I'll saddle the horses.<|model|>")
        assert [m.content for m in bot_messages(tavern.channel)] == [turns[1].content, turns[-1].content]
        assert bot_messages(cellar) == []

        # READY again in the same process, a new process, and the missed events delivered late: nothing new.
        await t.env.restart_bot()
        await t.restart()
        for message in away:
            t.env.backend.announce_message_create(message)
        await t.env.settle()
        assert await stored_turns(t, tavern.channel) == turns
        assert len(t.backend.prompts) == 2 and len(bot_messages(tavern.channel)) == 2
    ids = await stored_message_ids(db_url)
    assert len(ids) == len(set(ids))


async def test_catch_up_reads_back_at_most_the_limit(db_url: str) -> None:
    settings = Settings.model_validate({"discord": {"catch_up_limit": 2}})
    async with bot_env(db_url, settings=settings) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello.")
        for text in ("One.", "Two.", "Three."):
            said_while_away(t.env, tavern.channel, tavern.alice, text)
        await t.restart()
        turns = await stored_turns(t, tavern.channel)
        assert user_turns(turns) == [("Alice", "Hello."), ("Alice", "Two."), ("Alice", "Three.")]
        assert len(bot_messages(tavern.channel)) == 2


async def test_catch_up_skip_leaves_missed_messages_alone(db_url: str) -> None:
    settings = Settings.model_validate({"discord": {"catch_up": "skip"}})
    async with bot_env(db_url, settings=settings) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello.")
        said_while_away(t.env, tavern.channel, tavern.alice, "Are you there?")
        await t.restart()
        assert user_turns(await stored_turns(t, tavern.channel)) == [("Alice", "Hello.")]
        assert len(bot_messages(tavern.channel)) == 1 and len(t.backend.prompts) == 1
        assert not [r for r in t.env.http_requests if r.method == "GET" and r.path.endswith("/messages")]


# --- 4. Discord API errors -------------------------------------------------------------------------


async def test_streaming_edits_back_off_while_discord_refuses_them(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    story = "The wind rose over the moor and the lanterns swung on their hooks. " * 2
    async with bot_env(db_url, backend=FakeBackend(story.strip(), token_delay=0.005)) as t:
        t.bot.replies.edit_interval = 0.01
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        # The reply streams through Mira's webhook: its message edits are the ones refused.
        t.env.inject_error("PATCH", "/webhooks/*/*/messages/*", status=503, times=4)
        with caplog.at_level(logging.INFO, logger="bot.discord_front.replies"):
            await tavern.alice.send(tavern.channel, "Is a storm coming?")
        skipped = [r.created for r in caplog.records if r.getMessage().startswith("skipped a streaming edit")]
        assert len(skipped) == 4
        # After the n-th failure in a row the next edit waits at least edit_interval * 2**n.
        for failures, (before, after) in enumerate(itertools.pairwise(skipped), start=1):
            assert after - before >= 0.01 * 2**failures * 0.99, (failures, after - before)
        reply = tavern.channel.last_message
        assert reply.content == story.strip() and reply.webhook_id in t.bot.intake.own_webhook_ids
        refused = [r for r in t.env.http_requests if r.method == "PATCH"
                   and r.path.startswith(f"/webhooks/{reply.webhook_id}/") and r.path.endswith(f"/messages/{reply.id}")]
        assert len(refused) > 4  # the 4 refused edits, then at least the final one landed
        [_, turn] = await stored_turns(t, tavern.channel)
        assert turn.status is TurnStatus.COMPLETE and turn.content == story.strip()
        assert turn.message_ids == (reply.id,)


async def test_failed_sends_are_skipped_and_a_lasting_failure_is_explained(db_url: str) -> None:
    backend = FakeBackend("Keep to the shore.", token_delay=0.002)
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        # The reply is posted by executing Mira's webhook (created on the first reply).
        posts = "/webhooks/*/*"

        # A 5xx on the first post (discord.py retries only 500, 502, 504 and 524 itself): streaming
        # skips it and the final post puts the reply up exact.
        t.env.inject_error("POST", posts, status=503, times=1)
        await tavern.alice.send(tavern.channel, "Which way?")
        assert [m.content for m in bot_messages(tavern.channel)] == ["Keep to the shore."]
        hook_id = tavern.channel.last_message.webhook_id
        assert hook_id in t.bot.intake.own_webhook_ids
        executes = [r for r in t.env.http_requests if r.method == "POST" and r.path.startswith(f"/webhooks/{hook_id}/")]
        assert len(executes) == 2  # the refused streaming post, then the final one

        # 503 on both tries of the only post (the streaming one, then the final one): the user is told.
        t.bot.replies.edit_interval = 60.0
        t.env.inject_error("POST", f"/webhooks/{hook_id}/*", status=503, times=2)
        await tavern.bob.send(tavern.channel, "And then?")
        assert tavern.channel.last_message.content == DISCORD_TROUBLE_NOTICE.format(status=503)
        assert tavern.channel.last_message.webhook_id is None  # the notice comes from the bot itself
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.content) for turn in turns[2:]] == [(Role.USER, "And then?")]  # nothing half-stored

        # Discord is back: the next reply answers what is waiting.
        await tavern.bob.send(tavern.channel, "Hello?")
        assert tavern.channel.last_message.content == "Keep to the shore."
        assert t.backend.prompts[-1].endswith("<|user|>Bob: And then?\nBob: Hello?<|model|>")


@pytest.mark.parametrize("refusal", ["permissions revoked", "webhook refused"])
async def test_missing_permissions_pause_that_channel_and_the_others_go_on(
    db_url: str, caplog: pytest.LogCaptureFixture, refusal: str
) -> None:
    """"Missing permissions" with characters speaking through webhooks: either an admin takes Manage
    Webhooks and Send Messages from the bot (it falls back to posting as itself, and Discord refuses
    that), or Discord refuses the character webhook's execute with 403 / 50013."""
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        await start_session(t, tavern)
        await start_session(t, tavern, channel=cellar)
        await tavern.alice.send(tavern.channel, "Good evening.")
        hook_id = tavern.channel.last_message.webhook_id
        assert hook_id in t.bot.intake.own_webhook_ids  # all is well: the reply came through Mira's webhook

        if refusal == "permissions revoked":
            me = tavern.guild.me
            assert me is not None
            deny = discord.PermissionOverwrite(manage_webhooks=False, send_messages=False).pair()[1].value
            t.env.backend.set_overwrite(tavern.channel.id, Overwrite(me.id, OverwriteType.MEMBER, 0, deny))
            await t.env.settle()
            refused = f"/channels/{tavern.channel.id}/messages"
        else:
            refused = f"/webhooks/{hook_id}/*"
            t.env.inject_error("POST", refused, status=403, code=50013, message="Missing Permissions", times=None)

        def tries() -> int:
            return len([r for r in t.env.http_requests if r.method == "POST" and fnmatch.fnmatch(r.path, refused)])

        before = tries()
        with caplog.at_level(logging.WARNING):
            await tavern.alice.send(tavern.channel, "Can you hear me?")
        assert tries() > before  # the reply really went to the refused route
        session = await t.bot.repo.get_active_session(channel_key(tavern.channel.id))
        assert session is not None and not session.active
        [warning] = [
            r for r in caplog.records if r.levelno == logging.WARNING and r.name == "bot.discord_front.replies.jobs"
        ]
        assert f"channel {tavern.channel.id} (#roleplay" in warning.getMessage()
        assert "Missing Permissions" in warning.getMessage() and "paused" in warning.getMessage()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [m.content for m in bot_messages(tavern.channel)] == ["You said: Alice: Good evening."]

        await tavern.bob.send(cellar, "Hello, cellar.")
        assert [m.content for m in bot_messages(cellar)] == ["You said: Bob: Hello, cellar."]
        assert cellar.last_message.webhook_id in t.bot.intake.own_webhook_ids

        before = tries()
        await tavern.alice.send(tavern.channel, "Hello?")  # paused: neither stored nor answered
        assert tries() == before
        assert user_turns(await stored_turns(t, tavern.channel)) == [("Alice", "Good evening."),
                                                                     ("Alice", "Can you hear me?")]


# --- 5. the model fails or runs out of time --------------------------------------------------------


class FailsFirstTime(FakeBackend):
    """Fails mid-stream on its first generation, then works."""

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        self.fail_after = 8 if not self.prompts else None
        yield from super().tokens(prompt, sampling, stop)


async def test_model_failure_mid_reply_is_told_and_the_queue_moves_on(db_url: str) -> None:
    backend = FailsFirstTime("Half a sentence and then the rest of it.", token_delay=0.01)
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        await start_session(t, tavern)
        await start_session(t, tavern, channel=cellar)
        # While the first reply fails, a message waits behind it in the same channel and one in another.
        t.env.backend.create_message(tavern.channel.id, tavern.alice.id, "Go on.")
        await until(lambda: len(backend.prompts) == 1)
        t.env.backend.create_message(tavern.channel.id, tavern.bob.id, "And then?")
        t.env.backend.create_message(cellar.id, tavern.bob.id, "Meanwhile, down here.")
        await t.env.settle()

        partial, notice, answer = bot_messages(tavern.channel)
        assert notice.content == GenerationFailed.user_message
        assert answer.content == "Half a sentence and then the rest of it."
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.status, turn.content) for turn in turns] == [
            (Role.USER, TurnStatus.COMPLETE, "Go on."),
            (Role.MODEL, TurnStatus.INTERRUPTED, partial.content),
            (Role.USER, TurnStatus.COMPLETE, "And then?"),
            (Role.MODEL, TurnStatus.COMPLETE, answer.content),
        ]
        assert [m.content for m in bot_messages(cellar)] == ["Half a sentence and then the rest of it."]
        assert t.engine.running == 0 and t.engine.queue_depth == 0 and len(backend.prompts) == 3


async def test_reply_over_the_time_limit_is_cut_short_with_a_notice(db_url: str) -> None:
    settings = Settings.model_validate({"engine": {"timeout_seconds": 0.3}, "model": {"max_new_tokens": 2000}})
    tale = ("The tale goes on and on, through the long night. " * 10).strip()
    backend = FakeBackend(tale, token_delay=0.01)  # about 5 s of text
    async with bot_env(db_url, backend=backend, settings=settings) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        await start_session(t, tavern)
        await start_session(t, tavern, channel=cellar)
        await tavern.alice.send(tavern.channel, "Tell me everything.")
        partial, notice = bot_messages(tavern.channel)
        assert notice.content == TIMEOUT_NOTICE
        [_, turn] = await stored_turns(t, tavern.channel)
        assert turn.status is TurnStatus.INTERRUPTED and turn.content == partial.content
        assert 0 < len(turn.content) < len(tale) and tale.startswith(turn.content)

        # The next replies come at once, so that only the first one meets the time limit, however busy
        # the machine is.
        backend.reply, backend.token_delay = "Short and sweet.", 0.0
        await tavern.bob.send(tavern.channel, "The short version?")
        assert tavern.channel.last_message.content == "Short and sweet."
        await tavern.bob.send(cellar, "And here?")
        assert cellar.last_message.content == "Short and sweet."
        assert t.engine.running == 0 and t.engine.queue_depth == 0


# --- 6. the database cannot be written -------------------------------------------------------------


def _read_only(connection: Any, _record: Any) -> None:
    connection.execute("PRAGMA query_only=ON")


def _read_only_postgresql(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("SET default_transaction_read_only = on")
    cursor.close()
    connection.commit()  # the driver ran the SET in a transaction: keep it past the pool's reset


def _disk_full(connection: Any, _record: Any) -> None:
    # The file may not grow past its current size: the next write that needs a new page fails (SQLITE_FULL).
    [(pages,)] = connection.execute("PRAGMA page_count").fetchall()
    connection.execute(f"PRAGMA max_page_count={pages}")


async def _set_fault(t: BotEnv, listener: Callable[[Any, Any], None], on: bool) -> None:
    """Apply `listener` to every new connection (or stop) and drop the pooled ones so it takes effect."""
    for engine in (t.database.engine,):
        if on:
            event.listen(engine, "connect", listener)
        else:
            event.remove(engine, "connect", listener)
    await t.database.drop_connections()


# Per backend: how each fault is made, and the driver's words for it.
FAULTS: dict[tuple[str, str], tuple[Callable[[Any, Any], None], str]] = {
    ("sqlite", "read-only"): (_read_only, "readonly database"),
    ("sqlite", "disk full"): (_disk_full, "database or disk is full"),
    ("postgresql", "read-only"): (_read_only_postgresql, "read-only transaction"),
}


@pytest.mark.parametrize("fault_name", ["read-only", "disk full"])
async def test_unwritable_database_gives_a_notice_and_stores_nothing(
    db_url: str, db_backend: str, caplog: pytest.LogCaptureFixture, fault_name: str
) -> None:
    if (db_backend, fault_name) not in FAULTS:
        pytest.skip(f"a {fault_name} fault is not made from a test on {db_backend}")
    fault, error = FAULTS[db_backend, fault_name]
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello.")
        before = await stored_turns(t, tavern.channel)

        await _set_fault(t, fault, on=True)
        # Long enough (and multi-byte) to need new pages, so a full disk is hit whatever space is left.
        lost = "Here is my whole backstory: " + "龍" * 1800
        with caplog.at_level(logging.ERROR):
            said = await tavern.alice.send(tavern.channel, lost)
        assert tavern.channel.last_message.content == SAVE_FAILED_NOTICE
        [record] = [r for r in caplog.records if r.name == "cogs.roleplay"]
        message = record.getMessage()
        assert f"message {said.id}" in message and f"channel={tavern.channel.id}" in message
        assert f"user={tavern.alice.id}" in message and error in (record.exc_text or "")
        assert len(t.backend.prompts) == 1  # no reply for a message that was not stored

        await _set_fault(t, fault, on=False)
        assert await stored_turns(t, tavern.channel) == before
        await tavern.alice.send(tavern.channel, "Can you hear me now?")
        turns = await stored_turns(t, tavern.channel)
        assert user_turns(turns) == [("Alice", "Hello."), ("Alice", "Can you hear me now?")]
        assert turns[-1].status is TurnStatus.COMPLETE and lost not in t.backend.prompts[-1]
        assert await t.bot.repo.turn_by_message(said.id) is None
    if db_backend == "sqlite":
        with sqlite3.connect(make_url(db_url).database or "") as connection:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        connection.close()
