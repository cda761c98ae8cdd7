"""What only PostgreSQL has: writers side by side (the channel locks), several processes migrating one
database at once (the migration lock), time zones, Alembic's way there and back, and `pg_dump` for
backups. Skipped, with the reason, when no server is configured (TAVERNKEEP_TEST_DATABASE_URL)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from sqlalchemy import make_url, select, text

from persistence import Database, Repository, Role
from persistence.backup import pg_dump_command
from persistence.database import alembic_config
from persistence.locks import CHANNEL_SPACE
from persistence.models import Base, ChannelSessionRow, UTCDateTime
from tests.postgres import PostgresServer
from tests.test_persistence import HEAD, _schema_diffs


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database."""
    with postgres_server.database() as url:
        yield url


@pytest.fixture
def pg_empty_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database."""
    with postgres_server.database(empty=True) as url:
        yield url


@pytest.fixture
async def processes(pg_url: str) -> AsyncIterator[list[Repository]]:
    """Two repositories on one database, each with an engine and pool of its own, as two bot processes."""
    dbs = [await Database.open(pg_url) for _ in range(2)]
    try:
        yield [Repository(db) for db in dbs]
    finally:
        for db in dbs:
            await db.close()


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- the migration lock ----------------------------------------------------------------------------


# A bot process as far as the database goes: open (and so migrate) once everyone is ready.
OPEN_WHEN_TOLD = """
import asyncio, sys
from persistence import Database
print("ready", flush=True)
sys.stdin.readline()
async def main():
    db = await Database.open(sys.argv[1])
    await db.close()
asyncio.run(main())
"""


async def test_processes_starting_at_once_on_a_fresh_database_migrate_it_once(pg_empty_url: str) -> None:
    """Three processes open one empty database at the same moment: one migrates while the others wait on
    the migration lock, then find it at head. Without the lock they race to create the same tables."""
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", OPEN_WHEN_TOLD, pg_empty_url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for process in processes:  # every one imported and connected to nothing yet
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    outcomes = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in processes)), 120)
    assert [p.returncode for p in processes] == [0, 0, 0], [err.decode()[-2000:] for _, err in outcomes]

    async with await Database.open(pg_empty_url, migrate=False) as db:
        def check(s: Any) -> None:
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
            assert _schema_diffs(s.connection()) == []

        await db.run(check)


async def test_a_migration_waits_while_another_process_holds_the_lock(pg_empty_url: str) -> None:
    """The lock is real: while another session holds it, opening the database waits, then migrates."""
    from persistence.locks import MIGRATION_LOCK

    holder = await asyncpg.connect(_dsn(pg_empty_url))
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATION_LOCK)
        opening = asyncio.create_task(Database.open(pg_empty_url))
        await asyncio.sleep(0.5)
        assert not opening.done()
        await transaction.rollback()
        db = await asyncio.wait_for(opening, 30)
        await db.close()
    finally:
        await holder.close()


def test_alembic_down_and_up_again_on_postgresql(pg_url: str) -> None:
    """Every migration runs both ways on PostgreSQL through the Alembic command line path (env.py, asyncpg)."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", pg_url)
    command.downgrade(config, "base")
    command.upgrade(config, "head")

    async def version() -> list[str]:
        conn = await asyncpg.connect(_dsn(pg_url))
        try:
            return [row[0] for row in await conn.fetch("SELECT version_num FROM alembic_version")]
        finally:
            await conn.close()

    assert asyncio.run(version()) == [HEAD]


# --- writes of one channel -------------------------------------------------------------------------


async def test_writes_to_a_channel_wait_for_its_lock_and_other_channels_do_not(
    processes: list[Repository], pg_url: str
) -> None:
    first, second = processes
    busy = await first.start_session("discord:busy")
    quiet = await first.start_session("discord:quiet")
    holder = await asyncpg.connect(_dsn(pg_url))
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", CHANNEL_SPACE, "discord:busy")
        waiting = asyncio.create_task(second.append_turn(busy.id, Role.USER, "after the lock"))
        # Another channel is not held up.
        await asyncio.wait_for(second.append_turn(quiet.id, Role.USER, "meanwhile"), 5)
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await transaction.rollback()
        turn = await asyncio.wait_for(waiting, 5)
    finally:
        await holder.close()
    assert [t.id for t in await first.recent_turns(busy.id, 10)] == [turn.id]


