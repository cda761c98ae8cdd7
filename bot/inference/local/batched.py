"""Continuous batching: the model loaded once, one llama.cpp context whose sequences serve the channels.

A decode thread owns the context. Each step it decodes the next token of every generating sequence
plus prompt chunks of sequences starting a reply, up to `n_batch` tokens, in one `llama_decode`
(llama.cpp's server does the same in `update_slots`), then samples each sequence's token with its
own sampler chain. The Engine sees one `SequenceBackend` per sequence, each on its own worker thread:
fairness, queues, stop strings, cancellation and statistics stay the Engine's, while the heavy work
of all sequences runs in shared decodes. Everything that touches the context (saving and restoring
states, trimming, the context shift) runs on the decode thread between decodes; reading and writing
the state cache runs on the worker threads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from bot.config import CacheSettings, ModelSettings, Settings
from bot.inference.api import Sampling
from bot.inference.engine import Engine
from bot.inference.local.llama import KV_TYPES, N_BATCH, load_sequence_state, sequence_state, state_cache
from bot.inference.local.state_cache import SavedState, StateCache, worth_restoring
from bot.inference.window import common_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")
# Tokens of the prompt fed to a sequence's repetition penalty, as llama-cpp-python's default.
PENALTY_LAST_N = 64
_END = object()


class Vocabulary:
    """The model's vocabulary with the `Tokenizer` interface of `llama_cpp.Llama` (read-only, any thread)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`."""
        return list(self._model.tokenize(text, add_bos, special))

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """Bytes of `tokens`."""
        return bytes(self._model.detokenize(tokens, special=special))

    def token_bos(self) -> int:
        """The beginning-of-sequence token."""
        return int(self._model.token_bos())

    def token_eos(self) -> int:
        """The end-of-sequence token."""
        return int(self._model.token_eos())

    def n_vocab(self) -> int:
        """Number of tokens."""
        return int(self._model.n_vocab())


@dataclass(eq=False)
class _Reply:
    """One reply being generated in a sequence (touched only on the decode thread, but for `out`)."""

    prompt: list[int]
    sampler: Any
    stop: Callable[[], bool]
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    evaluated: int = 0  # prompt tokens in the sequence
    next_token: int | None = None  # sampled, not yet decoded
    ended: bool = False

    def finish(self, item: Any = _END) -> None:
        if not self.ended:
            self.ended = True
            self.out.put(item)


