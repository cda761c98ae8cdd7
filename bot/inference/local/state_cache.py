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
import secrets
import shutil
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
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


@dataclass(eq=False, slots=True)
class _DiskEntry:
    path: Path
    tokens: tuple[int, ...]
    nbytes: int
    key: str
    pending: SavedState | None = None  # the state while its file is being written


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


# Restore speeds assumed until measured: copying a state from RAM into llama.cpp's KV cache, and
# reading one from disk (a cautious figure for an SSD; measured reads replace it).
RAM_BYTES_PER_SECOND = 4e9
DISK_BYTES_PER_SECOND = 300e6


class StateCache:
    """Saved channel states, shared by all workers: RAM up to `ram_bytes`, then disk up to `disk_bytes`.

    Both tiers are least-recently-used and never hold more than their budget (on disk, counting the
    files being written; a file evicted while it is written is deleted once written). An entry
    bigger than the RAM budget goes straight to disk (if it fits there) or is not kept at all.
    Thread-safe; call it from worker threads, never the event loop: the lock guards only the
    bookkeeping, and states are copied, written and read outside it.

    The disk tier lives in a directory of its own under `disk_dir` (one per cache, named after the
    process), so processes sharing `disk_dir` never touch each other's files; directories left by
    processes that are gone are removed at start, and `close()` removes this cache's.
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
        self._serial = 0
        self._disk_rate = DISK_BYTES_PER_SECOND
        self._dir: Path | None = None
        if disk_dir and self.disk_budget:
            root = Path(disk_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(root)
            self._dir = root / f"{os.getpid()}-{secrets.token_hex(4)}"
            self._dir.mkdir()

    @property
    def ram_used(self) -> int:
        """Bytes held in RAM."""
        return self._ram_used

    @property
    def disk_used(self) -> int:
        """Bytes held (or being written) on disk."""
        return self._disk_used

    @property
    def directory(self) -> Path | None:
        """This cache's own directory of the disk tier."""
        return self._dir

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

    def restore_seconds(self, key: str) -> float | None:
        """Estimated seconds to bring `key`'s state back (bytes over its tier's speed); None if not saved."""
        with self._lock:
            if key in self._ram:
                return self._ram[key].nbytes / RAM_BYTES_PER_SECOND
            if key in self._disk:
                return self._disk[key].nbytes / self._disk_rate + self._disk[key].nbytes / RAM_BYTES_PER_SECOND
            return None

    def put(self, key: str, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> bool:
        """Save `key`'s state (replacing any older one); False if it fits in no tier.

        `bytes` and read-only memoryviews are kept as they are (the caller hands them over): a
        state is tens of megabytes, and copying it holds the GIL long enough to stall the event
        loop. Anything writable is copied. States leaving RAM are written to disk by this call,
        after the lock is released.
        """
        entry = SavedState(tuple(tokens), _frozen(data))
        spills: list[_DiskEntry] = []
        doomed: list[Path] = []
        with self._lock:
            doomed += self._remove(key)
            if entry.nbytes <= self.ram_budget:
                self._ram[key] = entry
                self._ram_used += entry.nbytes
                while self._ram_used > self.ram_budget:
                    old_key, old = self._ram.popitem(last=False)
                    self._ram_used -= old.nbytes
                    self._evictions += 1
                    spills += self._reserve(old_key, old, doomed)
                kept = True
            else:
                spills += self._reserve(key, entry, doomed)
                kept = bool(spills) and spills[-1].key == key
        for path in doomed:
            path.unlink(missing_ok=True)
        for spill in spills:
            if not self._write(spill) and spill.key == key and spill.pending is entry:
                kept = False
        return kept

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
            self._hits += 1
            pending = disk.pending
        if pending is not None:
            return pending  # still being written: its writer finds it gone and deletes the file
        begin = time.perf_counter()
        try:
            entry = _read_state(disk.path)
        except (OSError, ValueError) as exc:
            log.warning("cannot read saved state %s: %s", disk.path, exc)
            with self._lock:
                self._hits -= 1
                self._misses += 1
            return None
        finally:
            disk.path.unlink(missing_ok=True)
        seconds = time.perf_counter() - begin
        if seconds > 0 and disk.nbytes >= 2**20:
            with self._lock:  # a moving average of measured reads
                self._disk_rate = 0.7 * self._disk_rate + 0.3 * (disk.nbytes / seconds)
        return entry

    def discard(self, key: str) -> None:
        """Forget `key`'s state."""
        with self._lock:
            doomed = self._remove(key)
        for path in doomed:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every state."""
        with self._lock:
            doomed = [path for key in [*self._ram, *self._disk] for path in self._remove(key)]
        for path in doomed:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget every state and remove this cache's directory."""
        self.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _remove(self, key: str) -> list[Path]:
        """Drop `key` from both tiers (lock held); return the file to delete."""
        entry = self._ram.pop(key, None)
        if entry is not None:
            self._ram_used -= entry.nbytes
        disk = self._disk.pop(key, None)
        if disk is None:
            return []
        self._disk_used -= disk.nbytes
        return [disk.path]

    def _reserve(self, key: str, entry: SavedState, doomed: list[Path]) -> list[_DiskEntry]:
        """Make room on disk for an entry leaving RAM (lock held); the caller writes it."""
        if self._dir is None or entry.nbytes > self.disk_budget:
            return []
        while self._disk and self._disk_used + entry.nbytes > self.disk_budget:
            _, old = self._disk.popitem(last=False)
            self._disk_used -= old.nbytes
            doomed.append(old.path)
            self._evictions += 1
        self._serial += 1
        name = f"{hashlib.sha256(key.encode()).hexdigest()[:32]}-{self._serial}{_SUFFIX}"
        disk = _DiskEntry(self._dir / name, entry.tokens, entry.nbytes, key, entry)
        self._disk[key] = disk
        self._disk_used += entry.nbytes
        return [disk]

    def _write(self, disk: _DiskEntry) -> bool:
        """Write a reserved entry's file (no lock held), then publish it; False if it could not be kept."""
        assert disk.pending is not None
        try:
            _write_state(disk.path, disk.pending)
        except OSError as exc:
            log.warning("cannot write saved state %s: %s", disk.path, exc)
            disk.path.unlink(missing_ok=True)
            with self._lock:
                if self._disk.get(disk.key) is disk:
                    del self._disk[disk.key]
                    self._disk_used -= disk.nbytes
            return False
        with self._lock:
            current = self._disk.get(disk.key) is disk
            if current:
                disk.pending = None  # on disk now: the bytes in RAM may go
        if not current:  # taken, replaced or evicted while it was written
            disk.path.unlink(missing_ok=True)
        return True


def _remove_abandoned(root: Path) -> None:
    """Remove states of earlier runs: loose files, and directories of processes no longer alive."""
    for stale in root.glob(f"*{_SUFFIX}"):
        stale.unlink(missing_ok=True)
    for child in root.iterdir():
        pid = child.name.split("-", 1)[0]
        if child.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(child, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class CacheBudgets:
    """The cache's sizes with the machine's defaults filled in."""

    ram_bytes: int
    disk_dir: Path | None
    disk_bytes: int


# Defaults taken from the machine: a quarter of its RAM, and half of the disk space free at start
# (at most 64 GiB) under the user cache directory.
RAM_SHARE = 0.25
DISK_SHARE = 0.5
DISK_CAP = 64 * 2**30


def default_state_dir() -> Path:
    """Where the disk tier lives unless configured: the user cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tavernkeep" / "states"


def total_ram_bytes() -> int:
    """Physical memory of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk_bytes(path: Path) -> int:
    """Bytes free for this user on the file system holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cache_budgets(ram_bytes: int | str, disk_dir: str, disk_bytes: int | str, *,
                  total_ram: Callable[[], int] = total_ram_bytes,
                  free_disk: Callable[[Path], int] = free_disk_bytes) -> CacheBudgets:
    """Resolve `"auto"` settings from the machine; `disk_dir = ""` turns the disk tier off."""
    ram = int(total_ram() * RAM_SHARE) if ram_bytes == "auto" else int(ram_bytes)
    if not disk_dir:
        return CacheBudgets(ram, None, 0)
    directory = default_state_dir() if disk_dir == "auto" else Path(disk_dir).expanduser()
    disk = min(DISK_CAP, int(free_disk(directory) * DISK_SHARE)) if disk_bytes == "auto" else int(disk_bytes)
    return CacheBudgets(ram, directory, disk)


def worth_restoring(restore_seconds: float | None, tokens_to_evaluate: int,
                    prompt_tokens_per_second: float | None) -> bool:
    """Restore a saved state only if that is quicker than evaluating the tokens it saves."""
    if restore_seconds is None or tokens_to_evaluate <= 0:
        return False
    if not prompt_tokens_per_second:
        return True  # no measurement yet: a state read is rarely slower than a model
    return restore_seconds < tokens_to_evaluate / prompt_tokens_per_second


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
