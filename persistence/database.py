"""Engine and session setup: SQLite pragmas, explicit transactions, migrations on open, and the
database threads that run the hot paths of a SQLite file in one step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

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
    """Run `alembic upgrade head` on an open sync connection (inside its transaction)."""
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


@dataclass(frozen=True)
class _FileAccess:
    """A sync engine on a SQLite file, its session factories and the threads that use them."""

    engine: Engine
    threads: ThreadPoolExecutor
    read: sessionmaker[Session]
    write: sessionmaker[Session]

    @classmethod
    def on(cls, engine: Engine) -> _FileAccess:
        """Sessions of `engine` (writes with `BEGIN IMMEDIATE`) on two threads."""
        writer = engine.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"})
        return cls(
            engine,
            ThreadPoolExecutor(2, thread_name_prefix="tavernkeep-db"),
            sessionmaker(engine, expire_on_commit=False),
            sessionmaker(writer, expire_on_commit=False),
        )

    def close(self) -> None:
        """Wait for running work, then close the connections."""
        self.threads.shutdown()
        self.engine.dispose()


class Database:
    """An async engine plus read and write session factories.

    Use `Database.open(url)` to build one; `read()` and `write()` give sessions whose
    transactions the caller commits explicitly. On SQLite, write sessions start with
    `BEGIN IMMEDIATE`, so a writer takes the write lock up front (waiting up to the busy
    timeout) instead of failing with "database is locked" when upgrading a read lock, and
    writers of this process also queue on an asyncio lock, so the busy timeout is only ever
    spent waiting on other processes. `run_sync` runs a whole piece of sync work at once: on a
    SQLite file, on a database thread.
    """

    def __init__(self, engine: AsyncEngine, file_engine: Engine | None = None) -> None:
        """Wrap engines that are already configured (see `Database.open`); `file_engine`, a sync
        engine on the same SQLite file, runs `run_sync` on threads."""
        self.engine = engine
        self._file = None if file_engine is None else _FileAccess.on(file_engine)
        self.is_sqlite = engine.dialect.name == "sqlite"
        write_engine = (
            engine.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"}) if self.is_sqlite else engine
        )
        self._write_engine = write_engine
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._read_sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(write_engine, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str | URL, *, migrate: bool = True, **engine_kwargs: Any) -> Database:
        """Create the engine for `url` (any SQLAlchemy async URL) and, by default, migrate to head."""
        url = make_url(url)
        sqlite = url.get_backend_name() == "sqlite"
        file = _sqlite_file(url) if sqlite else None
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **engine_kwargs)
        if sqlite:
            _listen_sqlite(engine.sync_engine)
        file_engine = None
        if file is not None:
            file_engine = create_engine(url.set(drivername="sqlite+pysqlite"))
            _listen_sqlite(file_engine)
        db = cls(engine, file_engine)
        if migrate:
            try:
                await db.migrate()
            except BaseException:
                await db.close()
                raise
        return db

    @property
    def sync_engines(self) -> list[Engine]:
        """The sync engines whose connections reach the database (for connection events)."""
        engines = [self.engine.sync_engine]
        if self._file is not None:
            engines.append(self._file.engine)
        return engines

    async def migrate(self) -> None:
        """Upgrade the schema to the newest Alembic revision (a no-op when already there)."""
        log.debug("running migrations on %s", self.engine.url.render_as_string(hide_password=True))
        async with self._writer(), self._write_engine.connect() as conn:
            if self.is_sqlite:
                await conn.run_sync(_set_foreign_keys, False)
            try:
                async with conn.begin():
                    await conn.run_sync(_upgrade)
            finally:
                if self.is_sqlite:
                    await conn.run_sync(_set_foreign_keys, True)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads (deferred transaction; rolled back on exit unless committed)."""
        async with self._read_sessions() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session for writes (`BEGIN IMMEDIATE` on SQLite); commit it explicitly. Do not nest."""
        async with self._writer(), self._write_sessions() as session:
            yield session

    async def run_sync(self, work: Callable[[Session], T], *, write: bool = False) -> T:
        """Run `work(session)` with a sync session and return its result; a write must commit.

        On a SQLite file the whole of it runs on a database thread over a plain sqlite3
        connection: one hand-off from the loop instead of one per driver call, which is most of
        what a short query costs through aiosqlite (a prompt window read: p50 about 5 ms through
        the async session, under 2 ms this way). Elsewhere it runs in the async session's
        `run_sync`. Writes queue on the same lock as `write()`.
        """
        file = self._file
        if file is None:
            async with self.write() if write else self.read() as session:
                return await session.run_sync(work)
        sessions = file.write if write else file.read

        def run() -> T:
            with sessions() as session:
                return work(session)

        loop = asyncio.get_running_loop()
        if not write:
            return await loop.run_in_executor(file.threads, run)
        async with self._writer():
            return await _finish(loop.run_in_executor(file.threads, run))

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
        if self._file is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._file.engine.dispose)
        await self.engine.dispose()

    async def close(self) -> None:
        """Dispose of the engines and their pooled connections."""
        if self._file is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._file.close)
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        """Use an opened database as an async context manager that closes it."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the database."""
        await self.close()
