"""The saved-state cache at 7B scale: budgets under random use and threads, files in flight, shared directories,
the restore cost, sizing from the machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bot.config import CacheSettings, ConfigError, load_settings
from bot.inference.local import state_cache as states
from bot.inference.local.llama import state_cache
from bot.inference.local.state_cache import (
    AUTO,
    DISK_CAP,
    DISK_START_RATE,
    LOAD_START_RATE,
    StateCache,
    auto_disk_bytes,
    auto_ram_bytes,
    default_states_dir,
    worth_restoring,
)

ROOT = Path(__file__).resolve().parents[1]
HEADER = 22  # bytes of a state file before its tokens and state


def files(cache: StateCache) -> list[Path]:
    assert cache.directory is not None
    return sorted(cache.directory.iterdir())


def assert_consistent(cache: StateCache) -> None:
    """Budgets hold and the disk tier's files are exactly its listed entries, sized as counted."""
    stats = cache.stats()
    assert 0 <= stats.ram_bytes <= cache.ram_budget
    assert 0 <= stats.disk_bytes <= cache.disk_budget
    on_disk = files(cache)
    assert all(path.suffix == ".kvstate" for path in on_disk), on_disk  # no temporary file left
    assert len(on_disk) == stats.disk_entries
    assert sum(path.stat().st_size for path in on_disk) == stats.disk_bytes


# ------------------------------------------------------------------ budgets under random use


class CacheMachine(RuleBasedStateMachine):
    """Random put / take / discard / clear with both tiers small enough to evict all the time."""

    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="states-"))
        self.cache = StateCache(ram_bytes=1200, disk_dir=self.base, disk_bytes=2000)
        self.latest: dict[str, bytes] = {}  # what each key was last saved as
        self.count = 0

    @rule(key=st.sampled_from("abcdef"), size=st.integers(0, 1500), n_tokens=st.integers(0, 20))
    def put(self, key: str, size: int, n_tokens: int) -> None:
        self.count += 1
        data = bytes([self.count % 256]) * size
        stored = self.cache.put(key, list(range(n_tokens)), data)
        self.latest[key] = data
        if not stored:
            assert key not in self.cache

    @rule(key=st.sampled_from("abcdef"))
    def take(self, key: str) -> None:
        saved = self.cache.take(key)
        if saved is not None:
            assert bytes(saved.data) == self.latest[key], "an older state came back"
        assert key not in self.cache

    @rule(key=st.sampled_from("abcdef"))
    def discard(self, key: str) -> None:
        self.cache.discard(key)
        assert key not in self.cache

    @precondition(lambda self: self.count % 7 == 0)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        assert self.cache.stats().entries == self.cache.stats().disk_entries == 0

    @invariant()
    def budgets_hold(self) -> None:
        assert_consistent(self.cache)
        assert self.cache.ram_used == self.cache.stats().ram_bytes

    def teardown(self) -> None:
        self.cache.close()
        assert not list(self.base.iterdir()), "close() leaves nothing behind"
        shutil.rmtree(self.base, ignore_errors=True)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_budgets_and_files_hold_with_threads_at_once(tmp_path):
    cache = StateCache(ram_bytes=20_000, disk_dir=tmp_path, disk_bytes=50_000)
    errors: list[BaseException] = []
    seen: list[tuple[int, int]] = []

    def work(n: int) -> None:
        try:
            for i in range(250):
                key = f"k{(n * 7 + i) % 30}"
                cache.put(key, [n, i], bytes([n]) * (500 + (i * 37) % 4000))
                saved = cache.take(f"k{(n + 3 * i) % 30}")
                if saved is not None:
                    assert bytes(saved.data) == bytes([saved.tokens[0]]) * len(saved.data)
                if i % 17 == 0:
                    cache.discard(f"k{i % 30}")
                stats = cache.stats()
                seen.append((stats.ram_bytes, stats.disk_bytes))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(ram <= cache.ram_budget and disk <= cache.disk_budget for ram, disk in seen)
    assert cache.stats().disk_entries > 0, "the disk tier was used"
    assert_consistent(cache)
    cache.close()
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ a spill still being written


