"""KV-cache reuse: saved channel states under a byte budget (where a prompt meets a cache: `bot.inference.window`).

A context holds the KV cache of a few channels at a time. When a channel leaves it, its state is
saved here (RAM, least recently used first out, spilling to disk) and restored on that channel's
next turn. Every entry carries the exact tokens its KV cache was computed from, and only the
longest common prefix with the new prompt is ever reused, so an edited, deleted or reset history
can never bring back a stale suffix.

The cache is called from worker threads only, never from the event loop: a 7B state is about a
gigabyte and its file takes seconds to write or read. The lock guards bookkeeping only; files are
written and read outside it.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import threading
import time
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

AUTO = -1  # a budget sized from the machine
RAM_SHARE = 0.25  # of total RAM, for saved states when the RAM budget is AUTO
DISK_SHARE = 0.5  # of the free space at start, when the disk budget is AUTO
DISK_CAP = 32 * 2**30  # at most this much disk when AUTO: 32 full 2,048-token 7B windows
# Starting figures before anything is measured, on the slow side so a restore is not promised
# faster than it comes: llama.cpp copies a state into a context at memory speed (GiB/s), a
# cold SATA SSD reads about 500 MB/s, a disk or a busy cloud volume far less.
LOAD_START_RATE = 2.0 * 2**30
DISK_START_RATE = 200.0 * 2**20
_RATE_WEIGHT = 0.3  # of each new measurement in the running figure
_MIN_SAMPLE = 2**20  # smaller transfers measure call overhead, not throughput

_MAGIC = b"TKKV1\n"
_HEADER = len(_MAGIC) + 16
_SUFFIX = ".kvstate"
_LOCK = ".lock"
_INSTANCE = re.compile(r"tk-\d+-[0-9a-f]{8}")


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
    nbytes: int  # the file's size
    pending: SavedState | None  # the state while its file is being written; None once written


@dataclass(frozen=True, slots=True)
class _Spill:
    key: str
    entry: _DiskEntry
    state: SavedState
    victims: tuple[_DiskEntry, ...]  # files to delete before writing: their bytes now belong to `entry`


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

    Both tiers are least-recently-used and never hold more than their budget (on disk: the bytes of
    the files, including those being written or about to be deleted). `AUTO` sizes a budget from
    the machine (`auto_ram_bytes`, `auto_disk_bytes`). The disk tier lives in a subdirectory of
    `disk_dir` of its own, so several processes can share `disk_dir`; states of earlier runs are
    deleted at start, those of live processes left alone. A state on its way to disk is counted
    in the disk tier and can be taken back before its file is written. Thread-safe.
    """

    def __init__(self, ram_bytes: int, disk_dir: str | Path | None = None, disk_bytes: int = 0) -> None:
        self.ram_budget = auto_ram_bytes(total_ram_bytes()) if ram_bytes == AUTO else max(0, ram_bytes)
        base = Path(disk_dir).expanduser() if disk_dir else None
        if base is not None and disk_bytes == AUTO:
            disk_bytes = auto_disk_bytes(free_disk_bytes(base))
        self.disk_budget = max(0, disk_bytes) if base is not None else 0
        self._ram: OrderedDict[str, SavedState] = OrderedDict()
        self._disk: OrderedDict[str, _DiskEntry] = OrderedDict()
        self._ram_used = 0
        self._disk_used = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0
        self._files = 0
        self._load_rate = LOAD_START_RATE
        self._disk_rate = DISK_START_RATE
        self._dir: Path | None = None
        self._closed = False
        if base is not None and self.disk_budget:
            try:
                sweep_states_dir(base)
                self._dir, lock_fd = _claim(base)
            except OSError as exc:  # e.g. a service user without a writable home: RAM only
                log.warning("no disk tier for saved states in %s: %s", base, exc)
                self.disk_budget = 0
            else:
                self._release_dir = weakref.finalize(self, _drop_instance, self._dir, lock_fd)

    @property
    def ram_used(self) -> int:
        """Bytes held in RAM."""
        return self._ram_used

    @property
    def disk_used(self) -> int:
        """Bytes held on disk (files written, being written, or about to be deleted)."""
        return self._disk_used

    @property
    def directory(self) -> Path | None:
        """This cache's own directory of state files (None without a disk tier)."""
        return self._dir

    @property
    def load_rate(self) -> float:
        """Bytes per second llama.cpp loads a state into a context at (measured through `record_load`)."""
        return self._load_rate

    @property
    def disk_rate(self) -> float:
        """Bytes per second state files are read at (measured on every read from disk)."""
        return self._disk_rate

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
        """Estimated seconds to bring `key`'s state back into a context (None if nothing is saved).

        Bytes over the measured throughput of the tier holding it: loading into the context, plus
        reading the file for a state on disk. Compare with the evaluation cost (`worth_restoring`).
        """
        with self._lock:
            if key in self._ram:
                return self._ram[key].nbytes / self._load_rate
            disk = self._disk.get(key)
            if disk is None:
                return None
            seconds = disk.nbytes / self._load_rate
            return seconds if disk.pending is not None else seconds + disk.nbytes / self._disk_rate

    def record_load(self, nbytes: int, seconds: float) -> None:
        """Note that loading a state of `nbytes` into a context took `seconds` (feeds `restore_seconds`)."""
        with self._lock:
            self._load_rate = _blend(self._load_rate, nbytes, seconds)

    def put(self, key: str, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> bool:
        """Save `key`'s state (replacing any older one); False if it fits in no tier.

        `bytes` and read-only memoryviews are kept as they are (the caller hands them over): a
        state is up to a gigabyte, and copying it holds the GIL long enough to stall the event
        loop. Anything writable is copied. States pushed out of RAM are written to disk by this
        call, outside the lock.
        """
        entry = SavedState(tuple(tokens), _frozen(data))
        spills: list[_Spill] = []
        with self._lock:
            dropped = self._remove(key)
            in_ram = entry.nbytes <= self.ram_budget
            if in_ram:
                self._ram[key] = entry
                self._ram_used += entry.nbytes
                while self._ram_used > self.ram_budget:
                    old_key, old = self._ram.popitem(last=False)
                    self._ram_used -= old.nbytes
                    self._evictions += 1
                    if (spill := self._reserve(old_key, old)) is not None:
                        spills.append(spill)
            elif (spill := self._reserve(key, entry)) is not None:
                spills.append(spill)
        self._delete(dropped)
        written = [self._write(spill) for spill in spills]
        return in_ram or any(written)  # not in RAM: the only spill is this entry's own

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
            if disk.pending is not None:  # still being written: its writer deletes the file
                self._hits += 1
                return disk.pending
        started = time.perf_counter()
        try:
            entry = _read_state(disk.path)
        except (OSError, ValueError) as exc:
            log.warning("cannot read saved state %s: %s", disk.path, exc)
            entry = None
        elapsed = time.perf_counter() - started
        disk.path.unlink(missing_ok=True)
        with self._lock:
            self._disk_used -= disk.nbytes
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
                self._disk_rate = _blend(self._disk_rate, disk.nbytes, elapsed)
        return entry

    def discard(self, key: str) -> None:
        """Forget `key`'s state."""
        with self._lock:
            dropped = self._remove(key)
        self._delete(dropped)

    def clear(self) -> None:
        """Forget every state."""
        with self._lock:
            dropped = [disk for key in [*self._ram, *self._disk] for disk in self._remove(key)]
        self._delete(dropped)

    def close(self) -> None:
        """Forget every state and remove this cache's directory; later states stay in RAM only."""
        with self._lock:
            self._closed = True
        self.clear()
        with self._lock:
            self.disk_budget = 0
        if self._dir is not None:
            self._release_dir()

    def _remove(self, key: str) -> list[_DiskEntry]:
        """Unlist `key` (lock held); return written files for the caller to delete outside the lock."""
        entry = self._ram.pop(key, None)
        if entry is not None:
            self._ram_used -= entry.nbytes
        disk = self._disk.pop(key, None)
        # A file still being written is deleted by its writer, which finds itself unlisted.
        return [disk] if disk is not None and disk.pending is None else []

    def _reserve(self, key: str, state: SavedState) -> _Spill | None:
        """List `state` on disk and reserve its bytes, evicting older files (lock held); None if it cannot fit."""
        size = _HEADER + state.nbytes
        if self._dir is None or self._closed or size > self.disk_budget:
            return None
        written = [(k, d) for k, d in self._disk.items() if d.pending is None]
        room = self.disk_budget - self._disk_used
        if room + sum(d.nbytes for _, d in written) < size:
            return None  # the rest is in flight: this state is dropped
        victims: list[_DiskEntry] = []
        for old_key, old in written:
            if room >= size:
                break
            del self._disk[old_key]
            victims.append(old)
            room += old.nbytes
            self._evictions += 1
        self._files += 1
        entry = _DiskEntry(self._dir / f"{self._files:012d}{_SUFFIX}", state.tokens, size, state)
        self._disk[key] = entry
        self._disk_used += size - sum(v.nbytes for v in victims)
        return _Spill(key, entry, state, tuple(victims))

    def _write(self, spill: _Spill) -> bool:
        """Write a reserved spill outside the lock and publish it, unless it was taken or replaced meanwhile."""
        for victim in spill.victims:  # first, so the files on disk never exceed the budget
            victim.path.unlink(missing_ok=True)
        with self._lock:
            wanted = self._disk.get(spill.key) is spill.entry
        written = False
        if wanted:
            try:
                _write_state(spill.entry.path, spill.state)
                written = True
            except OSError as exc:
                log.warning("cannot write saved state %s: %s", spill.entry.path, exc)
        with self._lock:
            if self._disk.get(spill.key) is spill.entry:
                if written:
                    spill.entry.pending = None
                    return True
                del self._disk[spill.key]
        self._delete([spill.entry])
        return False

    def _delete(self, entries: Iterable[_DiskEntry]) -> None:
        """Delete unlisted files (outside the lock), then give their bytes back."""
        freed = 0
        for entry in entries:
            entry.path.unlink(missing_ok=True)
            entry.path.with_suffix(".tmp").unlink(missing_ok=True)
            freed += entry.nbytes
        if freed:
            with self._lock:
                self._disk_used -= freed
                closed = self._closed
            if closed and self._dir is not None:
                _drop_instance(self._dir, None)  # a write that outlived close()


def worth_restoring(restore_seconds: float, tokens_to_evaluate: int, prompt_tokens_per_second: float) -> bool:
    """Whether restoring a saved state beats evaluating the `tokens_to_evaluate` prompt tokens it holds.

    `tokens_to_evaluate` counts the tokens a restore saves (those the live context would have to
    evaluate but the saved state already holds); an unknown prompt speed (<= 0) favours restoring.
    """
    if tokens_to_evaluate <= 0:
        return False
    if prompt_tokens_per_second <= 0:
        return True
    return restore_seconds < tokens_to_evaluate / prompt_tokens_per_second


# ------------------------------------------------------------------ sizing from the machine


def auto_ram_bytes(total_ram: int) -> int:
    """The RAM budget for saved states on a machine with `total_ram` bytes."""
    return int(total_ram * RAM_SHARE)


def auto_disk_bytes(free_disk: int) -> int:
    """The disk budget for saved states with `free_disk` bytes free at start."""
    return min(DISK_CAP, int(free_disk * DISK_SHARE))


def total_ram_bytes() -> int:
    """RAM this process may use: physical memory, or a smaller cgroup (container) limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = _meminfo_total()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    return min(total, int(limit)) if limit.isdigit() and int(limit) > 0 else total


def _meminfo_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2 * 2**30  # unknown: budget as for a small machine


def free_disk_bytes(path: Path) -> int:
    """Bytes free for an unprivileged user on the file system that holds (or will hold) `path`."""
    for candidate in (path, *path.parents):
        try:
            stat = os.statvfs(candidate)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize
    return 0


def default_states_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where state files go unless configured: the user cache directory, `tavernkeep/states`."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tavernkeep" / "states"


# ------------------------------------------------------------------ one directory per cache


def sweep_states_dir(base: Path) -> None:
    """Delete what caches of ended processes left in `base`; those of live processes stay.

    Each cache holds an exclusive `flock` on `<its dir>.lock` while it lives, and the kernel drops
    it when the process ends however it ends. Only names this module creates are touched, so a
    `disk_dir` shared with other files is safe.
    """
    if not base.is_dir():
        return
    for stale in base.glob(f"*{_SUFFIX}"):  # the single-directory layout of earlier versions
        stale.unlink(missing_ok=True)
    for lock in base.glob(f"tk-*{_LOCK}"):
        name = lock.name.removesuffix(_LOCK)
        if not _INSTANCE.fullmatch(name):
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: its process is alive
            continue
        shutil.rmtree(base / name, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
    for folder in base.iterdir():
        # A cache makes its lock before its directory and deletes it after, so a directory
        # without one is left from a crash.
        if _INSTANCE.fullmatch(folder.name) and not (base / f"{folder.name}{_LOCK}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _claim(base: Path) -> tuple[Path, int]:
    """Create this cache's own directory under `base` and hold its lock; return it and the lock's descriptor."""
    base.mkdir(parents=True, exist_ok=True)
    while True:
        name = f"tk-{os.getpid()}-{secrets.token_hex(4)}"
        lock = base / f"{name}{_LOCK}"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            ours = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            ours = False  # a sweep took it for a dead one between our open and our flock
        if ours:
            (base / name).mkdir()
            return base / name, fd
        os.close(fd)


def _drop_instance(folder: Path, lock_fd: int | None) -> None:
    """Remove a cache's directory, then its lock file (in that order: see `sweep_states_dir`)."""
    shutil.rmtree(folder, ignore_errors=True)
    if lock_fd is not None:
        folder.with_name(f"{folder.name}{_LOCK}").unlink(missing_ok=True)
        os.close(lock_fd)


# ------------------------------------------------------------------ buffers and files


def os_buffer(size: int) -> mmap.mmap:
    """A writable buffer of `size` bytes mapped straight from the OS and unmapped when dropped.

    States are up to a gigabyte and come and go all the time: taken from the heap, they leave
    it fragmented and the process grows although the cache stays within its budget.
    """
    return mmap.mmap(-1, max(1, size))


def _blend(rate: float, nbytes: int, seconds: float) -> float:
    if nbytes < _MIN_SAMPLE or seconds <= 0:
        return rate
    return (1 - _RATE_WEIGHT) * rate + _RATE_WEIGHT * nbytes / seconds


def _frozen(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    if isinstance(data, bytes):
        return data
    view = data if isinstance(data, memoryview) else memoryview(data)
    if not view.readonly:
        return view.tobytes()
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _write_state(path: Path, entry: SavedState) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(_MAGIC + struct.pack("<QQ", len(entry.tokens), memoryview(entry.data).nbytes))
            fh.write(array("i", entry.tokens).tobytes())
            fh.write(entry.data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _read_state(path: Path) -> SavedState:
    # Unbuffered, straight into pages mapped for the state: a buffered reader copies a gigabyte
    # through its own buffer first.
    with path.open("rb", buffering=0) as fh:
        head = bytearray(_HEADER)
        if _read_into(fh, memoryview(head)) != _HEADER or not head.startswith(_MAGIC):
            raise ValueError("not a saved state")
        n_tokens, n_data = struct.unpack("<QQ", head[len(_MAGIC):])
        tokens = array("i", bytes(4 * n_tokens))
        data = os_buffer(n_data)
        complete = _read_into(fh, memoryview(tokens).cast("B")) == 4 * n_tokens
        if not complete or _read_into(fh, memoryview(data)) < n_data:
            raise ValueError("truncated saved state")
    return SavedState(tuple(tokens), memoryview(data)[:n_data].toreadonly())


def _read_into(fh: BinaryIO, view: memoryview) -> int:
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            break
        done += got
    return done
