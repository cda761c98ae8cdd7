"""Engine and session setup: SQLite pragmas, explicit transactions, migrations on open (under a lock on
PostgreSQL), and where every piece of database work runs.

One access style: each repository call is a plain function over a sync `Session` (`Database.run`).
A SQLite file is reached through the standard sqlite3 module on database threads, so the event loop
hands work over once per call instead of once per driver call: benchmark 5 measured both styles on
SQLite (README): through an AsyncSession over aiosqlite a window load took p50/p99 2.7/4.3 ms and an
append 1.5/2.8 ms; this way 1.4/1.8 ms and 0.6/0.9 ms. (aiosqlite itself runs each driver call on a
thread of its own: the cost was the hand-offs.) PostgreSQL is reached through asyncpg, whose I/O is
native to the event loop: the same function runs through `AsyncSession.run_sync`, each statement an
await on the loop and no thread involved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from persistence.locks import MIGRATION_LOCK

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option read by the SQLite `begin` listener: the BEGIN flavour to emit.
BEGIN_MODE_OPTION = "tavernkeep_sqlite_begin"

SQLITE_PRAGMAS = (
    # busy_timeout first: switching to WAL may itself have to wait for a lock.
    "PRAGMA busy_timeout=5000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",
)


def _sqlite_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    """Take BEGIN away from the sqlite3 driver and set the pragmas on every new connection."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    """Emit BEGIN ourselves: DEFERRED for reads, IMMEDIATE when the connection is tagged for writing."""
    mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite database kept in a plain file (None in memory or for a URI)."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:") or url.query.get("uri"):
        return None
    return Path(database).expanduser()


# Async drivers named in a URL (the config's default names aiosqlite) and the sync driver used instead.
SYNC_DRIVERS = {
    "aiosqlite": "pysqlite",
    "psycopg_async": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
}
# Async drivers kept as they are: their work runs on the event loop (`AsyncSession.run_sync`).
LOOP_DRIVERS = frozenset({"asyncpg"})
# Database threads: SQLite has one writer at a time (and a reader next to it in WAL mode); a server
# database reached through a sync driver gets one thread per pooled connection.
SQLITE_THREADS = 2
SERVER_THREADS = 8
# Pooled connections of a database reached through asyncpg.
LOOP_POOL_SIZE = 8


def sync_url(url: str | URL) -> URL:
    """`url` with its async driver swapped for the sync one that does the same work (drivers in
    `LOOP_DRIVERS` and sync drivers are kept)."""
    url = make_url(url)
    driver = url.get_driver_name()
    if driver in SYNC_DRIVERS:
        return url.set(drivername=f"{url.get_backend_name()}+{SYNC_DRIVERS[driver]}")
    return url


def _listen_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)


async def _finish(work: asyncio.Future[T]) -> T:
    """Await `work`, which keeps running if the caller is cancelled: wait for it to end before
    passing the cancellation on, so a write lock is never released while the write goes on."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if not work.cancelled() and (error := work.exception()) is not None:
            log.error("a write failed after its caller was cancelled", exc_info=error)
        raise


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini); `connection` is handed to env.py."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    """Run `alembic upgrade head` on an open sync connection (inside its transaction).

    On PostgreSQL the transaction first takes the migration lock, so of several processes starting
    at once one migrates and the others wait, then find the schema at head (DDL is transactional
    there: a failed migration leaves nothing behind).
    """
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(*MIGRATION_LOCK)))
    command.upgrade(alembic_config(connection), "head")
    if connection.dialect.name != "sqlite":
        return
    # Foreign keys are off while migrating (see `_set_foreign_keys`): check what they would have caught.
    if problems := connection.exec_driver_sql("PRAGMA foreign_key_check").all():
        raise RuntimeError(f"migration left foreign key violations: {problems[:5]}")


def _set_foreign_keys(connection: Connection, enabled: bool) -> None:
    """Switch SQLite foreign key enforcement; only effective outside a transaction.

    Batch migrations copy a table, drop the original and rename the copy; with enforcement
    on, dropping a parent table would run its ON DELETE CASCADE actions on the children.
    """
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA foreign_keys={'ON' if enabled else 'OFF'}")
    finally:
        cursor.close()


class Database:
    """An engine and the place every piece of work on it runs: database threads, or the event loop
    for a driver in `LOOP_DRIVERS` (asyncpg).

    Use `Database.open(url)` to build one and `run(work)` to run `work(session)`; a writing `work`
    commits explicitly. On SQLite, write sessions start with `BEGIN IMMEDIATE`, so a writer takes the
    write lock up front (waiting up to the busy timeout) instead of failing with "database is locked"
    when upgrading a read lock, and writers of this process also queue on an asyncio lock, so the busy
    timeout is only ever spent waiting on other processes. PostgreSQL writes run concurrently; the
    repository serializes those of one channel with a lock of its own (`persistence.locks`).
    """

    def __init__(self, engine: Engine | AsyncEngine, threads: int = 0) -> None:
        """Wrap an engine that is already configured (see `Database.open`): a sync one with `threads`
        database threads, or an async one (its work runs on the event loop)."""
        self._async_engine = engine if isinstance(engine, AsyncEngine) else None
        # The sync engine: for events, the dialect and the URL (an async engine's is its sync twin).
        self.engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_engine = (
            self.engine.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"}) if self.is_sqlite else self.engine
        )
        self._threads = (
            None if self._async_engine is not None
            else ThreadPoolExecutor(threads, thread_name_prefix="tavernkeep-db")
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)
        self._loop_sessions = (
            None if self._async_engine is None else async_sessionmaker(self._async_engine, expire_on_commit=False)
        )

    @classmethod
    async def open(cls, url: str | URL, *, migrate: bool = True, **engine_kwargs: Any) -> Database:
        """Create the engine for `url` (any SQLAlchemy URL; an async driver is swapped for its sync
        twin, see `SYNC_DRIVERS`, except asyncpg) and, by default, migrate to head."""
        url = sync_url(url)
        db: Database
        if url.get_driver_name() in LOOP_DRIVERS:
            engine_kwargs.setdefault("pool_size", LOOP_POOL_SIZE)
            db = cls(create_async_engine(url, **engine_kwargs))
        else:
            threads = SERVER_THREADS
            if url.get_backend_name() == "sqlite":
                file = _sqlite_file(url)
                threads = SQLITE_THREADS
                if file is not None:
                    file.parent.mkdir(parents=True, exist_ok=True)
                else:  # one connection, or each thread would see a database of its own
                    threads = 1
                    engine_kwargs.setdefault("poolclass", StaticPool)
                    engine_kwargs.setdefault("connect_args", {"check_same_thread": False})
            else:
                engine_kwargs.setdefault("pool_size", threads)
            engine = create_engine(url, **engine_kwargs)
            if engine.dialect.name == "sqlite":
                _listen_sqlite(engine)
            db = cls(engine, threads)
        if migrate:
            try:
                await db.migrate()
            except BaseException:
                await db.close()
                raise
        return db

    async def migrate(self) -> None:
        """Upgrade the schema to the newest Alembic revision (a no-op when already there); safe to run
        from several processes at once (see `_upgrade`)."""
        log.debug("running migrations on %s", self.engine.url.render_as_string(hide_password=True))

        def upgrade(conn: Connection) -> None:
            if self.is_sqlite:
                _set_foreign_keys(conn, False)
            try:
                with conn.begin():
                    _upgrade(conn)
            finally:
                if self.is_sqlite:
                    _set_foreign_keys(conn, True)

        if self._async_engine is not None:
            async with self._async_engine.connect() as conn:
                await _finish(asyncio.ensure_future(conn.run_sync(upgrade)))
            return

        def upgrade_on_thread() -> None:
            with self._write_engine.connect() as conn:
                upgrade(conn)

        async with self._writer():
            await _finish(asyncio.get_running_loop().run_in_executor(self._threads, upgrade_on_thread))

    async def run(self, work: Callable[[Session], T], *, write: bool = False) -> T:
        """Run `work(session)` and return its result; a write must commit.

        The whole of `work` runs at once: on a database thread, or on the event loop between the
        driver's awaits (asyncpg). Writes queue on this process's write lock (SQLite), and once
        started finish even if the caller is cancelled (see `_finish`).
        """
        if self._loop_sessions is not None:
            sessions = self._loop_sessions

            async def run_on_loop() -> T:
                async with sessions() as session:
                    return await session.run_sync(work)

            if not write:
                return await run_on_loop()
            return await _finish(asyncio.ensure_future(run_on_loop()))

        thread_sessions = self._write_sessions if write else self._read_sessions

        def run() -> T:
            with thread_sessions() as session:
                return work(session)

        loop = asyncio.get_running_loop()
        if not write:
            return await loop.run_in_executor(self._threads, run)
        async with self._writer():
            return await _finish(loop.run_in_executor(self._threads, run))

    @asynccontextmanager
    async def _writer(self) -> AsyncIterator[None]:
        """Hold this process's SQLite write lock (a no-op on other databases)."""
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    async def drop_connections(self) -> None:
        """Close the pooled connections: the next use opens new ones (with the connect events then in place)."""
        if self._async_engine is not None:
            await self._async_engine.dispose()
            return
        await asyncio.get_running_loop().run_in_executor(self._threads, self.engine.dispose)

    async def close(self) -> None:
        """Wait for running work, then close the pooled connections."""
        if self._async_engine is not None:
            await self._async_engine.dispose()
            return
        await asyncio.get_running_loop().run_in_executor(None, self._close)

    def _close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
        self.engine.dispose()

    async def __aenter__(self) -> Database:
        """Use an opened database as an async context manager that closes it."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the database."""
        await self.close()
