"""Tavernkeep benchmarks: every figure is a ratio measured side by side in one run.

    python -m bench.run [--model PATH] [--quick] [--threads N] [--only 1,2,...] [--out bench/results/latest.json]

1. turn cost: a scripted conversation that slides the window, KV reuse vs full re-evaluation
2. interleaved channels over 2 and 1 sequences, windows full as in 1., reuse vs none
3. engine overhead: tokens/s through the engine vs llama-cpp-python directly, same threads and thread
4. event loop lag while the engine generates (switching channels), vs the same work on the loop
5. database: append-turn latency and prompt-window load for a channel of 100,000 turns
6. memory: 1, 2 and 4 sequences of the batched engine vs as many llama-cpp-python contexts; saved states
7. experiment: several channels decoded in one raw llama.cpp call vs one at a time and vs 2 contexts
8. lore reuse: a card's lorebook at a depth, before the character kept in the head, or moved to a depth
9. speaker switching: two characters answering in turn, one card in the prompt or both
10. name prefill: replies of three characters cut to nothing, with and without `Name:` after `<|model|>`
11. 1-8 channels generating at once: ours vs llama.cpp's llama-server vs the engine before batching (bench/server.py)

Paired figures alternate their two sides (ABBA), so a busy machine slows both alike, and keep
the best of several runs where the work is identical; benchmark 3 takes each side's rate over all
its runs instead, as this host's speed swings both ways between runs. Each benchmark runs on a
thread of its own (see `in_own_thread`).

"Ours" is the engine the bot runs: the batched backend (`bot.inference.local.batched`), one model
and one context whose sequences serve the channels, with all `--threads` in that context. A
benchmark that needs several backends at once takes them as sequences of one context, so only one
thread (its decode thread) runs the model.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bot.config import CacheSettings, ModelSettings, Settings
from bot.core.sessions import generation_request
from bot.inference.api import Finished, GenerationRequest, GenerationStats, Sampling, Text
from bot.inference.engine import Engine, run_generation
from bot.inference.local.batched import SequenceBackend, SharedContext
from bot.inference.local.llama import N_BATCH, LlamaBackend, llama_params
from bot.inference.local.state_cache import StateCache
from bot.prompt.builder import Conversation, Prompt, PromptTurn, build_prompt, longest_token_chars
from persistence.records import WindowBudget

PERSONA = (
    "Enter roleplay mode. You must act as Captain Mirela Vance, whose persona follows: a weathered airship "
    "captain who trades spices between floating islands, speaks in clipped nautical slang, distrusts nobles "
    "and keeps a mechanical parrot named Brass that repeats the last word of every sentence."
)
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, seed=1)
# Benchmark 3 needs a long reply: with this request and seed the demo model writes past 128 tokens.
LONG_REPLY = "Describe, in great detail and at length, every room of your airship, one by one."
SAMPLED = Sampling(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1, seed=3)
_WORDS = (
    "storm", "wind", "spice", "island", "cargo", "brass", "parrot", "map", "harbor", "cloud", "engine", "lantern",
    "rope", "anchor", "noble", "coin", "deck", "sail", "compass", "thunder", "merchant", "pirate", "signal", "beacon",
    "tower", "cellar", "wine", "bread", "knife", "star", "night", "dawn", "fog", "reef", "chart", "ledger",
    "debt", "promise", "rumour", "guard", "gate", "market", "bridge", "river", "mountain",
)


def scripted_turn(index: int, role: str) -> PromptTurn:
    """A deterministic conversation turn (user turns about 25 tokens, replies about 35)."""
    rng = random.Random(index * 2 + (role == "model"))
    words = " ".join(rng.choice(_WORDS) for _ in range(14 if role == "user" else 22))
    if role == "user":
        speaker = ("Alice", "Bob", "Chen")[index % 3]
        return PromptTurn("user", f"Turn {index}: what about the {words}?", speaker=speaker)
    return PromptTurn("model", f"*adjusts her goggles* The {words}, aye. Brass squawks: aye!")


def history(turns: int, tag: str = "") -> list[PromptTurn]:
    out: list[PromptTurn] = []
    for i in range(turns):
        out.append(scripted_turn(i, "user"))
        out.append(scripted_turn(i, "model"))
    if tag:
        out = [PromptTurn(t.role, f"{tag} {t.text}", t.speaker) for t in out]
    return out


_vocabularies: dict[str, Any] = {}


def vocabulary(model: str) -> Any:
    """The model's vocabulary alone (no weights), loaded once: what requests are tokenized with."""
    if model not in _vocabularies:
        import llama_cpp

        _vocabularies[model] = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    return _vocabularies[model]


def built_request(model: str, n_ctx: int, key: str, conv: Conversation, max_new: int,
                  sampling: Sampling = GREEDY) -> tuple[GenerationRequest, Prompt]:
    """The request the bot's core builds for `conv` (widest window for `n_ctx`, cuts at block starts)."""
    return generation_request(vocabulary(model), conv, key=key, n_ctx=n_ctx, max_new_tokens=max_new,
                              sampling=sampling)


def tagged_conversation(tag: str, pairs: int) -> Conversation:
    """`pairs` earlier turn pairs plus the next user turn, each prefixed by `tag` (one per channel)."""
    turns = history(pairs, tag)
    turns.append(PromptTurn("user", f"{tag} {scripted_turn(pairs, 'user').text}", scripted_turn(pairs, "user").speaker))
    return Conversation(PERSONA, tuple(turns))


def tagged_request(model: str, n_ctx: int, tag: str, key: str, pairs: int, max_new: int) -> GenerationRequest:
    """The request of `tagged_conversation`."""
    return built_request(model, n_ctx, key, tagged_conversation(tag, pairs), max_new)[0]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


class BenchSequence(SequenceBackend):
    """A sequence of the batched engine that remembers the first token of each generation (the greedy argmax).

    On close it saves the channel it holds, so a later engine sharing the state cache starts warm.
    """

    first_token: int | None = None

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        self.first_token = None
        for token in super().tokens(prompt, sampling, stop):
            if self.first_token is None:
                self.first_token = token
            yield token

    def close(self) -> None:
        self.save_current()
        super().close()


def bench_sequences(model: str, settings: ModelSettings, count: int, *, cache: StateCache | None = None,
                    cache_settings: CacheSettings | None = None, n_batch: int = N_BATCH) -> list[BenchSequence]:
    """All `count` sequences of one new SharedContext, as BenchSequences (close each; the last frees the model)."""
    shared = SharedContext(model, settings, count, cache=cache, cache_settings=cache_settings or CacheSettings(),
                           n_batch=n_batch)
    # Nothing is handed out yet, so the context's slots can still be swapped for the benchmark's own.
    sequences = [BenchSequence(shared, slot.seq) for slot in shared.slots]
    shared.slots[:] = sequences
    for _ in sequences:
        shared.sequence()  # counted as handed out
    return sequences


class NoReuse:
    """The same sequence emptied before every prompt, which it then evaluates in full (the baseline)."""

    def __init__(self, inner: BenchSequence) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.n_ctx = inner.n_ctx

    @property
    def first_token(self) -> int | None:
        return self.inner.first_token

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        self.inner.reset()
        return self.inner.tokens(prompt, sampling, stop)

    def piece(self, token: int) -> bytes:
        return self.inner.piece(token)

    def is_end(self, token: int) -> bool:
        return self.inner.is_end(token)

    def close(self) -> None:
        self.inner.close()


def keyed(request: GenerationRequest, key: str) -> GenerationRequest:
    """`request` under another channel key: sequences of one context given the same key would hand it over."""
    return dataclasses.replace(request, key=key)


def model_settings(model: str, n_ctx: int, threads: int, workers: int = 1, **extra: Any) -> ModelSettings:
    return ModelSettings(path=model, n_ctx=n_ctx, threads=threads, workers=workers, seed=1, **extra)


def generate(backend: Any, request: GenerationRequest) -> GenerationStats:
    return run_generation(backend, request, threading.Event(), lambda _chunk: None)


def ttft(stats: GenerationStats) -> float:
    return stats.first_token_seconds if stats.first_token_seconds is not None else stats.seconds


def turns_to_fill(args: argparse.Namespace, tag: str) -> int:
    """The fewest earlier turn pairs that make a tagged conversation overflow the window."""
    pairs = 1
    while True:
        conv = tagged_conversation(tag, pairs)
        prompt = build_prompt(vocabulary(args.model), conv, n_ctx=args.n_ctx, max_new_tokens=args.max_new)
        if prompt.turns_used < len(conv.turns):
            return pairs
        pairs += 1


# ------------------------------------------------------------------------------------------ 1


