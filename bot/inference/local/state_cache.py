"""KV-cache reuse: saved channel states under a byte budget (where a prompt meets a cache: `bot.inference.window`).

A worker context holds the KV cache of one channel at a time. When it moves to another channel the
occupant's state is saved here (RAM, least recently used first out, optionally spilling to disk)
and restored on that channel's next turn. Every entry carries the exact tokens its KV cache was
computed from, and only the longest common prefix with the new prompt is ever reused, so an edited,
deleted or reset history can never bring back a stale suffix.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_MAGIC = b"TKKV1\n"
_SUFFIX = ".kvstate"


@dataclass(frozen=True, slots=True)
class SavedState:
    """One channel's KV state: the tokens it was computed from and llama.cpp's sequence state bytes."""

    tokens: tuple[int, ...]
    data: bytes | memoryview

    @property
    def nbytes(self) -> int:
        """Bytes this entry takes (state plus its token list)."""
        return memoryview(self.data).nbytes + 4 * len(self.tokens)


@dataclass(slots=True)
class _DiskEntry:
    path: Path
    tokens: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of a StateCache."""

    entries: int
    ram_bytes: int
    disk_entries: int
    disk_bytes: int
    hits: int
    misses: int
    evictions: int


class StateCache:
    """Saved channel states, shared by all workers: RAM up to `ram_bytes`, then disk up to `disk_bytes`.

    Both tiers are least-recently-used and never hold more than their budget. An entry bigger than
    the RAM budget goes straight to disk (if it fits there) or is not kept at all. Thread-safe.
    """

    def __init__(self, ram_bytes: int, disk_dir: str | Path | None = None, disk_bytes: int = 0) -> None:
        self.ram_budget = max(0, ram_bytes)
        self.disk_budget = max(0, disk_bytes) if disk_dir else 0
        self._ram: OrderedDict[str, SavedState] = OrderedDict()
        self._disk: OrderedDict[str, _DiskEntry] = OrderedDict()
        self._ram_used = 0
        self._disk_used = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0
        self._dir: Path | None = None
        if disk_dir and self.disk_budget:
            self._dir = Path(disk_dir).expanduser()
            self._dir.mkdir(parents=True, exist_ok=True)
            # States of an earlier run may come from another model or KV type: never trust them.
            for stale in self._dir.glob(f"*{_SUFFIX}"):
                stale.unlink(missing_ok=True)

    @property
    def ram_used(self) -> int:
        """Bytes held in RAM."""
        return self._ram_used

    @property
    def disk_used(self) -> int:
        """Bytes held on disk."""
        return self._disk_used

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                len(self._ram), self._ram_used, len(self._disk), self._disk_used,
                self._hits, self._misses, self._evictions,
            )

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._ram or key in self._disk

    def tokens(self, key: str) -> tuple[int, ...] | None:
        """The tokens of `key`'s saved state, without loading it."""
        with self._lock:
            if key in self._ram:
                return self._ram[key].tokens
            if key in self._disk:
                return self._disk[key].tokens
            return None

    def put(self, key: str, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> bool:
        """Save `key`'s state (replacing any older one); False if it fits in no tier.

        `bytes` and read-only memoryviews are kept as they are (the caller hands them over): a
        state is tens of megabytes, and copying it holds the GIL long enough to stall the event
        loop. Anything writable is copied.
        """
        entry = SavedState(tuple(tokens), _frozen(data))
        with self._lock:
            self._remove(key)
            if entry.nbytes <= self.ram_budget:
                self._ram[key] = entry
                self._ram_used += entry.nbytes
                while self._ram_used > self.ram_budget:
                    old_key, old = self._ram.popitem(last=False)
                    self._ram_used -= old.nbytes
                    self._evictions += 1
                    self._spill(old_key, old)
                return True
            return self._spill(key, entry)

    def take(self, key: str) -> SavedState | None:
        """Remove and return `key`'s state (the worker that restores it now holds it)."""
        with self._lock:
            entry = self._ram.pop(key, None)
            if entry is not None:
                self._ram_used -= entry.nbytes
                self._hits += 1
                return entry
            disk = self._disk.pop(key, None)
            if disk is None:
                self._misses += 1
                return None
            self._disk_used -= disk.nbytes
        try:
            entry = _read_state(disk.path)
        except (OSError, ValueError) as exc:
            log.warning("cannot read saved state %s: %s", disk.path, exc)
            entry = None
        finally:
            disk.path.unlink(missing_ok=True)
        with self._lock:
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
        return entry

    def discard(self, key: str) -> None:
        """Forget `key`'s state."""
        with self._lock:
            self._remove(key)

    def clear(self) -> None:
        """Forget every state."""
        with self._lock:
            for key in [*self._ram, *self._disk]:
                self._remove(key)

    def _remove(self, key: str) -> None:
        entry = self._ram.pop(key, None)
        if entry is not None:
            self._ram_used -= entry.nbytes
        disk = self._disk.pop(key, None)
        if disk is not None:
            self._disk_used -= disk.nbytes
            disk.path.unlink(missing_ok=True)

    def _spill(self, key: str, entry: SavedState) -> bool:
        """Write an entry leaving RAM to disk (called with the lock held)."""
        if self._dir is None or entry.nbytes > self.disk_budget:
            return False
        while self._disk and self._disk_used + entry.nbytes > self.disk_budget:
            _, old = self._disk.popitem(last=False)
            self._disk_used -= old.nbytes
            old.path.unlink(missing_ok=True)
            self._evictions += 1
        path = self._dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + _SUFFIX)
        try:
            _write_state(path, entry)
        except OSError as exc:
            log.warning("cannot write saved state %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return False
        self._disk[key] = _DiskEntry(path, entry.tokens, entry.nbytes)
        self._disk_used += entry.nbytes
        return True


def os_buffer(size: int) -> mmap.mmap:
    """A writable buffer of `size` bytes mapped straight from the OS and unmapped when dropped.

    States are tens of megabytes and come and go all the time: taken from the heap, they leave
    it fragmented and the process grows although the cache stays within its budget.
    """
    return mmap.mmap(-1, max(1, size))


def _frozen(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    if isinstance(data, bytes):
        return data
    view = data if isinstance(data, memoryview) else memoryview(data)
    if not view.readonly:
        return view.tobytes()
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _write_state(path: Path, entry: SavedState) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        fh.write(_MAGIC + struct.pack("<QQ", len(entry.tokens), memoryview(entry.data).nbytes))
        fh.write(array("i", entry.tokens).tobytes())
        fh.write(entry.data)
    os.replace(tmp, path)


def _read_state(path: Path) -> SavedState:
    with path.open("rb") as fh:
        if fh.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("not a saved state")
        n_tokens, n_data = struct.unpack("<QQ", fh.read(16))
        tokens = array("i")
        tokens.frombytes(fh.read(4 * n_tokens))
        data = os_buffer(n_data)
        read = fh.readinto(data)
    if len(tokens) != n_tokens or read != n_data:
        raise ValueError("truncated saved state")
    return SavedState(tuple(tokens), memoryview(data)[:n_data].toreadonly())
