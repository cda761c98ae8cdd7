"""The terminal chat: the same service path as Discord, driven through a pipe."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from bot import app
from bot.config import DatabaseSettings, Settings
from bot.terminal import channel_key, run_chat
from persistence.database import Database
from persistence.records import Role, TurnStatus
from persistence.repository import Repository
from tests.fake_backend import FakeBackend, fake_engine


async def chat_once(db_url: str, backend: FakeBackend, lines: str, *, persona: str | None = "A bard.",
                    session: str = "s1") -> str:
    out = io.StringIO()
    settings = Settings(database=DatabaseSettings(url=db_url))
    async with app.services(settings, fake_engine(backend)) as service:
        await run_chat(service, service.engine, session_name=session, persona=persona, user_name="Alice",
                       stdin=io.StringIO(lines), stdout=out)
    return out.getvalue()


async def stored_turns(db_url: str, session: str = "s1"):
    database = await Database.open(db_url)
    try:
        repo = Repository(database)
        current = await repo.get_active_session(channel_key(session))
        assert current is not None
        return current, await repo.recent_turns(current.id, 100)
    finally:
        await database.close()


async def test_chat_streams_stores_and_resumes(db_url):
    backend = FakeBackend("Welcome, friend.\nAlice: I take a seat")
    out = await chat_once(db_url, backend, "Hello there\n/quit\nnever read\n")
    assert "New session 's1'" in out
    assert "Character: Welcome, friend.\n" in out
    assert "I take a seat" not in out, "the model must not speak for the user"
    session, turns = await stored_turns(db_url)
    assert [(t.role, t.author_name, t.content) for t in turns] == [
        (Role.USER, "Alice", "Hello there"), (Role.MODEL, "", "Welcome, friend.")]
    assert session.persona_text == "A bard."
    assert "A bard." in backend.prompts[0] and "<|user|>Alice: Hello there<|model|>" in backend.prompts[0]

    out = await chat_once(db_url, backend, "Another round!\n", persona=None)
    assert "Resuming session 's1' (2 turns)" in out
    assert "Alice: Hello there" in out
    _, turns = await stored_turns(db_url)
    assert len(turns) == 4
    # The second prompt carries the whole history, persona first.
    assert backend.prompts[-1].index("A bard.") < backend.prompts[-1].index("Hello there") < \
        backend.prompts[-1].index("Another round!")


async def test_reset_archives_and_unknown_commands_are_explained(db_url):
    backend = FakeBackend("Aye.")
    out = await chat_once(db_url, backend, "one\n/reset\n/dance\ntwo\n")
    assert "History archived" in out
    assert "Unknown command /dance" in out
    _, turns = await stored_turns(db_url)
    assert [t.content for t in turns] == ["two", "Aye."]


async def test_persona_too_large_is_refused_with_numbers(db_url):
    from bot.errors import PersonaTooLarge

    with pytest.raises(PersonaTooLarge) as err:
        await chat_once(db_url, FakeBackend("x", n_ctx=512), "hi\n", persona="word " * 600)
    assert "3000 tokens" in err.value.user_message or "tokens long" in err.value.user_message


async def test_model_failure_is_reported_and_user_turn_kept(db_url):
    out = await chat_once(db_url, FakeBackend("abc", fail_after=1), "hello\n")
    assert "The model failed while writing a reply" in out
    _, turns = await stored_turns(db_url)
    assert [(t.role, t.status) for t in turns] == [(Role.USER, TurnStatus.COMPLETE)]


def run_cli(tmp_path: Path, model: Path, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[model]\npath = '{model}'\nn_ctx = 1024\nmax_new_tokens = 24\nthreads = 2\nseed = 3\n"
        f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path / 'chat.db'}'\n"
        "[logging]\nlevel = 'WARNING'\n",
        encoding="utf-8",
    )
    return subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config), "chat", *args],
        input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )


@pytest.mark.model
def test_cli_chat_through_a_pipe_on_the_real_model(tmp_path, demo_model_path):
    persona = tmp_path / "persona.txt"
    persona.write_text("Bob is a cheerful pirate captain.\nHe loves the sea.", encoding="utf-8")
    first = run_cli(tmp_path, demo_model_path, "Hello, who are you?\n/quit\n",
                    "--session", "ship", "--persona", f"@{persona}", "--name", "Alice")
    assert first.returncode == 0, first.stderr
    assert "New session 'ship'" in first.stdout
    reply = first.stdout.split("Character: ", 1)[1].splitlines()[0]
    assert reply.strip()
    assert "<|" not in first.stdout

    second = run_cli(tmp_path, demo_model_path, "Where are we sailing?\n", "--session", "ship", "--name", "Alice")
    assert second.returncode == 0, second.stderr
    assert "Resuming session 'ship' (2 turns)" in second.stdout
    assert "Alice: Hello, who are you?" in second.stdout
    assert "Character: " in second.stdout


@pytest.mark.model
def test_cli_persona_too_large_exits_with_one_line(tmp_path, demo_model_path):
    proc = run_cli(tmp_path, demo_model_path, "hi\n", "--persona", "tavern " * 2000)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("tavernkeep: That character is")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("command", "configured", "expected"),
    [("chat", "INFO", "WARNING"), ("chat", "WARNING", "WARNING"), ("chat", "ERROR", "ERROR"),
     ("chat", "DEBUG", "DEBUG"), ("run", "INFO", "INFO"), ("backup", "INFO", "INFO")],
)
def test_the_chat_logs_warnings_only_unless_asked_for_debug(command, configured, expected):
    from bot.__main__ import log_level

    assert log_level(command, configured) == expected


def test_cli_chat_start_up_prints_no_info_lines(tmp_path):
    """Migrations run (their INFO lines used to print into the chat), then the model fails to load:
    the only line on stderr is the error."""
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00 not a model")
    config = tmp_path / "config.toml"
    config.write_text(f"[model]\npath = '{model}'\n[database]\nurl = 'sqlite+aiosqlite:///{tmp_path / 'c.db'}'\n"
                      "[logging]\nlevel = 'INFO'\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "bot", "--config", str(config), "chat"], input="hi\n",
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert (tmp_path / "c.db").is_file(), "the database was migrated before the model was loaded"
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("tavernkeep: model.path: cannot load the model")


@pytest.mark.model
def test_cli_chat_through_a_pipe_prints_only_the_chat(tmp_path, demo_model_path):
    config = tmp_path / "config.toml"
    config.write_text(f"[model]\npath = '{demo_model_path}'\nn_ctx = 512\nmax_new_tokens = 8\nseed = 3\n"
                      f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path / 'c.db'}'\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "bot", "--config", str(config), "chat", "--name", "Alice"],
                          input="Hello!\n", capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "INFO" not in proc.stdout and "alembic" not in proc.stdout
    assert proc.stdout.startswith("New session 'default'.\n")


@pytest.mark.model
def test_cli_chat_plays_a_character_card_through_a_pipe(tmp_path, demo_model_path):
    from tests import card_files

    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Mira", "description": "Mira is a sharp-tongued elven ranger.",
                     "first_mes": "*Mira looks up from her bow.* Well met, {{user}}."}}
    path = tmp_path / "mira.png"
    path.write_bytes(card_files.png_card([("tEXt", "chara", card_files.b64(card))]))
    proc = run_cli(tmp_path, demo_model_path, "Who are you?\n", "--session", "woods", "--character", str(path),
                   "--name", "Alice")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["New session 'woods'.", "Mira: *Mira looks up from her bow.* Well met, Alice."]
    reply = proc.stdout.split("Mira: ")[2].splitlines()[0] if proc.stdout.count("Mira: ") > 1 else ""
    assert reply.strip() or "nothing to say" in proc.stdout
    assert "<|" not in proc.stdout


def test_cli_chat_refuses_a_file_that_is_no_card_with_one_line(tmp_path):
    bad = tmp_path / "cat.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = tmp_path / "config.toml"
    config.write_text(f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path / 'c.db'}'\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "bot", "--config", str(config), "chat", "--character", str(bad)],
                          input="hi\n", capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"tavernkeep: --character: {bad}:") and len(proc.stderr.splitlines()) == 1