async def test_two_processes_adding_swipes_to_one_turn_lose_none(processes: list[Repository]) -> None:
    """Each new version reads the count, then writes the next number: without the channel lock two
    writers would take the same number (a refused write, or a version lost)."""
    first, second = processes
    session = await first.start_session("discord:1")
    turn = await first.append_turn(session.id, Role.MODEL, "v0")
    versions = [f"{name}{i}" for i in range(12) for name in ("a", "b")]
    await asyncio.gather(*(
        (first if text_.startswith("a") else second).add_swipe(turn.id, text_) for text_ in versions
    ))
    stored = await first.swipes(turn.id)
    assert stored[0] == "v0" and sorted(stored[1:]) == sorted(versions)
    latest = await second.latest_turn(session.id)
    assert latest is not None and latest.swipe_count == len(versions) + 1


async def test_two_processes_appending_to_one_channel_keep_every_turn_in_id_order(
    processes: list[Repository],
) -> None:
    """Turns appended from two processes at once all arrive, each with its message, and a reader that
    pages by id (as catch-up and exports do) sees every turn: ids are taken and committed in one order."""
    first, second = processes
    session = await first.start_session("discord:1")
    seen: list[int] = []
    done = asyncio.Event()

    async def reader() -> None:
        while True:
            finished = done.is_set()
            page = await first.session_turns(session.id, after_id=seen[-1] if seen else 0)
            seen.extend(t.id for t in page)
            if finished:
                return
            await asyncio.sleep(0)

    async def writer(repo: Repository, name: str) -> None:
        for i in range(25):
            await repo.append_turn(session.id, Role.USER, f"{name}{i}", message_ids=[ord(name) * 1000 + i])

    reading = asyncio.create_task(reader())
    await asyncio.gather(writer(first, "a"), writer(second, "b"), writer(second, "c"))
    done.set()
    await reading
    turns = await second.session_turns(session.id)
    assert len(turns) == 75 and all(len(t.message_ids) == 1 for t in turns)
    assert seen == [t.id for t in turns]


async def test_two_processes_resetting_one_channel_at_once_open_one_session(processes: list[Repository]) -> None:
    first, second = processes
    session = await first.start_session("discord:1", persona_text="A bard.")
    fresh = await asyncio.gather(*(repo.archive_session(session.id) for repo in (first, second, first, second)))
    assert len({s.id for s in fresh}) == 1
    current = await second.get_active_session("discord:1")
    assert current is not None and current.id == fresh[0].id and current.persona_text == "A bard."


async def test_two_processes_starting_one_channel_at_once_open_one_session(processes: list[Repository]) -> None:
    first, second = processes
    started = await asyncio.gather(*(
        repo.start_session("discord:new", guild_id=7) for repo in (first, second, first, second)
    ))
    assert len({s.id for s in started}) == 1


# --- time zones ------------------------------------------------------------------------------------


async def test_times_are_stored_with_their_zone_and_read_back_in_utc(pg_url: str) -> None:
    """Every datetime column is `timestamp with time zone`; a connection in another zone still reads UTC."""
    columns = {
        (table.name, column.name)
        for table in Base.metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, UTCDateTime)
    }
    db = await Database.open(pg_url, connect_args={"server_settings": {"timezone": "Asia/Tokyo"}})
    try:
        query = text("SELECT table_name, column_name, data_type FROM information_schema.columns "
                     "WHERE table_schema = 'public' AND data_type LIKE 'timestamp%'")
        found = await db.run(lambda s: {(t, c): kind for t, c, kind in s.execute(query)})
        assert set(found) == columns and set(found.values()) == {"timestamp with time zone"}

        session = await Repository(db).start_session("discord:1")
        assert session.created_at.utcoffset() == timedelta(0)
        shown = await db.run(lambda s: s.scalar(text("SELECT to_char(created_at, 'TZH') FROM channel_sessions")))
        assert shown == "+09"  # the server keeps the instant; this connection shows it in Tokyo time
        row = await db.run(lambda s: s.scalar(select(ChannelSessionRow)))
        assert row.created_at.tzinfo is UTC and row.created_at == session.created_at
    finally:
        await db.close()


# --- backups ---------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump is not installed")
async def test_the_pg_dump_command_named_by_backup_dumps_the_database(pg_url: str, tmp_path: Path) -> None:
    async with await Database.open(pg_url) as db:
        repo = Repository(db)
        session = await repo.start_session("discord:1")
        await repo.append_turn(session.id, Role.USER, "keep me")
    target = tmp_path / "tavernkeep.dump"
    run = await asyncio.to_thread(
        subprocess.run, pg_dump_command(pg_url, target), shell=True, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    listing = await asyncio.to_thread(
        subprocess.run, ["pg_restore", "--list", str(target)], capture_output=True, text=True, timeout=60
    )
    assert "TABLE DATA public turns" in listing.stdout