class SharedContext:
    """The model, one context of `sequences` sequences, and the decode thread that owns them."""

    def __init__(self, model_path: str, settings: ModelSettings, sequences: int, *, cache: StateCache | None,
                 cache_settings: CacheSettings, n_batch: int = N_BATCH, own_cache: bool = False) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose  # llama.cpp's log callback, as `Llama(verbose=False)` sets it

        set_verbose(False)
        llama_cpp.llama_backend_init()
        self.lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if settings.gpu_layers == -1 else settings.gpu_layers
        self.model = LlamaModel(path_model=model_path, params=params, verbose=False)
        self.vocabulary = Vocabulary(self.model)
        self.n_vocab = self.vocabulary.n_vocab()
        self.n_ctx = settings.n_ctx  # per sequence
        self.n_batch = n_batch
        self.sequences = sequences
        self.threads = settings.threads or os.cpu_count() or 1
        self.seed = settings.seed if settings.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = settings.n_ctx * sequences
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = sequences
        # One KV stream per sequence: attention then skips the other channels' cells (faster when
        # the sequences share no prefix, which is the rule for channels).
        ctx_params.kv_unified = False
        ctx_params.n_threads = ctx_params.n_threads_batch = self.threads
        ctx_params.type_k = ctx_params.type_v = getattr(llama_cpp, KV_TYPES[settings.kv_type])
        ctx_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx_params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, ctx_params)
        if not self.ctx:
            self.model.close()
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.memory))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.cache = cache
        self.own_cache = own_cache  # closed (its disk tier removed) with the model
        self.cache_settings = cache_settings
        # Prompt evaluation speed measured here, for choosing between restoring a state and evaluating.
        self.prompt_tokens = 0
        self.prompt_seconds = 0.0
        self._in_batch: list[SequenceBackend] = []
        # llama.cpp calls the abort callback before every graph node (about 600 per decode of the demo
        # model), each call taking the GIL: it is set only for decodes that evaluate prompt tokens,
        # which may run for seconds. A decode of next tokens alone is one step; stops wait for its end.
        self._abort = llama_cpp.ggml_abort_callback(self._should_abort)
        self._no_abort = llama_cpp.ggml_abort_callback(0)
        self._abort_set = False
        self.slots = [SequenceBackend(self, seq) for seq in range(sequences)]
        self._handed_out = 0
        self.switching = threading.Lock()
        self._open = sequences
        self._tasks: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._active: list[SequenceBackend] = []
        self._turn = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tavernkeep-decode", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- used from worker threads

    def sequence(self) -> SequenceBackend:
        """The next sequence not handed out yet (one per Engine worker)."""
        slot = self.slots[self._handed_out]
        self._handed_out += 1
        return slot

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the decode thread between two decodes and return its result."""
        future: Future[T] = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the model is closed")
            self._tasks.append((fn, future))
            self._wake.notify()
        return future.result()

    def release(self) -> None:
        """A sequence's Engine worker is done with it; the last one closes the model."""
        with self._wake:
            self._open -= 1
            if self._open > 0:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for slot in self.slots:
            slot.free_sampler()
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.model.close()
        if self.own_cache and self.cache is not None:
            self.cache.close()

    # ---------------------------------------------------------------- the decode thread

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._tasks and not self._active and not self._closed:
                    self._wake.wait()
                if self._closed:
                    closed = RuntimeError("the model is closed")
                    for _, future in self._tasks:
                        future.set_exception(closed)
                    for slot in list(self._active):
                        self._end(slot, closed)
                    return
                tasks, self._tasks = self._tasks, []
            for fn, future in tasks:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the waiting worker thread
                    future.set_exception(exc)
            if self._active:
                try:
                    self._step()
                except Exception as exc:
                    log.exception("batched decode failed")
                    for slot in list(self._active):
                        self._drop_uncommitted(slot)
                        self._end(slot, exc)

    def start(self, slot: SequenceBackend, reply: _Reply) -> None:
        """Begin generating `reply` in `slot` (decode thread)."""
        slot.reply = reply
        self._active.append(slot)

    def _end(self, slot: SequenceBackend, item: Any = _END) -> None:
        if slot.reply is not None:
            slot.reply.finish(item)
        if slot in self._active:
            self._active.remove(slot)

    def stop_reply(self, slot: SequenceBackend) -> None:
        """Stop `slot`'s reply (decode thread): its worker no longer reads it."""
        self._end(slot)
        slot.reply = None

    def _step(self) -> None:
        """One decode over every active sequence: next tokens first, then prompt chunks in turn."""
        entries: list[tuple[int, int, SequenceBackend, bool]] = []
        prompting: list[SequenceBackend] = []
        for slot in list(self._active):
            reply = slot.reply
            assert reply is not None
            if reply.stop():
                self._end(slot)
            elif reply.next_token is not None:
                entries.append((reply.next_token, len(slot.held), slot, True))
            elif reply.evaluated < len(reply.prompt):
                prompting.append(slot)
        room = self.n_batch - len(entries)
        if prompting:
            self._turn = (self._turn + 1) % len(prompting)
            for slot in prompting[self._turn:] + prompting[: self._turn]:
                if room <= 0:
                    break
                reply = slot.reply
                assert reply is not None
                take = min(room, len(reply.prompt) - reply.evaluated)
                base = len(slot.held)
                last = reply.evaluated + take == len(reply.prompt)
                for i in range(take):
                    entries.append((reply.prompt[reply.evaluated + i], base + i, slot, last and i == take - 1))
                room -= take
        if entries:
            # With a KV stream per sequence llama.cpp puts sequences in one micro-batch only in
            # order of consecutive ids (`split_equal`): sorted, all active sequences decode together.
            entries.sort(key=lambda entry: (entry[2].seq, entry[1]))
            self._decode(entries)

    def _decode(self, entries: list[tuple[int, int, SequenceBackend, bool]]) -> None:
        """Decode `entries` in as few calls as fit: a call that finds no room in the KV cache is halved."""
        size, start = len(entries), 0
        while start < len(entries):
            part = entries[start : start + size]
            prompt_tokens = sum(1 for _, _, slot, _ in part if slot.reply and slot.reply.next_token is None)
            if (prompt_tokens > 0) != self._abort_set:
                self._abort_set = prompt_tokens > 0
                self.lib.llama_set_abort_callback(self.ctx, self._abort if self._abort_set else self._no_abort, None)
            begin = time.perf_counter()
            result = self._decode_once(part)
            if result == 1 and size > 1:
                size //= 2  # llama.cpp's server does the same when a batch finds no free cells
                continue
            if result == 0:
                if prompt_tokens >= 32:
                    self.prompt_tokens += prompt_tokens
                    self.prompt_seconds += time.perf_counter() - begin
                self._commit(part)
                start += size
                continue
            slots = {slot for _, _, slot, _ in part}
            for slot in slots:
                self._drop_uncommitted(slot)
            if result == 2:  # aborted: every sequence in the batch was stopping
                for slot in slots:
                    self._end(slot)
                return
            if result == 1:  # no room even for one token: the sequence is full
                for slot in slots:
                    self._end(slot)
                start += size
                continue
            raise RuntimeError(f"llama_decode failed ({result})")

    def _decode_once(self, part: Sequence[tuple[int, int, SequenceBackend, bool]]) -> int:
        batch = self.batch
        for i, (token, pos, slot, logits) in enumerate(part):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq
            batch.logits[i] = logits
        batch.n_tokens = len(part)
        self._in_batch = list({slot for _, _, slot, _ in part})
        try:
            return int(self.lib.llama_decode(self.ctx, batch))
        finally:
            self._in_batch = []

    def _commit(self, part: Sequence[tuple[int, int, SequenceBackend, bool]]) -> None:
        for index, (token, _, slot, logits) in enumerate(part):
            reply = slot.reply
            slot.held.append(token)
            if reply is None or reply.ended:
                continue
            if reply.next_token is not None:
                reply.next_token = None
            else:
                reply.evaluated += 1
            if logits:
                sampled = int(self.lib.llama_sampler_sample(reply.sampler, self.ctx, index))
                reply.out.put(sampled)
                if self.lib.llama_vocab_is_eog(self.model.vocab, sampled):
                    self._end(slot)  # nothing more to decode; the reader ends at the token itself
                else:
                    reply.next_token = sampled

    def _drop_uncommitted(self, slot: SequenceBackend) -> None:
        """Forget KV cells past the tokens the sequence counts (left by a failed or aborted decode)."""
        self.lib.llama_memory_seq_rm(self.memory, slot.seq, len(slot.held), -1)

    def _should_abort(self, _data: object) -> bool:
        batch = self._in_batch
        return bool(batch) and all(slot.reply is not None and slot.reply.stop() for slot in batch)

    def prompt_speed(self) -> float | None:
        """Prompt tokens evaluated per second, as measured on this context so far."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else None

    # ---------------------------------------------------------------- sequence operations (decode thread)

    def sampler(self, sampling: Sampling, prompt: Sequence[int]) -> Any:
        """A sampler chain for one reply, as llama-cpp-python builds it, fed the prompt's last tokens."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lib.llama_sampler_chain_add
        add(chain, lib.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0))
        if sampling.temperature <= 0:
            add(chain, lib.llama_sampler_init_greedy())
        else:
            add(chain, lib.llama_sampler_init_top_k(sampling.top_k))
            add(chain, lib.llama_sampler_init_top_p(sampling.top_p, 1))
            add(chain, lib.llama_sampler_init_min_p(sampling.min_p, 1))
            add(chain, lib.llama_sampler_init_temp(sampling.temperature))
            seed = sampling.seed if sampling.seed is not None else self.seed
            add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for token in prompt[-PENALTY_LAST_N:]:
            lib.llama_sampler_accept(chain, token)
        return chain

    def next_logits(self, slot: SequenceBackend, prompt: Sequence[int]) -> np.ndarray:
        """Evaluate what `slot`'s sequence lacks of `prompt` and return a copy of the next token's logits."""
        self.trim(slot, min(common_prefix(slot.held, prompt), len(prompt) - 1))
        for start in range(len(slot.held), len(prompt), self.n_batch):
            chunk = prompt[start : start + self.n_batch]
            part = [(t, start + i, slot, start + i == len(prompt) - 1) for i, t in enumerate(chunk)]
            if self._decode_once(part) != 0:
                self._drop_uncommitted(slot)
                raise RuntimeError("llama_decode failed")
            slot.held.extend(chunk)
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)  # the last output: the prompt's last token
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def trim(self, slot: SequenceBackend, keep: int) -> None:
        """Keep only the first `keep` tokens of `slot`'s sequence."""
        if keep < len(slot.held):
            self.lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1)
            del slot.held[keep:]

    def state_bytes(self, slot: SequenceBackend) -> memoryview:
        """llama.cpp's state of `slot`'s sequence, as a read-only buffer."""
        return sequence_state(self.lib, self.ctx, slot.seq)

    def restore(self, slot: SequenceBackend, saved: SavedState) -> None:
        """Load a saved state into `slot`'s sequence; on failure the sequence starts empty."""
        self.lib.llama_memory_seq_rm(self.memory, slot.seq, 0, -1)
        begin = time.perf_counter()
        loaded = load_sequence_state(self.lib, self.ctx, slot.seq, saved.data)
        if self.cache is not None:
            self.cache.record_load(memoryview(saved.data).nbytes, time.perf_counter() - begin)
        if not loaded:
            log.warning("could not restore a saved state of %d tokens; evaluating in full", len(saved.tokens))
            self.lib.llama_memory_seq_rm(self.memory, slot.seq, 0, -1)
            slot.held = []
        else:
            slot.held = list(saved.tokens)

    def shift(self, slot: SequenceBackend, head: int, count: int) -> None:
        """Drop `count` cached tokens after the first `head` of `slot` and move the rest down."""
        end = len(slot.held)
        if not self.can_shift or count <= 0 or head + count > end:
            return
        self.lib.llama_memory_seq_rm(self.memory, slot.seq, head, head + count)
        self.lib.llama_memory_seq_add(self.memory, slot.seq, head + count, end, -count)
        del slot.held[head : head + count]


