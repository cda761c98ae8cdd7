"""Shared fixtures: real model files, real SQLite databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.inference.local import state_cache
from bot.inference.local.demo_model import ensure_demo_model
from persistence import Database, Repository
from tests.model_files import ensure_spm_vocab
from tests.simcord_webhooks import discord_webhooks


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
def db_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file database."""
    return f"sqlite+aiosqlite:///{tmp_path / 'tavernkeep.db'}"


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
