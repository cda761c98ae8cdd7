"""Fetch the model files the tests run on (cached in the user cache directory)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bot.inference.local.demo_model import cache_dir, sha256_of

LLAMA_SDIST = "llama-cpp-python==0.3.36"
SPM_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
SPM_SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"


def ensure_spm_vocab() -> Path:
    """Return the Llama-2 SPM vocabulary GGUF shipped in the llama-cpp-python sdist."""
    target = cache_dir() / "models" / "ggml-vocab-llama-spm.gguf"
    if target.is_file() and sha256_of(target) == SPM_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", tmp, LLAMA_SDIST],
            check=True,
        )
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(SPM_MEMBER))
            src = tf.extractfile(member)
            assert src is not None
            partial = Path(tmp) / "vocab.gguf"
            partial.write_bytes(src.read())
        if sha256_of(partial) != SPM_SHA256:
            raise RuntimeError("SPM vocabulary checksum mismatch")
        partial.replace(target)
    return target
