"""Shared fixtures: real model files, real databases (SQLite files, and PostgreSQL when
`TAVERNKEEP_TEST_DATABASE_URL` names a server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from bot.inference.local import state_cache
from bot.inference.local.demo_model import ensure_demo_model
from persistence import Database, Repository
from tests.model_files import ensure_spm_vocab
from tests.postgres import BACKENDS, SKIP_LOCATION, SKIP_REASON, PostgresServer, open_test_server
from tests.simcord_webhooks import discord_webhooks


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of tests that only make sense on SQLite."""
    config.addinivalue_line(
        "markers", "sqlite_only(reason): runs on SQLite only (the `db_url` fixture is not run on PostgreSQL)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test built on `db_url` once per database backend (`db_backend`: sqlite, postgresql).

    Tests on the real model stay on SQLite: what they measure is the model, not the database.
    """
    if "db_backend" not in metafunc.fixturenames:
        return
    node = metafunc.definition
    sqlite_only = node.get_closest_marker("sqlite_only") or node.get_closest_marker("model")
    metafunc.parametrize("db_backend", ["sqlite"] if sqlite_only else list(BACKENDS))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report every PostgreSQL run skipped for want of a server at one place, so the summary says it
    once with the count instead of once per test."""
    report: pytest.TestReport = yield
    if report.skipped and isinstance(report.longrepr, tuple) and report.longrepr[2].endswith(SKIP_REASON):
        report.longrepr = (*SKIP_LOCATION, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server named by TAVERNKEEP_TEST_DATABASE_URL, with a migrated template database;
    skips (saying how to run them) when the variable is not set."""
    with open_test_server() as server:
        yield server


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """Path of the real SmolLM2-135M demo GGUF (fetched once, cached)."""
    return ensure_demo_model(report=lambda _msg: None)


@pytest.fixture(scope="session")
def spm_vocab():
    """The Llama-2 SPM vocabulary that Metharme 7B uses, loaded vocab-only."""
    from llama_cpp import Llama

    return Llama(str(ensure_spm_vocab()), vocab_only=True, verbose=False)


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a fresh database: a SQLite file not created yet, or a PostgreSQL database of its own
    copied from the migrated template (dropped after the test)."""
    if db_backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tavernkeep.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    with server.database() as url:
        yield url


@pytest.fixture
def empty_db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Like `db_url`, but the PostgreSQL database is empty (no schema, not even Alembic's table)."""
    if db_backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tavernkeep.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    with server.database(empty=True) as url:
        yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """An opened, migrated database on a fresh file."""
    database = await Database.open(db_url)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def repo(db: Database) -> Repository:
    """A repository on the fresh database."""
    return Repository(db)


@pytest.fixture(autouse=True)
def _discord_webhooks() -> Iterator[None]:
    """Every SimCord test sees Discord's webhook behaviour that SimCord lacks (see tests/simcord_webhooks.py):
    characters speak through webhooks in every Discord test."""
    with discord_webhooks():
        yield



@pytest.fixture(autouse=True)
def _states_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Saved states that leave RAM go to a temporary directory, never into the user cache directory:
    in this process (the default location) and in bots the tests start (the environment)."""
    states = tmp_path_factory.mktemp("states")
    monkeypatch.setattr(state_cache, "default_states_dir", lambda env=None: states)
    monkeypatch.setenv("TAVERNKEEP_CACHE_DISK_DIR", str(states))
    return states
