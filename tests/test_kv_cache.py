"""KV-cache reuse without a model: the saved-state cache, window planning, worker affinity, accounting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bot.inference.api import Finished, GenerationRequest, Started
from bot.inference.engine import Engine
from bot.inference.local.state_cache import StateCache
from bot.inference.window import ALIGN_PROBE, common_prefix, find_run, plan_window
from bot.prompt.builder import Conversation, PromptTurn, build_prompt
from tests.fake_backend import FakeBackend, fake_request

# ------------------------------------------------------------------ StateCache


def test_ram_budget_is_never_exceeded_and_oldest_leaves_first():
    cache = StateCache(ram_bytes=1000)
    assert cache.put("a", [1, 2], b"x" * 392)  # 400 bytes with its tokens
    assert cache.put("b", [1, 2], b"x" * 392)
    assert cache.tokens("a") == (1, 2)  # reading tokens does not refresh the entry
    assert cache.put("c", [1, 2], b"x" * 392)
    assert cache.ram_used == 800 <= cache.ram_budget
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.stats().evictions == 1


def test_entry_bigger_than_the_budget_is_not_kept():
    cache = StateCache(ram_bytes=100)
    assert not cache.put("a", [1], b"x" * 200)
    assert "a" not in cache and cache.ram_used == 0


def test_put_replaces_and_take_removes():
    cache = StateCache(ram_bytes=10_000)
    cache.put("a", [1, 2, 3], b"old")
    cache.put("a", [1, 2, 3, 4], b"new")
    assert cache.ram_used == 3 + 16
    saved = cache.take("a")
    assert saved is not None and saved.data == b"new" and saved.tokens == (1, 2, 3, 4)
    assert cache.take("a") is None and cache.ram_used == 0
    assert cache.stats().hits == 1 and cache.stats().misses == 1


def test_states_leaving_ram_spill_to_disk_within_its_budget(tmp_path):
    (tmp_path / "stale.kvstate").write_bytes(b"from an earlier run")
    cache = StateCache(ram_bytes=500, disk_dir=tmp_path, disk_bytes=900)
    assert not (tmp_path / "stale.kvstate").exists()
    for key in "abcd":
        cache.put(key, [1, 2], key.encode() * 392)
    # RAM holds d; disk holds b and c (a fell off the disk tier, 3 files of 422 bytes > 900).
    assert cache.ram_used == 400 and cache.disk_used == 2 * FILE
    assert "a" not in cache and all(k in cache for k in "bcd")
    assert len(list(tmp_path.glob("*/*.kvstate"))) == 2
    saved = cache.take("b")
    assert saved is not None and saved.data == b"b" * 392 and saved.tokens == (1, 2)
    assert cache.disk_used == FILE and len(list(tmp_path.glob("*/*.kvstate"))) == 1
    cache.clear()
    assert cache.disk_used == 0 and not list(tmp_path.glob("*/*.kvstate"))
    cache.close()
    assert not list(tmp_path.iterdir())


FILE = 22 + 400  # a state file: header, then the 400 bytes of tokens and state


def test_read_only_buffers_are_kept_without_a_copy_and_writable_ones_are_copied(tmp_path):
    cache = StateCache(ram_bytes=10_000, disk_dir=tmp_path, disk_bytes=10_000)
    frozen = memoryview(bytearray(b"abcd" * 100)).toreadonly()
    cache.put("view", [1, 2], frozen)
    saved = cache.take("view")
    assert saved is not None and saved.data is frozen and saved.nbytes == 400 + 8

    writable = bytearray(b"x" * 100)
    cache.put("copy", [1], writable)
    writable[:] = b"y" * 100  # the caller reuses its buffer: the saved state must not change
    saved = cache.take("copy")
    assert saved is not None and bytes(saved.data) == b"x" * 100

    # A read-only view of wider items is accounted in bytes and spills to disk intact.
    words = memoryview(bytearray(range(16))).cast("I").toreadonly()
    small = StateCache(ram_bytes=19, disk_dir=tmp_path, disk_bytes=10_000)
    assert small.put("wide", [7], words) and small.disk_used == 22 + 16 + 4
    saved = small.take("wide")
    assert saved is not None and saved.data == bytes(range(16)) and saved.tokens == (7,)

def test_cache_is_safe_across_threads():
    cache = StateCache(ram_bytes=50_000)

    def work(n: int) -> None:
        for i in range(300):
            cache.put(f"k{(n * 7 + i) % 40}", [i], b"x" * 1000)
            cache.take(f"k{(n + i) % 40}")

    import threading

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 <= cache.ram_used <= cache.ram_budget
    assert cache.ram_used == sum(1004 for k in range(40) if f"k{k}" in cache)


# ------------------------------------------------------------------ window planning


def test_common_prefix_and_find_run():
    a = list(range(1000))
    assert common_prefix(a, a) == 1000
    assert common_prefix(a, [*a[:700], -1]) == 700
    assert common_prefix([], a) == 0
    assert find_run(a, [500, 501, 502]) == 500
    assert find_run(a, [5, 7]) == -1


HEAD = [1, 9, 9, 9]


def turns(start: int, stop: int) -> list[int]:
    out: list[int] = []
    for t in range(start, stop):
        out += [5, 5] + [100 + t] * 10  # a marker then a distinct body per turn
    return out


def test_plan_prefix_slide_and_align():
    cached = HEAD + turns(0, 10)
    assert plan_window(HEAD + turns(0, 12), 4, cached).kind == "prefix"
    slide = plan_window(HEAD + turns(3, 12), 4, cached)
    assert (slide.kind, slide.offset) == ("slide", 3 * 12)
    align = plan_window(HEAD + turns(0, 12), 4, HEAD + turns(2, 10))
    assert (align.kind, align.offset) == ("align", 2 * 12)
    # Another persona, or nothing in common past it: plain prefix reuse (of nothing).
    assert plan_window([1, 8, 8, 8, *turns(3, 12)], 4, cached).kind == "prefix"
    assert plan_window(HEAD + turns(50, 60), 4, cached).kind == "prefix"
    assert ALIGN_PROBE <= 24


# ------------------------------------------------------------------ the engine with a reusing backend


class ReusingFake(FakeBackend):
    """FakeBackend with a simulated KV cache per worker and a shared StateCache."""

    def __init__(self, cache: StateCache, *, n_ctx: int = 4096, shift: bool = True) -> None:
        super().__init__("ok", n_ctx=n_ctx)
        self.cache = cache
        self.key: str | None = None
        self.live: list[int] = []
        self.context_shift = shift
        self.trim_fraction = 0.5
        self.restores = 0
        self.evaluated: list[int] = []

    def cached_tokens(self, key: str) -> Sequence[int]:
        if self.key != key and (saved := self.cache.tokens(key)) is not None:
            return saved
        return self.live

    def prepare(self, key: str, prompt: list[int], *, head: int = 0, slide: int = 0) -> int:
        if self.key != key:
            if self.key is not None and self.live:
                self.cache.put(self.key, self.live, bytes(len(self.live)))
            self.key = key
            saved = self.cache.take(key)
            if saved is not None:
                self.live = list(saved.tokens)
                self.restores += 1
        if slide:
            del self.live[head : head + slide]
        reused = min(common_prefix(self.live, prompt), len(prompt) - 1)
        self.live = list(prompt)
        self.evaluated.append(len(prompt) - reused)
        return reused


def conv(n: int, tag: str = "") -> Conversation:
    items = tuple(
        PromptTurn("user", f"{tag}message number {i}", speaker="Alice") if i % 2 == 0
        else PromptTurn("model", f"{tag}reply number {i}")
        for i in range(n)
    )
    return Conversation(system="A test persona.", turns=items)


def req(key: str, conversation: Conversation, max_new: int = 8, n_ctx: int = 4096) -> GenerationRequest:
    return fake_request(key, conversation, max_new, n_ctx=n_ctx)


async def finish(engine: Engine, request: GenerationRequest) -> tuple[Started, Finished]:
    started = finished = None
    async for chunk in engine.generate(request):
        if isinstance(chunk, Started):
            started = chunk
        elif isinstance(chunk, Finished):
            finished = chunk
    assert started is not None and finished is not None
    return started, finished


async def test_started_and_stats_report_evaluated_and_reused_tokens():
    backend = ReusingFake(StateCache(10**6))
    engine = Engine(lambda: backend)
    await engine.start()
    try:
        first, _ = await finish(engine, req("c", conv(1)))
        assert first.reused_tokens == 0 and first.evaluated_tokens == first.prompt_tokens
        second, done2 = await finish(engine, req("c", conv(3)))
        assert second.reused_tokens > first.prompt_tokens - 5
        assert second.evaluated_tokens == second.prompt_tokens - second.reused_tokens
        assert done2.stats.evaluated_tokens == second.evaluated_tokens
        assert done2.stats.reused_tokens == second.reused_tokens
    finally:
        await engine.close()


async def test_plain_backends_report_every_prompt_token_as_evaluated():
    engine = Engine(lambda: FakeBackend("ok"))
    await engine.start()
    try:
        started, done = await finish(engine, req("c", conv(3)))
        assert started.evaluated_tokens == started.prompt_tokens and started.reused_tokens == 0
        assert done.stats.evaluated_tokens == started.prompt_tokens
    finally:
        await engine.close()


async def test_a_channel_goes_back_to_the_worker_that_served_it():
    cache = StateCache(10**6)
    backends: list[ReusingFake] = []

    def factory() -> ReusingFake:
        backends.append(ReusingFake(cache))
        return backends[-1]

    engine = Engine(factory, workers=2)
    await engine.start()
    try:
        a, _ = await finish(engine, req("a", conv(1, "a")))
        b, _ = await finish(engine, req("b", conv(1, "b")))
        assert a.worker != b.worker, "an idle worker holding nothing wanted is preferred"
        for n in (3, 5, 7):
            a2, _ = await finish(engine, req("a", conv(n, "a")))
            b2, _ = await finish(engine, req("b", conv(n, "b")))
            assert (a2.worker, b2.worker) == (a.worker, b.worker)
        assert sum(x.restores for x in backends) == 0
    finally:
        await engine.close()


async def test_many_channels_on_one_worker_restore_their_saved_state():
    backend = ReusingFake(StateCache(10**6))
    engine = Engine(lambda: backend)
    await engine.start()
    try:
        for n in (1, 3, 5):
            for key in "abc":
                started, _ = await finish(engine, req(key, conv(n, key)))
                if n > 1:
                    assert started.reused_tokens > started.prompt_tokens // 2
        assert backend.restores == 6
    finally:
        await engine.close()


async def test_concurrent_channels_stay_fair_with_affinity():
    backend = ReusingFake(StateCache(10**6))
    backend.token_delay = 0.001
    engine = Engine(lambda: backend, workers=2)
    await engine.start()
    try:
        results = await asyncio.gather(*(finish(engine, req(k, conv(3, k))) for k in "abcdef"))
        assert all(done.stats.stop_reason == "eos" for _, done in results)
    finally:
        await engine.close()


async def test_edited_history_reuses_only_the_common_prefix():
    backend = ReusingFake(StateCache(10**6))
    engine = Engine(lambda: backend)
    await engine.start()
    try:
        await finish(engine, req("a", conv(6)))
        await finish(engine, req("b", conv(2, "b")))  # a's state is saved
        turns = list(conv(6).turns)
        turns[2] = PromptTurn("user", "an edited message", speaker="Alice")
        edited = Conversation(system="A test persona.", turns=tuple(turns))
        started, _ = await finish(engine, req("a", edited))
        expected = build_prompt(backend.tokenizer, edited, n_ctx=4096, max_new_tokens=8).tokens
        old = build_prompt(backend.tokenizer, conv(6), n_ctx=4096, max_new_tokens=8).tokens
        assert started.reused_tokens == common_prefix(old, expected)
        assert started.evaluated_tokens == len(expected) - started.reused_tokens
    finally:
        await engine.close()


@pytest.mark.parametrize("shift", [True, False])
async def test_sliding_window_shifts_or_trims_in_chunks(shift: bool):
    backend = ReusingFake(StateCache(10**6), n_ctx=400, shift=shift)
    engine = Engine(lambda: backend)
    await engine.start()
    try:
        stats = []
        for n in range(2, 60):
            _, done = await finish(engine, req("a", conv(n), n_ctx=400))
            stats.append(done.stats)
        full = [s for s in stats if s.evaluated_tokens > 100]
        last = build_prompt(backend.tokenizer, conv(59), n_ctx=400, max_new_tokens=8)
        assert last.turns_from(stats[-1].window_start) < 59, "the window must have slid"
        if shift:
            assert not full, [s.evaluated_tokens for s in stats]
        else:
            # Each trim drops half the room, so a full evaluation comes only every several turns.
            assert 1 < len(full) <= len(stats) // 5, [s.evaluated_tokens for s in stats]
    finally:
        await engine.close()


# ------------------------------------------------------------------ settings


def test_quantized_kv_cache_needs_flash_attention(tmp_path):
    from bot.config import ConfigError, load_settings

    path = tmp_path / "config.toml"
    path.write_text('[model]\nkv_type = "q8_0"\n')
    with pytest.raises(ConfigError, match=r"model: kv_type = 'q8_0' needs flash_attn = true"):
        load_settings(path, env={})
    path.write_text('[model]\nkv_type = "q8_0"\nflash_attn = true\n[cache]\nram_bytes = 1024\ncontext_shift = false\n')
    settings = load_settings(path, env={})
    assert settings.model.kv_type == "q8_0" and settings.cache.ram_bytes == 1024
    assert not settings.cache.context_shift
    path.write_text('[model]\nkv_type = "q2"\n')
    with pytest.raises(ConfigError, match=r"model\.kv_type"):
        load_settings(path, env={})
