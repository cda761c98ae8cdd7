"""User data: export, forget, and consistent backups of a live database."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from persistence.backup import BackupError, backup_database
from persistence.database import Database
from persistence.records import Role
from persistence.repository import Repository


async def seeded(db_url: str) -> tuple[Database, Repository, list[int]]:
    db = await Database.open(db_url)
    repo = Repository(db)
    a = await repo.start_session("discord:1", guild_id=10, persona_text="p")
    b = await repo.start_session("discord:2", guild_id=10, persona_text="p")
    other = await repo.start_session("discord:3", guild_id=20, persona_text="p")
    await repo.append_turn(a.id, Role.USER, "I am Alice", author_id=1, author_name="Alice", message_ids=[100])
    await repo.append_turn(a.id, Role.MODEL, "Hello Alice, welcome! ALICE? Alicent is also here.")
    await repo.append_turn(a.id, Role.USER, "hi all", author_id=2, author_name="Bob")
    await repo.append_turn(b.id, Role.USER, "Alice again", author_id=1, author_name="Alice")
    await repo.append_turn(other.id, Role.USER, "Alice elsewhere", author_id=1, author_name="Alice")
    return db, repo, [a.id, b.id, other.id]


async def test_user_turns_cover_one_guild_only(db_url):
    db, repo, _ = await seeded(db_url)
    try:
        mine = await repo.user_turns(1, 10)
        assert [(key, t.content) for key, t in mine] == [("discord:1", "I am Alice"), ("discord:2", "Alice again")]
    finally:
        await db.close()


async def test_forget_deletes_the_users_turns_of_that_guild_and_changes_nothing_else(db_url):
    db, repo, (a, b, _) = await seeded(db_url)
    try:
        before = [t for s in (a, b) for t in await repo.session_turns(s)]
        assert await repo.count_user_turns(1, 10) == 2
        assert await repo.forget_user(1, 10) == 2
        assert await repo.user_turns(1, 10) == [] and await repo.count_user_turns(1, 10) == 0
        remaining = [t for s in (a, b) for t in await repo.session_turns(s)]
        assert remaining == [t for t in before if t.author_id != 1]  # every other turn as it was
        assert [t.content for t in remaining] == ["Hello Alice, welcome! ALICE? Alicent is also here.", "hi all"]
        assert await repo.turn_by_message(100) is None
        # Another guild is untouched.
        assert [t.content for _, t in await repo.user_turns(1, 20)] == ["Alice elsewhere"]
    finally:
        await db.close()


async def test_user_turns_come_in_pages(db_url):
    db, repo, (a, _, _) = await seeded(db_url)
    try:
        for i in range(5):
            await repo.append_turn(a, Role.USER, f"more {i}", author_id=1, author_name="Alice")
        first = await repo.user_turns(1, 10, limit=3)
        rest = await repo.user_turns(1, 10, after_id=first[-1][1].id, limit=3)
        last = await repo.user_turns(1, 10, after_id=rest[-1][1].id, limit=3)
        assert [t.content for _, t in first + rest + last] == [
            "I am Alice", "Alice again", "more 0", "more 1", "more 2", "more 3", "more 4"
        ]
        assert len(last) == 1
    finally:
        await db.close()


@pytest.mark.sqlite_only("the built-in backup copies SQLite files")
async def test_backup_is_consistent_while_writes_run(db_url, tmp_path):
    db = await Database.open(db_url)
    repo = Repository(db)
    session = await repo.start_session("discord:1", guild_id=1, persona_text="p")
    stop = asyncio.Event()

    async def writer(n: int) -> int:
        count = 0
        while not stop.is_set():
            await repo.append_turn(session.id, Role.USER, f"w{n}-{count}", author_id=n, author_name=f"u{n}")
            count += 1
        return count

    writers = [asyncio.create_task(writer(n)) for n in range(3)]
    try:
        await asyncio.sleep(0.3)
        sizes = [await backup_database(db_url, tmp_path / f"backup{i}.db") for i in range(3)]
    finally:
        stop.set()
        written = sum(await asyncio.gather(*writers))
        await db.close()
    assert all(size > 0 for size in sizes)
    counts = []
    for i in range(3):
        con = sqlite3.connect(tmp_path / f"backup{i}.db")
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts.append(con.execute("SELECT count(*) FROM turns").fetchone()[0])
        con.close()
    assert counts == sorted(counts) and counts[-1] <= written
    assert counts[0] > 0
    # The copy opens as a Tavernkeep database.
    copy = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'backup2.db'}")
    assert await Repository(copy).count_turns(session.id) == counts[-1]
    await copy.close()


@pytest.mark.sqlite_only("the built-in backup copies SQLite files")
async def test_backup_errors_are_one_line(db_url, tmp_path):
    with pytest.raises(BackupError, match="SQLite files only"):
        await backup_database("postgresql+asyncpg://u@h/db", tmp_path / "x.db")
    with pytest.raises(BackupError, match="database file not found"):
        await backup_database(db_url, tmp_path / "x.db")
    db = await Database.open(db_url)
    await db.close()
    (tmp_path / "exists.db").write_bytes(b"")
    with pytest.raises(BackupError, match="already exists"):
        await backup_database(db_url, tmp_path / "exists.db")
    with pytest.raises(BackupError, match=r"cannot write|backup failed"):
        await backup_database(db_url, tmp_path / "missing-dir" / "x.db")


def test_backup_command_copies_the_configured_database(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "live.db"
    con = sqlite3.connect(source)
    con.execute("CREATE TABLE t (x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()
    config = tmp_path / "config.toml"
    config.write_text(f"[database]\nurl = 'sqlite+aiosqlite:///{source}'\n", encoding="utf-8")
    run = [sys.executable, "-m", "bot", "--config", str(config), "backup"]
    ok = subprocess.run([*run, str(tmp_path / "copy.db")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "Backup written" in ok.stdout
    assert sqlite3.connect(tmp_path / "copy.db").execute("SELECT x FROM t").fetchall() == [(1,)]
    again = subprocess.run([*run, str(tmp_path / "copy.db")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    expected = f"tavernkeep: {tmp_path / 'copy.db'} already exists; choose a new file name"
    assert again.stderr.strip().splitlines() == [expected]


def test_backup_command_on_postgresql_names_the_pg_dump_command(tmp_path):
    """No built-in copy of a PostgreSQL database: the command says what to run instead, for the configured
    URL and the given file, without the password, and fails."""
    import subprocess
    import sys

    config = tmp_path / "config.toml"
    url = "postgresql+asyncpg://tavern:s3cret@db.example:5433/tavernkeep"
    config.write_text(f"[database]\nurl = '{url}'\n", encoding="utf-8")
    target = tmp_path / "nightly.dump"
    run = subprocess.run([sys.executable, "-m", "bot", "--config", str(config), "backup", str(target)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "tavernkeep: backups are built in for SQLite files only; for PostgreSQL run: "
        f"pg_dump --format=custom --file={target} postgresql://tavern@db.example:5433/tavernkeep"
    ]
    assert "s3cret" not in run.stderr and not target.exists()
