"""KV-cache reuse on the real demo model: reused and restored caches give the logits of a full evaluation.

Each test runs on both local backends: a sequence of the batched context (what the bot runs) and
the context-per-worker backend it replaced (kept for measurement side by side).
"""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest

from bot.config import CacheSettings, ModelSettings
from bot.core.sessions import generation_request
from bot.inference.api import GenerationRequest, GenerationStats, Sampling
from bot.inference.engine import run_generation
from bot.inference.local.batched import SequenceBackend, SharedContext
from bot.inference.local.llama import LlamaBackend
from bot.inference.local.state_cache import StateCache
from bot.inference.window import common_prefix
from bot.prompt.builder import Conversation, Prompt, PromptTurn, build_prompt

pytestmark = pytest.mark.model

TOLERANCE = 1e-4
GREEDY = Sampling(temperature=0.0, seed=1)
PERSONA = "Enter roleplay mode. You must act as Bob, a cheerful pirate who loves maps and parrots."


Backend = LlamaBackend | SequenceBackend


KIND = "batched"


@pytest.fixture(params=["batched", "per-worker"], autouse=True)
def kind(request) -> str:
    global KIND
    KIND = request.param
    return request.param


def backend(path, cache: StateCache | None = None, *, n_ctx: int = 512, shift: bool = True, **model) -> Backend:
    settings = ModelSettings(path=str(path), n_ctx=n_ctx, threads=1, **model)
    cache_settings = CacheSettings(context_shift=shift)
    if KIND == "batched":
        return SharedContext(str(path), settings, 1, cache=cache, cache_settings=cache_settings).sequence()
    return LlamaBackend(str(path), settings, cache=cache, cache_settings=cache_settings)


@pytest.fixture
def fresh(demo_model_path, kind):
    b = backend(demo_model_path)
    yield b
    b.close()


def reset(b: Backend) -> None:
    if isinstance(b, SequenceBackend):
        b.reset()
    else:
        b.llm.reset()


def next_logits(b: Backend, prompt: list[int]) -> np.ndarray:
    """Evaluate what `prompt` still needs and return the logits for the token after it."""
    if isinstance(b, SequenceBackend):
        return b.next_logits(prompt)
    gen = b.tokens(prompt, GREEDY, lambda: False)
    next(gen)
    logits = np.ctypeslib.as_array(b.llm._ctx.get_logits_ith(-1), shape=(b.llm.n_vocab(),)).copy()
    gen.close()
    return logits


def full_logits(b: Backend, prompt: list[int]) -> np.ndarray:
    reset(b)
    return next_logits(b, prompt)


def assert_same(reused: np.ndarray, full: np.ndarray) -> None:
    assert int(np.argmax(reused)) == int(np.argmax(full))
    assert float(np.max(np.abs(reused - full))) <= TOLERANCE


def conversation(*texts: str) -> Conversation:
    turns = tuple(
        PromptTurn("user", t, speaker="Alice") if i % 2 == 0 else PromptTurn("model", t) for i, t in enumerate(texts)
    )
    return Conversation(system=PERSONA, turns=turns)


def prompt_of(b: Backend, *texts: str) -> list[int]:
    return build_prompt(b.tokenizer, conversation(*texts), n_ctx=b.n_ctx, max_new_tokens=32).tokens


def test_prefix_reuse_gives_full_evaluation_logits(demo_model_path, fresh):
    b = backend(demo_model_path, StateCache(64 * 2**20))
    try:
        first = prompt_of(b, "Where is the treasure?")
        assert b.prepare("a", first) == 0
        next_logits(b, first)
        second = prompt_of(b, "Where is the treasure?", "Under the old oak, matey!", "Show me the map.")
        reused = b.prepare("a", second)
        assert reused == common_prefix(first, second) and reused > len(first) - 4
        assert_same(next_logits(b, second), full_logits(fresh, second))
        # Regenerate: the same prompt again evaluates at most one token (none while the logits are live).
        assert b.prepare("a", second) >= len(second) - 1
        assert_same(next_logits(b, second), full_logits(fresh, second))
    finally:
        b.close()


def test_state_saved_for_another_channel_then_restored(demo_model_path, fresh):
    cache = StateCache(64 * 2**20)
    b = backend(demo_model_path, cache)
    try:
        a1 = prompt_of(b, "Where is the treasure?", "Under the old oak, matey!")
        b.prepare("a", a1)
        next_logits(b, a1)
        other = build_prompt(
            b.tokenizer,
            Conversation(system="You are Carol, a grumpy innkeeper.", turns=(PromptTurn("user", "A room, please."),)),
            n_ctx=b.n_ctx,
            max_new_tokens=32,
        ).tokens
        b.prepare("b", other)
        next_logits(b, other)
        assert "a" in cache and cache.ram_used > 0
        a2 = prompt_of(b, "Where is the treasure?", "Under the old oak, matey!", "Dig it up!")
        reused = b.prepare("a", a2)
        assert reused == common_prefix(a1, a2) > 20
        assert "a" not in cache and "b" in cache
        assert_same(next_logits(b, a2), full_logits(fresh, a2))
    finally:
        b.close()


