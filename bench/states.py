"""Saved states at 7B size: bring a 2,048-token channel back from RAM or disk, against evaluating it again.

A Llama-2 7B with an f16 KV cache holds 2 (K and V) x 32 layers x 4096 x 2 bytes = 512 KiB per
token, so a 2,048-token channel is a 1 GiB state. A synthetic state of that size goes through the
real StateCache and its real disk tier (a temporary directory under the user cache directory,
where the bot keeps them), and is brought back:

- from RAM: `take` plus copying the bytes into a preallocated buffer, as llama.cpp's
  `llama_state_seq_set_data` copies them into the KV cache;
- from disk, warm: the file was just written and still sits in the page cache;
- from disk, cold: the file's pages are dropped first (fsync, then `posix_fadvise(DONTNEED)` on
  that file only, which needs no root and leaves other processes' cache alone).

Each is the median of a few runs, against evaluating the 2,048 tokens at a 7B model's published
CPU prompt speed (`PROMPT_TPS`, below). Run: `python -m bench.states [--runs N] [--prompt-tps X]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bot.inference.local.state_cache import StateCache, default_states_dir, os_buffer, worth_restoring

BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # Llama-2 7B, f16 K and V: 512 KiB
TOKENS = 2048
# llama.cpp (build 081fe431, July 2024) on LLaMA-v2-7B Q4_0, CPU only, 8 threads of an M2 Max:
# pp512 = 65.46 tokens/s. A 2,048-token prompt is slower still (attention over a longer cache),
# so this figure is kind to re-evaluation.
PROMPT_TPS = 65.46
PROMPT_TPS_SOURCE = ("llama.cpp pp512, LLaMA-v2-7B Q4_0, CPU (M2 Max, 8 threads): "
                     "https://github.com/ikawrakow/ik_llama.cpp/wiki/July-2024:-Prompt-processing-perfomance-comparison")
_CHUNK = 2**20


def bench_states(args: argparse.Namespace) -> dict[str, Any]:
    """Measure bringing one 7B-sized channel state back from each tier; return the figures."""
    runs = max(1, getattr(args, "runs", 3))
    tokens = getattr(args, "tokens", TOKENS)
    prompt_tps = getattr(args, "prompt_tps", PROMPT_TPS)
    size = tokens * BYTES_PER_TOKEN - 4 * tokens  # with its token list, the entry is tokens x 512 KiB
    token_ids = list(range(tokens))
    home = default_states_dir().parent
    home.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"tokens": tokens, "state_bytes": size + 4 * tokens, "runs": runs,
                           "directory": str(home), "file_system": file_system(home)}
    state = _synthetic_state(size)
    context = np.zeros(size, dtype=np.uint8)  # stands in for the KV cache (touched, as llama.cpp's is)
    try:
        ram = StateCache(2 * size)
        take_s, load_s = [], []
        for _ in range(runs):
            ram.put("channel", token_ids, state)
            started = time.perf_counter()
            saved = ram.take("channel")
            taken = time.perf_counter()
            assert saved is not None
            np.copyto(context, np.frombuffer(saved.data, dtype=np.uint8))
            take_s.append(taken - started)
            load_s.append(time.perf_counter() - taken)
            ram.record_load(saved.nbytes, load_s[-1])
            del saved
        out.update(ram_take_s=statistics.median(take_s), ram_load_s=statistics.median(load_s),
                   ram_s=statistics.median(t + c for t, c in zip(take_s, load_s, strict=True)))

        with tempfile.TemporaryDirectory(prefix="bench-states-", dir=home) as where:
            disk = StateCache(0, where, 2 * size + 2**20)
            for seconds in load_s:  # what the backend reports after each restore
                disk.record_load(size, seconds)
            for mode in ("warm", "cold"):
                write_s, read_s, file_s = [], [], []
                for _ in range(runs):
                    started = time.perf_counter()
                    assert disk.put("channel", token_ids, state)
                    write_s.append(time.perf_counter() - started)
                    if mode == "cold":
                        _drop_from_page_cache(disk)
                    estimate = disk.restore_seconds("channel")
                    started = time.perf_counter()
                    saved = disk.take("channel")
                    read = time.perf_counter()
                    assert saved is not None
                    np.copyto(context, np.frombuffer(saved.data, dtype=np.uint8))
                    read_s.append(time.perf_counter() - started)
                    file_s.append(read - started)
                    disk.record_load(saved.nbytes, time.perf_counter() - read)
                    del saved
                out[f"disk_{mode}_s"] = statistics.median(read_s)
                out[f"disk_{mode}_read_s"] = statistics.median(file_s)
                out[f"disk_{mode}_estimate_s"] = estimate  # the cache's own forecast before the last read
                out["disk_write_s"] = statistics.median(write_s)
            disk.close()
    finally:
        del context, state
    reeval = tokens / prompt_tps
    out.update(prompt_tps=prompt_tps, prompt_tps_source=PROMPT_TPS_SOURCE, reeval_s=reeval)
    for tier in ("ram", "disk_warm", "disk_cold"):
        out[f"{tier}_vs_reeval"] = reeval / out[f"{tier}_s"]
        out[f"{tier}_worth_restoring"] = worth_restoring(out[f"{tier}_s"], tokens, prompt_tps)
    return out


def _synthetic_state(size: int) -> memoryview:
    """`size` bytes of incompressible-looking data in pages of their own, handed over read-only."""
    buffer = os_buffer(size)
    block = os.urandom(_CHUNK)
    for offset in range(0, size, _CHUNK):
        end = min(size, offset + _CHUNK)
        buffer[offset:end] = block[: end - offset]
    return memoryview(buffer).toreadonly()


def _drop_from_page_cache(cache: StateCache) -> None:
    assert cache.directory is not None
    for path in cache.directory.glob("*.kvstate"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/mounts; "?" elsewhere)."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) < len(best):
            continue
        if resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/"):
            best, kind = parts[1], parts[2]
    return kind


def report(result: dict[str, Any]) -> str:
    """The figures as a short text."""
    gib = result["state_bytes"] / 2**30
    lines = [
        f"7B saved state: {result['tokens']} tokens x 512 KiB = {gib:.2f} GiB, median of {result['runs']} runs",
        f"disk tier in {result['directory']} ({result['file_system']})",
        f"  from RAM:        {result['ram_s']:6.3f} s  (take {result['ram_take_s'] * 1e3:.3f} ms, "
        f"copy into the context {result['ram_load_s']:.3f} s)",
        f"  write to disk:   {result['disk_write_s']:6.3f} s  (into the page cache)",
        f"  from disk, warm: {result['disk_warm_s']:6.3f} s  (read {result['disk_warm_read_s']:.3f} s, file in the "
        f"page cache; the cache's estimate {result['disk_warm_estimate_s']:.3f} s)",
        f"  from disk, cold: {result['disk_cold_s']:6.3f} s  (read {result['disk_cold_read_s']:.3f} s, file's pages "
        f"dropped; the cache's estimate {result['disk_cold_estimate_s']:.3f} s)",
        f"  re-evaluate:     {result['reeval_s']:6.1f} s  "
        f"({result['tokens']} tokens at {result['prompt_tps']} tokens/s)",
        f"    source: {result['prompt_tps_source']}",
        f"re-evaluation / restore: RAM {result['ram_vs_reeval']:.0f}x, disk warm {result['disk_warm_vs_reeval']:.0f}x, "
        f"disk cold {result['disk_cold_vs_reeval']:.0f}x",
    ]
    if result["file_system"] in ("tmpfs", "ramfs"):
        lines.append("note: the user cache directory is in RAM here, so the disk figures are RAM figures")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--prompt-tps", type=float, default=PROMPT_TPS, help="7B prompt tokens per second")
    print(report(bench_states(parser.parse_args())))


if __name__ == "__main__":
    main()
