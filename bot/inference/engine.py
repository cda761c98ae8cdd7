"""The fair scheduler: worker threads, each owning one model context, behind a fair asyncio queue.

The event loop never runs model code. Each worker has a single-thread executor, so a context is only
ever used from its own thread. Requests (`bot.inference.api`) carry a key (the channel): one request
per key runs at a time, keys take turns round-robin, and the wait is bounded in total and per key.
Cancellation and time limits are checked between tokens and handed to the backend, which may stop
inside a long step (llama.cpp's abort callback stops a prompt evaluation part-way).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from bot.errors import ChannelQueueFull, EngineClosed, GenerationFailed, QueueFull, TavernError
from bot.inference.api import (
    WAIT_TOKEN,
    Backend,
    Chunk,
    Finished,
    GenerationRequest,
    GenerationStats,
    Queued,
    ReusingBackend,
    Started,
    StopReason,
    Text,
    Tokenizer,
    Waiting,
)
from bot.inference.stops import StopScanner
from bot.inference.window import fit_window

log = logging.getLogger(__name__)

T = TypeVar("T")
# How long `Engine.close` waits, after the grace, for cancelled generations to stop. Backends stop
# within one step of work (a token, or a slice of prompt evaluation through llama.cpp's abort
# callback); a worker still busy after this is left behind and its model is not freed.
CLOSE_STOP_SECONDS = 5.0


def run_generation(
    backend: Backend,
    request: GenerationRequest,
    cancel: threading.Event,
    emit: Callable[[Chunk], None],
    worker: int = 0,
) -> GenerationStats:
    """Choose the request's window and generate one reply on the calling thread, emitting chunks as they come."""
    started = time.perf_counter()
    deadline = started + request.timeout if request.timeout else None

    def stop() -> bool:
        return cancel.is_set() or (deadline is not None and time.perf_counter() > deadline)

    reused = 0
    if isinstance(backend, ReusingBackend):
        start, slide = fit_window(
            request, n_ctx=backend.n_ctx, cached=backend.cached_tokens(request.key),
            context_shift=backend.context_shift, trim_fraction=backend.trim_fraction,
        )
        prompt = request.window(start)
        reused = backend.prepare(request.key, prompt, head=request.head, slide=slide)
    else:
        start, _ = fit_window(request, n_ctx=backend.n_ctx)
        prompt = request.window(start)
    evaluated = len(prompt) - reused
    emit(Started(worker, len(prompt), evaluated, reused, start))
    scanner = StopScanner(request.stops)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated = 0
    first_token: float | None = None
    reason: StopReason | None = None
    tokens = backend.tokens(prompt, request.sampling, stop)
    try:
        for token in tokens:
            if cancel.is_set():
                reason = "cancelled"
                break
            if token == WAIT_TOKEN:
                emit(Waiting())
                continue
            if backend.is_end(token):
                reason = "eos"
                break
            generated += 1
            if first_token is None:
                first_token = time.perf_counter() - started
            text = scanner.feed(decoder.decode(backend.piece(token)))
            if text:
                emit(Text(text))
            if scanner.stopped:
                reason = "stop"
                break
            if generated >= request.max_new_tokens:
                reason = "length"
                break
            if deadline is not None and time.perf_counter() > deadline:
                reason = "timeout"
                break
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()  # a generator left open would finish its clean-up later, on another thread
    if reason is None:
        # The backend ended early: it noticed `stop()` (cancelled, or out of time) or ran dry.
        reason = "cancelled" if cancel.is_set() else "timeout" if stop() else "length"
    if not scanner.stopped:
        tail = scanner.feed(decoder.decode(b"", final=True)) + scanner.flush()
        if tail:
            emit(Text(tail))
    return GenerationStats(
        prompt_tokens=len(prompt),
        generated_tokens=generated,
        first_token_seconds=first_token,
        seconds=time.perf_counter() - started,
        stop_reason=reason,
        evaluated_tokens=evaluated,
        reused_tokens=reused,
        window_start=start,
    )


@dataclass(eq=False)
class _Failure:
    error: BaseException


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    events: asyncio.Queue[Chunk | _Failure] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    position: int = 0
    running: bool = False
    done: bool = False
    worker: int = -1


