"""Benchmark 11: our batched engine vs llama.cpp's own server vs the engine before batching.

Three sides, the same model, threads in total, prompts and greedy sampling:

- server: `llama-server -np N` (built by bench/build-llama-server), one slot per channel with a
  context of our size, token-id prompts to `/completion` with `cache_prompt`, streamed;
- ours: `batched_engine`, one context whose N sequences are decoded together;
- before: `llama_engine` with 2 workers (a context each, half the threads), channels beyond the
  workers kept in the state cache, as the bot ran before continuous batching.

Each channel holds a conversation of about 700 tokens of its own, put in each side's cache by one
warm-up turn per channel (the conversation before its last user message); then all N channels get
that message and generate 48 tokens at once. Figures, measured by the
client: aggregate tokens/s (every generated token / wall time from the burst's start to its last
token) and the median time to first token over the channels. Each burst starts its side afresh;
the sides take turns in ABBA order over the rounds; medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import importlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.inference.api import Finished, GenerationRequest, Text
from bot.inference.engine import Engine
from bot.inference.local.llama import N_BATCH

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("server", "ours", "before")
# Where each engine side's factory lives: (settings, model_path) -> Engine. A side whose module
# is missing is skipped, so the benchmark runs while one of them is being written.
FACTORIES = {"ours": "bot.inference.local.batched:batched_engine",
             "before": "bot.inference.local.llama:llama_engine"}
BEFORE_WORKERS = 2
START_SECONDS = 60.0
READ_SECONDS = 900.0
# Channels whose greedy reply ends early are replaced; at most this many candidates per channel.
CANDIDATES_PER_CHANNEL = 4
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Reply:
    """One channel's reply in a burst: tokens generated, text, first and last token (s after the start)."""

    generated: int
    text: str
    first: float | None
    last: float
    prompt_evaluated: int  # prompt tokens the side evaluated (not found in its cache)


@dataclass(frozen=True, slots=True)
class Burst:
    """Every channel's reply of one burst."""

    replies: tuple[Reply, ...]

    @property
    def tokens_per_second(self) -> float:
        """All generated tokens over the wall time to the last one."""
        end = max(r.last for r in self.replies)
        return sum(r.generated for r in self.replies) / end if end > 0 else 0.0

    @property
    def ttft(self) -> float:
        """Median time to first token over the channels (a channel with none counts its end)."""
        return statistics.median(r.last if r.first is None else r.first for r in self.replies)


# ---------------------------------------------------------------------------------- prompts


def channel_request(args: argparse.Namespace, channel: int) -> GenerationRequest:
    """A conversation of its own for `channel`, the fewest turn pairs reaching `server_prompt_tokens`."""
    from bench.run import PERSONA, built_request, scripted_turn
    from bot.prompt.builder import Conversation

    base = 1000 * (channel + 1)  # scripted turns of other indices: other words, other speakers
    pairs = 1
    while True:
        turns = [scripted_turn(base + i, role) for i in range(pairs) for role in ("user", "model")]
        turns.append(scripted_turn(base + pairs, "user"))
        request, _ = built_request(args.model, args.server_n_ctx, f"channel-{channel}",
                                   Conversation(PERSONA, tuple(turns)), args.server_tokens)
        if len(request.tokens) >= args.server_prompt_tokens:
            return request
        pairs += 1


def channel_requests(args: argparse.Namespace, count: int) -> tuple[list[GenerationRequest], int]:
    """`count` requests whose greedy reply on the old engine runs the full length; and how many were tried.

    A reply that ends (end of text or a stop string) before `server_tokens` would make the sides'
    work differ, so such conversations are replaced by the next ones.
    """
    make = engine_factory(FACTORIES["before"])
    if make is None:
        raise RuntimeError(f"{FACTORIES['before']} is missing: it picks the prompts")
    kept: list[GenerationRequest] = []
    tried = 0
    while len(kept) < count:
        if tried >= CANDIDATES_PER_CHANNEL * count:
            raise RuntimeError(f"only {len(kept)} of {tried} conversations run {args.server_tokens} greedy tokens")
        batch = [channel_request(args, tried + i) for i in range(count - len(kept))]
        tried += len(batch)
        burst = asyncio.run(engine_burst(before_engine(args, make), batch, warm=False))
        kept += [r for r, reply in zip(batch, burst.replies, strict=True) if reply.generated >= args.server_tokens]
    return [dataclasses.replace(r, key=f"channel-{c}") for c, r in enumerate(kept)], tried


