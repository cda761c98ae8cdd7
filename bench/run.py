"""Tavernkeep benchmarks: every figure is a ratio measured side by side in one run.

    python -m bench.run [--model PATH] [--quick] [--threads N] [--out bench/results/latest.json]

1. turn cost: a scripted conversation that slides the window, KV reuse vs full re-evaluation
2. interleaved channels over 2 and 1 workers, reuse vs none
3. engine overhead: tokens/s through the engine vs llama-cpp-python directly
4. event loop lag while the workers generate, vs the same work on the loop
5. database: append-turn latency and prompt-window load for a channel of 100,000 turns
6. memory: resident memory with 1, 2 and 4 workers; size of saved channel states
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bot.config import CacheSettings, ModelSettings, Settings
from bot.engine import Engine, Finished, GenerationRequest, GenerationStats, Sampling, Started, run_generation
from bot.kv_cache import StateCache
from bot.llama_backend import LlamaBackend
from bot.prompt import Conversation, PromptTurn

PERSONA = (
    "Enter roleplay mode. You must act as Captain Mirela Vance, whose persona follows: a weathered airship "
    "captain who trades spices between floating islands, speaks in clipped nautical slang, distrusts nobles "
    "and keeps a mechanical parrot named Brass that repeats the last word of every sentence."
)
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, seed=1)
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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class BenchBackend(LlamaBackend):
    """LlamaBackend that remembers the first token of each generation (the greedy argmax)."""

    first_token: int | None = None

    def tokens(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        self.first_token = None
        for token in super().tokens(prompt, sampling):
            if self.first_token is None:
                self.first_token = token
            yield token


class NoReuse:
    """The same backend evaluating every prompt in full (the baseline)."""

    def __init__(self, inner: BenchBackend) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.n_ctx = inner.n_ctx

    @property
    def first_token(self) -> int | None:
        return self.inner.first_token

    def tokens(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        self.inner.llm.reset()
        return self.inner.tokens(prompt, sampling)

    def piece(self, token: int) -> bytes:
        return self.inner.piece(token)

    def is_end(self, token: int) -> bool:
        return self.inner.is_end(token)

    def close(self) -> None:
        self.inner.close()


def model_settings(model: str, n_ctx: int, threads: int, workers: int = 1) -> ModelSettings:
    return ModelSettings(path=model, n_ctx=n_ctx, threads=threads, workers=workers, seed=1)


def generate(backend: Any, request: GenerationRequest) -> GenerationStats:
    return run_generation(backend, request, threading.Event(), lambda _chunk: None)


def ttft(stats: GenerationStats) -> float:
    return stats.first_token_seconds if stats.first_token_seconds is not None else stats.seconds


# ------------------------------------------------------------------------------------------ 1


def bench_turn_cost(args: argparse.Namespace, shift: bool) -> dict[str, Any]:
    """One channel, a scripted conversation; reuse every turn, a full evaluation on sampled turns."""
    settings = model_settings(args.model, args.n_ctx, args.threads)
    cache_settings = CacheSettings(context_shift=shift)
    reuse = BenchBackend(args.model, settings, cache=StateCache(0), cache_settings=cache_settings)
    full = NoReuse(BenchBackend(args.model, settings))
    turns: list[PromptTurn] = []
    rows: list[dict[str, Any]] = []
    first_full: int | None = None
    started = time.perf_counter()
    try:
        for t in range(args.turns):
            turns.append(scripted_turn(t, "user"))
            request = GenerationRequest("bench", Conversation(PERSONA, tuple(turns)), args.max_new, GREEDY)
            stats = generate(reuse, request)
            row: dict[str, Any] = {
                "turn": t, "prompt": stats.prompt_tokens, "evaluated": stats.evaluated_tokens,
                "ttft": ttft(stats), "turns_used": stats.turns_used,
            }
            if first_full is None and stats.turns_used < len(turns):
                first_full = t
            if first_full is not None and (t - first_full) % args.sample_every == 0:
                base = generate(full, request)
                row.update(base_evaluated=base.evaluated_tokens, base_ttft=ttft(base))
                if base.prompt_tokens == stats.prompt_tokens:
                    row["argmax_agree"] = full.first_token == reuse.first_token
            rows.append(row)
            turns.append(scripted_turn(t, "model"))
        state = len(reuse.state_bytes())
        held = reuse.llm.n_tokens
    finally:
        reuse.close()
        full.close()
    warm = [r for r in rows if first_full is not None and r["turn"] > first_full]
    sampled = [r for r in rows if "base_ttft" in r]
    agree = [r["argmax_agree"] for r in rows if "argmax_agree" in r]
    result = {
        "context_shift": shift,
        "turns": args.turns,
        "window_full_from_turn": first_full,
        "reuse_evaluated_median": median([r["evaluated"] for r in warm]),
        "reuse_evaluated_mean": statistics.fmean([r["evaluated"] for r in warm]) if warm else float("nan"),
        "reuse_evaluated_p95": pct([r["evaluated"] for r in warm], 95),
        "reuse_ttft_median": median([r["ttft"] for r in warm]),
        "reuse_ttft_p95": pct([r["ttft"] for r in warm], 95),
        "full_evaluated_median": median([r["base_evaluated"] for r in sampled]),
        "full_ttft_median": median([r["base_ttft"] for r in sampled]),
        "full_ttft_p95": pct([r["base_ttft"] for r in sampled], 95),
        "full_samples": len(sampled),
        "argmax_agreement": (sum(agree) / len(agree)) if agree else None,
        "argmax_samples": len(agree),
        "state_bytes": state,
        "state_tokens": held,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    result["work_ratio"] = result["full_evaluated_median"] / max(1.0, result["reuse_evaluated_mean"])
    result["ttft_ratio"] = result["full_ttft_median"] / result["reuse_ttft_median"]
    return result


# ------------------------------------------------------------------------------------------ 2


async def _interleaved(args: argparse.Namespace, workers: int, reuse: bool) -> dict[str, Any]:
    channels = args.channels
    threads = max(1, args.threads // workers)
    settings = Settings(model=model_settings(args.model, args.n_ctx, threads, workers))
    cache = StateCache(settings.cache.ram_bytes)
    backends: list[BenchBackend] = []

    def factory() -> Any:
        backend = BenchBackend(args.model, settings.model, cache=cache, cache_settings=settings.cache)
        backends.append(backend)
        return backend if reuse else NoReuse(backend)

    engine = Engine(factory, workers=workers, queue_size=64, per_key_queue=4)
    await engine.start()
    base = args.prefill
    rounds = args.rounds if reuse else 1
    records: list[tuple[int, Started, GenerationStats]] = []

    async def turn(key: int, rnd: int) -> None:
        conv = history(base + rnd, tag=f"[ch{key}]")
        conv.append(scripted_turn(base + rnd, "user"))
        request = GenerationRequest(f"ch{key}", Conversation(PERSONA, tuple(conv)), args.max_new, GREEDY)
        started = None
        async for chunk in engine.generate(request):
            if isinstance(chunk, Started):
                started = chunk
            elif isinstance(chunk, Finished) and started is not None:
                records.append((rnd, started, chunk.stats))

    try:
        for rnd in range(rounds + (1 if reuse else 0)):
            await asyncio.gather(*(turn(key, rnd) for key in range(channels)))
    finally:
        await engine.close()
    measured = [(s, st) for rnd, s, st in records if not reuse or rnd > 0]  # round 0 fills the caches
    return {
        "workers": workers,
        "requests": len(measured),
        "evaluated_median": median([st.evaluated_tokens for _, st in measured]),
        "evaluated_mean": statistics.fmean([st.evaluated_tokens for _, st in measured]),
        "prompt_median": median([st.prompt_tokens for _, st in measured]),
        "ttft_median": median([ttft(st) for _, st in measured]),
        "ttft_p95": pct([ttft(st) for _, st in measured], 95),
        "cache_ram_bytes": cache.ram_used,
        "cache_entries": cache.stats().entries,
        "cache_hits": cache.stats().hits,
    }


def bench_interleaved(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for workers in (2, 1):
        with_reuse = asyncio.run(_interleaved(args, workers, True))
        without = asyncio.run(_interleaved(args, workers, False))
        out.append({
            "workers": workers,
            "channels": args.channels,
            "reuse": with_reuse,
            "none": without,
            "work_ratio": without["evaluated_median"] / max(1.0, with_reuse["evaluated_mean"]),
            "ttft_ratio": without["ttft_median"] / with_reuse["ttft_median"],
        })
    return out


# ------------------------------------------------------------------------------------------ 3


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Generation tokens/s: the engine (worker thread, stop scanning, events) vs Llama.generate."""
    import llama_cpp

    sampling = Sampling(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1, seed=3)
    settings = Settings(model=model_settings(args.model, 1024, args.threads))
    conv = Conversation(PERSONA, (PromptTurn("user", "Tell me a long story about your airship.", "Alice"),))
    request = GenerationRequest("o", conv, args.gen_tokens, sampling)

    async def through_engine() -> GenerationStats:
        engine = Engine(lambda: LlamaBackend(args.model, settings.model, cache_settings=settings.cache))
        await engine.start()
        try:
            async for chunk in engine.generate(request):
                if isinstance(chunk, Finished):
                    return chunk.stats
        finally:
            await engine.close()
        raise RuntimeError("no result")

    llm = llama_cpp.Llama(
        model_path=args.model, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, seed=1,
        verbose=False,
    )
    from bot.prompt import build_prompt

    prompt = build_prompt(llm, conv, n_ctx=1024, max_new_tokens=args.gen_tokens).tokens
    engine_rates, direct_rates = [], []
    try:
        for _ in range(args.overhead_reps):
            stats = asyncio.run(through_engine())
            engine_rates.append(stats.tokens_per_second)
            count = max(2, stats.generated_tokens)
            llm.reset()
            llm.set_seed(3)
            first = None
            n = 0
            begin = time.perf_counter()
            for _token in llm.generate(prompt, temp=0.8, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1):
                n += 1
                if first is None:
                    first = time.perf_counter()
                if n >= count:
                    break
            end = time.perf_counter()
            direct_rates.append((n - 1) / (end - (first or begin)))
    finally:
        llm.close()
    # Best of the runs, alternating: other load on the machine only ever slows a run down.
    engine_rate, direct_rate = max(engine_rates), max(direct_rates)
    return {"engine_tokens_per_s": engine_rate, "direct_tokens_per_s": direct_rate,
            "ratio": engine_rate / direct_rate, "reps": args.overhead_reps,
            "engine_all": engine_rates, "direct_all": direct_rates}