class HeldWrites:
    """Makes the cache's first file write wait until released, to act while a spill is in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        write = states._write_state

        def held(path, entry):
            if not self.started.is_set():
                self.started.set()
                assert self.release.wait(10)
            write(path, entry)

        monkeypatch.setattr(states, "_write_state", held)


def spill_in_background(cache: StateCache, held: HeldWrites) -> threading.Thread:
    """Put "a" then "b" so that "a" leaves RAM, in a thread that stops inside the write of "a"."""
    cache.put("a", [1], b"a" * 396)
    thread = threading.Thread(target=cache.put, args=("b", [2], b"b" * 396))
    thread.start()
    assert held.started.wait(10)
    return thread


def test_a_state_being_written_can_be_taken_and_its_file_goes(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    cache = StateCache(ram_bytes=500, disk_dir=tmp_path, disk_bytes=5000)
    thread = spill_in_background(cache, held)
    # The lock is free during the write: other calls go on, and "a" is served from memory.
    assert cache.tokens("a") == (1,) and "b" in cache
    assert cache.restore_seconds("a") == pytest.approx((HEADER + 400) / LOAD_START_RATE)  # no read
    saved = cache.take("a")
    assert saved is not None and saved.data == b"a" * 396
    assert cache.disk_used == HEADER + 400, "reserved until its writer deletes it"
    held.release.set()
    thread.join(10)
    assert "a" not in cache and cache.disk_used == 0 and not files(cache)


def test_a_newer_put_wins_over_an_older_state_being_written(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    cache = StateCache(ram_bytes=500, disk_dir=tmp_path, disk_bytes=5000)
    thread = spill_in_background(cache, held)
    assert cache.put("a", [1, 2], b"n" * 392)  # to RAM, pushing "b" out to disk (held too)
    held.release.set()
    thread.join(10)
    saved = cache.take("a")
    assert saved is not None and saved.data == b"n" * 392 and saved.tokens == (1, 2)
    assert cache.take("a") is None
    saved = cache.take("b")
    assert saved is not None and saved.data == b"b" * 396
    assert cache.disk_used == 0 and not files(cache)


def test_discard_and_clear_during_a_write_leave_no_file(tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    cache = StateCache(ram_bytes=500, disk_dir=tmp_path, disk_bytes=5000)
    thread = spill_in_background(cache, held)
    cache.discard("a")
    cache.clear()
    held.release.set()
    thread.join(10)
    assert cache.stats().disk_entries == 0 and cache.disk_used == 0 and not files(cache)


def test_a_state_that_cannot_be_written_is_dropped_without_a_trace(tmp_path, monkeypatch):
    def failing(path, entry):
        path.with_suffix(".tmp").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    cache = StateCache(ram_bytes=500, disk_dir=tmp_path, disk_bytes=5000)
    monkeypatch.setattr(states, "_write_state", failing)
    cache.put("a", [1], b"a" * 396)
    assert cache.put("b", [2], b"b" * 396)
    assert "a" not in cache and cache.disk_used == 0 and not files(cache)
    assert not cache.put("big", [3], b"x" * 600)  # straight to disk, which fails


# ------------------------------------------------------------------ one directory per process

HOLD = """
import sys
from bot.inference.local.state_cache import StateCache
cache = StateCache(100, sys.argv[1], 10_000)
cache.put("a", [1], b"a" * 200)
print(cache.directory, flush=True)
if sys.argv[2] == "crash":
    import os
    os._exit(1)