def warm_request(request: GenerationRequest) -> GenerationRequest:
    """The channel's previous turn: its prompt without the last user message, one token.

    After it a side holds the conversation up to the new message, so the burst evaluates that
    message (about 40 tokens) and generates, as a busy channel's next reply does.
    """
    cut = request.cuts[-1]
    return dataclasses.replace(request, tokens=request.tokens[:cut], cuts=request.cuts[:-1], max_new_tokens=1)


# ---------------------------------------------------------------------------------- engines


def engine_factory(spec: str) -> Callable[..., Engine] | None:
    """The factory `module:name`, or None when it cannot be imported."""
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


def our_engine(args: argparse.Namespace, make: Callable[..., Engine], channels: int) -> Engine:
    """The batched engine: one sequence per channel, all threads."""
    from bench.run import model_settings

    settings = model_settings(args.model, args.server_n_ctx, args.threads, workers=channels)
    return make(Settings(model=settings), args.model)


def before_engine(args: argparse.Namespace, make: Callable[..., Engine]) -> Engine:
    """The engine before batching: 2 workers sharing the threads, a context each."""
    from bench.run import model_settings

    settings = model_settings(args.model, args.server_n_ctx, max(1, args.threads // BEFORE_WORKERS),
                              workers=BEFORE_WORKERS, batched=False)
    return make(Settings(model=settings), args.model)


async def engine_burst(engine: Engine, requests: Sequence[GenerationRequest], *, warm: bool = True) -> Burst:
    """Start `engine`, give each channel one warm-up turn, time all channels generating at once, close."""
    await engine.start()
    try:
        async def one(request: GenerationRequest, t0: float) -> Reply:
            first: float | None = None
            last, generated, evaluated, text = 0.0, 0, 0, []
            async for chunk in engine.generate(request):
                if isinstance(chunk, Text):
                    last = time.perf_counter() - t0
                    first = last if first is None else first
                    text.append(chunk.text)
                elif isinstance(chunk, Finished):
                    generated, evaluated = chunk.stats.generated_tokens, chunk.stats.evaluated_tokens
            return Reply(generated, "".join(text), first, last, evaluated)

        if warm:
            t0 = time.perf_counter()
            await asyncio.gather(*(one(warm_request(r), t0) for r in requests))
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(r, t0) for r in requests))
    finally:
        await engine.close()
    return Burst(tuple(replies))


# ---------------------------------------------------------------------------------- llama-server


def server_binary() -> str:
    """The cached llama-server binary (bench/build-llama-server builds it when missing)."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "build-llama-server")], stdout=subprocess.PIPE, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


def server_options(binary: str) -> str:
    """The server's `--help`, to pass only options this build knows."""
    return subprocess.run([binary, "--help"], capture_output=True, text=True, check=False).stdout


def server_command(binary: str, options: str, args: argparse.Namespace, channels: int, port: int) -> list[str]:
    """llama-server with our settings: a slot of our context size per channel, same threads and batch.

    Without a unified KV cache llama.cpp splits `-c` evenly among the slots, each slot a KV stream
    of its own, as our batched context does; flash attention off as ours by default.
    """
    t = str(args.threads)
    command = [binary, "-m", args.model, "-t", t, "-tb", t, "-np", str(channels),
               "-c", str(args.server_n_ctx * channels), "-b", str(N_BATCH), "-ub", str(N_BATCH), "-fa", "off",
               "--host", "127.0.0.1", "--port", str(port)]
    command += [flag for flag in ("--no-kv-unified", "--no-webui") if flag in options]
    return command


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: the server gets SIGKILL when the thread that started it ends, even if this process is
    # killed before its `finally` runs.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def server_burst(binary: str, options: str, args: argparse.Namespace, requests: Sequence[GenerationRequest],
                 log: Path) -> tuple[Burst, dict[str, Any]]:
    """Start llama-server with a slot per request, warm each slot, time one burst, kill it; and its /props."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(server_command(binary, options, args, len(requests), port), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=_die_with_parent)
    try:
        return asyncio.run(_drive_server(f"http://127.0.0.1:{port}", process, requests, log))
    finally:
        process.kill()
        process.wait()


async def _drive_server(url: str, process: subprocess.Popen[bytes], requests: Sequence[GenerationRequest],
                        log: Path) -> tuple[Burst, dict[str, Any]]:
    import aiohttp

    # A warm-up request waits silently while the slots before it evaluate their prompts: on a busy
    # machine that took minutes for 8 slots, so only a server that says nothing for long is given up.
    timeout = aiohttp.ClientTimeout(total=None, sock_read=READ_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_healthy(session, url, process, log)
        async with session.get(f"{url}/props") as response:
            props = await response.json()

        async def one(slot: int, request: GenerationRequest, n_predict: int, t0: float) -> Reply:
            body = {"prompt": list(request.tokens), "n_predict": n_predict, "cache_prompt": True,
                    "id_slot": slot, "temperature": 0.0, "top_k": 1, "stop": list(request.stops), "stream": True}
            first: float | None = None
            last, generated, evaluated, text = 0.0, 0, 0, []
            async with session.post(f"{url}/completion", json=body) as response:
                response.raise_for_status()
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    event = json.loads(line[6:])
                    if event.get("content"):
                        last = time.perf_counter() - t0
                        first = last if first is None else first
                        text.append(event["content"])
                    if event.get("stop"):
                        generated = int(event.get("tokens_predicted", 0))
                        evaluated = int(event.get("timings", {}).get("prompt_n", 0))
                        break
            return Reply(generated, "".join(text), first, last, evaluated)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(s, warm_request(r), 1, t0) for s, r in enumerate(requests)))
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(s, r, r.max_new_tokens, t0) for s, r in enumerate(requests)))
    return Burst(tuple(replies)), props


async def wait_healthy(session: Any, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Return once /health answers 200 (the model is loaded)."""
    import aiohttp

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}; see {log}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"llama-server did not start within {START_SECONDS:.0f} s; see {log}")


