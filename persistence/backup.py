"""Consistent copies of a live SQLite database (SQLite's online backup API); for PostgreSQL, the
`pg_dump` command that does the same."""

from __future__ import annotations

import asyncio
import shlex
import sqlite3
from pathlib import Path

from sqlalchemy.engine import URL, make_url


class BackupError(Exception):
    """The backup could not be written; the message says why in one line."""


def pg_dump_command(url: str | URL, target: Path) -> str:
    """The `pg_dump` command line writing the PostgreSQL database of `url` to `target` (custom format,
    restored with `pg_restore`); the password is left out (libpq reads PGPASSWORD or ~/.pgpass)."""
    parsed = make_url(url)
    libpq = URL.create("postgresql", username=parsed.username, host=parsed.host, port=parsed.port,
                       database=parsed.database, query=parsed.query)
    return shlex.join(["pg_dump", "--format=custom", f"--file={target}", libpq.render_as_string()])


def sqlite_path(url: str, target: Path | None = None) -> Path:
    """The file behind a SQLite URL; BackupError for other databases (for PostgreSQL, naming the
    `pg_dump` command to run instead)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        command = pg_dump_command(parsed, target or Path("tavernkeep.dump"))
        raise BackupError(f"backups are built in for SQLite files only; for PostgreSQL run: {command}")
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        raise BackupError("backups are built in for SQLite files only; use your database's own tools")
    return Path(parsed.database).expanduser()


def _copy(source: Path, target: Path) -> int:
    if not source.is_file():
        raise BackupError(f"database file not found: {source}")
    if target.exists():
        raise BackupError(f"{target} already exists; choose a new file name")
    partial = target.with_name(target.name + ".partial")
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                # One step: the copy is a snapshot of a single moment, even while others write (WAL).
                src.backup(dst, pages=-1)
                (result,) = dst.execute("PRAGMA integrity_check").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        if result != "ok":
            raise BackupError(f"the copy failed its integrity check: {result}")
        partial.replace(target)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"backup failed: {exc}") from exc
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"cannot write {target}: {exc.strerror}") from exc
    return target.stat().st_size


async def backup_database(url: str, target: Path) -> int:
    """Write a consistent copy of the SQLite database at `url` to `target`; return its size in bytes.
    BackupError for other databases (for PostgreSQL naming the `pg_dump` command for `target`)."""
    return await asyncio.to_thread(_copy, sqlite_path(url, target), target)