class SequenceBackend:
    """One sequence of a SharedContext, as the Engine's backend for one worker (a ReusingBackend)."""

    def __init__(self, shared: SharedContext, seq: int) -> None:
        self.shared = shared
        self.seq = seq
        self.tokenizer = shared.vocabulary
        self.n_ctx = shared.n_ctx
        self.cache = shared.cache
        self.context_shift = shared.cache_settings.context_shift and shared.can_shift
        self.trim_fraction = shared.cache_settings.trim_fraction
        self.key: str | None = None
        self.held: list[int] = []  # tokens whose KV the sequence holds; changed on the decode thread only
        self.reply: _Reply | None = None
        self._sampler: Any = None

    @property
    def can_shift(self) -> bool:
        """Whether the model's KV cache can move tokens (the context shift)."""
        return self.shared.can_shift

    def live_tokens(self) -> list[int]:
        """Tokens whose keys and values the sequence holds now."""
        return list(self.held)

    def reset(self) -> None:
        """Empty the sequence (its channel's state is not saved)."""
        self.shared.call(lambda: self.shared.trim(self, 0))

    def _holder(self, key: str) -> SequenceBackend | None:
        """Another sequence whose worker still holds `key` live (it has not switched away yet)."""
        return next((s for s in self.shared.slots if s is not self and s.key == key), None)

    def cached_tokens(self, key: str) -> Sequence[int]:
        """Tokens of the KV cache a request of `key` starts from: its saved state, else the live one."""
        if self.key != key:
            holder = self._holder(key)
            saved = holder.held if holder is not None else self.cache.tokens(key) if self.cache is not None else None
            if saved is not None:
                return saved
        return self.held

    def prepare(self, key: str, prompt: list[int], *, head: int = 0, slide: int = 0) -> int:
        """Make the sequence hold `key` (saving the previous channel's state); return reused prompt tokens."""
        shared = self.shared
        if self.key != key:
            # One switch at a time: a channel whose state another sequence still holds live (its
            # worker has not switched yet) is copied from there instead of missing the cache.
            with shared.switching:
                self.save_current()
                self.key = key
                holder = self._holder(key)
                if holder is not None:
                    holder.key = None  # its worker will not save this channel again
                    saved = shared.call(lambda: SavedState(tuple(holder.held), shared.state_bytes(holder)))
                else:
                    saved = self._take_if_worth_it(key, prompt)
            if saved is not None and (slide or common_prefix(saved.tokens, prompt) > common_prefix(
                self.held, prompt
            )):
                shared.call(lambda: shared.restore(self, saved))
            elif slide:
                slide = 0  # planned against a state that is gone: evaluate normally
        if slide:
            shared.call(lambda: shared.shift(self, head, slide))
        # The reply starts by trimming the sequence to this (`tokens`); its last token gives fresh logits.
        return min(common_prefix(self.held, prompt), len(prompt) - 1)

    def _take_if_worth_it(self, key: str, prompt: list[int]) -> SavedState | None:
        """`key`'s saved state, if reading it back is quicker than evaluating what it holds of `prompt`."""
        if self.cache is None:
            return None
        tokens = self.cache.tokens(key)
        if tokens is None:
            return None
        saves = common_prefix(tokens, prompt) - common_prefix(self.held, prompt)
        seconds = self.cache.restore_seconds(key)
        if seconds is None:
            return None
        if not worth_restoring(seconds, saves, self.shared.prompt_speed() or 0.0):
            self.cache.discard(key)  # this turn makes it stale anyway
            return None
        return self.cache.take(key)

    def next_logits(self, prompt: list[int]) -> np.ndarray:
        """The logits after `prompt`, evaluating what the sequence does not hold yet (for checks and benchmarks)."""
        return self.shared.call(lambda: self.shared.next_logits(self, prompt))

    def save_current(self) -> None:
        """Save the channel this sequence holds into the shared cache (copied on the decode thread)."""
        if self.cache is None or self.key is None or not self.held:
            return
        tokens, data = self.shared.call(lambda: (list(self.held), self.shared.state_bytes(self)))
        self.cache.put(self.key, tokens, data)

    def state_bytes(self) -> memoryview:
        """llama.cpp's state of this sequence."""
        return self.shared.call(lambda: self.shared.state_bytes(self))

    def restore(self, tokens: Sequence[int], data: bytes | memoryview) -> None:
        """Load a state saved by `state_bytes` for `tokens`."""
        saved = SavedState(tuple(tokens), data)
        self.shared.call(lambda: self.shared.restore(self, saved))

    def tokens_for(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> _Reply:
        """Start a reply on the decode thread (the prompt's reused part is already in the sequence)."""
        shared = self.shared

        def begin() -> _Reply:
            shared.trim(self, min(common_prefix(self.held, prompt), len(prompt) - 1))
            self.free_sampler()
            self._sampler = shared.sampler(sampling, prompt)
            reply = _Reply(prompt, self._sampler, stop, evaluated=len(self.held))
            shared.start(self, reply)
            return reply

        return shared.call(begin)

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        """Yield sampled tokens as the shared decodes produce them; end when `stop()` turns true."""
        reply = self.tokens_for(prompt, sampling, stop)
        try:
            while True:
                item = reply.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError("generation failed in the shared context") from item
                yield item
        finally:
            self.shared.call(lambda: self.shared.stop_reply(self))

    def free_sampler(self) -> None:
        """Free the last reply's sampler chain (decode thread, or after it ended)."""
        if self._sampler is not None:
            self.shared.lib.llama_sampler_free(self._sampler)
            self._sampler = None

    def piece(self, token: int) -> bytes:
        """Bytes of one token."""
        return self.tokenizer.detokenize([token])

    def is_end(self, token: int) -> bool:
        """End-of-generation tokens as the model's vocabulary defines them."""
        return bool(self.shared.lib.llama_vocab_is_eog(self.shared.model.vocab, token))

    def close(self) -> None:
        """Give the sequence back; the last one frees the context and the model."""
        self.shared.release()


class _Sequences:
    """Hands one sequence of a lazily built SharedContext to each Engine worker."""

    def __init__(self, build: Callable[[], SharedContext]) -> None:
        self._build = build
        self._shared: SharedContext | None = None
        self._lock = threading.Lock()

    def __call__(self) -> SequenceBackend:
        with self._lock:
            if self._shared is None:
                self._shared = self._build()
            return self._shared.sequence()


def batched_engine(settings: Settings, model_path: str, cache: StateCache | None = None) -> Engine:
    """An unstarted Engine over one model and one batched context of `model.workers` sequences."""
    own = cache is None
    shared_cache = state_cache(settings.cache) if cache is None else cache
    sequences = settings.model.workers
    return Engine(
        _Sequences(lambda: SharedContext(model_path, settings.model, sequences, cache=shared_cache,
                                         cache_settings=settings.cache, own_cache=own)),
        workers=sequences,
        queue_size=settings.engine.queue_size,
        per_key_queue=settings.engine.per_channel_queue,
        model_name=os.path.basename(model_path),
    )
