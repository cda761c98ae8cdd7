"""Remote generation inside the fair Engine: each worker thread drives a server stream on the event loop.

The scheduler stays the same as for llama.cpp in this process: per-channel round robin, queue
limits, one running reply per channel, time limits, stop strings, UTF-8 decoding and stats all come
from `bot.inference.engine`. A worker's backend hands the prompt to the `ServerPool` on the event loop
(`asyncio.run_coroutine_threadsafe`) and yields what the stream brings; cancelling the iteration
cancels the stream, which closes the connection, and the server stops the reply. There is one worker
per server slot, so the engine never runs more replies than the servers can.

Prompts are tokenized here, with the vocabulary of `model.path` (loaded vocabulary-only); at start
it is checked against each server's own tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from bot.config import Settings
from bot.errors import GenerationFailed
from bot.inference.api import WAIT_TOKEN, GenerationStats, Sampling, Tokenizer
from bot.inference.engine import Engine, ModelLoadError
from bot.inference.remote.dialects import End, Loading, dialect
from bot.inference.remote.pool import ServerFailed, ServerPool
from bot.inference.window import common_prefix

log = logging.getLogger(__name__)

# A streamed piece whose token id the server did not tell (OpenAI-compatible servers stream text).
TEXT_TOKEN = -1
# The server ended the reply with end-of-sequence.
END_TOKEN = -2
# How often a worker waiting for the stream looks at `stop()` (cancel, time limit).
POLL_SECONDS = 0.05
# Text tokenized by both sides at start: plain words, accents, CJK, and the markers a user might type.
VOCABULARY_PROBE = "Tavernkeep checks: naïve café, 東京, </s> <|model|> <|im_end|> [INST]"
_MID_PROMPT = b"\n"


def load_vocabulary(path: str) -> Tokenizer:
    """The vocabulary of a GGUF file, without its weights."""
    from llama_cpp import Llama

    return Llama(path, vocab_only=True, verbose=False)


def continuation_tokens(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """Tokens of `data` as it goes on mid-prompt (no BOS, no word-start space of SPM vocabularies)."""
    probe = tokenizer.tokenize(_MID_PROMPT, add_bos=False, special=False)
    tokens = tokenizer.tokenize(_MID_PROMPT + data, add_bos=False, special=False)
    if tokens[: len(probe)] == probe:
        return tokens[len(probe):]
    return tokenizer.tokenize(data, add_bos=False, special=False)


class RemoteBackend:
    """One worker's backend: the shared vocabulary, and replies generated on the servers of `pool`.

    It is a ReusingBackend so that the engine's windowing plans against what the server's cache holds
    for the channel (trimming in chunks instead of sliding, since a server cannot shift a cache on
    request), and so that `prepare` tells it the channel of the reply.
    """

    context_shift = False

    def __init__(
        self,
        pool: ServerPool,
        tokenizer: Tokenizer,
        loop: asyncio.AbstractEventLoop,
        *,
        end_tokens: frozenset[int] = frozenset(),
        trim_fraction: float = 0.5,
    ) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.n_ctx = pool.n_ctx
        self.trim_fraction = trim_fraction
        self._loop = loop
        self._key = ""
        self._piece = b""
        self._eog = end_tokens or frozenset({tokenizer.token_eos()})

    def cached_tokens(self, key: str) -> Sequence[int]:
        """Tokens the server's cache holds for `key`, as far as the pool knows."""
        return self.pool.cached_tokens(key)

    def prepare(self, key: str, prompt: list[int], *, head: int = 0, slide: int = 0) -> int:
        """Remember the channel; estimate the prompt tokens the server reuses (it re-evaluates at least one)."""
        self._key = key
        common = common_prefix(self.pool.cached_tokens(key), prompt)
        return min(common, max(0, len(prompt) - 1))

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        """Yield the reply's tokens as the server streams them; closing the iteration cancels the stream."""
        events: queue.SimpleQueue[object] = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(
            self.pool.generate(self._key, list(prompt), sampling, events.put), self._loop
        )
        try:
            while True:
                try:
                    event = events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if stop():
                        return
                    if future.done() and events.empty():
                        # `generate` puts every failure in the queue: this is a bug, not a server.
                        error = None if future.cancelled() else future.exception()
                        raise GenerationFailed() from error
                    continue
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Loading):
                    yield WAIT_TOKEN
                    continue
                if isinstance(event, End):
                    if event.reason == "eos":
                        self._piece = b""
                        yield END_TOKEN
                    return
                self._piece = getattr(event, "data", b"")
                token = getattr(event, "token", None)
                yield TEXT_TOKEN if token is None else token
        finally:
            future.cancel()

    def piece(self, token: int) -> bytes:
        """The text the server streamed with the token just yielded."""
        return self._piece

    def is_end(self, token: int) -> bool:
        """The end of the reply: the server said so, or it streamed an end-of-generation token."""
        return token == END_TOKEN or token in self._eog

    def close(self) -> None:
        """Nothing to free: the pool belongs to the engine."""


