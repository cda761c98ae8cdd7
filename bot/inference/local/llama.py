"""The llama.cpp backend: one `llama_cpp.Llama` context, used only from its worker thread."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from bot.config import CacheSettings, ModelSettings, Settings
from bot.inference.api import Sampling
from bot.inference.engine import Engine
from bot.inference.local.state_cache import StateCache, os_buffer
from bot.inference.window import common_prefix

log = logging.getLogger(__name__)

KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
_SEQ = 0  # llama-cpp-python keeps the whole context in sequence 0
_BYTE_POINTER = ctypes.POINTER(ctypes.c_uint8)


# Tokens per llama.cpp batch. The compute buffer grows with it (its worst case holds logits for
# every token of a batch: n_batch x n_vocab floats); on CPU, prompt speed is the same from about
# 128 tokens up, so 256 keeps each worker about 40 MiB smaller than llama-cpp-python's 512.
N_BATCH = 256


def threads_per_worker(settings: ModelSettings) -> int:
    """CPU threads each worker's context computes with: the setting, else the cores shared out."""
    return settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)


def llama_params(model_path: str, settings: ModelSettings, *, n_batch: int = N_BATCH) -> dict[str, Any]:
    """Keyword arguments of the `llama_cpp.Llama` each worker runs (also for side-by-side baselines)."""
    import llama_cpp

    threads = threads_per_worker(settings)
    kv_type = getattr(llama_cpp, KV_TYPES[settings.kv_type])
    return {
        "model_path": model_path,
        "n_ctx": settings.n_ctx,
        "n_batch": n_batch,
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": settings.gpu_layers,
        "seed": settings.seed if settings.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
        "type_k": kv_type,
        "type_v": kv_type,
        "flash_attn": settings.flash_attn,
        "verbose": False,
    }


def sequence_state(lib: Any, ctx: Any, seq: int) -> memoryview:
    """llama.cpp's state of sequence `seq` of `ctx` (its KV cache), as a read-only buffer.

    The state is tens of megabytes. llama.cpp copies it straight into pages mapped for it
    (`os_buffer`) while the GIL is released: zeroing a ctypes array and copying it into `bytes`
    would hold the GIL for tens of milliseconds and stall the event loop, and states taken from
    the heap would leave it fragmented as they come and go.
    """
    size = lib.llama_state_seq_get_size(ctx, seq)
    buffer = os_buffer(size)
    target = (ctypes.c_uint8 * size).from_buffer(buffer)
    written = lib.llama_state_seq_get_data(ctx, target, size, seq)
    del target  # the buffer stays alive through the returned view only
    if written == 0 or written > size:
        raise RuntimeError("llama.cpp could not copy the sequence state")
    return memoryview(buffer)[:written].toreadonly()


def load_sequence_state(lib: Any, ctx: Any, seq: int, data: bytes | memoryview) -> bool:
    """Load a state from `sequence_state` into sequence `seq` (emptied first); False if llama.cpp refused it."""
    source = np.frombuffer(data, dtype=np.uint8)  # no copy: llama.cpp only reads it
    return lib.llama_state_seq_set_data(ctx, source.ctypes.data_as(_BYTE_POINTER), source.size, seq) != 0


