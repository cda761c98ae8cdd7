"""Async engine and session setup: SQLite pragmas, explicit transactions, migrations on open."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

log = logging.getLogger(__name__)

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


def _prepare_sqlite_path(url: URL) -> None:
    """Create the parent directories of a SQLite database file if needed."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:") or url.query.get("uri"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


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


class Database:
    """An async engine plus read and write session factories.

    Use `Database.open(url)` to build one; `read()` and `write()` give sessions whose
    transactions the caller commits explicitly. On SQLite, write sessions start with
    `BEGIN IMMEDIATE`, so a writer takes the write lock up front (waiting up to the busy
    timeout) instead of failing with "database is locked" when upgrading a read lock, and
    writers of this process also queue on an asyncio lock, so the busy timeout is only ever
    spent waiting on other processes.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        """Wrap an engine that is already configured (see `Database.open`)."""
        self.engine = engine
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
        if sqlite:
            _prepare_sqlite_path(url)
        engine = create_async_engine(url, **engine_kwargs)
        if sqlite:
            event.listen(engine.sync_engine, "connect", _sqlite_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
        db = cls(engine)
        if migrate:
            try:
                await db.migrate()
            except BaseException:
                await engine.dispose()
                raise
        return db

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

    @asynccontextmanager
    async def _writer(self) -> AsyncIterator[None]:
        """Hold this process's SQLite write lock (a no-op on other databases)."""
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    async def close(self) -> None:
        """Dispose of the engine and its pooled connections."""
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        """Use an opened database as an async context manager that closes it."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the database."""
        await self.close()