def test_restored_state_of_an_edited_history_reuses_only_the_common_prefix(demo_model_path, fresh):
    cache = StateCache(64 * 2**20)
    b = backend(demo_model_path, cache)
    try:
        old = prompt_of(b, "Where is the treasure?", "Under the old oak, matey!", "Dig it up!")
        b.prepare("a", old)
        next_logits(b, old)
        b.prepare("b", old[:5])  # move away so the state is saved
        # The bot's reply was edited: everything after it must be evaluated again.
        edited = prompt_of(b, "Where is the treasure?", "In the cave behind the falls.", "Dig it up!")
        reused = b.prepare("a", edited)
        assert reused == common_prefix(old, edited) < len(old) - 10
        assert_same(next_logits(b, edited), full_logits(fresh, edited))
        # Reset: nothing but the persona is shared, and nothing past it is reused.
        b.prepare("b", old[:5])
        reset = prompt_of(b, "Hello again.")
        assert b.prepare("a", reset) == common_prefix(old, reset)
        assert_same(next_logits(b, reset), full_logits(fresh, reset))
    finally:
        b.close()


def test_state_round_trips_as_a_read_only_view_and_as_bytes(demo_model_path, fresh):
    b = backend(demo_model_path)
    try:
        p = prompt_of(b, "Where is the treasure?", "Under the old oak, matey!")
        b.prepare("a", p)
        next_logits(b, p)
        state, tokens = b.state_bytes(), b.live_tokens()
        assert state.readonly and len(state) > 0
        assert isinstance(state.obj, mmap.mmap)  # its own pages, given back to the OS when dropped
        # As saved in RAM (the view itself) and as read back from disk (bytes).
        for data in (state, bytes(state)):
            reset(b)
            b.restore(tokens, data)
            assert b.live_tokens() == tokens
            assert_same(next_logits(b, p), full_logits(fresh, p))
    finally:
        b.close()


def long_request(b: Backend, turns: int, max_new: int = 16) -> tuple[GenerationRequest, Prompt]:
    texts = [f"Line {i}: the parrot squawks about island number {i} and its golden sand." for i in range(turns)]
    return generation_request(b.tokenizer, conversation(*texts), key="a", n_ctx=b.n_ctx, max_new_tokens=max_new,
                              sampling=GREEDY)


def generate(b, built: tuple[GenerationRequest, Prompt]) -> tuple[GenerationStats, int]:
    """Run the request; return its stats and how many turns its window reached back over."""
    request, prompt = built
    stats = run_generation(b, request, threading.Event(), lambda _chunk: None)
    return stats, prompt.turns_from(stats.window_start)


def test_sliding_window_shifts_the_cache_when_the_model_can(demo_model_path):
    b = backend(demo_model_path, StateCache(64 * 2**20), n_ctx=256)
    try:
        assert b.can_shift and b.context_shift
        generate(b, long_request(b, 9))
        stats, used = None, 0
        for turns in range(10, 16):
            stats, used = generate(b, long_request(b, turns))
        assert stats is not None and used < 15, "the window must have slid"
        assert stats.evaluated_tokens < 60, stats
    finally:
        b.close()


@pytest.mark.parametrize("why", ["switched off", "model cannot shift"])
def test_without_shift_the_window_is_trimmed_in_chunks(demo_model_path, monkeypatch, why):
    if why == "model cannot shift":
        import llama_cpp

        monkeypatch.setattr(llama_cpp, "llama_memory_can_shift", lambda _memory: False)
    b = backend(demo_model_path, StateCache(64 * 2**20), n_ctx=256, shift=why == "model cannot shift")
    try:
        assert not b.context_shift
        if why == "model cannot shift":
            assert not b.can_shift  # asked for, but the model cannot
        runs = [generate(b, long_request(b, turns)) for turns in range(8, 24)]
        stats = [s for s, _ in runs]
        assert runs[-1][1] < 23, "the window must have slid"
        # Mostly only the new turn is evaluated; the occasional trim re-evaluates the window.
        cheap = [s.evaluated_tokens for s in stats if s.evaluated_tokens < 60]
        assert len(cheap) >= len(stats) * 2 // 3, [s.evaluated_tokens for s in stats]
    finally:
        b.close()


def test_cache_bytes_are_bounded_and_accounted(demo_model_path):
    b = backend(demo_model_path, StateCache(0))
    try:
        p = prompt_of(b, "Hello")
        b.prepare("a", p)
        next_logits(b, p)
        size = len(b.state_bytes())
        assert size > 0
        b.cache = StateCache(size + 4 * len(p) + 10)
        b.save_current()
        assert b.cache.ram_used == size + 4 * len(b.live_tokens())
        b.key = "b"
        b.save_current()  # a second entry does not fit beside the first: the older one leaves
        assert b.cache.ram_used <= b.cache.ram_budget and "a" not in b.cache and "b" in b.cache
    finally:
        b.close()


def test_quantized_kv_cache_loads_and_its_state_is_smaller(demo_model_path):
    small = backend(demo_model_path, n_ctx=256, kv_type="q8_0", flash_attn=True)
    big = backend(demo_model_path, n_ctx=256)
    try:
        p = prompt_of(big, "Where is the treasure?")
        for b in (small, big):
            b.prepare("a", p)
            next_logits(b, p)
        assert len(small.state_bytes()) < 0.7 * len(big.state_bytes())
    finally:
        small.close()
        big.close()