# ---------------------------------------------------------------------------------- the benchmark


def _side_figures(bursts: Sequence[Burst], reference: Sequence[Burst] | None) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "tokens_per_s": statistics.median(b.tokens_per_second for b in bursts),
        "ttft": statistics.median(b.ttft for b in bursts),
        "runs_tokens_per_s": [round(b.tokens_per_second, 1) for b in bursts],
        "generated": sorted({r.generated for b in bursts for r in b.replies}),
        "prompt_evaluated": sorted({r.prompt_evaluated for b in bursts for r in b.replies}),
    }
    if reference:
        texts = [(r.text, s.text) for b, ref in zip(bursts, reference, strict=False)
                 for r, s in zip(b.replies, ref.replies, strict=True)]
        figures["same_text_as_before"] = sum(a == b for a, b in texts) / len(texts)
    return figures


def bench_server(args: argparse.Namespace) -> dict[str, Any]:
    """One row per channel count: each side's tokens/s and median time to first token (medians over rounds)."""
    binary = server_binary()
    options = server_options(binary)
    log = Path(tempfile.gettempdir()) / "tavernkeep-bench-llama-server.log"
    log.write_bytes(b"")
    makers = {side: engine_factory(FACTORIES[side]) for side in ("ours", "before")}
    skipped = [side for side, make in makers.items() if make is None]
    for side in skipped:
        print(f"11.: side '{side}' skipped: {FACTORIES[side]} cannot be imported", file=sys.stderr)
    sides = [s for s in SIDES if s not in skipped]
    requests, tried = channel_requests(args, max(args.server_channels))
    props: dict[str, Any] = {}

    def run(side: str, batch: list[GenerationRequest]) -> Burst:
        if side == "server":
            burst, props[str(len(batch))] = server_burst(binary, options, args, batch, log)
            return burst
        make = makers[side]
        assert make is not None
        engine = our_engine(args, make, len(batch)) if side == "ours" else before_engine(args, make)
        return asyncio.run(engine_burst(engine, batch))

    rows = []
    started = time.perf_counter()
    for n in args.server_channels:
        bursts: dict[str, list[Burst]] = {side: [] for side in sides}
        for r in range(args.server_rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                bursts[side].append(run(side, requests[:n]))
                print(f"11. {n} channel(s), round {r + 1}/{args.server_rounds}, {side}: "
                      f"{bursts[side][-1].tokens_per_second:.0f} tokens/s ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr)
        row: dict[str, Any] = {"channels": n}
        for side in SIDES:
            row[side] = None if side in skipped else _side_figures(bursts[side], bursts.get("before"))
        row["server_n_ctx_slot"] = props[str(n)]["default_generation_settings"]["n_ctx"]
        rows.append(row)
    return {
        "rows": rows, "rounds": args.server_rounds, "threads": args.threads, "n_ctx": args.server_n_ctx,
        "new_tokens": args.server_tokens, "prompt_tokens": [len(r.tokens) for r in requests],
        "conversations_tried": tried, "skipped": skipped, "before_workers": BEFORE_WORKERS,
        "server_command": server_command(binary, options, args, max(args.server_channels), 0)[1:],
        "server_build": next(iter(props.values())).get("build_info", "") if props else "",
    }


# ---------------------------------------------------------------------------------- report


def _ratio(row: dict[str, Any], side: str, other: str, key: str) -> float | None:
    if row[side] is None or row[other] is None or not row[other][key]:
        return None
    return float(row[side][key] / row[other][key])


def targets(result: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """The issue's targets these rows can judge: (name, met, or None when a side is missing)."""
    by_n = {row["channels"]: row for row in result["rows"]}
    out: list[tuple[str, bool | None]] = []
    for n, least in ((8, 1.2), (1, 1.0)):
        if n in by_n:
            ratio = _ratio(by_n[n], "ours", "server", "tokens_per_s")
            out.append((f"{n} channel(s): ours >= {least}x llama-server's tokens/s",
                        None if ratio is None else ratio >= least))
    for n in (1, 2):
        if n in by_n:
            ratio = _ratio(by_n[n], "ours", "before", "ttft")
            out.append((f"{n} channel(s): time to first token, ours <= before", None if ratio is None else ratio <= 1))
    return out


def report_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool | None]]:
    """Rows of bench.run's table: (figure, ours, reference, ratio, target, met)."""

    def rate(row: dict[str, Any], side: str) -> str:
        return "skipped" if row[side] is None else f"{row[side]['tokens_per_s']:.0f}"

    def ms(row: dict[str, Any], side: str) -> str:
        return "skipped" if row[side] is None else f"{row[side]['ttft'] * 1000:.0f} ms"

    def x(ratio: float | None) -> str:
        return "" if ratio is None else f"{ratio:.2f}x"

    out = []
    for row in result["rows"]:
        n = row["channels"]
        to_server = _ratio(row, "ours", "server", "tokens_per_s")
        least = {8: 1.2, 1: 1.0}.get(n)
        out.append((f"11. {n} channel(s) at once: aggregate tokens/s, ours vs llama-server -np {n}",
                    rate(row, "ours"), rate(row, "server"), x(to_server),
                    "report" if least is None else f">= {least}x",
                    None if least is None or to_server is None else to_server >= least))
        out.append((f"11. {n} channel(s): aggregate tokens/s, ours vs before ({result['before_workers']} workers)",
                    rate(row, "ours"), rate(row, "before"), x(_ratio(row, "ours", "before", "tokens_per_s")),
                    "report", None))
        to_before = _ratio(row, "ours", "before", "ttft")
        out.append((f"11. {n} channel(s): time to first token (median), ours vs before; llama-server",
                    ms(row, "ours"), f"{ms(row, 'before')}; {ms(row, 'server')}", x(to_before),
                    "<= 1.00x" if n <= 2 else "report", None if n > 2 or to_before is None else to_before <= 1))
    return out


def report_notes(result: dict[str, Any]) -> list[str]:
    """Notes under bench.run's table: how it was measured, token counts, the targets as PASS/MISS."""
    generated = "; ".join(f"{row['channels']}: " + ", ".join(f"{s} {'/'.join(map(str, row[s]['generated']))}"
                                                             for s in SIDES if row[s] is not None)
                          for row in result["rows"])
    same = ", ".join(f"{row['channels']}: {row[s]['same_text_as_before'] * 100:.0f}% {s}"
                     for row in result["rows"] for s in ("server", "ours")
                     if row[s] is not None and "same_text_as_before" in row[s])
    evaluated = ", ".join(f"{s} {min(ns)}-{max(ns)}" for s in SIDES
                          if (ns := [n for row in result["rows"] if row[s] is not None
                                     for n in row[s]["prompt_evaluated"]]))
    notes = [
        f"11.: {len(result['prompt_tokens'])} conversations of {min(result['prompt_tokens'])}-"
        f"{max(result['prompt_tokens'])} prompt tokens (of {result['conversations_tried']} tried: a conversation "
        f"whose greedy reply ends early is replaced), one warm-up turn per channel, then {result['new_tokens']} "
        f"greedy tokens per channel, all at once; {result['rounds']} rounds, ABBA, medians; every side starts "
        f"afresh for each burst. n_ctx {result['n_ctx']} per channel; {result['threads']} threads per side "
        f"(before: {result['before_workers']} workers sharing them). llama-server {result['server_build']}: "
        f"{' '.join(result['server_command'][2:])} (-np, -c per burst; slot n_ctx per /props: "
        f"{', '.join(str(row['server_n_ctx_slot']) for row in result['rows'])}); prompt tokens evaluated "
        f"per channel in a burst (the rest came from the cache): {evaluated}.",
        f"11.: tokens generated per channel by channels: {generated}; replies equal to before's: {same}.",
    ]
    if result["skipped"]:
        notes.append(f"11.: skipped (factory missing): {', '.join(result['skipped'])}.")
    notes += [f"11. {'PASS' if ok else 'MISS' if ok is not None else 'n/a'}: {name}" for name, ok in targets(result)]
    return notes