@dataclass(eq=False)
class _Worker:
    index: int
    executor: ThreadPoolExecutor
    backend: Backend
    last_key: str | None = None


class ModelLoadError(RuntimeError):
    """A worker could not load the model (corrupt or unsupported file, out of memory)."""


class Generation:
    """A submitted request: iterate it for chunks; `cancel()` stops it (queued or running)."""

    def __init__(self, engine: Engine, job: _Job) -> None:
        self._engine = engine
        self._job = job

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._job.done and self._job.events.empty():
            raise StopAsyncIteration
        event = await self._job.events.get()
        if isinstance(event, _Failure):
            self._job.done = True
            raise event.error
        if isinstance(event, Finished):
            self._job.done = True
        return event

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop the request: drop it from the queue, or stop its worker (at the next token, or inside a long step)."""
        self._engine._cancel_job(self._job)


class Engine:
    """Fair, bounded, cancellable generation over a pool of worker threads."""

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        workers: int = 1,
        queue_size: int = 32,
        per_key_queue: int = 4,
        model_name: str = "model",
    ) -> None:
        self._factory = backend_factory
        self._worker_count = workers
        self.queue_size = queue_size
        self.per_key_queue = per_key_queue
        self.model_name = model_name
        self.n_ctx = 0
        self.last_stats: GenerationStats | None = None
        self._workers: list[_Worker] = []
        self._idle: deque[_Worker] = deque()
        self._pending: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._running: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def workers(self) -> int:
        """Number of worker threads."""
        return self._worker_count

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a worker."""
        return sum(len(jobs) for jobs in self._pending.values())

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return len(self._running)

    async def start(self) -> None:
        """Create one backend (model context) per worker, each inside its own thread."""
        loop = asyncio.get_running_loop()
        for index in range(self._worker_count):
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tavernkeep-worker-{index}")
            try:
                backend = await loop.run_in_executor(executor, self._factory)
            except Exception as exc:
                executor.shutdown(wait=False)
                await self.close()
                raise ModelLoadError(str(exc) or type(exc).__name__) from exc
            self._workers.append(_Worker(index, executor, backend))
            self._idle.append(self._workers[-1])
        self.n_ctx = self._workers[0].backend.n_ctx if self._workers else 0

    async def with_tokenizer(self, fn: Callable[[Tokenizer], T]) -> T:
        """Run `fn(tokenizer)` off the event loop (the vocabulary is read-only, safe beside generation)."""
        if not self._workers:
            raise EngineClosed()
        tokenizer = self._workers[0].backend.tokenizer
        return await asyncio.get_running_loop().run_in_executor(None, fn, tokenizer)

    async def on_worker(self, fn: Callable[[Backend], T], index: int = 0) -> T:
        """Run `fn(backend)` on worker `index`'s own thread, after the work already queued there."""
        if self._closed or not self._workers:
            raise EngineClosed()
        worker = self._workers[index]
        return await asyncio.get_running_loop().run_in_executor(worker.executor, fn, worker.backend)

    def generate(self, request: GenerationRequest) -> Generation:
        """Queue a request and return its chunk stream; raise a TavernError when it cannot be queued."""
        if self._closed or not self._workers:
            raise EngineClosed()
        waiting = self.queue_depth
        if waiting >= self.queue_size:
            raise QueueFull(waiting)
        own = len(self._pending.get(request.key, ()))
        if own >= self.per_key_queue:
            raise ChannelQueueFull(own)
        job = _Job(request)
        self._pending.setdefault(request.key, deque()).append(job)
        self._dispatch()
        return Generation(self, job)

    def cancel_key(self, key: str) -> int:
        """Cancel every queued and running request of `key`; return how many were cancelled."""
        jobs = list(self._pending.get(key, ()))
        if key in self._running:
            jobs.append(self._running[key])
        for job in jobs:
            self._cancel_job(job)
        return len(jobs)

    async def close(self, grace: float = 10.0) -> None:
        """Stop taking work, cancel queued requests, let running ones finish for `grace` seconds, free models.

        Returns within about `grace` + CLOSE_STOP_SECONDS: running requests are cancelled when the
        grace is over, and a worker that still does not stop is left to its thread, unfreed.
        """
        self._closed = True
        for jobs in list(self._pending.values()):
            for job in list(jobs):
                self._cancel_job(job)
        if self._tasks:
            _, still = await asyncio.wait(set(self._tasks), timeout=grace)
            if still:
                for job in self._running.values():
                    job.cancel.set()
                await asyncio.wait(still, timeout=CLOSE_STOP_SECONDS)
        loop = asyncio.get_running_loop()
        busy = {job.worker for job in self._running.values()}
        for worker in self._workers:
            if worker.index in busy:
                log.warning("worker %d did not stop in time; its model is not freed", worker.index)
                worker.executor.shutdown(wait=False)
                continue
            try:
                await loop.run_in_executor(worker.executor, worker.backend.close)
            finally:
                worker.executor.shutdown(wait=False)
        self._workers.clear()
        self._idle.clear()

    def _cancel_job(self, job: _Job) -> None:
        if job.done:
            return
        if job.running:
            job.cancel.set()
            return
        jobs = self._pending.get(job.request.key)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._pending[job.request.key]
        job.done = True
        job.events.put_nowait(Finished(GenerationStats(0, 0, None, 0.0, "cancelled")))
        self._announce_positions()

    def _next_job(self) -> _Job | None:
        for key, jobs in self._pending.items():
            if key not in self._running:
                job = jobs.popleft()
                if jobs:
                    self._pending.move_to_end(key)
                else:
                    del self._pending[key]
                return job
        return None

    def _dispatch(self) -> None:
        while self._idle and not self._closed:
            job = self._next_job()
            if job is None:
                break
            worker = self._pick_worker(job.request.key)
            job.running = True
            job.worker = worker.index
            self._running[job.request.key] = job
            task = asyncio.get_running_loop().create_task(self._run(worker, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._announce_positions()

    def _pick_worker(self, key: str) -> _Worker:
        """Take the idle worker that last served `key`, else the least recently used idle one.

        Among the others, one whose channel has nothing waiting is preferred: its KV cache is the
        cheapest to give up. `_idle` is ordered by when each worker became idle.
        """
        chosen = next((w for w in self._idle if w.last_key == key), None)
        if chosen is None:
            chosen = next((w for w in self._idle if w.last_key not in self._pending), self._idle[0])
        self._idle.remove(chosen)
        for worker in self._workers:
            if worker.last_key == key:
                worker.last_key = None  # the key's state moves to `chosen` (saved, or handed over live)
        chosen.last_key = key
        return chosen

    def _dispatch_order(self) -> list[_Job]:
        """Simulate the round-robin to tell each waiting job how many go before it."""
        queues = OrderedDict((key, deque(jobs)) for key, jobs in self._pending.items())
        order: list[_Job] = []
        while queues:
            key, jobs = next(iter(queues.items()))
            order.append(jobs.popleft())
            if jobs:
                queues.move_to_end(key)
            else:
                del queues[key]
        return order

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._dispatch_order(), start=1):
            if job.position != position:
                job.position = position
                job.events.put_nowait(Queued(position))

    async def _run(self, worker: _Worker, job: _Job) -> None:
        loop = asyncio.get_running_loop()

        def emit(chunk: Chunk) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, chunk)

        try:
            stats = await loop.run_in_executor(
                worker.executor, run_generation, worker.backend, job.request, job.cancel, emit, worker.index
            )
        except TavernError as exc:
            job.events.put_nowait(_Failure(exc))
        except Exception as exc:
            log.exception("generation failed (key=%s, worker=%d)", job.request.key, worker.index)
            failure = GenerationFailed()
            failure.__cause__ = exc
            job.events.put_nowait(_Failure(failure))
        else:
            self.last_stats = stats
            if stats.stop_reason == "cancelled":
                log.info("generation cancelled (key=%s)", job.request.key)
            job.events.put_nowait(Finished(stats))
        finally:
            job.running = False
            job.done = True
            self._running.pop(job.request.key, None)
            self._idle.append(worker)
            self._dispatch()
