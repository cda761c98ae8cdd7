"""Persistence layer against real SQLite files (and PostgreSQL databases when a server is configured):
migrations, pragmas, repository round trips, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Connection, Integer, MetaData, event, inspect, make_url, text
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import IntegrityError

from persistence import (
    ChannelSession,
    CharacterWebhook,
    Database,
    DuplicateMessage,
    Persona,
    PersonaExists,
    PersonaInUse,
    PersonaNotFound,
    Repository,
    Role,
    SessionNotFound,
    Turn,
    TurnNotFound,
    TurnStatus,
)
from persistence.database import alembic_config
from persistence.models import Base, ChannelSessionRow, UTCDateTime
from persistence.repository import messages_from_query, newest_turns_query

HEAD = "0003"
GUILD = 111_111_111_111_111_111
OTHER_GUILD = 222_222_222_222_222_222
USER = 333_333_333_333_333_333


@contextmanager
def _before_each_statement(db: Database, listener: Callable[..., None]) -> Iterator[None]:
    """Call `listener` before every statement any of the database's engines runs, while inside."""
    event.listen(db.engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        event.remove(db.engine, "before_cursor_execute", listener)


def _db_path(url: str) -> Path:
    database = make_url(url).database
    assert database
    return Path(database)


def _schema_diffs(conn: Connection, metadata: MetaData = Base.metadata) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return compare_metadata(context, metadata)


def _assert_recent(value: datetime) -> None:
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=1)


# --- database, migrations, pragmas -----------------------------------------------------------------


async def test_migrations_fresh_twice_and_schema_matches_models(empty_db_url: str) -> None:
    db = await Database.open(empty_db_url)
    await db.migrate()  # second upgrade on the same database: a no-op
    await db.close()
    db = await Database.open(empty_db_url)  # and a third, on reopen

    def check(s: Any) -> None:
        conn = s.connection()
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == HEAD
        assert _schema_diffs(conn) == []

        # The comparison is not vacuous: a model change shows up as a diff.
        changed = MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        changed.tables["turns"].append_column(Column("extra", Integer))
        diffs = _schema_diffs(conn, changed)
        assert [d[0] for d in diffs] == ["add_column"]

        found = inspect(conn)
        assert {"guilds", "personas", "channel_sessions", "turns", "turn_messages"} <= set(found.get_table_names())
        assert "ix_turns_session_id_id" in {i["name"] for i in found.get_indexes("turns")}
        indexes = {i["name"]: i for i in found.get_indexes("channel_sessions")}
        open_key = indexes["uq_channel_sessions_open_channel_key"]
        assert open_key["unique"]
        # The partial index keeps its WHERE on both backends.
        where = open_key.get("dialect_options", {}).get(f"{conn.dialect.name}_where")
        assert where is not None and "archived_at IS NULL" in str(where)

    try:
        await db.run(check)
    finally:
        await db.close()


def test_alembic_cli_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """env.py also runs from a URL (online, sync or async driver) and offline (SQL script)."""
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"):
        config = alembic_config()
        config.set_main_option("sqlalchemy.url", url)
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        command.upgrade(config, "head")
        with closing(sqlite3.connect(_db_path(url))) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
            assert conn.execute("SELECT count(*) FROM turn_messages").fetchone() == (0,)

    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql://localhost/tavernkeep")
    capsys.readouterr()
    command.upgrade(config, "head", sql=True)
    script = capsys.readouterr().out
    assert "CREATE UNIQUE INDEX uq_channel_sessions_open_channel_key" in script
    assert "WHERE archived_at IS NULL" in script and "TIMESTAMP WITH TIME ZONE" in script


async def test_open_without_migrate_leaves_file_empty(empty_db_url: str) -> None:
    db = await Database.open(empty_db_url, migrate=False)
    try:
        assert await db.run(lambda s: inspect(s.connection()).get_table_names()) == []
    finally:
        await db.close()


async def test_open_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    db = await Database.open(f"sqlite+aiosqlite:///{path}")
    try:
        await Repository(db).ensure_guild(GUILD, "g")
    finally:
        await db.close()
    assert path.is_file()