def bench_turn_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One channel, a scripted conversation; KV reuse every turn (context shift and chunked trim).

    Both reuse modes and the full re-evaluation see the same requests. The full re-evaluation
    costs a whole window per turn, so it runs on every `sample_every`-th turn once the window
    is full (its cost depends on the window size, which no longer changes then). Chunked
    trimming, the fallback for models whose cache cannot shift, runs the first `trim_turns`.
    The three sides are three sequences of one batched context (all threads), used one at a time.
    """
    settings = model_settings(args.model, args.n_ctx, args.threads)
    shifting, trimming, whole = bench_sequences(args.model, settings, 3, cache=StateCache(0))
    trimming.context_shift = False
    modes = {True: shifting, False: trimming}
    full = NoReuse(whole)
    turns: list[PromptTurn] = []
    rows: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    base_rows: list[dict[str, Any]] = []
    first_full: int | None = None
    started = time.perf_counter()
    try:
        for t in range(args.turns):
            turns.append(scripted_turn(t, "user"))
            request, prompt = built_request(args.model, args.n_ctx, "bench", Conversation(PERSONA, tuple(turns)),
                                            args.max_new)
            order = (True, False) if t % 2 == 0 else (False, True)
            for shift in order:
                if not shift and t >= args.trim_turns:
                    continue
                stats = generate(modes[shift], keyed(request, f"bench-{shift}"))
                rows[shift].append({
                    "turn": t, "prompt": stats.prompt_tokens, "evaluated": stats.evaluated_tokens,
                    "ttft": ttft(stats), "turns_used": prompt.turns_from(stats.window_start),
                    "first": modes[shift].first_token,
                })
            if first_full is None and rows[True][-1]["turns_used"] < len(turns):
                first_full = t
            if first_full is not None and (t - first_full) % args.sample_every == 0:
                base = generate(full, request)
                base_rows.append({"turn": t, "prompt": base.prompt_tokens, "evaluated": base.evaluated_tokens,
                                  "ttft": ttft(base), "first": full.first_token})
            turns.append(scripted_turn(t, "model"))
        states = {shift: (len(b.state_bytes()), len(b.live_tokens())) for shift, b in modes.items()}
    finally:
        for backend in (*modes.values(), full):
            backend.close()
    seconds = time.perf_counter() - started
    sampled_turns = {r["turn"]: r for r in base_rows}
    results = []
    for shift, mode_rows in rows.items():
        warm = [r for r in mode_rows if first_full is not None and r["turn"] > first_full]
        agree = [r["first"] == sampled_turns[r["turn"]]["first"] for r in mode_rows
                 if r["turn"] in sampled_turns and r["prompt"] == sampled_turns[r["turn"]]["prompt"]]
        result = {
            "context_shift": shift,
            "turns": len(mode_rows),
            "window_full_from_turn": first_full,
            "reuse_evaluated_median": median([r["evaluated"] for r in warm]),
            "reuse_evaluated_mean": mean([r["evaluated"] for r in warm]),
            "reuse_evaluated_p95": pct([r["evaluated"] for r in warm], 95),
            "reuse_ttft_median": median([r["ttft"] for r in warm]),
            "reuse_ttft_p95": pct([r["ttft"] for r in warm], 95),
            "full_evaluated_median": median([r["evaluated"] for r in base_rows]),
            "full_ttft_median": median([r["ttft"] for r in base_rows]),
            "full_ttft_p95": pct([r["ttft"] for r in base_rows], 95),
            "full_samples": len(base_rows),
            "full_sample_every": args.sample_every,
            "argmax_agreement": (sum(agree) / len(agree)) if agree else None,
            "argmax_samples": len(agree),
            "state_bytes": states[shift][0],
            "state_tokens": states[shift][1],
            "seconds": seconds,
            "rows": mode_rows,
            "full_rows": base_rows,
        }
        # Work: the mean counts every re-evaluation a trim causes; TTFT: the median turn.
        result["work_ratio"] = result["full_evaluated_median"] / max(1.0, result["reuse_evaluated_mean"])
        result["ttft_ratio"] = result["full_ttft_median"] / result["reuse_ttft_median"]
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------ 2


async def _interleaved(
    args: argparse.Namespace, sequences: int, cache: StateCache | None, rounds: range, channels: int,
    measure_from: int,
) -> dict[str, Any]:
    """Channels take turns over `sequences` of one context; `cache` None: no reuse. Rounds before
    `measure_from` fill."""
    settings = Settings(model=model_settings(args.model, args.n_ctx, args.threads, sequences))
    made = bench_sequences(args.model, settings.model, sequences, cache=cache, cache_settings=settings.cache)
    backends = iter([NoReuse(b) for b in made] if cache is None else made)
    engine = Engine(lambda: next(backends), workers=sequences, queue_size=64, per_key_queue=4)
    await engine.start()
    records: list[tuple[int, GenerationStats]] = []

    async def turn(key: int, rnd: int) -> None:
        request = tagged_request(args.model, args.n_ctx, f"[ch{key}]", f"ch{key}", args.fill_pairs + rnd, args.max_new)
        async for chunk in engine.generate(request):
            if isinstance(chunk, Finished):
                records.append((rnd, chunk.stats))

    try:
        for rnd in rounds:
            await asyncio.gather(*(turn(key, rnd) for key in range(channels)))
    finally:
        await engine.close()  # BenchSequence.close saves the live channel into the cache
    measured = [st for rnd, st in records if rnd >= measure_from]
    out: dict[str, Any] = {
        "sequences": sequences,
        "threads": args.threads,
        "requests": len(measured),
        "evaluated_median": median([st.evaluated_tokens for st in measured]),
        "evaluated_mean": mean([st.evaluated_tokens for st in measured]),
        "prompt_median": median([st.prompt_tokens for st in measured]),
        "ttft_median": median([ttft(st) for st in measured]),
        "ttft_p95": pct([ttft(st) for st in measured], 95),
    }
    if cache is not None:
        stats = cache.stats()
        out.update(cache_ram_bytes=stats.ram_bytes, cache_entries=stats.entries, cache_hits=stats.hits,
                   cache_misses=stats.misses, cache_evictions=stats.evictions)
    return out


def bench_interleaved(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`channels` channels, each window full as in benchmark 1, take turns over 2 sequences, then over 1.

    Each engine is the batched one: one context with all threads, one sequence per Engine worker
    (what `model.workers` sets). Each engine's first round is not measured: round 0 fills every
    channel's window. Both engines share one state cache, so the 1-sequence rounds continue the same
    conversations; but llama.cpp stores a context's number of KV streams (one per sequence) with a
    sequence's state and refuses it in a context of another count, so the 1-sequence engine's first
    round evaluates every window again and is not measured either. Without reuse
    (the same engine, each sequence emptied before every prompt) every request evaluates a whole
    window, so that side is sampled: `none_requests` requests per sequence count.
    """
    channels = args.channels
    args.fill_pairs = turns_to_fill(args, f"[ch{channels - 1}]") + 1
    cache = StateCache(max(Settings().cache.ram_bytes, channels * args.state_bytes_hint))
    out = []
    for sequences, first in ((2, 0), (1, 1 + args.rounds)):
        rounds = range(first, first + 1 + args.rounds)
        with_reuse = asyncio.run(_interleaved(args, sequences, cache, rounds, channels, first + 1))
        without = asyncio.run(_interleaved(args, sequences, None, range(1, 2), args.none_requests, 1))
        out.append({
            "sequences": sequences,
            "channels": channels,
            "fill_pairs": args.fill_pairs,
            "reuse": with_reuse,
            "none": without,
            "work_ratio": without["evaluated_median"] / max(1.0, with_reuse["evaluated_mean"]),
            "ttft_ratio": without["ttft_median"] / with_reuse["ttft_median"],
        })
    return out


# ------------------------------------------------------------------------------------------ 3


