"""The bot process killed or stopped while it writes a reply, for real: a child process, real signals.

The child (`tests/crash_child.py`) runs the real `tavernkeep run` over SimCord and a slow FakeBackend,
with its database in a file. After SIGKILL the test checks the file as the crash left it, then starts
a new bot over it in a new SimCord world built the same way (SimCord's snowflakes are deterministic,
so the channel has the same id) and checks what the channel gets: one fresh reply or one notice, per
`discord.after_crash`, also when the bot is started once more. After SIGTERM it checks the exit code
and that the reply was stored whole or, when the grace period is too short, as interrupted.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import simcord

from bot.config import Settings
from bot.discord_front.client import create_bot
from bot.discord_front.recovery import CRASH_NOTICE
from persistence.database import Database
from persistence.records import CharacterWebhook, Role, TurnStatus
from tests.child_process import Child
from tests.crash_child import SAID, STORY, build_world, placeholder_bot
from tests.discord_fixtures import bot_env, bot_messages, start_session, stored_turns, tavern_guild
from tests.fake_backend import FakeBackend, fake_engine

FRESH_REPLY = "Ah, the north road. Mind the bridge, it sways."


@dataclass(frozen=True)
class StoredTurn:
    role: str
    status: str
    content: str
    message_ids: tuple[int, ...]


def read_store(db_file: Path) -> tuple[str, list[StoredTurn]]:
    """`PRAGMA integrity_check` and the turns, read with plain sqlite3 as any tool would after a crash."""
    with sqlite3.connect(db_file) as connection:
        [(integrity,)] = connection.execute("PRAGMA integrity_check").fetchall()
        rows = connection.execute("SELECT id, role, status, content FROM turns ORDER BY id").fetchall()
        parts = connection.execute("SELECT turn_id, message_id FROM turn_messages ORDER BY turn_id, part").fetchall()
    connection.close()
    return integrity, [
        StoredTurn(role, status, content, tuple(m for t, m in parts if t == turn_id))
        for turn_id, role, status, content in rows
    ]


async def start_again(db_file: Path, settings: Settings, world_ids: dict[str, int], times: int) -> list[list[str]]:
    """Start a new bot over the database `times` times; the bot's messages in the channel after each
    start, then the message look-ups and deletes of all the starts."""
    database = await Database.open(f"sqlite+aiosqlite:///{db_file}")
    engine = fake_engine(FakeBackend(FRESH_REPLY))
    await engine.start()
    seen = []
    try:
        async with simcord.run(placeholder_bot()) as env:
            world = build_world(env)
            assert world.ids() == world_ids, "SimCord gave the rebuilt world other ids"
            for _ in range(times):
                await env.restart_bot(create_bot(settings, engine=engine, database=database, edit_interval=0.05,
                                                  reply_delay=0))
                await env.settle()
                seen.append([m.content for m in bot_messages(env, world.channel)])
            # What the bots did to single messages: looked one up (GET) or deleted one.
            touched = [f"{r.method} {r.path}" for r in env.http_requests
                       if r.method == "DELETE" or (r.method == "GET" and "/messages/" in r.path)]
    finally:
        await engine.close(grace=0)
        await database.close()
    seen.append(touched)
    return seen


@pytest.mark.parametrize("after_crash", ["reply", "notice"])
def test_killed_mid_reply_leaves_a_sound_store_and_the_channel_is_answered_once(
    tmp_path: Path, after_crash: str
) -> None:
    db_file = tmp_path / "tavernkeep.db"
    with Child("tests.crash_child", str(db_file), "30", log=db_file.with_suffix(".stderr")) as child:
        world = child.wait_for("world")
        started = child.wait_for("generating")
        assert child.send(signal.SIGKILL) == -signal.SIGKILL
    assert started["webhook"] is not None, "the reply was not posted through the character's webhook"

    # The store as the crash left it: sound, the user's turn kept, the reply only reserved (empty,
    # interrupted) with the id of its half-written message.
    integrity, turns = read_store(db_file)
    assert integrity == "ok"
    assert turns == [
        StoredTurn("user", "complete", SAID, (started["said"],)),
        StoredTurn("model", "pending", "", (started["reply"],)),
    ]

    settings = Settings.model_validate({"discord": {"after_crash": after_crash}})
    world_ids = {k: v for k, v in world.items() if k != "event"}
    first, second, touched = asyncio.run(start_again(db_file, settings, world_ids, times=2))

    # The half-written message is taken down, once: the bot reads it to learn who posted it (only that
    # webhook can delete it) and here finds it gone already (the world is new), so deletes nothing.
    # `test_restart_takes_down_a_half_written_reply_and_answers_afresh` sees the delete itself.
    assert touched == [f"GET /channels/{world['channel']}/messages/{started['reply']}"]
    integrity, turns = read_store(db_file)
    assert integrity == "ok"
    if after_crash == "reply":
        assert first == [FRESH_REPLY]
        assert [(t.role, t.status, t.content) for t in turns] == [
            ("user", "complete", SAID), ("model", "complete", FRESH_REPLY)
        ]
    else:
        assert first == [CRASH_NOTICE]
        assert [(t.role, t.status, t.content) for t in turns] == [("user", "complete", SAID)]
    assert second == first, "a second start must not answer or notify again"


@pytest.mark.parametrize("grace", [30.0, 0.2])
def test_sigterm_mid_reply_exits_0_with_the_reply_stored(tmp_path: Path, grace: float) -> None:
    db_file = tmp_path / "tavernkeep.db"
    with Child("tests.crash_child", str(db_file), str(grace), log=db_file.with_suffix(".stderr")) as child:
        child.wait_for("world")
        started = child.wait_for("generating")
        assert started["webhook"] is not None, "the reply was not posted through the character's webhook"
        assert child.send(signal.SIGTERM) == 0, child.stderr()
        shown = child.wait_for("closed")["shown"]

    integrity, turns = read_store(db_file)
    assert integrity == "ok"
    said, reply = turns
    assert said == StoredTurn("user", "complete", SAID, (started["said"],))
    assert reply.message_ids == (started["reply"],) and shown == [reply.content]
    if grace > 5:
        assert reply.status == "complete" and reply.content == STORY
    else:
        assert reply.status == "interrupted" and 0 < len(reply.content) < len(STORY)
        assert STORY.startswith(reply.content)


@pytest.mark.parametrize("posted_by", ["webhook", "bot"])
async def test_restart_takes_down_a_half_written_reply_and_answers_afresh(db_url: str, posted_by: str) -> None:
    """In one process, with the channel as users saw it when the bot died (the subprocess test above
    cannot show that: its restarted world is new). The store is set up as the SIGKILL test finds it.
    The half-written message was posted through the character's webhook (only that webhook can delete
    it), or by the bot itself (a channel where it may not manage webhooks)."""
    async with bot_env(db_url, backend=FakeBackend(FRESH_REPLY)) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern)
        repo = t.bot.repo
        # Posted while the bot was down (SimCord's backend, not public API: actors would deliver them).
        said = t.env.backend.create_message(tavern.channel.id, tavern.alice.id, SAID, broadcast=False)
        if posted_by == "webhook":
            hook = t.env.backend.create_webhook(tavern.channel.id, "Mira", t.bot.user.id)
            await repo.save_character_webhook(
                CharacterWebhook(tavern.channel.id, session.persona_id, hook.id, hook.token))
            half = t.env.backend.create_message(tavern.channel.id, hook.webhook_user_id, STORY[:20],
                                                webhook_id=hook.id, author_name="Mira", broadcast=False)
            taken_down = f"/webhooks/{hook.id}/{hook.token}/messages/{half.id}"
        else:
            half = t.env.backend.create_message(tavern.channel.id, t.bot.user.id, STORY[:20], broadcast=False)
            taken_down = f"/channels/{tavern.channel.id}/messages/{half.id}"
        await repo.append_turn(session.id, Role.USER, SAID, author_id=tavern.alice.id, author_name="Alice",
                               message_ids=[said.id])
        await repo.append_turn(session.id, Role.MODEL, "", status=TurnStatus.PENDING, message_ids=[half.id])

        await t.restart()
        assert [r.path for r in t.env.http_requests if r.method == "DELETE"] == [taken_down]
        shown = bot_messages(t.env, tavern.channel)
        assert [m.content for m in shown] == [FRESH_REPLY]
        assert shown[0].webhook_id is not None  # the fresh reply speaks through the character's webhook
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.status, turn.content) for turn in turns] == [
            (Role.USER, TurnStatus.COMPLETE, SAID), (Role.MODEL, TurnStatus.COMPLETE, FRESH_REPLY)
        ]
        assert t.backend.prompts[-1].endswith(f"<|user|>Alice: {SAID}<|model|>")