@pytest.mark.sqlite_only("SQLite pragmas")
async def test_pragmas_on_every_connection(db: Database) -> None:
    def pragmas(run: Any) -> tuple[Any, ...]:
        return tuple([run(f"PRAGMA {p}").scalar() for p in ("journal_mode", "foreign_keys", "busy_timeout")])

    expected = ("wal", 1, 5000)
    # Several connections checked out at once: each one is new and must carry the pragmas.
    conns = [db.engine.connect() for _ in range(4)]
    try:
        for conn in conns:
            assert pragmas(conn.exec_driver_sql) == expected
        assert len({id(c.connection.dbapi_connection) for c in conns}) == 4
    finally:
        for conn in conns:
            conn.close()
    assert await db.run(lambda s: pragmas(lambda q: s.execute(text(q)))) == expected
    assert await db.run(lambda s: pragmas(lambda q: s.execute(text(q))), write=True) == expected
    assert await db.run(lambda s: s.execute(text("PRAGMA synchronous")).scalar(), write=True) == 1  # NORMAL


@pytest.mark.sqlite_only("SQLite's BEGIN IMMEDIATE (PostgreSQL: tests/test_postgres.py, the channel locks)")
async def test_write_sessions_begin_immediate(db: Database, db_url: str) -> None:
    def try_write_lock() -> bool:
        other = sqlite3.connect(_db_path(db_url), timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError as error:
            assert "locked" in str(error)
            return False
        finally:
            other.close()

    def holds(s: Any) -> bool:
        s.execute(text("SELECT count(*) FROM turns"))
        return not try_write_lock()

    assert not await db.run(holds)  # a read transaction takes no write lock
    assert await db.run(holds, write=True)  # the write transaction reserved the database at BEGIN
    assert try_write_lock()


async def test_reopened_database_keeps_everything(db_url: str) -> None:
    db = await Database.open(db_url)
    repo = Repository(db)
    await repo.ensure_guild(GUILD, "Tavern")
    persona = await repo.create_persona(GUILD, "Bard", "A bard.", created_by=USER)
    session = await repo.start_session(
        "discord:1", guild_id=GUILD, persona_id=persona.id, settings={"t": 0.7}
    )
    turn = await repo.append_turn(session.id, Role.USER, "hello", author_id=USER, message_ids=[10, 11])
    await db.close()

    db = await Database.open(db_url)
    try:
        repo = Repository(db)
        assert await repo.get_persona(GUILD, "Bard") == persona
        assert await repo.get_active_session("discord:1") == session
        assert await repo.recent_turns(session.id, 10) == [turn]
        assert await repo.turn_by_message(11) == turn
    finally:
        await db.close()


# --- guilds and personas ---------------------------------------------------------------------------


async def test_ensure_guild_creates_and_renames(repo: Repository, db: Database) -> None:
    await repo.ensure_guild(GUILD, "Old")
    await repo.ensure_guild(GUILD, "New")
    await repo.ensure_guild(GUILD, "New")
    rows = await db.run(lambda s: s.execute(text("SELECT id, name FROM guilds")).all())
    assert [tuple(r) for r in rows] == [(GUILD, "New")]


async def test_persona_round_trip(repo: Repository) -> None:
    created = await repo.create_persona(GUILD, "Bard", "Sings.", created_by=USER)
    assert isinstance(created, Persona)
    assert (created.guild_id, created.name, created.text, created.created_by) == (
        GUILD,
        "Bard",
        "Sings.",
        USER,
    )
    _assert_recent(created.created_at)
    assert await repo.get_persona(GUILD, "Bard") == created
    assert await repo.get_persona(OTHER_GUILD, "Bard") is None

    await repo.create_persona(GUILD, "Alchemist", "Brews.")
    assert [p.name for p in await repo.list_personas(GUILD)] == ["Alchemist", "Bard"]
    assert await repo.list_personas(OTHER_GUILD) == []

    updated = await repo.update_persona(GUILD, "Bard", "Sings loudly.")
    assert updated is not None and updated.text == "Sings loudly." and updated.id == created.id
    assert updated.updated_at >= created.updated_at and updated.created_at == created.created_at
    assert await repo.get_persona(GUILD, "Bard") == updated
    assert await repo.update_persona(GUILD, "Nobody", "x") is None

    assert await repo.delete_persona(GUILD, "Bard") is True
    assert await repo.delete_persona(GUILD, "Bard") is False
    assert await repo.get_persona(GUILD, "Bard") is None


async def test_persona_names_unique_per_guild_and_globally(repo: Repository) -> None:
    await repo.create_persona(GUILD, "Bard", "one")
    with pytest.raises(PersonaExists):
        await repo.create_persona(GUILD, "Bard", "two")
    assert (await repo.get_persona(GUILD, "Bard")).text == "one"  # type: ignore[union-attr]
    await repo.create_persona(OTHER_GUILD, "Bard", "other guild")  # fine elsewhere

    await repo.create_persona(None, "Narrator", "global")
    with pytest.raises(PersonaExists):
        await repo.create_persona(None, "Narrator", "again")
    assert [p.name for p in await repo.list_personas(None)] == ["Narrator"]
    assert (await repo.get_persona(None, "Narrator")).text == "global"  # type: ignore[union-attr]


async def test_a_persona_played_in_an_open_session_is_not_deleted(repo: Repository) -> None:
    """Open sessions, running or paused, keep their persona: the delete is refused naming them, and
    goes through once only archived sessions used it (those lose the link, not their turns)."""
    persona = await repo.create_persona(GUILD, "Bard", "Sings.")
    first = await repo.start_session("discord:1", guild_id=GUILD, persona_id=persona.id)
    paused = await repo.start_session("discord:2", guild_id=GUILD, persona_id=persona.id)
    await repo.set_session_active(paused.id, False)
    await repo.start_session("discord:3", guild_id=GUILD, persona_text="Someone else.")

    with pytest.raises(PersonaInUse) as refused:
        await repo.delete_persona(GUILD, "Bard")
    assert refused.value.channel_keys == ("discord:1", "discord:2")
    assert await repo.get_persona(GUILD, "Bard") == persona
    assert (await repo.get_active_session("discord:2")).persona_text == "Sings."

    await repo.archive_session(first.id)  # the fresh session of discord:1 still plays it
    with pytest.raises(PersonaInUse):
        await repo.delete_persona(GUILD, "Bard")
    await repo.start_session("discord:1", persona_text="A new character.")
    await repo.start_session("discord:2", persona_text="Another one.")
    turn = await repo.append_turn(first.id, Role.USER, "kept")
    assert await repo.delete_persona(GUILD, "Bard")
    assert await repo.recent_turns(first.id, 10) == [turn]


# --- sessions --------------------------------------------------------------------------------------


async def test_session_round_trip(repo: Repository) -> None:
    assert await repo.get_active_session("discord:1") is None
    persona = await repo.create_persona(GUILD, "Bard", "Sings.")

    started = await repo.start_session(
        "discord:1", guild_id=GUILD, persona_id=persona.id, settings={"temp": 0.8}
    )
    assert isinstance(started, ChannelSession)
    assert (started.channel_key, started.guild_id, started.active) == ("discord:1", GUILD, True)
    assert (started.persona_name, started.persona_text, started.settings) == ("Bard", "Sings.", {"temp": 0.8})
    assert started.archived_at is None
    _assert_recent(started.created_at)  # type: ignore[arg-type]
    assert await repo.get_active_session("discord:1") == started

    paused = await repo.set_session_active(started.id, False)
    assert paused.active is False and paused.id == started.id
    assert await repo.get_active_session("discord:1") == paused  # paused sessions are still the open one
    assert await repo.list_active_sessions() == []

    # Starting again re-activates the same session; the persona is kept when none is given.
    resumed = await repo.start_session("discord:1")
    assert resumed.id == started.id and resumed.active and resumed.persona_id == persona.id

    # Giving an inline persona replaces the named one.
    inline = await repo.start_session("discord:1", persona_text="A pirate.")
    assert (inline.id, inline.persona_id, inline.persona_name, inline.persona_text) == (
        started.id,
        None,
        None,
        "A pirate.",
    )
    assert inline.settings == {"temp": 0.8}

    tuned = await repo.update_session_settings(started.id, {"max_tokens": 200, "stop": ["\n"]})
    assert tuned.settings == {"max_tokens": 200, "stop": ["\n"]}
    assert (await repo.get_active_session("discord:1")).settings == tuned.settings  # type: ignore[union-attr]

    local = await repo.start_session("local:test")
    assert (local.guild_id, local.persona_id, local.persona_name, local.persona_text) == (
        None,
        None,
        None,
        "",
    )
    assert [s.channel_key for s in await repo.list_active_sessions()] == ["discord:1", "local:test"]


async def test_session_errors(repo: Repository) -> None:
    with pytest.raises(SessionNotFound):
        await repo.set_session_active(999, True)
    with pytest.raises(SessionNotFound):
        await repo.update_session_settings(999, {})
    with pytest.raises(SessionNotFound):
        await repo.archive_session(999)
    with pytest.raises(PersonaNotFound):
        await repo.start_session("discord:1", persona_id=999)
    assert await repo.get_active_session("discord:1") is None


async def test_at_most_one_open_session_per_channel(repo: Repository, db: Database) -> None:
    first = await repo.start_session("discord:1")
    assert (await repo.start_session("discord:1")).id == first.id

    def second_open_row(s: Any) -> None:  # the partial unique index refuses a second open row
        s.add(ChannelSessionRow(channel_key="discord:1", active=True, settings={}))
        s.flush()

    with pytest.raises(IntegrityError):
        await db.run(second_open_row, write=True)

    concurrent = await asyncio.gather(*(repo.start_session("discord:2") for _ in range(10)))
    assert len({s.id for s in concurrent}) == 1

    new = await repo.archive_session(first.id)  # archived rows do not count
    query = text("SELECT id, archived_at IS NULL FROM channel_sessions WHERE channel_key = 'discord:1' ORDER BY id")
    rows = await db.run(lambda s: s.execute(query).all())
    assert [tuple(r) for r in rows] == [(first.id, 0), (new.id, 1)]


async def test_archive_session_keeps_old_turns_and_starts_empty(repo: Repository) -> None:
    persona = await repo.create_persona(GUILD, "Bard", "Sings.")
    old = await repo.start_session("discord:1", guild_id=GUILD, persona_id=persona.id, settings={"k": 1})
    old = await repo.set_session_active(old.id, False)
    turns = [await repo.append_turn(old.id, Role.USER, f"t{i}", message_ids=[100 + i]) for i in range(3)]

    new = await repo.archive_session(old.id)
    assert new.id != old.id and new.archived_at is None
    assert (new.channel_key, new.guild_id, new.persona_id, new.persona_text, new.settings, new.active) == (
        "discord:1",
        GUILD,
        persona.id,
        "Sings.",
        {"k": 1},
        False,
    )
    assert await repo.get_active_session("discord:1") == new
    assert await repo.count_turns(new.id) == 0
    assert await repo.recent_turns(new.id, 10) == []
    assert await repo.latest_turn(new.id) is None
    assert await repo.recent_turns(old.id, 10) == turns
    assert (await repo.turn_by_message(101)).session_id == old.id  # type: ignore[union-attr]

    # Archiving the already archived session again (a double reset) opens nothing new.
    assert await repo.archive_session(old.id) == new
    newer = await repo.archive_session(new.id)
    assert newer.id not in (old.id, new.id)


# --- turns -----------------------------------------------------------------------------------------


async def test_turn_round_trip(repo: Repository) -> None:
    session = await repo.start_session("discord:1")
    user = await repo.append_turn(
        session.id, Role.USER, "Hi there", author_id=USER, author_name="Ann", message_ids=[1001]
    )
    assert isinstance(user, Turn)
    assert (user.session_id, user.role, user.author_id, user.author_name, user.content) == (
        session.id,
        Role.USER,
        USER,
        "Ann",
        "Hi there",
    )
    assert user.status is TurnStatus.COMPLETE and user.message_ids == (1001,)
    _assert_recent(user.created_at)

    reply = await repo.append_turn(
        session.id, "model", "Part one", message_ids=[2001, 2002], status=TurnStatus.INTERRUPTED
    )
    assert reply.role is Role.MODEL and reply.status is TurnStatus.INTERRUPTED
    assert reply.created_at >= user.created_at
    for message_id in (2001, 2002):
        assert await repo.turn_by_message(message_id) == reply
    assert await repo.turn_by_message(9999) is None

    extended = await repo.add_turn_messages(reply.id, [2003, 2004])
    assert extended.message_ids == (2001, 2002, 2003, 2004)
    assert await repo.turn_by_message(2004) == extended

    edited = await repo.edit_turn(reply.id, "Part one and two", status=TurnStatus.COMPLETE)
    assert edited is not None
    assert (edited.content, edited.status, edited.message_ids) == (
        "Part one and two",
        TurnStatus.COMPLETE,
        (2001, 2002, 2003, 2004),
    )
    kept = await repo.edit_turn(reply.id, "Again")
    assert kept is not None and kept.status is TurnStatus.COMPLETE
    assert await repo.edit_turn(9999, "x") is None

    system = await repo.append_turn(session.id, Role.SYSTEM, "note")
    assert system.message_ids == ()
    assert await repo.count_turns(session.id) == 3
    assert await repo.latest_turn(session.id) == system
    assert [t.id for t in await repo.recent_turns(session.id, 10)] == [user.id, reply.id, system.id]

    assert await repo.delete_turn(reply.id) is True
    assert await repo.delete_turn(reply.id) is False
    assert await repo.turn_by_message(2001) is None  # message rows went with the turn
    assert await repo.count_turns(session.id) == 2
    with pytest.raises(TurnNotFound):
        await repo.add_turn_messages(reply.id, [3000])
    with pytest.raises(SessionNotFound):
        await repo.append_turn(9999, Role.USER, "x")

    # Turn ids are never reused, even for the newest deleted turn.
    assert await repo.delete_turn(system.id)
    assert (await repo.append_turn(session.id, Role.USER, "later")).id > system.id


async def test_recent_turns_returns_newest_in_order(repo: Repository, db: Database) -> None:
    a = await repo.start_session("discord:a")
    b = await repo.start_session("discord:b")
    for i in range(30):
        await repo.append_turn(a.id, Role.USER, f"a{i}")
        await repo.append_turn(b.id, Role.MODEL, f"b{i}")

    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    with _before_each_statement(db, capture):
        recent = await repo.recent_turns(a.id, 5)
    assert [t.content for t in recent] == ["a25", "a26", "a27", "a28", "a29"]
    # The turns (a LIMIT over the index, newest first), then the messages of those turns only.
    turns, messages = [q for q in statements if "FROM turns" in q or "FROM turn_messages" in q]
    assert "ORDER BY turns.id DESC" in turns and "LIMIT" in turns
    assert "turns.id >= " in messages

    assert [t.content for t in await repo.recent_turns(b.id, 2)] == ["b28", "b29"]
    assert len(await repo.recent_turns(a.id, 100)) == 30
    assert await repo.recent_turns(a.id, 0) == []


@pytest.mark.sqlite_only("SQLite's query plans")
async def test_window_queries_use_the_index(repo: Repository, db: Database) -> None:
    session = await repo.start_session("discord:1")
    for i in range(20):
        await repo.append_turn(session.id, Role.USER, str(i))
    params = {"session_id": session.id, "limit": 5, "first": 3}
    for query in (newest_turns_query(), messages_from_query()):
        bound = query.params(**params)
        sql = str(bound.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
        plan = await db.run(lambda s, sql=sql: " | ".join(
            str(r[-1]) for r in s.execute(text(f"EXPLAIN QUERY PLAN {sql}"))))
        assert "INDEX ix_turns_session_id_id (session_id=?" in plan, (sql, plan)
        assert "SCAN turns" not in plan and "TEMP B-TREE" not in plan, (sql, plan)


@pytest.mark.sqlite_only("asyncpg's work runs on the event loop, no thread involved")
async def test_hot_paths_run_on_a_database_thread(repo: Repository, db: Database) -> None:
    """Appends and window reads run whole on a database thread: nothing of them on the loop's thread."""
    session = await repo.start_session("discord:1")
    threads: list[str] = []

    def capture(*_args: Any) -> None:
        threads.append(threading.current_thread().name)

    with _before_each_statement(db, capture):
        turn = await repo.append_turn(session.id, Role.USER, "hello", message_ids=[1])
        await repo.add_turn_messages(turn.id, [2])
        assert [t.message_ids for t in await repo.recent_turns(session.id, 10)] == [(1, 2)]
    assert threads and all(name.startswith("tavernkeep-db") for name in threads), threads


async def test_in_memory_database_shares_one_connection() -> None:
    """In memory each connection would be a database of its own: every call uses the one connection."""
    db = await Database.open("sqlite+aiosqlite://")
    try:
        assert db.engine.url.get_driver_name() == "pysqlite"
        repo = Repository(db)
        session = await repo.start_session("discord:1")
        turn = await repo.append_turn(session.id, Role.USER, "hello", message_ids=[1])
        assert await repo.recent_turns(session.id, 10) == [turn]
    finally:
        await db.close()


async def test_cancelled_write_is_finished_before_the_cancellation_returns(repo: Repository, db: Database) -> None:
    """A write on the database thread cannot be stopped halfway: the cancelled caller waits for it,
    so the write lock is never handed on while it still runs, and the stored turn is whole."""
    session = await repo.start_session("discord:1")
    started = threading.Event()

    def slow_insert(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO turns"):
            started.set()
            time.sleep(0.3)

    engine = db.engine
    event.listen(engine, "before_cursor_execute", slow_insert)
    try:
        task = asyncio.create_task(repo.append_turn(session.id, Role.USER, "hello", message_ids=[7]))
        assert await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        event.remove(engine, "before_cursor_execute", slow_insert)
    [turn] = await repo.recent_turns(session.id, 10)
    assert (turn.content, turn.message_ids) == ("hello", (7,))


def test_utc_datetimes_read_from_sqlite_text() -> None:
    process = UTCDateTime().result_processor(sqlite_dialect(), None)
    assert process is not None
    assert process("2026-11-24 16:01:16.323311") == datetime(2026, 11, 24, 16, 1, 16, 323311, tzinfo=UTC)
    assert process("2026-11-24 16:01:16") == datetime(2026, 11, 24, 16, 1, 16, tzinfo=UTC)
    shifted = process("2026-11-24 18:01:16+02:00")
    assert shifted == datetime(2026, 11, 24, 16, 1, 16, tzinfo=UTC) and shifted.tzinfo is UTC
    assert process(None) is None


async def test_duplicate_message_ids_write_nothing(repo: Repository) -> None:
    session = await repo.start_session("discord:1")
    first = await repo.append_turn(session.id, Role.USER, "one", message_ids=[42])

    with pytest.raises(DuplicateMessage) as info:
        await repo.append_turn(session.id, Role.MODEL, "two", message_ids=[43, 42])
    assert info.value.message_ids == (42,)
    with pytest.raises(DuplicateMessage):
        await repo.append_turn(session.id, Role.MODEL, "three", message_ids=[50, 50])
    with pytest.raises(DuplicateMessage):
        await repo.add_turn_messages(first.id, [44, 42])

    assert await repo.count_turns(session.id) == 1
    assert await repo.latest_turn(session.id) == first
    for unused in (43, 44, 50):
        assert await repo.turn_by_message(unused) is None
    # The ids of the failed writes are still free.
    assert (await repo.append_turn(session.id, Role.MODEL, "ok", message_ids=[43, 50])).message_ids == (
        43,
        50,
    )


async def test_concurrent_writers_do_not_lock(repo: Repository) -> None:
    sessions = [await repo.start_session(f"discord:{i}") for i in range(5)]

    async def writer(task: int) -> list[Turn]:
        session = sessions[task % len(sessions)]
        written = []
        for i in range(20):
            message_id = task * 1000 + i
            written.append(
                await repo.append_turn(session.id, Role.USER, f"{task}:{i}", message_ids=[message_id])
            )
            if i % 5 == 0:
                await repo.recent_turns(session.id, 10)
        return written

    started = time.perf_counter()
    results = await asyncio.gather(*(writer(task) for task in range(50)))
    elapsed = time.perf_counter() - started

    written = [turn for batch in results for turn in batch]
    assert len(written) == 1000 and len({t.id for t in written}) == 1000
    assert sum([await repo.count_turns(s.id) for s in sessions]) == 1000
    for turn in written[::97]:
        assert await repo.turn_by_message(turn.message_ids[0]) == turn
    assert elapsed < 60, elapsed


async def test_concurrent_writers_across_engines(db_url: str) -> None:
    """Separate engines on one file (like separate processes) rely on BEGIN IMMEDIATE + busy_timeout."""
    dbs = [await Database.open(db_url) for _ in range(3)]
    try:
        repos = [Repository(db) for db in dbs]
        session = await repos[0].start_session("discord:shared")

        async def writer(task: int) -> None:
            repo = repos[task % len(repos)]
            for i in range(20):
                await repo.append_turn(session.id, Role.USER, f"{task}:{i}", message_ids=[task * 1000 + i])

        await asyncio.gather(*(writer(task) for task in range(15)))
        assert await repos[1].count_turns(session.id) == 300
    finally:
        for db in dbs:
            await db.close()


async def test_meta_values_round_trip(db_url: str) -> None:
    """Bot-wide values are stored, replaced and read back."""
    db = await Database.open(db_url)
    try:
        repo = Repository(db)
        assert await repo.get_meta("commands") is None
        await repo.set_meta("commands", "abc")
        await repo.set_meta("commands", "def")
        assert await repo.get_meta("commands") == "def"
    finally:
        await db.close()


# --- one key written by many writers at once -------------------------------------------------------

# Writers of one key at once, half of them in each of two processes.
WRITERS = 20


@pytest.fixture
async def two_processes(db_url: str) -> AsyncIterator[list[Repository]]:
    """Two repositories on one database, each with an engine and pool of its own, as two bot processes."""
    dbs = [await Database.open(db_url) for _ in range(2)]
    try:
        yield [Repository(db) for db in dbs]
    finally:
        for db in dbs:
            await db.close()


async def _rows(repo: Repository, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    return await repo.db.run(lambda s: [tuple(row) for row in s.execute(text(sql), params).all()])


async def test_a_guild_ensured_by_many_writers_at_once_is_stored_once(two_processes: list[Repository]) -> None:
    names = [f"Tavern {i}" for i in range(WRITERS)]
    await asyncio.gather(*(two_processes[i % 2].ensure_guild(GUILD, name) for i, name in enumerate(names)))
    [(name,)] = await _rows(two_processes[0], "SELECT name FROM guilds WHERE id = :id", id=GUILD)
    assert name in names


async def test_a_meta_value_set_by_many_writers_at_once_is_stored_once(two_processes: list[Repository]) -> None:
    values = [f"digest {i}" for i in range(WRITERS)]
    await asyncio.gather(*(two_processes[i % 2].set_meta("commands", value) for i, value in enumerate(values)))
    [(value,)] = await _rows(two_processes[0], "SELECT value FROM meta WHERE key = 'commands'")
    assert value in values and await two_processes[1].get_meta("commands") == value


async def test_a_member_persona_set_by_many_writers_at_once_is_stored_once(two_processes: list[Repository]) -> None:
    texts = [f"Alice, take {i}." for i in range(WRITERS)]
    await asyncio.gather(*(two_processes[i % 2].set_user_persona(GUILD, USER, t) for i, t in enumerate(texts)))
    query = "SELECT text FROM user_personas WHERE guild_id = :guild AND user_id = :user"
    [(stored,)] = await _rows(two_processes[0], query, guild=GUILD, user=USER)
    assert stored in texts and await two_processes[1].get_user_persona(GUILD, USER) == stored

    # Removals among the writes: the member ends with one of the texts or none, never two.
    mixed = [None if i % 3 else f"Alice, retake {i}." for i in range(WRITERS)]
    await asyncio.gather(*(two_processes[i % 2].set_user_persona(GUILD, USER, t) for i, t in enumerate(mixed)))
    rows = await _rows(two_processes[0], query, guild=GUILD, user=USER)
    assert rows in ([], *([(t,)] for t in mixed if t is not None))


async def test_a_character_webhook_saved_by_many_writers_at_once_is_stored_once(
    two_processes: list[Repository],
) -> None:
    mira = await two_processes[0].create_persona(GUILD, "Mira", "A ranger.")
    channel = 555_555_555_555_555_555
    webhooks = [CharacterWebhook(channel, mira.id, 70 + i, f"token-{i}", f"{i:064x}") for i in range(WRITERS)]
    saved = await asyncio.gather(*(two_processes[i % 2].save_character_webhook(w) for i, w in enumerate(webhooks)))
    assert saved == webhooks  # each writer is handed back what it stored
    query = "SELECT webhook_id FROM character_webhooks WHERE channel_id = :channel AND persona_id = :persona"
    [(webhook_id,)] = await _rows(two_processes[0], query, channel=channel, persona=mira.id)
    assert await two_processes[1].get_character_webhook(channel, mira.id) == webhooks[webhook_id - 70]

    missing = [CharacterWebhook(channel, 9999, 90 + i, f"token-{i}") for i in range(WRITERS)]
    results = await asyncio.gather(
        *(two_processes[i % 2].save_character_webhook(w) for i, w in enumerate(missing)), return_exceptions=True
    )
    assert all(isinstance(result, PersonaNotFound) for result in results), results


async def test_migration_0002_marks_reserved_reply_turns_pending(tmp_path: Path) -> None:
    """An empty, interrupted model turn was a reply's reserved place: 0002 makes it pending, and only it."""
    path = tmp_path / "old.db"
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(config, "0001")
    rows = [
        ("model", "", "interrupted"),  # reserved, never written: pending
        ("model", "Half a repl", "interrupted"),
        ("model", "A reply.", "complete"),
        ("user", "", "interrupted"),
    ]
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO channel_sessions (id, channel_key, active, settings, created_at) "
                     "VALUES (1, 'discord:1', 1, '{}', '2025-01-01 00:00:00')")
        conn.executemany("INSERT INTO turns (session_id, role, author_name, content, status, created_at) "
                         "VALUES (1, ?, '', ?, ?, '2025-01-01 00:00:00')", rows)

    async with await Database.open(f"sqlite+aiosqlite:///{path}") as db:
        turns = await Repository(db).recent_turns(1, 10)
    assert [t.status for t in turns] == [
        TurnStatus.PENDING, TurnStatus.INTERRUPTED, TurnStatus.COMPLETE, TurnStatus.INTERRUPTED
    ]

    command.downgrade(config, "0001")
    with closing(sqlite3.connect(path)) as conn:
        assert [r[0] for r in conn.execute("SELECT status FROM turns ORDER BY id")] == [
            "interrupted", "interrupted", "complete", "interrupted"
        ]


def test_migration_0002_is_plain_sql_on_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql://localhost/tavernkeep")
    capsys.readouterr()
    command.upgrade(config, "0001:0002", sql=True)
    script = capsys.readouterr().out
    assert "UPDATE turns SET status='pending' WHERE turns.role = 'model' AND turns.status = 'interrupted' " \
           "AND turns.content = ''" in script
    assert "_alembic_tmp" not in script  # no table copy


async def test_a_refused_write_is_told_apart_by_the_rows_not_the_driver_message(repo: Repository) -> None:
    """A taken message id and a missing session both break a constraint; which one is read back from
    the store, so a driver that words its errors differently changes nothing."""
    session = await repo.start_session("discord:1")
    await repo.append_turn(session.id, Role.USER, "one", message_ids=[42])
    with pytest.raises(SessionNotFound):
        await repo.append_turn(999, Role.USER, "lost", message_ids=[43])
    with pytest.raises(DuplicateMessage):
        await repo.append_turn(999, Role.USER, "lost", message_ids=[42])
    with pytest.raises(SessionNotFound):
        await repo.append_turn(999, Role.USER, "lost")
    assert await repo.turn_by_message(43) is None