# ------------------------------------------------------------------------------------------ 4


async def _lag_while(work: Any) -> list[float]:
    lags: list[float] = []
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(max(0.0, time.perf_counter() - t0 - 0.005))

    task = asyncio.create_task(sampler())
    await asyncio.sleep(0.02)
    try:
        await work()
    finally:
        done.set()
        await task
    return lags


def bench_loop_lag(args: argparse.Namespace) -> dict[str, Any]:
    workers = 2
    settings = Settings(model=model_settings(args.model, 1024, max(1, args.threads // workers), workers))
    requests = [
        GenerationRequest(f"lag{k}", Conversation(PERSONA, tuple(history(6, f"[l{k}]"))), args.gen_tokens, GREEDY)
        for k in range(2 * workers)
    ]

    async def engine_run() -> list[float]:
        engine = Engine(lambda: LlamaBackend(args.model, settings.model, cache_settings=settings.cache),
                        workers=workers)
        await engine.start()

        async def one(request: GenerationRequest) -> None:
            async for _ in engine.generate(request):
                pass

        try:
            return await _lag_while(lambda: asyncio.gather(*(one(r) for r in requests)))
        finally:
            await engine.close()

    async def loop_run() -> list[float]:
        backend = LlamaBackend(args.model, settings.model, cache_settings=settings.cache)

        async def blocking() -> None:
            for request in requests:
                generate(backend, request)  # on the loop thread: what the engine avoids
                await asyncio.sleep(0)

        try:
            return await _lag_while(blocking)
        finally:
            backend.close()

    engine_lags = asyncio.run(engine_run())
    loop_lags = asyncio.run(loop_run())

    def summary(lags: list[float]) -> dict[str, float]:
        return {"p50_ms": 1000 * pct(lags, 50), "p99_ms": 1000 * pct(lags, 99), "max_ms": 1000 * max(lags),
                "samples": len(lags)}

    return {"engine": summary(engine_lags), "on_loop": summary(loop_lags), "workers": workers}


# ------------------------------------------------------------------------------------------ 5


async def _database(turns: int, samples: int, window: int) -> dict[str, Any]:
    from persistence.database import Database
    from persistence.repository import Repository

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        db = await Database.open(f"sqlite+aiosqlite:///{path}")
        repo = Repository(db)
        try:
            session = await repo.start_session("bench:1", persona_text=PERSONA)
            first = await repo.append_turn(session.id, "user", "seed turn", author_name="Alice")
            filler = sqlite3.connect(path)
            with filler:
                filler.executemany(
                    "INSERT INTO turns (session_id, role, author_id, author_name, content, status, created_at) "
                    "SELECT session_id, CASE WHEN ? % 2 THEN 'model' ELSE 'user' END, author_id, author_name, "
                    "content || ' ' || ?, status, created_at FROM turns WHERE id = ?",
                    ((i, "x" * (40 + i % 200), first.id) for i in range(turns - 1)),
                )
            filler.close()
            count = await repo.count_turns(session.id)
            appends, loads = [], []
            for i in range(samples):
                t0 = time.perf_counter()
                await repo.append_turn(session.id, "user", f"message {i} " + "y" * 80, author_name="Bob",
                                       message_ids=[10_000_000 + i])
                appends.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                rows = await repo.recent_turns(session.id, window)
                loads.append(time.perf_counter() - t0)
                assert len(rows) == window
        finally:
            await db.close()
    return {
        "turns_in_channel": count,
        "append_p50_ms": 1000 * pct(appends, 50), "append_p99_ms": 1000 * pct(appends, 99),
        "window_turns": window,
        "load_p50_ms": 1000 * pct(loads, 50), "load_p99_ms": 1000 * pct(loads, 99),
        "samples": samples,
    }


def bench_database(args: argparse.Namespace) -> dict[str, Any]:
    from bot.sessions import MIN_TOKENS_PER_TURN

    return asyncio.run(_database(args.db_turns, args.db_samples, max(8, args.n_ctx // MIN_TOKENS_PER_TURN)))


# ------------------------------------------------------------------------------------------ 6


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_probe(model: str, workers: int, n_ctx: int, threads: int, kv_type: str) -> None:
    """Run in a child process: load `workers` contexts, fill each, print resident memory as JSON."""
    settings = ModelSettings(path=model, n_ctx=n_ctx, threads=threads, workers=workers, kv_type=kv_type,
                             flash_attn=kv_type != "f16")
    before = _rss_bytes()
    backends = [LlamaBackend(model, settings) for _ in range(workers)]
    conv = Conversation(PERSONA, tuple(history(8)))
    for backend in backends:
        generate(backend, GenerationRequest("m", conv, 4, GREEDY))
    state = backends[0].state_bytes()
    print(json.dumps({"workers": workers, "rss_bytes": _rss_bytes(), "rss_before_bytes": before,
                      "state_bytes": len(state), "state_tokens": backends[0].llm.n_tokens, "kv_type": kv_type}))
    for backend in backends:
        backend.close()


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for kv_type, counts in (("f16", (1, 2, 4)), ("q8_0", (1,))):
        for workers in counts:
            out = subprocess.run(
                [sys.executable, "-m", "bench.run", "--memory-probe", str(workers), "--model", args.model,
                 "--n-ctx", str(args.n_ctx), "--kv-type", kv_type],
                capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    f16 = [r for r in runs if r["kv_type"] == "f16"]
    return {
        "model_file_bytes": os.path.getsize(args.model),
        "n_ctx": args.n_ctx,
        "runs": runs,
        "added_per_worker_bytes": (f16[-1]["rss_bytes"] - f16[0]["rss_bytes"]) / (f16[-1]["workers"] - 1),
    }


# ------------------------------------------------------------------------------------------ report


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []

    def row(name: str, reuse: str, none: str, ratio: str, target: str, ok: bool | None) -> None:
        mark = "" if ok is None else ("yes" if ok else "NO")
        lines.append(f"| {name} | {reuse} | {none} | {ratio} | {target} | {mark} |")

    lines.append(f"model {results['model']}, threads {results['threads']}, n_ctx {results['n_ctx']}")
    lines.append("| figure | with reuse / ours | without / reference | ratio | target | met |")
    lines.append("|---|---|---|---|---|---|")
    for t in results.get("turn_cost", []):
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
    single = next((t for t in results.get("turn_cost", []) if t["context_shift"]), None)
    for i in results.get("interleaved", []):
        name = f"2. {i['channels']} channels / {i['workers']} worker(s)"
        r, n = i["reuse"], i["none"]
        close = None if single is None else i["work_ratio"] * 2 >= single["work_ratio"]
        row(f"{name}: prompt tokens evaluated (median/mean)", f"{r['evaluated_median']:.0f}/{r['evaluated_mean']:.0f}",
            f"{n['evaluated_median']:.0f}", f"{i['work_ratio']:.1f}x", "within 2x of 1.", close)
        close = None if single is None else i["ttft_ratio"] * 2 >= single["ttft_ratio"]
        row(f"{name}: time to first token (median / p95)",
            f"{r['ttft_median'] * 1000:.0f} / {r['ttft_p95'] * 1000:.0f} ms",
            f"{n['ttft_median'] * 1000:.0f} / {n['ttft_p95'] * 1000:.0f} ms",
            f"{i['ttft_ratio']:.1f}x", "within 2x of 1.", close)
        row(f"{name}: saved states in RAM", f"{r['cache_entries']} ({mib(r['cache_ram_bytes'])}), "
            f"{r['cache_hits']} restores", "", "", "<= ram_bytes", None)
    if "overhead" in results:
        o = results["overhead"]
        row("3. generation tokens/s, engine vs llama-cpp-python", f"{o['engine_tokens_per_s']:.1f}",
            f"{o['direct_tokens_per_s']:.1f}", f"{o['ratio']:.2f}", ">= 0.95", o["ratio"] >= 0.95)
    if "loop_lag" in results:
        e, b = results["loop_lag"]["engine"], results["loop_lag"]["on_loop"]
        row("4. loop lag p50/p99/max (ms), workers vs on the loop",
            f"{e['p50_ms']:.2f}/{e['p99_ms']:.2f}/{e['max_ms']:.1f}",
            f"{b['p50_ms']:.1f}/{b['p99_ms']:.0f}/{b['max_ms']:.0f}", "",
            "p99 < 5, max < 50", e["p99_ms"] < 5 and e["max_ms"] < 50)
    if "database" in results:
        d = results["database"]
        row(f"5. append turn p50/p99, {d['turns_in_channel']} turns", f"{d['append_p50_ms']:.2f}/"
            f"{d['append_p99_ms']:.2f} ms", "", "", "p99 < 5 ms", d["append_p99_ms"] < 5)
        row(f"5. load window of {d['window_turns']} turns p50/p99", f"{d['load_p50_ms']:.2f}/{d['load_p99_ms']:.2f} ms",
            "", "", "p99 < 5 ms", d["load_p99_ms"] < 5)
    if "memory" in results:
        m = results["memory"]
        for r in m["runs"]:
            row(f"6. resident memory, {r['workers']} worker(s), kv {r['kv_type']}", mib(r["rss_bytes"]), "", "",
                "report", None)
        row("6. added per worker (f16 KV)", mib(m["added_per_worker_bytes"]),
            f"model file {mib(m['model_file_bytes'])}", "", "report", None)
        for r in m["runs"]:
            if r["workers"] == 1:
                row(f"6. saved channel state, kv {r['kv_type']}", f"{mib(r['state_bytes'])} / {r['state_tokens']} tok",
                    f"{r['state_bytes'] / max(1, r['state_tokens']) / 1024:.1f} KiB/token", "", "report", None)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="GGUF file (default: the demo model)")
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 2 minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated benchmark numbers")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latest.json"))
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--kv-type", default="f16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.model:
        from bot.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model(report=lambda msg: print(msg, file=sys.stderr)))
    if args.memory_probe:
        memory_probe(args.model, args.memory_probe, args.n_ctx, 1, args.kv_type)
        return 0
    if args.quick:
        args.n_ctx = min(args.n_ctx, 1024)
        args.turns, args.sample_every, args.max_new = 60, 8, 8
        args.channels, args.prefill, args.rounds = 8, 4, 2
        args.gen_tokens, args.overhead_reps = 64, 3
        args.db_turns, args.db_samples = 100_000, 100
    else:
        args.turns, args.sample_every, args.max_new = 200, 12, 8
        args.channels, args.prefill, args.rounds = 8, 12, 3
        args.gen_tokens, args.overhead_reps = 128, 5
        args.db_turns, args.db_samples = 100_000, 300
    only = {int(x) for x in args.only.split(",") if x.strip()}
    results: dict[str, Any] = {"model": os.path.basename(args.model), "threads": args.threads,
                               "n_ctx": args.n_ctx, "quick": args.quick}
    steps = [
        (1, "turn_cost", lambda: [bench_turn_cost(args, True), bench_turn_cost(args, False)]),
        (2, "interleaved", lambda: bench_interleaved(args)),
        (3, "overhead", lambda: bench_overhead(args)),
        (4, "loop_lag", lambda: bench_loop_lag(args)),
        (5, "database", lambda: bench_database(args)),
        (6, "memory", lambda: bench_memory(args)),
    ]
    for number, name, step in steps:
        if number in only:
            begin = time.perf_counter()
            results[name] = step()
            print(f"benchmark {number} ({name}) took {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    table = report(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
