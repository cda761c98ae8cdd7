"""Two bot processes, shards 0 and 1 of one bot, on one database, with a restart of one in the middle.

Each child (`tests/shard_child.py`) runs the real `tavernkeep run` with its own `discord.shard_ids`
over its own SimCord world; both worlds hold the same guilds (North on shard 0, South on shard 1) and
every message is said in both, as Discord would send it to whichever process runs its guild's shard.
Shard 1's process is killed mid-reply; Alice speaks again in South while it is away; it is started
again. In the end every message is stored once and answered once, by its own guild's process only,
and only shard 0's process synced slash commands.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import ExitStack
from pathlib import Path

from bot.discord_front.keys import channel_id_of
from persistence.database import Database
from persistence.records import Role, TurnStatus
from persistence.repository import Repository
from tests.child_process import Child
from tests.shard_child import REPLY


def start(shard: int, db_url: str, tmp_path: Path, *missed: str, run: int = 0) -> Child:
    return Child("tests.shard_child", str(shard), db_url, *missed, log=tmp_path / f"shard{shard}-{run}.stderr")


def say(children: list[Child], guild: str, text: str) -> list[dict[str, list[str]]]:
    """Alice says `text` in `guild` in every live world; what each then shows, once it has settled."""
    for child in children:
        child.tell(say=guild, text=text)
    return [child.wait_for("settled", timeout=60)["shown"] for child in children]


async def stored(db_url: str) -> dict[int | None, list[tuple[Role, TurnStatus, str]]]:
    """Every session's turns (role, status, text), by channel."""
    database = await Database.open(db_url)
    try:
        repo = Repository(database)
        out = {}
        for session in await repo.list_active_sessions():
            turns = await repo.recent_turns(session.id, 100)
            out[channel_id_of(session.channel_key)] = [(t.role, t.status, t.content) for t in turns]
        return out
    finally:
        await database.close()


def test_two_shard_processes_answer_their_own_guilds_once_across_a_restart(db_url: str, tmp_path: Path) -> None:
    with ExitStack() as children:
        north = children.enter_context(start(0, db_url, tmp_path))
        world = north.wait_for("world")
        # The second starts once the first has created the database (processes starting together on
        # a fresh PostgreSQL database are tested in test_postgres.py).
        assert north.wait_for("ready", timeout=60)["shown"] == {"North": [], "South": []}
        south = children.enter_context(start(1, db_url, tmp_path))
        assert south.wait_for("world") == world, "SimCord gave the two worlds other ids"
        assert south.wait_for("ready", timeout=60)["shown"] == {"North": [], "South": []}

        # Both talk at once; each process answers its own guild.
        shown = say([north, south], "North", "Good evening.")
        assert shown == [{"North": [REPLY], "South": []}, {"North": [], "South": []}]
        shown = say([north, south], "South", "Which way to the mill?")
        assert shown == [{"North": [REPLY], "South": []}, {"North": [], "South": [REPLY]}]

        # Shard 1's process dies while it writes a reply in South.
        north.tell(say="South", text="And past the mill?")
        south.tell(say="South", text="And past the mill?", settle=False)
        assert north.wait_for("settled", timeout=60)["shown"] == {"North": [REPLY], "South": []}
        assert len(south.wait_for("generating", timeout=60)["shown"]["South"]) == 2
        assert south.send(signal.SIGKILL) == -signal.SIGKILL

        # North goes on meanwhile; South's message reaches no process.
        shown = say([north], "North", "Is anyone still up?")
        assert shown == [{"North": [REPLY, REPLY], "South": []}]
        shown = say([north], "South", "Hello? Anyone?")
        assert shown == [{"North": [REPLY, REPLY], "South": []}]

        # Shard 1 comes back: its new world has Alice's message from while it was away.
        with start(1, db_url, tmp_path, "Hello? Anyone?", run=1) as again:
            assert again.wait_for("world") == world
            # The reply cut short is dropped; one reply answers the interrupted and the missed message.
            assert again.wait_for("ready", timeout=60)["shown"] == {"North": [], "South": [REPLY]}
            shown = say([north, again], "South", "Thank you.")
            assert shown == [{"North": [REPLY, REPLY], "South": []}, {"North": [], "South": [REPLY, REPLY]}]
            shown = say([north, again], "North", "Good night.")
            assert shown == [{"North": [REPLY, REPLY, REPLY], "South": []}, {"North": [], "South": [REPLY, REPLY]}]
            assert again.send(signal.SIGTERM) == 0, again.stderr()
            assert again.wait_for("closed")["command_syncs"] == 0
        assert north.send(signal.SIGTERM) == 0, north.stderr()
        assert north.wait_for("closed")["command_syncs"] == 1

    turns = asyncio.run(stored(db_url))
    user, model = Role.USER, Role.MODEL
    done = TurnStatus.COMPLETE
    assert sorted(turns) == sorted(world[name] for name in ("North", "South"))
    assert turns[world["North"]] == [
        (user, done, "Good evening."), (model, done, REPLY),
        (user, done, "Is anyone still up?"), (model, done, REPLY),
        (user, done, "Good night."), (model, done, REPLY),
    ]
    assert turns[world["South"]] == [
        (user, done, "Which way to the mill?"), (model, done, REPLY),
        (user, done, "And past the mill?"), (user, done, "Hello? Anyone?"), (model, done, REPLY),
        (user, done, "Thank you."), (model, done, REPLY),
    ]