class LlamaBackend:
    """A llama.cpp context over a memory-mapped GGUF (weights are shared between workers by mmap)."""

    def __init__(
        self,
        model_path: str,
        settings: ModelSettings,
        *,
        cache: StateCache | None = None,
        cache_settings: CacheSettings | None = None,
        n_batch: int = N_BATCH,
    ) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(**llama_params(model_path, settings, n_batch=n_batch))
        self.tokenizer = self.llm
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab
        cache_settings = cache_settings or CacheSettings()
        self.cache = cache
        self.key: str | None = None
        memory = llama_cpp.llama_get_memory(self.llm._ctx.ctx)
        self.can_shift = bool(memory is not None and llama_cpp.llama_memory_can_shift(memory))
        self.context_shift = cache_settings.context_shift and self.can_shift
        self.trim_fraction = cache_settings.trim_fraction
        # llama.cpp asks this between the steps of a decode (per graph node on the CPU) and
        # abandons the decode when it returns true: a cancel or time limit then takes effect
        # inside a prompt evaluation of tens of seconds. The ctypes callback must outlive the context.
        self._stop: Callable[[], bool] | None = None
        self._abort = llama_cpp.ggml_abort_callback(self._should_abort)
        llama_cpp.llama_set_abort_callback(self.llm._ctx.ctx, self._abort, None)

    def _should_abort(self, _data: object) -> bool:
        stop = self._stop
        return bool(stop is not None and stop())

    # ---------------------------------------------------------------- KV-cache reuse

    def live_tokens(self) -> list[int]:
        """Tokens whose keys and values the context holds now."""
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    def cached_tokens(self, key: str) -> Sequence[int]:
        """Tokens of the KV cache a request of `key` starts from: its saved state, else the live one."""
        if self.key != key and self.cache is not None:
            saved = self.cache.tokens(key)
            if saved is not None:
                return saved
        return self.live_tokens()

    def prepare(self, key: str, prompt: list[int], *, head: int = 0, slide: int = 0) -> int:
        """Make the context hold `key` (saving the previous channel's state); return reused prompt tokens."""
        if self.key != key:
            self.save_current()
            self.key = key
            saved = self.cache.take(key) if self.cache is not None else None
            if saved is not None and (slide or common_prefix(saved.tokens, prompt) > common_prefix(
                self.live_tokens(), prompt
            )):
                self.restore(saved.tokens, saved.data)
            elif slide:
                slide = 0  # planned against a state that is gone: evaluate normally
        if slide:
            self.shift(head, slide)
        return self.reusable(prompt)

    def reusable(self, prompt: Sequence[int]) -> int:
        """Prompt tokens `Llama.generate` will not evaluate again (mirrors its prefix check)."""
        llm = self.llm
        if llm.n_tokens == 0:
            return 0
        common = common_prefix(self.live_tokens(), prompt)
        if common < len(prompt):
            return common
        if llm.n_tokens == len(prompt) and not llm._requires_eval:
            return common
        return common - 1  # one token is replayed to get fresh logits

    def save_current(self) -> None:
        """Save the channel this context holds into the shared cache (per-sequence state)."""
        if self.cache is None or self.key is None or self.llm.n_tokens == 0:
            return
        self.cache.put(self.key, self.live_tokens(), self.state_bytes())

    def state_bytes(self) -> memoryview:
        """llama.cpp's state of sequence 0 (the KV cache of the live tokens), as a read-only buffer."""
        return sequence_state(self._llama_cpp, self.llm._ctx.ctx, _SEQ)

    def restore(self, tokens: Sequence[int], data: bytes | memoryview) -> None:
        """Load a state saved by `state_bytes` for `tokens`; on failure the context starts empty."""
        lib, llm = self._llama_cpp, self.llm
        llm._ctx.kv_cache_seq_rm(_SEQ, 0, -1)
        if not load_sequence_state(lib, llm._ctx.ctx, _SEQ, data):
            log.warning("could not restore a saved state of %d tokens; evaluating in full", len(tokens))
            llm._ctx.kv_cache_seq_rm(_SEQ, 0, -1)
            llm.n_tokens = 0
        else:
            llm.input_ids[: len(tokens)] = tokens
            llm.n_tokens = len(tokens)
        llm._requires_eval = True  # the logits are not part of the state

    def shift(self, head: int, count: int) -> None:
        """Drop `count` cached tokens after the first `head` and move the rest down (context shift)."""
        lib, llm = self._llama_cpp, self.llm
        end = llm.n_tokens
        if not self.can_shift or count <= 0 or head + count > end:
            return
        memory = lib.llama_get_memory(llm._ctx.ctx)
        lib.llama_memory_seq_rm(memory, _SEQ, head, head + count)
        lib.llama_memory_seq_add(memory, _SEQ, head + count, end, -count)
        llm.input_ids[head : end - count] = llm.input_ids[head + count : end].copy()
        llm.n_tokens = end - count
        llm._requires_eval = True

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        """Yield sampled tokens; llama-cpp-python reuses the longest cached prefix of `prompt`.

        When `stop()` turns true during a decode, llama.cpp abandons it (`llama_decode` returns 2) and
        the iteration ends; the context then holds only the batches evaluated in full.
        """
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        self._stop = stop
        try:
            yield from self.llm.generate(
                prompt,
                temp=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repeat_penalty=sampling.repeat_penalty,
            )
        except RuntimeError:
            if not stop():
                raise
            self.drop_unfinished()
        finally:
            self._stop = None

    def drop_unfinished(self) -> None:
        """After an abandoned decode: forget the KV cells past the tokens llama-cpp-python counts as evaluated.

        `Llama.eval` counts a batch only once its decode succeeds, while llama.cpp may keep the
        micro-batches it finished before the abort. Saving the state now would carry them along.
        """
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(_SEQ, llm.n_tokens, -1)
        llm._requires_eval = True  # the logits belong to whatever ran last

    def piece(self, token: int) -> bytes:
        """Bytes of one token."""
        return self.llm.detokenize([token])

    def is_end(self, token: int) -> bool:
        """End-of-generation tokens as the model's vocabulary defines them."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        """Free the context and model."""
        self.llm.close()


def state_cache(settings: CacheSettings) -> StateCache:
    """The saved-state cache the workers of one engine share; budgets of -1 are sized from the machine."""
    from bot.inference.local import state_cache as states

    disk_dir = settings.disk_dir or states.default_states_dir()
    return StateCache(settings.ram_bytes, disk_dir if settings.disk_bytes else None, settings.disk_bytes)


def llama_engine(settings: Settings, model_path: str, cache: StateCache | None = None) -> Engine:
    """An unstarted Engine whose workers each own a LlamaBackend over `model_path`."""
    shared = cache if cache is not None else state_cache(settings.cache)
    workers, threads, cores = settings.model.workers, threads_per_worker(settings.model), os.cpu_count() or 1
    if workers * threads > cores:
        # Each worker's threads wait for each other at every step of a token; with more threads
        # than cores they wait for the scheduler too (and libgomp stops spin-waiting for them).
        log.warning("model.workers x model.threads = %d x %d = %d threads on %d cores: replies will be slower "
                    "than with at most one thread per core (model.threads = 0 shares the cores out)",
                    workers, threads, workers * threads, cores)
    return Engine(
        lambda: LlamaBackend(model_path, settings.model, cache=shared, cache_settings=settings.cache),
        workers=settings.model.workers,
        queue_size=settings.engine.queue_size,
        per_key_queue=settings.engine.per_channel_queue,
        model_name=os.path.basename(model_path),
    )
