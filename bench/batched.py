"""Experiment (benchmark 7): several channels decoded in one raw llama.cpp call (the bot: `local/batched.py`).

Each channel's prompt is evaluated into its own sequence once (not timed); then every channel
generates the same number of greedy tokens three ways, each run starting again right after the
prompts:

- one at a time: one context with all threads, one token of one channel per `llama_decode`;
- per worker: what the engine does with 2 workers, two contexts of 1 thread each, side by side;
- batched: one context with all threads, one token of every channel in each `llama_decode`.

Reported: tokens per second over all channels, and how many of the batched tokens equal the ones
generated one at a time (a batch takes other matrix kernels, so the logits may differ a little).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BATCH = 512


class _Context:
    """A raw llama.cpp context over a loaded model, with a token batch for `n_seq` sequences."""

    def __init__(self, llama_cpp: Any, model: Any, *, n_ctx: int, threads: int, n_seq: int) -> None:
        self.lib = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) entries in one call."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, index: int) -> int:
        """The greedy token after batch entry `index`."""
        logits = self.lib.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                         shape=(self.n_vocab,)).argmax())

    def load(self, prompts: Sequence[Sequence[int]], seqs: Sequence[int]) -> list[int]:
        """Evaluate each prompt into its sequence of an empty cache; return each one's greedy first token."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        first = []
        for prompt, seq in zip(prompts, seqs, strict=True):
            for start in range(0, len(prompt), N_BATCH):
                chunk = prompt[start : start + N_BATCH]
                self.decode([(t, start + i, seq, start + i == len(prompt) - 1) for i, t in enumerate(chunk)])
            first.append(self.argmax((len(prompt) - 1) % N_BATCH))  # its last token, in the last chunk
        return first

    def rewind(self, lengths: Sequence[int], seqs: Sequence[int]) -> None:
        """Drop what was generated after each sequence's prompt."""
        memory = self.lib.llama_get_memory(self.ctx)
        for length, seq in zip(lengths, seqs, strict=True):
            self.lib.llama_memory_seq_rm(memory, seq, length, -1)

    def close(self) -> None:
        """Free the batch and the context."""
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)


@dataclass(frozen=True)
class _Loaded:
    """A context with some channels' prompts evaluated: their sequences, lengths and first tokens."""

    ctx: _Context
    seqs: list[int]
    lengths: list[int]
    firsts: list[int]

    @classmethod
    def on(cls, ctx: _Context, prompts: Sequence[Sequence[int]]) -> _Loaded:
        """Evaluate `prompts` into sequences 0, 1, ... of `ctx`."""
        seqs = list(range(len(prompts)))
        return cls(ctx, seqs, [len(p) for p in prompts], ctx.load(prompts, seqs))


def _one_at_a_time(loaded: _Loaded, count: int) -> tuple[float, list[list[int]]]:
    """Greedy `count` tokens per sequence, one token of one sequence per call; (seconds, tokens)."""
    ctx = loaded.ctx
    ctx.rewind(loaded.lengths, loaded.seqs)
    outputs: list[list[int]] = []
    begin = time.perf_counter()
    for seq, length, token in zip(loaded.seqs, loaded.lengths, loaded.firsts, strict=True):
        out = [token]
        for step in range(count - 1):
            ctx.decode([(out[-1], length + step, seq, True)])
            out.append(ctx.argmax(0))
        outputs.append(out)
    return time.perf_counter() - begin, outputs


def _batched(loaded: _Loaded, count: int) -> tuple[float, list[list[int]]]:
    """Greedy `count` tokens per sequence, one token of every sequence per call; (seconds, tokens)."""
    ctx = loaded.ctx
    ctx.rewind(loaded.lengths, loaded.seqs)
    outputs = [[token] for token in loaded.firsts]
    begin = time.perf_counter()
    for step in range(count - 1):
        ctx.decode([(out[-1], length + step, seq, True)
                    for seq, length, out in zip(loaded.seqs, loaded.lengths, outputs, strict=True)])
        for i, out in enumerate(outputs):
            out.append(ctx.argmax(i))
    return time.perf_counter() - begin, outputs


def _per_worker(workers: Sequence[_Loaded], count: int) -> tuple[float, list[list[int]]]:
    """Each worker's channels one at a time, the workers on threads of their own, side by side;
    (seconds of the slowest, tokens in channel order: channel i is worker i % workers' i // workers)."""
    results: list[tuple[float, list[list[int]]]] = [(0.0, [])] * len(workers)
    failures: list[BaseException] = []
    ready = threading.Barrier(len(workers))

    def work(w: int) -> None:
        ready.wait()
        try:
            results[w] = _one_at_a_time(workers[w], count)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    total = sum(len(outs) for _, outs in results)
    outputs = [results[i % len(workers)][1][i // len(workers)] for i in range(total)]
    return max(seconds for seconds, _ in results), outputs


def bench_batched(model_path: str, prompts: Sequence[Sequence[int]], *, threads: int, count: int,
                  reps: int) -> dict[str, Any]:
    """Tokens/s over all channels: batched vs one at a time vs 2 workers (best of `reps`, ABBA order)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    n = len(prompts)
    n_ctx = n * (max(map(len, prompts)) + count + 16)
    contexts: list[_Context] = []
    best = {"one_at_a_time": float("inf"), "per_worker": float("inf"), "batched": float("inf")}
    outputs: dict[str, list[list[int]]] = {}
    try:
        contexts.append(_Context(llama_cpp, model, n_ctx=n_ctx, threads=threads, n_seq=n))
        contexts += [_Context(llama_cpp, model, n_ctx=n_ctx, threads=1, n_seq=(n + 1) // 2) for _ in range(2)]
        together = _Loaded.on(contexts[0], prompts)
        workers = [_Loaded.on(ctx, prompts[w::2]) for w, ctx in enumerate(contexts[1:])]
        sides = [("one_at_a_time", lambda: _one_at_a_time(together, count)),
                 ("per_worker", lambda: _per_worker(workers, count)),
                 ("batched", lambda: _batched(together, count))]
        for rep in range(reps):
            for name, run in sides if rep % 2 == 0 else sides[::-1]:
                seconds, outputs[name] = run()
                best[name] = min(best[name], seconds)
    finally:
        for ctx in contexts:
            ctx.close()
        llama_cpp.llama_model_free(model)
    generated = n * (count - 1)  # the first token of each channel comes from its prompt
    rates = {name: generated / seconds for name, seconds in best.items()}
    same = sum(a == b for x, y in zip(outputs["batched"], outputs["one_at_a_time"], strict=True)
               for a, b in zip(x, y, strict=True))
    return {
        "channels": n, "tokens_per_channel": count, "threads": threads, "reps": reps,
        "prompt_tokens": [len(p) for p in prompts],
        **{f"{name}_tokens_per_s": rate for name, rate in rates.items()},
        "batched_vs_one_at_a_time": rates["batched"] / rates["one_at_a_time"],
        "batched_vs_per_worker": rates["batched"] / rates["per_worker"],
        "same_tokens": same / (n * count),
    }