class _Replay:
    """Replays recorded tokens instantly through the real tokenizer: what the engine adds per token."""

    def __init__(self, backend: SequenceBackend, tokens: list[int]) -> None:
        self.tokenizer, self.n_ctx, self._tokens = backend.tokenizer, backend.n_ctx, tokens
        self.piece, self.is_end = backend.piece, backend.is_end

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        return iter(self._tokens)

    def close(self) -> None:
        pass


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Generation tokens/s through Engine.generate (the batched engine, one sequence) vs Llama.generate.

    The engine is the bot's: one batched context of one sequence with all threads, whose decode
    thread runs the model. The direct loop is llama-cpp-python's own `Llama` with the same context
    settings and threads, and runs on that same decode thread (between the engine's decodes): with
    the same prompt tokens, sampling settings and seed, it generates exactly as many tokens as the
    engine did. A second thread running llama.cpp would start a second OpenMP team, and libgomp then
    cuts every team's spin-waits short (it manages more threads than there are cores): both sides
    would run a third slower, in a state the bot never is in (only its decode thread runs the
    model). The two alternate (ABBA); each side's rate is over all its runs.
    """
    import llama_cpp

    settings = model_settings(args.model, args.n_ctx, args.threads)
    conv = Conversation(PERSONA, (PromptTurn("user", LONG_REPLY, "Alice"),))
    request, _ = built_request(args.model, args.n_ctx, "o", conv, args.gen_tokens, SAMPLED)

    async def run() -> dict[str, Any]:
        (sequence,) = bench_sequences(args.model, settings, 1)
        shared = sequence.shared
        # Loaded and freed on the decode thread too, so no other thread ever runs llama.cpp here.
        llm = shared.call(lambda: llama_cpp.Llama(**llama_params(args.model, settings)))
        engine = Engine(lambda: sequence)
        await engine.start()
        prompt = list(request.tokens)  # the whole window fits

        async def through_engine() -> tuple[float, int, list[int]]:
            await engine.on_worker(lambda _backend: sequence.reset())
            stats = None
            async for chunk in engine.generate(request):
                if isinstance(chunk, Finished):
                    stats = chunk.stats
            assert stats is not None
            return stats.tokens_per_second, stats.generated_tokens, sequence.live_tokens()[len(prompt) :]

        def direct(count: int) -> float:
            llm.reset()
            llm.set_seed(SAMPLED.seed or 0)
            n, first = 0, 0.0
            for _token in llm.generate(prompt, temp=SAMPLED.temperature, top_p=SAMPLED.top_p, top_k=SAMPLED.top_k,
                                       min_p=SAMPLED.min_p, repeat_penalty=SAMPLED.repeat_penalty):
                n += 1
                if n == 1:
                    first = time.perf_counter()
                if n >= count:
                    break
            return (n - 1) / (time.perf_counter() - first)

        engine_rates: list[float] = []
        direct_rates: list[float] = []
        counts: list[int] = []
        replay_tokens: list[int] = []
        try:
            # One unmeasured run of each side first: the first generation after loading runs at a
            # different speed here (caches and the CPU's clock after idling).
            await through_engine()
            await asyncio.to_thread(shared.call, lambda: direct(args.gen_tokens))
            for rep in range(args.overhead_reps):
                for side in (("engine", "direct") if rep % 2 == 0 else ("direct", "engine")):
                    if side == "engine":
                        rate, count, replay_tokens = await through_engine()
                        engine_rates.append(rate)
                        counts.append(count)
                    else:
                        count = counts[-1] if counts else args.gen_tokens
                        direct_rates.append(await asyncio.to_thread(shared.call, lambda n=count: direct(n)))
        finally:
            shared.call(llm.close)
            await engine.close()
        return {"engine_all": engine_rates, "direct_all": direct_rates, "generated": counts,
                "replay": replay_tokens}

    measured = asyncio.run(run())
    # The rate over all runs of a side (all tokens over all time): timings here swing both ways
    # between runs (the host's load and clock), so the best run is a lucky one, not a clean one.
    counts = measured["generated"]

    def overall(rates: list[float]) -> float:
        return sum(c - 1 for c in counts) / sum((c - 1) / r for c, r in zip(counts, rates, strict=True))

    engine_rate, direct_rate = overall(measured["engine_all"]), overall(measured["direct_all"])
    per_token = replay_cost(args, settings, measured["replay"], request)
    return {
        "engine_tokens_per_s": engine_rate, "direct_tokens_per_s": direct_rate,
        "ratio": engine_rate / direct_rate, "reps": args.overhead_reps,
        "threads": llama_params(args.model, settings)["n_threads"],
        "generated_tokens": measured["generated"],
        "engine_all": measured["engine_all"], "direct_all": measured["direct_all"],
        "paired_ratio_median": median([e / d for e, d in zip(measured["engine_all"], measured["direct_all"],
                                                             strict=False)]),
        "best_ratio": max(measured["engine_all"]) / max(measured["direct_all"]),
        **per_token,
    }


def replay_cost(args: argparse.Namespace, settings: ModelSettings, tokens: list[int],
                request: GenerationRequest) -> dict[str, Any]:
    """Per-token cost of the engine's own work: recorded tokens replayed with no model in the way."""
    if len(tokens) < 2:
        return {}
    (backend,) = bench_sequences(args.model, settings, 1)
    replay = _Replay(backend, tokens)
    chunks = 0

    def count(chunk: Any) -> None:
        nonlocal chunks
        chunks += isinstance(chunk, Text)

    async def through_engine() -> float:
        engine = Engine(lambda: replay)
        await engine.start()
        begin = time.perf_counter()
        async for _chunk in engine.generate(request):
            pass
        seconds = time.perf_counter() - begin
        await engine.close()
        return seconds

    try:
        thread_best = engine_best = float("inf")
        for _ in range(5):
            begin = time.perf_counter()
            stats = run_generation(replay, request, threading.Event(), count)
            thread_best = min(thread_best, time.perf_counter() - begin)
            engine_best = min(engine_best, asyncio.run(through_engine()))
    finally:
        backend.close()
    n = max(1, stats.generated_tokens)
    return {"replay_tokens": n, "replay_chunks": chunks // 5, "worker_us_per_token": 1e6 * thread_best / n,
            "engine_us_per_token": 1e6 * engine_best / n}


# ------------------------------------------------------------------------------------------ 4


async def _lag_while(work: Callable[[], Awaitable[Any]]) -> tuple[list[float], dict[int, int]]:
    """Loop lag sampled every 5 ms while `work` runs, and the garbage collections meanwhile."""
    lags: list[float] = []
    done = asyncio.Event()
    collections: dict[int, int] = {0: 0, 1: 0, 2: 0}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections[info["generation"]] += 1

    async def sampler() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(max(0.0, time.perf_counter() - t0 - 0.005))

    task = asyncio.create_task(sampler())
    await asyncio.sleep(0.02)
    gc.callbacks.append(on_gc)
    try:
        await work()
    finally:
        gc.callbacks.remove(on_gc)
        done.set()
        await task
    return lags, collections


def _lag_summary(lags: list[float], collections: dict[int, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"p50_ms": 1000 * pct(lags, 50), "p99_ms": 1000 * pct(lags, 99),
                           "max_ms": 1000 * max(lags, default=float("nan")), "samples": len(lags)}
    if collections is not None:
        out["gc_collections"] = collections
    return out


def bench_loop_lag(args: argparse.Namespace) -> dict[str, Any]:
    """The batched engine's two sequences serve four channels, two turns each, so states are saved and
    restored as in the bot; its one context has all threads. The reference runs the same requests on
    the loop thread through one llama-cpp-python context per worker's share of the threads (the
    engine before batching, minus its worker thread).
    """
    workers = 2
    settings = Settings(model=model_settings(args.model, args.n_ctx, args.threads, workers))
    per_worker = model_settings(args.model, args.n_ctx, max(1, args.threads // workers), workers)
    rounds = [
        [tagged_request(args.model, args.n_ctx, f"[l{k}]", f"lag{k}", 6 + rnd, args.lag_tokens)
         for k in range(2 * workers)]
        for rnd in range(2)
    ]

    async def engine_run() -> tuple[list[float], dict[int, int]]:
        cache = StateCache(settings.cache.ram_bytes)
        sequences = iter(await asyncio.to_thread(bench_sequences, args.model, settings.model, workers, cache=cache,
                                                 cache_settings=settings.cache))
        engine = Engine(lambda: next(sequences), workers=workers)
        await engine.start()

        async def one(request: GenerationRequest) -> None:
            async for _ in engine.generate(request):
                pass

        async def work() -> None:
            for requests in rounds:
                await asyncio.gather(*(one(r) for r in requests))

        try:
            return await _lag_while(work)
        finally:
            await engine.close()

    async def loop_run() -> tuple[list[float], dict[int, int]]:
        cache = StateCache(settings.cache.ram_bytes)
        backend = LlamaBackend(args.model, per_worker, cache=cache, cache_settings=settings.cache)

        async def blocking() -> None:
            for requests in rounds:
                for request in requests:
                    generate(backend, request)  # on the loop thread: what the engine avoids
                    await asyncio.sleep(0)

        try:
            return await _lag_while(blocking)
        finally:
            backend.close()

    async def reference(hogs: int) -> tuple[list[float], dict[int, int]]:
        """The loop with nothing to do, beside `hogs` busy processes (CPU contention without the GIL)."""
        procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass") for _ in range(hogs)]
        try:
            return await _lag_while(lambda: asyncio.sleep(args.lag_reference_seconds))
        finally:
            for proc in procs:
                proc.kill()
                await proc.wait()

    engine_lags = asyncio.run(engine_run())
    loop_lags = asyncio.run(loop_run())
    idle = asyncio.run(reference(0))
    hogs = asyncio.run(reference(os.cpu_count() or 1))
    return {"engine": _lag_summary(*engine_lags), "on_loop": _lag_summary(*loop_lags), "sequences": workers,
            "threads": settings.model.threads, "on_loop_threads": per_worker.threads, "idle": _lag_summary(*idle),
            "cpu_hogs": _lag_summary(*hogs), "hog_processes": os.cpu_count() or 1}


# ------------------------------------------------------------------------------------------ 5


async def _database(turns: int, samples: int, window: int, budget: WindowBudget) -> dict[str, Any]:
    from persistence.database import Database
    from persistence.repository import Repository

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        db = await Database.open(f"sqlite+aiosqlite:///{path}")
        repo = Repository(db)
        try:
            session = await repo.start_session("bench:1", persona_text=PERSONA)
            first = await repo.append_turn(session.id, "user", "seed turn", author_name="Alice", message_ids=[1])
            filler = sqlite3.connect(path)
            with filler:
                filler.executemany(
                    "INSERT INTO turns (session_id, role, author_id, author_name, content, status, created_at) "
                    "SELECT session_id, CASE WHEN ? % 2 THEN 'model' ELSE 'user' END, author_id, author_name, "
                    "content || ' ' || ?, status, created_at FROM turns WHERE id = ?",
                    ((i, "x" * (40 + i % 200), first.id) for i in range(turns - 1)),
                )
                # Every turn has its Discord message; one model reply in five spans two messages.
                filler.execute(
                    "INSERT INTO turn_messages (message_id, turn_id, part) "
                    "SELECT 1000 + 2 * id, id, 0 FROM turns WHERE session_id = ? AND id != ?",
                    (session.id, first.id),
                )
                filler.execute(
                    "INSERT INTO turn_messages (message_id, turn_id, part) "
                    "SELECT 1001 + 2 * id, id, 1 FROM turns WHERE session_id = ? AND role = 'model' AND id % 5 = 0",
                    (session.id,),
                )
            filler.close()
            count = await repo.count_turns(session.id)

            async def measure(n: int, first_message: int) -> tuple[list[float], list[float], dict[int, int]]:
                appends, loads = [], []
                collections = {0: 0, 1: 0, 2: 0}

                def on_gc(phase: str, info: dict[str, Any]) -> None:
                    if phase == "start":
                        collections[info["generation"]] += 1

                gc.callbacks.append(on_gc)
                try:
                    for i in range(n):
                        t0 = time.perf_counter()
                        await repo.append_turn(session.id, "user", f"message {i} " + "y" * 80, author_name="Bob",
                                               message_ids=[first_message + i])
                        appends.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        rows = await repo.recent_turns(session.id, window, budget)
                        loads.append(time.perf_counter() - t0)
                        read.append(len(rows))
                finally:
                    gc.callbacks.remove(on_gc)
                return appends, loads, collections

            read: list[int] = []
            for _ in range(5):  # warm the statement caches and the connection pool
                await repo.recent_turns(session.id, window, budget)
            appends, loads, collections = await measure(samples, 10_000_000)
            # The same with everything alive at start-up frozen out of the collector's full passes.
            gc.collect()
            gc.freeze()
            try:
                f_appends, f_loads, f_collections = await measure(samples, 20_000_000)
            finally:
                gc.unfreeze()
        finally:
            await db.close()
    return {
        "turns_in_channel": count,
        "window_turns": window,
        "window_rows_read": max(read),
        "window_room_tokens": budget.tokens,
        "chars_per_token": budget.chars_per_token,
        "samples": samples,
        "append_p50_ms": 1000 * pct(appends, 50), "append_p99_ms": 1000 * pct(appends, 99),
        "append_max_ms": 1000 * max(appends),
        "load_p50_ms": 1000 * pct(loads, 50), "load_p99_ms": 1000 * pct(loads, 99), "load_max_ms": 1000 * max(loads),
        "gc_collections": collections,
        "frozen_append_p50_ms": 1000 * pct(f_appends, 50), "frozen_append_p99_ms": 1000 * pct(f_appends, 99),
        "frozen_load_p50_ms": 1000 * pct(f_loads, 50), "frozen_load_p99_ms": 1000 * pct(f_loads, 99),
        "frozen_load_max_ms": 1000 * max(f_loads),
        "frozen_gc_collections": f_collections,
    }


def bench_database(args: argparse.Namespace) -> dict[str, Any]:
    """Append and window load alternate on an otherwise idle event loop (nothing else scheduled).

    The window is read as the bot reads it with its default reply length: at most n_ctx / 4
    turns, and of those only the ones that can fit (bounded by the model's longest token).
    """
    import llama_cpp

    from bot.core.sessions import MIN_TOKENS_PER_TURN

    vocab = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    try:
        chars_per_token = longest_token_chars(vocab)
    finally:
        vocab.close()
    budget = WindowBudget(args.n_ctx - Settings().model.max_new_tokens, MIN_TOKENS_PER_TURN, chars_per_token)
    return asyncio.run(_database(args.db_turns, args.db_samples, max(8, args.n_ctx // MIN_TOKENS_PER_TURN), budget))


# ------------------------------------------------------------------------------------------ 6


def _memory() -> dict[str, int]:
    """Resident (RSS), proportional (PSS: shared pages split between their mappings) and anonymous bytes."""
    wanted = {"Rss": "rss", "Pss": "pss", "Anonymous": "anon", "Pss_File": "pss_file"}
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in wanted:
                out[wanted[key]] = int(line.split()[1]) * 1024
    return out


def memory_probe(model: str, count: int, n_ctx: int, kv_type: str, n_batch: int, engine: str) -> None:
    """Run in a child process: load `count` sequences of one batched context (`engine` "batched") or `count`
    llama-cpp-python contexts ("llama", the engine before batching), fill each, print memory figures as JSON."""
    settings = ModelSettings(path=model, n_ctx=n_ctx, threads=1, workers=count, kv_type=kv_type,
                             flash_attn=kv_type != "f16")
    before = _memory()
    backends: list[Any] = (bench_sequences(model, settings, count, n_batch=n_batch) if engine == "batched"
                           else [LlamaBackend(model, settings, n_batch=n_batch) for _ in range(count)])
    conv = Conversation(PERSONA, tuple(history(8)))
    for index, backend in enumerate(backends):
        generate(backend, built_request(model, n_ctx, f"m{index}", conv, 4)[0])
    state = backends[0].state_bytes()
    print(json.dumps({"engine": engine, "count": count, "kv_type": kv_type, "n_batch": n_batch, "before": before,
                      "after": _memory(), "state_bytes": len(state),
                      "state_tokens": len(backends[0].live_tokens())}))
    for backend in backends:
        backend.close()


def prompt_speed_by_batch(args: argparse.Namespace) -> dict[Any, Any]:
    """Prompt tokens/s of the batched engine at n_batch 512 (llama-cpp-python's default) and ours, alternating,
    best of 3. One context at a time (a context's decode thread keeps its OpenMP team while it lives)."""
    settings = model_settings(args.model, args.n_ctx, args.threads)
    sizes = sorted({512, N_BATCH})
    conv = Conversation(PERSONA, tuple(history(60)))
    prompt = build_prompt(vocabulary(args.model), conv, n_ctx=min(args.n_ctx, args.speed_tokens + 8),
                          max_new_tokens=8).tokens
    best = dict.fromkeys(sizes, 0.0)
    for rep in range(3):
        for n in (sizes if rep % 2 == 0 else sizes[::-1]):
            (sequence,) = bench_sequences(args.model, settings, 1, n_batch=n)
            try:
                sequence.next_logits(prompt[:64])  # the first decode of a new context is not measured
                sequence.reset()
                begin = time.perf_counter()
                sequence.next_logits(prompt)
                best[n] = max(best[n], len(prompt) / (time.perf_counter() - begin))
            finally:
                sequence.close()
    return {n: round(v, 1) for n, v in best.items()} | {"prompt_tokens": len(prompt)}


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Each configuration in a child process: 1, 2 and 4 sequences of one batched context (one model) against
    as many llama-cpp-python contexts (the engine before batching, one per worker, the weights mapped once
    per context); n_batch 512 and a q8_0 KV cache for the batched engine; saved states' sizes."""
    runs = []
    probes = [("batched", "f16", n, N_BATCH) for n in args.memory_workers]
    probes += [("llama", "f16", n, N_BATCH) for n in args.memory_workers]
    probes += [("batched", "f16", n, 512) for n in (1, 2)]
    probes.append(("batched", "q8_0", 1, N_BATCH))
    for engine, kv_type, count, n_batch in probes:
        out = subprocess.run(
            [sys.executable, "-m", "bench.run", "--memory-probe", str(count), "--memory-engine", engine,
             "--model", args.model, "--n-ctx", str(args.n_ctx), "--kv-type", kv_type, "--n-batch", str(n_batch)],
            capture_output=True, text=True, check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

    def added(engine: str, n_batch: int, kind: str) -> float:
        """What one more sequence (or context) adds, from the fewest to the most."""
        same = sorted((r for r in runs if r["engine"] == engine and r["kv_type"] == "f16" and r["n_batch"] == n_batch),
                      key=lambda r: r["count"])
        lo, hi = same[0], same[-1]
        return (hi["after"][kind] - lo["after"][kind]) / max(1, hi["count"] - lo["count"])

    one = next(r for r in runs if r["engine"] == "batched" and r["kv_type"] == "f16" and r["count"] == 1
               and r["n_batch"] == N_BATCH)
    kv_bytes = one["state_bytes"] / max(1, one["state_tokens"]) * args.n_ctx  # f16 K and V of every position
    kinds = ("rss", "pss", "anon")
    return {
        "model_file_bytes": os.path.getsize(args.model),
        "n_ctx": args.n_ctx,
        "n_batch": N_BATCH,
        "runs": runs,
        "added_per_sequence": {kind: added("batched", N_BATCH, kind) for kind in kinds},
        "added_per_sequence_512": {kind: added("batched", 512, kind) for kind in kinds},
        "added_per_context": {kind: added("llama", N_BATCH, kind) for kind in kinds},
        "kv_cache_bytes": kv_bytes,
        "other_per_sequence_bytes": added("batched", N_BATCH, "anon") - kv_bytes,
        "other_per_context_bytes": added("llama", N_BATCH, "anon") - kv_bytes,
        "prompt_speed": prompt_speed_by_batch(args),
    }


# ------------------------------------------------------------------------------------------ 7


def bench_batched(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each channel a conversation of its own (8 turn pairs, about 600 tokens), as many channels as `batch_channels`."""
    import llama_cpp

    from bench.batched import bench_batched as run_batched

    vocab = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    try:
        prompts = [build_prompt(vocab, Conversation(PERSONA, tuple(history(8, f"#{c}"))), n_ctx=args.n_ctx,
                                max_new_tokens=args.batch_tokens).tokens for c in range(max(args.batch_channels))]
    finally:
        vocab.close()
    return [run_batched(args.model, prompts[:n], threads=args.threads, count=args.batch_tokens, reps=args.batch_reps)
            for n in args.batch_channels]


# ------------------------------------------------------------------------------------------ 8, 9, 10: scenes

MEMBERS = ("Alice", "Bob", "Chen")  # the members of `scripted_turn`
# The benchmark characters' descriptions: different texts, so one card in the head differs from another.
SPEAKER_CARDS = {
    "Mirela": PERSONA.split("persona follows: ", 1)[1],
    "Tobiah": "a soft-spoken quartermaster from the mining islands who counts every coin twice, wears "
              "ink-stained gloves, quotes old trade law from memory and trusts numbers more than people.",
    "Sera": "a young navigator raised in a lighthouse, who reads the stars and the clouds, hums sea shanties "
            "while she works and argues with the captain about every course.",
}
# Lorebook keys: words the scripted turns never use, so an entry fires only where a turn names it.
LORE = {
    "Skyreach": "Skyreach is the highest floating island; its harbor master taxes foreign spice twice and "
                "keeps a list of every captain who ever cheated him.",
    "Vossberg": "Vossberg is a mining island of black glass, ruled by the Vossberg guild, whose nobles buy "
                "pepper by the ton and pay in promissory notes.",
    "Halcyon": "The Halcyon is a rival airship, faster than Mirela's, captained by her former first mate, "
               "who left with half the crew and the best charts.",
    "Marrowgate": "Marrowgate is a prison island where debtors work the wind mills; Mirela spent a winter "
                  "there and never speaks of it sober.",
    "Quillfeather": "Quillfeather is an old cartographer on the island of Lumen who sells charts of the "
                    "storm walls, half of them forged.",
    "Emberfall": "Emberfall is the season of burning winds, when the lower islands close their docks and "
                 "cargo prices triple overnight.",
    "Tidewhisper": "Tidewhisper is a smuggler's code: three short lantern flashes, then one long, meaning "
                   "the customs cutter is near.",
    "Grimsby": "Grimsby is the ship's cook, a one-eyed veteran who brews coffee strong enough to wake the "
               "mechanical parrot from its winding sleep.",
    "Corvane": "Lord Corvane owns the spice exchange of the central islands and has put a bounty on "
               "Mirela's ship for a debt she denies.",
    "Ashcombe": "Ashcombe is a ruined monastery on a drifting rock, said to hide a compass that always "
                "points toward the nearest storm.",
    "Silverkeel": "The Silverkeel is Mirela's own airship: three masts, brass-plated hull, a cargo hold "
                  "that smells of cinnamon and gunpowder.",
    "Lumenport": "Lumenport is a free harbor where no noble may land armed; merchants meet there to settle "
                 "debts before the Emberfall winds.",
}
LORE_CONSTANT = "The floating islands drift on the trade winds; crossing between them takes days, and storms "\
                "rise without warning."
# Benchmark 8's placements: depth entries; the same before the character, kept in the head ("all") or
# moved to `lore_depth` (the default, "constant").
PLACEMENTS = {"depth": ("depth", "constant"), "head_all": ("before", "all"), "head_constant": ("before", "constant")}


def lore_card_book(position: str) -> dict[str, Any]:
    """A card's `character_book`: one entry per key of `LORE` at `position` ("depth": depths 2 to 4,
    "before": before the character), plus one constant entry after the character."""
    entries: list[dict[str, Any]] = []
    for index, (key, content) in enumerate(LORE.items()):
        ext: dict[str, Any] = {"position": 4, "depth": 2 + index % 3, "role": 0} if position == "depth" else {
            "position": 0}
        entries.append({"id": index, "keys": [key], "content": content, "enabled": True,
                        "insertion_order": 100 + index, "extensions": ext})
    entries.append({"id": len(entries), "keys": [], "content": LORE_CONSTANT, "constant": True, "enabled": True,
                    "insertion_order": 50, "extensions": {"position": 1}})
    return {"name": "The skyways", "entries": entries}


def bench_character(id_: int, name: str, book: dict[str, Any] | None = None) -> Any:
    """One of `SPEAKER_CARDS` as a character whose card is read as an imported V2 JSON card is."""
    from bot.core import cards
    from bot.core.scene import Character

    data: dict[str, Any] = {"name": name, "description": f"{name} is {SPEAKER_CARDS[name]}", "personality": "",
                            "scenario": "Aboard the Silverkeel, between floating islands.", "first_mes": "",
                            "mes_example": ""}
    if book is not None:
        data["character_book"] = book
    card = cards.read_card(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}).encode())
    return Character(id_, name, card)


def lore_user_turn(index: int) -> PromptTurn:
    """`scripted_turn`'s user turn; one in four also names a lorebook key."""
    turn = scripted_turn(index, "user")
    rng = random.Random(7919 * index + 17)
    if rng.random() < 0.25:
        key = rng.choice(list(LORE))
        return PromptTurn("user", turn.text.replace(": what about the ", f": what about {key} and the ", 1),
                          turn.speaker)
    return turn


def lore_keys_in(text: str) -> frozenset[str]:
    return frozenset(key for key in LORE if key in text)


def _counter(model: str) -> Callable[[str], int]:
    from bot.prompt.builder import count_tokens

    vocab = vocabulary(model)
    return lambda text: count_tokens(vocab, text)


def progress(name: str, done: int, total: int, started: float) -> None:
    """A line on stderr every tenth of a long benchmark."""
    if done and done % max(1, total // 10) == 0:
        print(f"{name} {done}/{total} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def generate_text(backend: Any, request: GenerationRequest) -> tuple[GenerationStats, str]:
    """Generate as `generate` does and keep the text the engine streams (stops already cut)."""
    parts: list[str] = []
    stats = run_generation(backend, request, threading.Event(),
                           lambda chunk: parts.append(chunk.text) if isinstance(chunk, Text) else None)
    return stats, "".join(parts)


def _work(rows: list[dict[str, Any]]) -> dict[str, float]:
    values = [r["evaluated"] for r in rows]
    return {"median": median(values), "mean": mean(values), "p95": pct(values, 95), "turns": len(values)}


def bench_lore(args: argparse.Namespace) -> dict[str, Any]:
    """A channel whose card has a lorebook, a scripted conversation of `lore_turns` turns (as in 1.).

    Every turn the conversation is composed for the scene as the bot composes it and generated with
    KV reuse (context shift), once per placement of the lorebook, in rotating order; the same history
    for all (scripted replies are stored, as in 1.). Before-character entries kept in the head change
    the head whenever the active set changes, so that placement runs the first `lore_head_turns`
    turns only. The full evaluation runs on every `lore_full_every`-th turn once the window is full.
    Each placement and the full evaluation is a sequence of one batched context (all threads).
    """
    from bot.core.scene import HistoryTurn, Scene, compose

    chars = Settings().characters
    count = _counter(args.model)
    vocab = vocabulary(args.model)
    settings = model_settings(args.model, args.n_ctx, args.threads)
    scenes: dict[str, Any] = {}
    for name, (position, in_head) in PLACEMENTS.items():
        character = bench_character(1, "Mirela", lore_card_book(position))
        assert character.book() is not None, "the card's lorebook reads"
        scenes[name] = (character, (), in_head)
    *placed, whole = bench_sequences(args.model, settings, len(PLACEMENTS) + 1, cache=StateCache(0))
    backends = dict(zip(PLACEMENTS, placed, strict=True))
    full = NoReuse(whole)
    history: list[Any] = []
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in PLACEMENTS}
    full_rows: dict[str, list[dict[str, Any]]] = {name: [] for name in PLACEMENTS}
    first_full: dict[str, int | None] = dict.fromkeys(PLACEMENTS)
    heads: dict[str, str] = {}
    previous_keys: frozenset[str] = frozenset()
    triggered = changed = 0
    started = time.perf_counter()
    try:
        for t in range(args.lore_turns):
            user = lore_user_turn(t)
            history.append(HistoryTurn("user", user.text, user.speaker or "User"))
            keys = lore_keys_in(user.text)
            triggered += bool(keys)
            changed += keys != previous_keys
            names = list(PLACEMENTS)
            for name in names[t % 3:] + names[: t % 3]:
                if name == "head_all" and t >= args.lore_head_turns:
                    continue
                character, books, in_head = scenes[name]
                scene = Scene(speaker=character, cast=(character,), user=user.speaker or "User", books=books,
                              lore_budget=int(args.n_ctx * chars.lore_budget), lore_scan_depth=chars.lore_scan_depth,
                              lore_in_head=in_head, lore_depth=chars.lore_depth)
                conv = compose(scene, history, count_tokens=count, rng=random.Random(1))
                request, prompt = generation_request(vocab, conv, key=f"lore-{name}", n_ctx=args.n_ctx,
                                                     max_new_tokens=args.max_new, sampling=GREEDY, speakers=MEMBERS)
                stats = generate(backends[name], request)
                row = {"turn": t, "prompt": stats.prompt_tokens, "evaluated": stats.evaluated_tokens,
                       "ttft": ttft(stats), "keys": sorted(keys), "changed": keys != previous_keys,
                       "lore_injections": len(conv.injections), "head_changed": heads.get(name) != conv.system,
                       "first": backends[name].first_token}
                heads[name] = conv.system
                rows[name].append(row)
                if first_full[name] is None and prompt.turns_from(stats.window_start) < len(history):
                    first_full[name] = t
                start = first_full[name]
                if start is not None and (t - start) % args.lore_full_every == 0:
                    base = generate(full, request)
                    full_rows[name].append({"turn": t, "prompt": base.prompt_tokens,
                                            "evaluated": base.evaluated_tokens, "ttft": ttft(base),
                                            "first": full.first_token, "reuse_first": row["first"]})
            previous_keys = keys
            history.append(HistoryTurn("model", scripted_turn(t, "model").text, "Mirela"))
            progress("8.", t + 1, args.lore_turns, started)
    finally:
        for backend in (*backends.values(), full):
            backend.close()
    out: dict[str, Any] = {"turns": args.lore_turns, "head_turns": args.lore_head_turns,
                           "full_every": args.lore_full_every, "entries": len(LORE) + 1,
                           "triggered_turns": triggered, "changed_turns": changed,
                           "seconds": time.perf_counter() - started,
                           "placements": {}}
    for name in PLACEMENTS:
        start = first_full[name]
        warm = [r for r in rows[name] if start is not None and r["turn"] > start]
        base = full_rows[name]
        result = {
            "turns": len(rows[name]), "window_full_from_turn": start,
            "reuse": _work(warm),
            "reuse_changed": _work([r for r in warm if r["changed"]]),
            "reuse_unchanged": _work([r for r in warm if not r["changed"]]),
            "head_changes": sum(r["head_changed"] for r in warm),
            "full_evaluated_median": median([r["evaluated"] for r in base]),
            "full_samples": len(base),
            "argmax_agreement": mean([float(r["first"] == r["reuse_first"]) for r in base]) if base else None,
            "rows": rows[name], "full_rows": base,
        }
        result["work_ratio"] = result["full_evaluated_median"] / max(1.0, result["reuse"]["mean"])
        out["placements"][name] = result
    return out


def speaker_reply(index: int, name: str) -> str:
    """A scripted reply in the voice of one of the benchmark's characters."""
    rng = random.Random(index * 2 + 1)
    words = " ".join(rng.choice(_WORDS) for _ in range(22))
    voices = {
        "Mirela": f"*adjusts her goggles* The {words}, aye. Brass squawks: aye!",
        "Tobiah": f"*taps the ledger with his pencil* The {words}, mind you. Coin first, questions later.",
        "Sera": f"*unrolls a chart across the table* The {words}, if the stars hold. Trust the chart.",
    }
    return voices[name]


def cast_of(names: Sequence[str]) -> tuple[Any, ...]:
    return tuple(bench_character(i + 1, name) for i, name in enumerate(names))


def bench_speakers(args: argparse.Namespace) -> dict[str, Any]:
    """Two characters of different cards answer in turn: two replies each, so every other turn the
    speaker changes. The history starts with the window full (`speaker_fill` pairs, found as in 2.);
    one unmeasured turn fills each cache, then `speaker_turns` measured turns per mode. Full
    evaluations on every `speaker_full_every`-th measured turn (odd, so both kinds of turn are sampled).
    Each mode and the full evaluation is a sequence of one batched context (all threads).
    """
    from bot.core.scene import HistoryTurn, Scene, compose
    from bot.prompt.builder import speaker_label

    cast = cast_of(("Mirela", "Tobiah"))
    names = tuple(c.name for c in cast)
    count = _counter(args.model)
    vocab = vocabulary(args.model)
    modes = ("speaker", "all")

    def speaker_at(t: int) -> Any:
        return cast[(t // 2) % 2]

    def turns_until(t: int) -> list[Any]:
        out = []
        for i in range(t):
            user = scripted_turn(i, "user")
            out.append(HistoryTurn("user", user.text, user.speaker or "User"))
            out.append(HistoryTurn("model", speaker_reply(i, speaker_at(i).name), speaker_at(i).name))
        user = scripted_turn(t, "user")
        out.append(HistoryTurn("user", user.text, user.speaker or "User"))
        return out

    def request_for(mode: str, t: int, history: list[Any]) -> tuple[GenerationRequest, Prompt]:
        speaker = speaker_at(t)
        scene = Scene(speaker=speaker, cast=cast, user=history[-1].speaker, cards_in_prompt=mode)  # type: ignore[arg-type]
        conv = compose(scene, history, count_tokens=count, rng=random.Random(1))
        speakers = tuple(dict.fromkeys(speaker_label(h.speaker, names) for h in history if h.role == "user"))
        others = tuple(n for n in names if n != speaker.name)
        return generation_request(vocab, conv, key=f"duo-{mode}", n_ctx=args.n_ctx, max_new_tokens=args.max_new,
                                  sampling=GREEDY, speakers=speakers, characters=others)

    fill = 1
    while not all(request_for(m, fill, turns_until(fill))[1].turns_used < 2 * fill + 1 for m in modes):
        fill += 1
    settings = model_settings(args.model, args.n_ctx, args.threads)
    *moded, whole = bench_sequences(args.model, settings, len(modes) + 1, cache=StateCache(0))
    backends = dict(zip(modes, moded, strict=True))
    full = NoReuse(whole)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    full_rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    started = time.perf_counter()
    try:
        for m in range(args.speaker_turns + 1):
            t = fill + m
            history = turns_until(t)
            switched = speaker_at(t) is not speaker_at(t - 1)
            for mode in (modes if m % 2 == 0 else modes[::-1]):
                request, _ = request_for(mode, t, history)
                stats = generate(backends[mode], request)
                if m == 0:
                    continue  # fills the cache
                rows[mode].append({"turn": t, "switched": switched, "speaker": speaker_at(t).name,
                                   "prompt": stats.prompt_tokens, "evaluated": stats.evaluated_tokens,
                                   "ttft": ttft(stats)})
                if (m - 1) % args.speaker_full_every == 0:
                    base = generate(full, request)
                    full_rows[mode].append({"turn": t, "switched": switched, "prompt": base.prompt_tokens,
                                            "evaluated": base.evaluated_tokens, "ttft": ttft(base)})
            progress("9.", m, args.speaker_turns, started)
    finally:
        for backend in (*backends.values(), full):
            backend.close()
    out: dict[str, Any] = {"fill_pairs": fill, "turns": args.speaker_turns, "full_every": args.speaker_full_every,
                           "seconds": time.perf_counter() - started, "modes": {}}
    for mode in modes:
        full_median = median([r["evaluated"] for r in full_rows[mode]])
        result: dict[str, Any] = {"full_evaluated_median": full_median, "full_samples": len(full_rows[mode]),
                                  "rows": rows[mode], "full_rows": full_rows[mode]}
        for kind, switched in (("changes", True), ("stays", False)):
            work = _work([r for r in rows[mode] if r["switched"] is switched])
            result[kind] = work | {"ratio": full_median / max(1.0, work["mean"])}
        out["modes"][mode] = result
    return out


def bench_prefill(args: argparse.Namespace) -> dict[str, Any]:
    """Three characters and two members; `prefill_replies` replies sampled with the bot's default
    sampling and a fixed seed each, with and without `prefill_name`, cleaned as `ReplyStream.text` cleans.

    Reply i answers member turn i (which names the speaker) after the 5 turn pairs before it; the
    speakers take turns. Both sides share one sequence of the batched engine (ABBA): their prompts
    differ only after the closing `<|model|>`, so the second evaluates a few tokens.
    """
    from bot.core.scene import HistoryTurn, Scene, compose
    from bot.prompt.builder import speaker_label
    from bot.prompt.stops import clean_reply, strip_character_echo

    cast = cast_of(("Mirela", "Tobiah", "Sera"))
    names = tuple(c.name for c in cast)
    members = ("Alice", "Bob")
    count = _counter(args.model)
    vocab = vocabulary(args.model)
    defaults = Settings().sampling.model_dump()

    def user_turn(i: int) -> Any:
        rng = random.Random(i * 2)
        words = " ".join(rng.choice(_WORDS) for _ in range(12))
        return HistoryTurn("user", f"{cast[i % 3].name}, what about the {words}?", members[i % 2])

    settings = model_settings(args.model, args.n_ctx, args.threads)
    (backend,) = bench_sequences(args.model, settings, 1, cache=StateCache(0))
    replies: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    started = time.perf_counter()
    try:
        for i in range(args.prefill_replies):
            history: list[Any] = []
            for k in range(max(0, i - 5), i):
                history += [user_turn(k), HistoryTurn("model", speaker_reply(k, cast[k % 3].name), cast[k % 3].name)]
            history.append(user_turn(i))
            speaker = cast[i % 3]
            speakers = tuple(dict.fromkeys(speaker_label(h.speaker, names) for h in history if h.role == "user"))
            others = tuple(n for n in names if n != speaker.name)
            sampling = Sampling(**defaults, seed=1000 + i)
            for prefill in ((True, False) if i % 2 == 0 else (False, True)):
                scene = Scene(speaker=speaker, cast=cast, user=history[-1].speaker, prefill_name=prefill)
                conv = compose(scene, history, count_tokens=count, rng=random.Random(1))
                request, _ = generation_request(vocab, conv, key="trio", n_ctx=args.n_ctx,
                                                max_new_tokens=args.prefill_tokens, sampling=sampling,
                                                speakers=speakers, characters=others)
                stats, raw = generate_text(backend, request)
                text = clean_reply(raw, speakers, speaker.name, characters=others)  # ReplyStream.text, finished
                replies[prefill].append({
                    "reply": i, "speaker": speaker.name, "prefix": conv.reply_prefix, "raw": raw, "text": text,
                    "stop_reason": stats.stop_reason, "generated": stats.generated_tokens,
                    "echo": strip_character_echo(raw, speaker.name) != raw,
                })
            progress("10.", i + 1, args.prefill_replies, started)
    finally:
        backend.close()
    out: dict[str, Any] = {"replies": args.prefill_replies, "max_new_tokens": args.prefill_tokens,
                           "characters": len(cast), "members": len(members),
                           "seconds": time.perf_counter() - started}
    for prefill, items in replies.items():
        empty = [r for r in items if not r["text"]]
        out["with" if prefill else "without"] = {
            "empty": len(empty),
            "empty_nothing_generated": sum(not r["raw"].strip() for r in empty),
            "echo_stripped": sum(r["echo"] for r in items),
            "mean_chars": mean([len(r["text"]) for r in items if r["text"]]),
            "stop_reasons": {reason: sum(r["stop_reason"] == reason for r in items)
                             for reason in sorted({r["stop_reason"] for r in items})},
            "rows": items,
        }
    return out


# ------------------------------------------------------------------------------------------ 11


def bench_server(args: argparse.Namespace) -> dict[str, Any]:
    """Ours vs llama-server vs the engine before batching (bench/server.py)."""
    from bench.server import bench_server as run_server

    return run_server(args)


# ------------------------------------------------------------------------------------------ report


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    notes: list[str] = []

    def row(name: str, reuse: str, none: str, ratio: str, target: str, ok: bool | None) -> None:
        mark = "" if ok is None else ("yes" if ok else "NO")
        lines.append(f"| {name} | {reuse} | {none} | {ratio} | {target} | {mark} |")

    lines.append(f"model {results['model']}, threads {results['threads']}, n_ctx {results['n_ctx']}, "
                 f"{results['cores']} cores, {'quick' if results['quick'] else 'default'} run, "
                 f"{results['seconds'] / 60:.1f} min")
    lines.append("")
    lines.append("| figure | with reuse / ours | without / reference | ratio | target | met |")
    lines.append("|---|---|---|---|---|---|")
    turn_cost = results.get("turn_cost", [])
    for t in turn_cost:
        name = "1. turn, " + ("context shift" if t["context_shift"] else "chunked trim")
        row(f"{name}: prompt tokens evaluated (median/mean/p95)",
            f"{t['reuse_evaluated_median']:.0f}/{t['reuse_evaluated_mean']:.0f}/{t['reuse_evaluated_p95']:.0f}",
            f"{t['full_evaluated_median']:.0f}", f"{t['work_ratio']:.1f}x", ">= 10x", t["work_ratio"] >= 10)
        row(f"{name}: time to first token (median / p95)",
            f"{t['reuse_ttft_median'] * 1000:.0f} / {t['reuse_ttft_p95'] * 1000:.0f} ms",
            f"{t['full_ttft_median'] * 1000:.0f} / {t['full_ttft_p95'] * 1000:.0f} ms",
            f"{t['ttft_ratio']:.1f}x", ">= 5x", t["ttft_ratio"] >= 5)
        if t["argmax_agreement"] is not None:
            row(f"{name}: next-token argmax agrees with full evaluation",
                f"{t['argmax_agreement'] * 100:.0f}% of {t['argmax_samples']}", "", "", "report", None)
    if turn_cost:
        t = turn_cost[0]
        trim = next((x for x in turn_cost if not x["context_shift"]), None)
        notes.append(f"1.: {t['turns']} turns (chunked trim: the first {trim['turns'] if trim else 0}); the window "
                     f"is full from turn {t['window_full_from_turn']}; reuse is measured on every later turn, the "
                     f"full re-evaluation on every {t['full_sample_every']}th turn from then on ({t['full_samples']} "
                     f"samples; its cost depends only on the window size, which is full and stays so). Work ratio: "
                     f"full median / reuse mean (every re-evaluation a trim causes counts).")
    single = next((t for t in turn_cost if t["context_shift"]), None)
    for i in results.get("interleaved", []):
        name = f"2. {i['channels']} channels / {i['sequences']} sequence(s)"
        r, n = i["reuse"], i["none"]
        for figure, key, value, base in (
            ("prompt tokens evaluated (median/mean)", "work_ratio",
             f"{r['evaluated_median']:.0f}/{r['evaluated_mean']:.0f}", f"{n['evaluated_median']:.0f}"),
            ("time to first token (median / p95)", "ttft_ratio",
             f"{r['ttft_median'] * 1000:.0f} / {r['ttft_p95'] * 1000:.0f} ms",
             f"{n['ttft_median'] * 1000:.0f} / {n['ttft_p95'] * 1000:.0f} ms"),
        ):
            ref = None if single is None else single[key]
            target = "within 2x of 1." if ref is None else f"within 2x of 1. ({ref:.1f}x): >= {ref / 2:.1f}x"
            row(f"{name}: {figure}", value, base, f"{i[key]:.1f}x", target, None if ref is None else i[key] * 2 >= ref)
        row(f"{name}: saved states in RAM", f"{r['cache_entries']} ({mib(r['cache_ram_bytes'])}), "
            f"{r['cache_hits']} restores, {r['cache_misses']} misses", "", "", "report", None)
    if results.get("interleaved"):
        i = results["interleaved"][0]
        notes.append(f"2.: every channel starts with {i['fill_pairs']} turn pairs (its window full, as in 1.); a "
                     f"round gives each channel one turn; the first round fills the caches and is not measured; "
                     f"the 1-sequence rounds continue the same conversations from the shared state cache, after "
                     f"one more unmeasured round (states of a 2-sequence context do not load into a 1-sequence "
                     f"one); each "
                     f"engine is one batched context of {i['reuse']['threads']} threads. Without reuse (the same "
                     f"engine, each sequence emptied first): {i['none']['requests']} requests per sequence count "
                     f"(each evaluates a whole window).")
    if "overhead" in results:
        o = results["overhead"]
        row(f"3. generation tokens/s, batched engine vs llama-cpp-python ({o['threads']} threads, "
            f"{o['reps']} runs each)",
            f"{o['engine_tokens_per_s']:.1f}", f"{o['direct_tokens_per_s']:.1f}", f"{o['ratio']:.2f}", ">= 0.95",
            o["ratio"] >= 0.95)
        if "worker_us_per_token" in o:
            row("3. engine's own work per token (replayed tokens): worker thread / through the loop",
                f"{o['worker_us_per_token']:.0f} / {o['engine_us_per_token']:.0f} us",
                f"{1e6 / o['direct_tokens_per_s']:.0f} us per token generated", "", "report", None)
        notes.append(f"3.: one batched context of one sequence vs a llama-cpp-python context of the same settings, "
                     f"both run by the engine's decode thread; same prompt, sampling and seed; "
                     f"the direct loop generates as many tokens as the engine did ({o['generated_tokens'][0]}); "
                     f"ABBA order; tokens/s over all runs of a side; median of paired ratios "
                     f"{o['paired_ratio_median']:.2f}, best run / best run {o.get('best_ratio', float('nan')):.2f}.")
    if "loop_lag" in results:
        lag = results["loop_lag"]
        e, b, idle, hogs = lag["engine"], lag["on_loop"], lag["idle"], lag["cpu_hogs"]
        row("4. loop lag p50/p99/max (ms), batched engine vs on the loop",
            f"{e['p50_ms']:.2f}/{e['p99_ms']:.2f}/{e['max_ms']:.1f}",
            f"{b['p50_ms']:.1f}/{b['p99_ms']:.0f}/{b['max_ms']:.0f}", "",
            "p99 < 5, max < 50", e["p99_ms"] < 5 and e["max_ms"] < 50)
        row(f"4. reference: idle loop / beside {lag['hog_processes']} busy processes (no GIL involved)",
            f"{idle['p50_ms']:.2f}/{idle['p99_ms']:.2f}/{idle['max_ms']:.1f}",
            f"{hogs['p50_ms']:.2f}/{hogs['p99_ms']:.2f}/{hogs['max_ms']:.1f}", "", "report", None)
        notes.append(f"4.: {lag['sequences']} sequences of one batched context of {lag['threads']} thread(s) serve "
                     f"4 channels twice (states saved and restored); on the loop: one llama-cpp-python context of "
                     f"{lag['on_loop_threads']} thread(s); full garbage collections while sampling: "
                     f"{e['gc_collections'][2]}.")
    if "database" in results:
        d = results["database"]
        row(f"5. append turn p50/p99, {d['turns_in_channel']} turns", f"{d['append_p50_ms']:.2f}/"
            f"{d['append_p99_ms']:.2f} ms", "", "", "p99 < 5 ms", d["append_p99_ms"] < 5)
        row(f"5. load window (of the newest {d['window_turns']} turns, the {d['window_rows_read']} that can fit) "
            f"p50/p99/max", f"{d['load_p50_ms']:.2f}/"
            f"{d['load_p99_ms']:.2f}/{d['load_max_ms']:.1f} ms", "", "", "p99 < 5 ms", d["load_p99_ms"] < 5)
        row("5. the same after gc.freeze(): append p50/p99, window p50/p99/max",
            f"{d['frozen_append_p50_ms']:.2f}/{d['frozen_append_p99_ms']:.2f} ms, {d['frozen_load_p50_ms']:.2f}/"
            f"{d['frozen_load_p99_ms']:.2f}/{d['frozen_load_max_ms']:.1f} ms", "", "", "report", None)
        notes.append(f"5.: {d['samples']} appends and window loads alternating on an idle loop; full garbage "
                     f"collections meanwhile: {d['gc_collections'][2]} (after gc.freeze(): "
                     f"{d['frozen_gc_collections'][2]}).")
    if "memory" in results:
        m = results["memory"]
        contexts = {(r["count"], r["n_batch"], r["kv_type"]): r for r in m["runs"] if r["engine"] == "llama"}
        for r in m["runs"]:
            if r["engine"] != "batched":
                continue
            after = r["after"]
            old = contexts.get((r["count"], r["n_batch"], r["kv_type"]))
            row(f"6. memory, {r['count']} sequence(s) in one context, kv {r['kv_type']}, n_batch {r['n_batch']}: "
                f"RSS / PSS / anonymous" + ("; vs as many llama-cpp-python contexts" if old else ""),
                f"{mib(after['rss'])} / {mib(after['pss'])} / {mib(after['anon'])}",
                f"{mib(old['after']['rss'])} / {mib(old['after']['pss'])} / {mib(old['after']['anon'])}"
                if old else "", f"{after['pss'] / old['after']['pss']:.2f} (PSS)" if old else "", "report", None)
        a, a512, c = m["added_per_sequence"], m["added_per_sequence_512"], m["added_per_context"]
        row(f"6. added per sequence vs per llama-cpp-python context (f16 KV, n_batch {m['n_batch']}): "
            f"RSS / PSS / anonymous", f"{mib(a['rss'])} / {mib(a['pss'])} / {mib(a['anon'])}",
            f"{mib(c['rss'])} / {mib(c['pss'])} / {mib(c['anon'])}", "", "report", None)
        row("6. added per sequence, n_batch 512: RSS / PSS / anonymous",
            f"{mib(a512['rss'])} / {mib(a512['pss'])} / {mib(a512['anon'])}", "", "", "report", None)
        row("6. anonymous added: KV cache / other (compute buffers), per sequence vs per context",
            f"{mib(m['kv_cache_bytes'])} / {mib(m['other_per_sequence_bytes'])}",
            f"{mib(m['kv_cache_bytes'])} / {mib(m['other_per_context_bytes'])}",
            f"model file {mib(m['model_file_bytes'])}", "report", None)
        speed = m["prompt_speed"]
        row(f"6. prompt tokens/s, batched, n_batch {m['n_batch']} vs 512 ({speed['prompt_tokens']} tokens, best of 3)",
            f"{speed[m['n_batch']]:.0f}", f"{speed[512]:.0f}", f"{speed[m['n_batch']] / speed[512]:.2f}", "report",
            None)
        for r in m["runs"]:
            if r["engine"] == "batched" and r["count"] == 1 and r["n_batch"] == m["n_batch"]:
                row(f"6. saved channel state, kv {r['kv_type']}", f"{mib(r['state_bytes'])} / {r['state_tokens']} tok",
                    f"{r['state_bytes'] / max(1, r['state_tokens']) / 1024:.1f} KiB/token", "", "report", None)
        notes.append("6.: the batched engine loads the model once and adds a sequence's KV cache per sequence; each "
                     "llama-cpp-python context (the engine before batching, one per worker) maps the model file "
                     "again (RSS counts it once per context; the pages are shared, which PSS shows) and has its "
                     "own compute buffers, which grow with n_batch.")
    for t in turn_cost:
        name = "context shift" if t["context_shift"] else "chunked trim"
        row(f"6. saved channel state after 1. ({name})", f"{mib(t['state_bytes'])} / {t['state_tokens']} tok",
            "", "", "report", None)
    for b in results.get("batched", []):
        row(f"7. experiment, {b['channels']} channels decoded together: tokens/s, batched vs one at a time "
            f"({b['threads']} threads)", f"{b['batched_tokens_per_s']:.0f}", f"{b['one_at_a_time_tokens_per_s']:.0f}",
            f"{b['batched_vs_one_at_a_time']:.2f}", "report", None)
        row(f"7. experiment, {b['channels']} channels: batched vs 2 contexts x 1 thread (the engine before batching)",
            f"{b['batched_tokens_per_s']:.0f}", f"{b['per_worker_tokens_per_s']:.0f}",
            f"{b['batched_vs_per_worker']:.2f}", "report", None)
    if results.get("batched"):
        b = results["batched"][0]
        same = ", ".join(f"{x['same_tokens'] * 100:.0f}%" for x in results["batched"])
        notes.append(f"7.: every channel's prompt evaluated first (not timed), then {b['tokens_per_channel']} greedy "
                     f"tokens per channel, best of {b['reps']} (ABBA); batched tokens equal to those generated one "
                     f"at a time: {same}. Raw llama.cpp calls, not the bot's engine (which 2. to 4. measure).")
    if "lore" in results:
        lo = results["lore"]
        labels = {"depth": "(a) entries at depth 2-4", "head_all": "(b) before the character, lore_in_head=all",
                  "head_constant": "(c) before the character, lore_in_head=constant (default)"}
        for name, p in lo["placements"].items():
            w = p["reuse"]
            target = "report" if name == "head_all" else ">= 5x"
            row(f"8. lore reuse, {labels[name]}: prompt tokens evaluated (median/mean/p95)",
                f"{w['median']:.0f}/{w['mean']:.0f}/{w['p95']:.0f}", f"{p['full_evaluated_median']:.0f}",
                f"{p['work_ratio']:.1f}x", target, None if name == "head_all" else p["work_ratio"] >= 5)
        for name, p in lo["placements"].items():
            c, u = p["reuse_changed"], p["reuse_unchanged"]
            row(f"8. lore reuse, {labels[name][:3]}: mean evaluated when the active set changes / stays "
                f"({c['turns']} / {u['turns']} turns)", f"{c['mean']:.0f} / {u['mean']:.0f}",
                f"head changed on {p['head_changes']} turns", "", "report", None)
        a = lo["placements"]["depth"]
        notes.append(f"8.: {lo['turns']} turns ((b): the first {lo['head_turns']}), {lo['entries']} entries (one "
                     f"constant, after the character); a lorebook key is named on {lo['triggered_turns']} turns "
                     f"and the active set changes on {lo['changed_turns']}; the window is full from turn "
                     f"{a['window_full_from_turn']}; figures over the later turns; full evaluation on every "
                     f"{lo['full_every']}th of them ({a['full_samples']} samples for (a)). Work ratio: full median "
                     f"/ reuse mean.")
    if "speakers" in results:
        sp = results["speakers"]
        for mode, m in sp["modes"].items():
            for kind, label in (("changes", "the speaker changes"), ("stays", "the same speaker")):
                w = m[kind]
                row(f"9. two characters, cards_in_prompt={mode}: evaluated when {label} (median/mean/p95, "
                    f"{w['turns']} turns)", f"{w['median']:.0f}/{w['mean']:.0f}/{w['p95']:.0f}",
                    f"{m['full_evaluated_median']:.0f}", f"{w['ratio']:.1f}x", "report", None)
        notes.append(f"9.: the history starts with {sp['fill_pairs']} turn pairs (window full); each character "
                     f"answers two turns in a row; {sp['turns']} measured turns per mode after one that fills the "
                     f"cache; full evaluation on every {sp['full_every']}th.")
    if "prefill" in results:
        pf = results["prefill"]
        w, wo = pf["with"], pf["without"]
        n = pf["replies"]
        row(f"10. name prefill, {pf['characters']} characters / {pf['members']} members: replies cut to nothing "
            f"(of {n})", f"with prefill_name: {w['empty']} ({w['empty_nothing_generated']} nothing generated)",
            f"without: {wo['empty']} ({wo['empty_nothing_generated']} nothing generated)", "", "report", None)
        row("10. name prefill: replies that began with the speaker's own name (stripped) / mean characters kept",
            f"{w['echo_stripped']} / {w['mean_chars']:.0f}", f"{wo['echo_stripped']} / {wo['mean_chars']:.0f}",
            "", "report", None)
        better = ("with prefill_name" if w["empty"] < wo["empty"] else
                  "without prefill_name" if wo["empty"] < w["empty"] else "neither (a tie)")
        notes.append(f"10.: {n} replies each way, default sampling with one fixed seed per reply, at most "
                     f"{pf['max_new_tokens']} tokens, cleaned as the bot cleans them; fewer empty replies: "
                     f"{better}.")
    if "server" in results:
        from bench.server import report_notes, report_rows

        for figure in report_rows(results["server"]):
            row(*figure)
        notes += report_notes(results["server"])
    return "\n".join([*lines, "", *(f"- {n}" for n in notes)])


def in_own_thread(step: Callable[[], Any]) -> Any:
    """Run one benchmark on a thread that ends with it.

    A thread that ran the model keeps its OpenMP team (idle threads) until it exits. Once two teams
    are alive libgomp manages more threads than there are cores and cuts every team's spin-waits
    short: generation ran a third slower here. A benchmark's thread ending frees its team.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench") as pool:
        return pool.submit(step).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="GGUF file (default: the demo model)")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a few minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10,11", help="comma-separated benchmark numbers")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latest.json"))
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--memory-engine", default="batched", choices=("batched", "llama"), help=argparse.SUPPRESS)
    parser.add_argument("--kv-type", default="f16", help=argparse.SUPPRESS)
    parser.add_argument("--n-batch", type=int, default=N_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--server-channels", dest="server_channel_counts", default="",
                        help="benchmark 11's channel counts (default 1,2,4,8; quick 1,2,8)")
    args = parser.parse_args(argv)
    if not args.model:
        from bot.inference.local.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model(report=lambda msg: print(msg, file=sys.stderr)))
    if args.memory_probe:
        memory_probe(args.model, args.memory_probe, args.n_ctx, args.kv_type, args.n_batch, args.memory_engine)
        return 0
    args.max_new = 8
    if args.quick:
        args.n_ctx = min(args.n_ctx, 512)
        args.turns, args.trim_turns, args.sample_every = 32, 32, 6
        args.channels, args.rounds, args.none_requests = 4, 1, 2
        args.gen_tokens, args.overhead_reps, args.lag_tokens = 64, 4, 32
        args.lag_reference_seconds = 1.5
        args.db_turns, args.db_samples = 100_000, 100
        args.memory_workers, args.speed_tokens = (1, 2), 300
        args.batch_channels, args.batch_tokens, args.batch_reps = (2, 4), 16, 2
        args.lore_turns, args.lore_head_turns, args.lore_full_every = 32, 24, 8
        args.speaker_turns, args.speaker_full_every = 16, 5
        args.prefill_replies, args.prefill_tokens = 12, 48
        args.server_channels, args.server_rounds = (1, 2, 8), 2
    else:
        args.turns, args.trim_turns, args.sample_every = 200, 100, 15
        args.channels, args.rounds, args.none_requests = 8, 2, 2
        args.gen_tokens, args.overhead_reps, args.lag_tokens = 128, 16, 64
        args.lag_reference_seconds = 3.0
        args.db_turns, args.db_samples = 100_000, 300
        args.memory_workers, args.speed_tokens = (1, 2, 4), 600
        args.batch_channels, args.batch_tokens, args.batch_reps = (2, 4, 8), 48, 4
        args.lore_turns, args.lore_head_turns, args.lore_full_every = 200, 60, 30
        args.speaker_turns, args.speaker_full_every = 60, 15
        args.prefill_replies, args.prefill_tokens = 60, 48
        args.server_channels, args.server_rounds = (1, 2, 4, 8), 3
    if args.server_channel_counts:
        args.server_channels = tuple(int(x) for x in args.server_channel_counts.split(","))
    # 11.: a conversation of about 700 tokens per channel in a context of 1024, 48 new tokens.
    args.server_n_ctx, args.server_prompt_tokens, args.server_tokens = 1024, 680, 48
    # A full window's saved state (about 23 KiB per token for the demo model), so every channel fits in RAM.
    args.state_bytes_hint = 24 * 1024 * args.n_ctx
    only = {int(x) for x in args.only.split(",") if x.strip()}
    results: dict[str, Any] = {"model": os.path.basename(args.model), "threads": args.threads,
                               "n_ctx": args.n_ctx, "quick": args.quick, "cores": os.cpu_count(),
                               "date": datetime.date.today().isoformat(), "machine": platform.machine(),
                               "python": platform.python_version()}
    steps: list[tuple[int, str, Callable[[], Any]]] = [
        (1, "turn_cost", lambda: bench_turn_cost(args)),
        (2, "interleaved", lambda: bench_interleaved(args)),
        (3, "overhead", lambda: bench_overhead(args)),
        (4, "loop_lag", lambda: bench_loop_lag(args)),
        (5, "database", lambda: bench_database(args)),
        (6, "memory", lambda: bench_memory(args)),
        (7, "batched", lambda: bench_batched(args)),
        (8, "lore", lambda: bench_lore(args)),
        (9, "speakers", lambda: bench_speakers(args)),
        (10, "prefill", lambda: bench_prefill(args)),
        (11, "server", lambda: bench_server(args)),
    ]
    started = time.perf_counter()
    for number, name, step in steps:
        if number in only:
            begin = time.perf_counter()
            load = os.getloadavg()[0]
            results[name] = in_own_thread(step)
            results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - begin, 1)
            results.setdefault("load_before", {})[name] = load
            print(f"benchmark {number} ({name}) took {time.perf_counter() - begin:.0f} s "
                  f"(load average before: {load:.2f})", file=sys.stderr)
    results["seconds"] = time.perf_counter() - started
    table = report(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
