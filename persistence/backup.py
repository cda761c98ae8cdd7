"""Consistent copies of a live SQLite database (SQLite's online backup API)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url


class BackupError(Exception):
    """The backup could not be written; the message says why in one line."""


def sqlite_path(url: str) -> Path:
    """The file behind a SQLite URL; BackupError for other databases."""
    parsed = make_url(url)
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
    """Write a consistent copy of the SQLite database at `url` to `target`; return its size in bytes."""
    return await asyncio.to_thread(_copy, sqlite_path(url), target)
