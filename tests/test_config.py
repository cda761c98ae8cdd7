"""Config loading: typed values, env overrides, one clear line and exit code 2 on errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, Settings, discord_token, load_settings

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_loads_with_documented_defaults():
    settings = load_settings(ROOT / "config.example.toml", env={})
    assert settings.model.n_ctx == 2048
    assert settings.sampling.top_k == 40
    assert settings.database.url.startswith("sqlite+aiosqlite:///")
    assert settings.discord.ignore_prefix == "//"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\nn_ctx = 12", "model.n_ctx: Input should be greater than or equal to 256 (got 12)"),
        ("[model]\nworkers = 0", "model.workers: Input should be greater than or equal to 1"),
        ("[sampling]\ntemperature = 'hot'", "sampling.temperature: Input should be a valid number"),
        ("[sampling]\ntop_p = 0", "sampling.top_p: Input should be greater than 0"),
        ("[model]\nn_threads = 4", "model.n_threads: unknown setting"),
        ("[discord]\nreply_mode = 'sometimes'", "discord.reply_mode: Input should be 'all' or 'mention'"),
        ("[model\n", "not valid TOML"),
        ("[model]\npath = '/nonexistent/model.gguf'", "model.path: file not found: /nonexistent/model.gguf"),
    ],
)
def test_bad_values_name_the_key_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    message = str(err.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_model_file_must_be_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not a model</html>")
    path = write(tmp_path, f"[model]\npath = '{fake}'")
    with pytest.raises(ConfigError, match=r"model\.path: not a GGUF model file"):
        load_settings(path, env={})


def test_environment_overrides_file_and_is_named_in_errors(tmp_path):
    path = write(tmp_path, "[model]\nn_ctx = 4096\n")
    env = {"TAVERNKEEP_MODEL_N_CTX": "1024", "TAVERNKEEP_DISCORD_COMMAND_GUILDS": "1, 2",
           "TAVERNKEEP_DATABASE_URL": "sqlite+aiosqlite:///x.db"}
    settings = load_settings(path, env=env)
    assert settings.model.n_ctx == 1024
    assert settings.discord.command_guilds == [1, 2]
    assert settings.database.url == "sqlite+aiosqlite:///x.db"
    with pytest.raises(ConfigError, match=r"environment \(TAVERNKEEP_MODEL_N_CTX\): model.n_ctx"):
        load_settings(path, env={"TAVERNKEEP_MODEL_N_CTX": "lots"})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("TAVERNKEEP_MODEL_NCTX", "environment (TAVERNKEEP_MODEL_NCTX): no such setting "
                                  "(did you mean TAVERNKEEP_MODEL_N_CTX, model.n_ctx?)"),
        ("TAVERNKEEP_DATABSE_URL", "environment (TAVERNKEEP_DATABSE_URL): no such setting "
                                   "(did you mean TAVERNKEEP_DATABASE_URL, database.url?)"),
        ("TAVERNKEEP_MODEL", "environment (TAVERNKEEP_MODEL): no such setting"),
        ("TAVERNKEEP_TOKEN", "environment (TAVERNKEEP_TOKEN): no such setting"),
        ("TAVERNKEEP_model_n_ctx", "environment (TAVERNKEEP_model_n_ctx): no such setting "
                                   "(did you mean TAVERNKEEP_MODEL_N_CTX, model.n_ctx?)"),
    ],
)
def test_an_environment_variable_that_names_no_setting_stops_the_start(tmp_path, name, expected):
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={name: "512", "TAVERNKEEP_MODEL_N_CTX": "1024"})
    assert str(err.value) == expected


def test_every_setting_has_its_environment_variable():
    for section, field in Settings.model_fields.items():
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            name = f"TAVERNKEEP_{section}_{key}".upper()
            try:
                load_settings(None, env={name: "x"})
            except ConfigError as exc:
                assert "no such setting" not in str(exc), name


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml", env={})


def test_token_only_from_environment():
    assert discord_token({"DISCORD_TOKEN": " abc "}) == "abc"
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        discord_token({})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\nn_ctx = 1", "model.n_ctx"),
        ("[model]\npath = '/missing.gguf'", "model.path: file not found"),
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, text, expected):
    path = write(tmp_path, text)
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(path), "chat"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tavernkeep: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_the_test_suites_variables_are_no_settings():
    """TAVERNKEEP_TEST_DATABASE_URL (the PostgreSQL server of the tests) is inherited by every bot the
    tests start: it is not taken for a misspelt setting."""
    settings = load_settings(None, env={"TAVERNKEEP_TEST_DATABASE_URL": "postgresql+asyncpg://db/x"})
    assert settings.database.url.startswith("sqlite+aiosqlite:///")


def test_cli_exits_2_on_an_unknown_environment_variable(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "chat"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
        stdin=subprocess.DEVNULL, env={**os.environ, "TAVERNKEEP_MODEL_NCTX": "512"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tavernkeep: environment (TAVERNKEEP_MODEL_NCTX): no such setting "
                                   "(did you mean TAVERNKEEP_MODEL_N_CTX, model.n_ctx?)")


def test_cli_rejects_truncated_model(tmp_path):
    model = tmp_path / "truncated.gguf"
    model.write_bytes(b"GG")
    path = write(tmp_path, f"[model]\npath = '{model}'")
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(path), "chat"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert "model.path: not a GGUF model file" in proc.stderr