sys.stdin.read()
cache.close()
"""


def start(base: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(base), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    folder = Path(proc.stdout.readline().strip())
    assert len(list(folder.glob("*.kvstate"))) == 1
    return proc, folder


def test_each_process_keeps_its_own_directory_and_only_those_of_ended_ones_are_removed(tmp_path):
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "keep").mkdir()
    live, live_dir = start(tmp_path, "hold")
    crashed, crashed_dir = start(tmp_path, "crash")
    try:
        assert crashed.wait(10) == 1 and crashed_dir.is_dir()
        orphan = tmp_path / "tk-1-0123abcd"  # a crash between removing a directory and its lock
        orphan.mkdir()
        mine = StateCache(100, tmp_path, 10_000)
        assert not crashed_dir.exists() and not crashed_dir.with_name(crashed_dir.name + ".lock").exists()
        assert not orphan.exists()
        assert len(list(live_dir.glob("*.kvstate"))) == 1, "a live process keeps its states"
        assert (tmp_path / "notes.txt").exists() and (tmp_path / "keep").is_dir()
        assert mine.directory is not None and mine.directory.parent == tmp_path
        assert mine.directory not in (live_dir, crashed_dir)
        mine.close()
        assert mine.directory is not None and not mine.directory.exists()
    finally:
        live.communicate("", timeout=10)
    assert not live_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "notes.txt"]


def test_two_caches_of_one_process_do_not_remove_each_other(tmp_path):
    first = StateCache(100, tmp_path, 10_000)
    first.put("a", [1], b"a" * 200)
    second = StateCache(100, tmp_path, 10_000)
    assert first.take("a") is not None and first.directory != second.directory
    first.close()
    assert second.directory is not None and second.directory.is_dir()
    second.close()
    assert not list(tmp_path.iterdir())


def test_an_unwritable_directory_leaves_the_cache_in_ram(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    cache = StateCache(1000, blocker / "states", 10_000)
    assert (cache.disk_budget, cache.directory) == (0, None)
    assert cache.put("a", [1], b"a" * 100) and not cache.put("big", [1], b"x" * 2000)


def test_a_closed_cache_keeps_working_in_ram(tmp_path):
    cache = StateCache(1000, tmp_path, 10_000)
    cache.close()
    assert cache.put("a", [1], b"a" * 100) and cache.take("a") is not None
    assert not cache.put("big", [1], b"x" * 2000)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ restore or evaluate


def test_restore_seconds_is_bytes_over_the_tier_throughput(tmp_path):
    cache = StateCache(ram_bytes=3 * 2**20, disk_dir=tmp_path, disk_bytes=64 * 2**20)
    assert cache.restore_seconds("absent") is None
    cache.put("old", [1], b"o" * (2 * 2**20 - 4))  # 2 MiB with its token
    assert cache.restore_seconds("old") == pytest.approx(2**21 / LOAD_START_RATE)
    cache.put("new", [1], b"n" * (2 * 2**20 - 4))  # "old" goes to disk
    on_disk = 2**21 + HEADER
    assert cache.restore_seconds("old") == pytest.approx(on_disk / LOAD_START_RATE + on_disk / DISK_START_RATE)
    assert cache.restore_seconds("new") < cache.restore_seconds("old")  # type: ignore[operator]

    assert cache.take("old") is not None
    assert cache.disk_rate != DISK_START_RATE, "reads are measured as they happen"
    cache.record_load(2**30, 0.25)  # the backend reports llama.cpp loading 1 GiB in 0.25 s
    assert cache.load_rate == pytest.approx(0.7 * LOAD_START_RATE + 0.3 * 4 * 2**30)
    cache.record_load(100, 1.0)  # too small to say anything about throughput
    assert cache.load_rate == pytest.approx(0.7 * LOAD_START_RATE + 0.3 * 4 * 2**30)
    cache.close()


def test_worth_restoring_compares_with_evaluating():
    # 2,048 tokens at 65 tokens/s take 31.5 s to evaluate: a 5 s read is worth it, a 40 s one is not.
    assert worth_restoring(5.0, 2048, 65.0)
    assert not worth_restoring(40.0, 2048, 65.0)
    assert not worth_restoring(0.001, 0, 65.0)  # nothing saved by restoring
    assert worth_restoring(1e6, 10, 0.0)  # unknown speed: restore


# ------------------------------------------------------------------ sizing from the machine


def test_budgets_from_the_machine_figures():
    assert auto_ram_bytes(24 * 2**30) == 6 * 2**30
    assert auto_disk_bytes(10 * 2**30) == 5 * 2**30
    assert auto_disk_bytes(10 * 2**40) == DISK_CAP
    assert auto_disk_bytes(0) == 0


def test_auto_budgets_read_the_machine_and_explicit_ones_win(tmp_path, monkeypatch):
    monkeypatch.setattr(states, "total_ram_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(states, "free_disk_bytes", lambda path: 100 * 2**30)
    cache = StateCache(AUTO, tmp_path / "new" / "dir", AUTO)
    assert (cache.ram_budget, cache.disk_budget) == (4 * 2**30, DISK_CAP)
    cache.close()
    explicit = StateCache(1000, tmp_path, 5000)
    assert (explicit.ram_budget, explicit.disk_budget) == (1000, 5000)
    explicit.close()
    assert StateCache(AUTO).disk_budget == 0 and StateCache(AUTO).directory is None


def test_default_settings_put_the_disk_tier_in_the_user_cache_directory(_states_dir, monkeypatch):
    monkeypatch.setattr(states, "total_ram_bytes", lambda: 8 * 2**30)
    monkeypatch.setattr(states, "free_disk_bytes", lambda path: 30 * 2**30)
    cache = state_cache(CacheSettings())
    assert (cache.ram_budget, cache.disk_budget) == (2 * 2**30, 15 * 2**30)
    assert cache.directory is not None and cache.directory.parent == _states_dir
    cache.close()
    off = state_cache(CacheSettings(disk_bytes=0, ram_bytes=1024))
    assert (off.ram_budget, off.disk_budget, off.directory) == (1024, 0, None)
    elsewhere = state_cache(CacheSettings(disk_dir=str(_states_dir / "other"), disk_bytes=4096))
    assert elsewhere.directory is not None and elsewhere.directory.parent == _states_dir / "other"
    assert elsewhere.disk_budget == 4096
    elsewhere.close()


def test_default_states_dir_follows_xdg_cache_home():
    assert default_states_dir({"XDG_CACHE_HOME": "/var/cache/bot"}) == Path("/var/cache/bot/tavernkeep/states")
    assert default_states_dir({}) == Path.home() / ".cache" / "tavernkeep" / "states"


def test_cache_settings_defaults_and_validation(tmp_path):
    defaults = CacheSettings()
    assert (defaults.ram_bytes, defaults.disk_dir, defaults.disk_bytes) == (-1, "", -1)
    path = tmp_path / "config.toml"
    path.write_text("[cache]\nram_bytes = -2\n")
    with pytest.raises(ConfigError, match=r"cache\.ram_bytes: Input should be greater than or equal to -1"):
        load_settings(path, env={})
    path.write_text("[cache]\ndisk_bytes = 0\nram_bytes = 1073741824\n")
    settings_ = load_settings(path, env={})
    assert (settings_.cache.disk_bytes, settings_.cache.ram_bytes) == (0, 2**30)