def end_tokens(tokenizer: Tokenizer) -> frozenset[int]:
    """End-of-generation ids of the vocabulary (EOS, EOT and the like)."""
    ends = {tokenizer.token_eos()}
    try:
        import llama_cpp

        vocab = tokenizer._model.vocab  # type: ignore[attr-defined]
        ends |= {t for t in range(tokenizer.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    except (AttributeError, ImportError):
        pass
    return frozenset(ends)


class RemoteEngine(Engine):
    """The fair Engine over inference servers: one worker per server slot, found out at start."""

    def __init__(self, settings: Settings, vocabulary_path: str) -> None:
        inference = settings.inference
        self.pool = ServerPool(dialect(inference.backend), inference, continuation=self._continuation)
        self._vocabulary_path = vocabulary_path
        self._tokenizer: Tokenizer | None = None
        self._end_tokens: frozenset[int] = frozenset()
        self._trim_fraction = settings.cache.trim_fraction
        self._last: GenerationStats | None = None
        super().__init__(
            self._backend,
            workers=1,
            queue_size=settings.engine.queue_size,
            per_key_queue=settings.engine.per_channel_queue,
            model_name=inference.backend,
        )

    @property  # type: ignore[override]
    def last_stats(self) -> GenerationStats | None:
        """The last reply's figures, its prompt figures as the server counted them (cached, evaluated)."""
        return self._last

    @last_stats.setter
    def last_stats(self, stats: GenerationStats | None) -> None:
        figures = self.pool.last_figures
        if (stats is not None and figures is not None and figures.cached is not None
                and figures.prompt_tokens == stats.prompt_tokens):
            evaluated = figures.evaluated if figures.evaluated is not None else stats.prompt_tokens - figures.cached
            stats = replace(stats, reused_tokens=figures.cached, evaluated_tokens=evaluated)
        self._last = stats

    @property
    def server_timings(self) -> dict[str, Any]:
        """The server's own timings of the last reply (`timings` of llama-server, `tokens_cached`)."""
        figures = self.pool.last_figures
        return dict(figures.timings) if figures is not None else {}

    async def start(self) -> None:
        """Load the vocabulary, reach the servers, check their vocabulary, then start one worker per slot."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            self._tokenizer = await loop.run_in_executor(None, load_vocabulary, self._vocabulary_path)
            self._end_tokens = await loop.run_in_executor(None, end_tokens, self._tokenizer)
        except Exception as exc:
            raise ModelLoadError(f"cannot read the vocabulary of {self._vocabulary_path}: {exc}") from exc
        try:
            await self.pool.open()
        except ServerFailed as exc:
            raise ModelLoadError(str(exc)) from None
        try:
            await self._check_vocabulary()
        except BaseException:
            await self.pool.close()
            raise
        self._worker_count = self.pool.capacity
        servers = len(self.pool.servers)
        self.model_name = f"{self.pool.model or 'model'} ({self.pool.dialect.name}, {servers} "
        self.model_name += "server)" if servers == 1 else "servers)"
        await super().start()

    async def close(self, grace: float = 10.0) -> None:
        """Close the engine, then the HTTP session and health checks."""
        await super().close(grace)
        await self.pool.close()

    def _backend(self) -> RemoteBackend:
        assert self._tokenizer is not None
        return RemoteBackend(
            self.pool, self._tokenizer, self._loop, end_tokens=self._end_tokens, trim_fraction=self._trim_fraction
        )

    def _continuation(self, data: bytes) -> list[int]:
        assert self._tokenizer is not None
        return continuation_tokens(self._tokenizer, data)

    async def _check_vocabulary(self) -> None:
        """Refuse to start when a server's tokenizer differs from the local vocabulary."""
        assert self._tokenizer is not None
        tokenizer = self._tokenizer
        local = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tokenizer.tokenize(VOCABULARY_PROBE.encode(), add_bos=False, special=False)
        )
        for server in self.pool.servers:
            if not server.healthy:
                continue
            remote = await self.pool.tokenize(server, VOCABULARY_PROBE)
            if remote is None:
                log.info("inference server %s cannot tokenize: its vocabulary is not checked", server.url)
            elif remote != local:
                raise ModelLoadError(
                    f"model.path: the vocabulary of {self._vocabulary_path} differs from the one of the model on "
                    f"{server.url}; set model.path to that model's GGUF file (only its vocabulary is read)"
                )


def remote_engine(settings: Settings, vocabulary_path: str) -> RemoteEngine:
    """An unstarted Engine over the servers of `settings.inference`, tokenizing with `vocabulary_path`."""
    return RemoteEngine(settings, vocabulary_path)
