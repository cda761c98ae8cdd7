"""The generation API: what a request carries, the chunks a generation streams, and what a backend offers.

A request is a token list, not a conversation: whoever builds it (`bot.core` with the Metharme
builder) decides the template. `head` and `cuts` tell the scheduler where the prompt may be made
shorter without changing what remains, so it can keep a cached window (see `bot.inference.window`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from bot.vocabulary import Tokenizer

StopReason = Literal["eos", "stop", "length", "cancelled", "timeout"]


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings for one request."""

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate. `key` serialises requests (one channel at a time).

    `tokens` is the whole prompt, the widest window that fits. Its first `head` tokens are fixed
    (BOS and system text): a shorter window always keeps them. `cuts` are the sorted offsets
    (each > `head`) where the rest may start instead: for every cut `c`, `tokens[:head] + tokens[c:]`
    is a complete prompt on its own. `stops` are plain strings that end the reply where they appear.
    """

    key: str
    tokens: tuple[int, ...]
    max_new_tokens: int
    head: int = 0
    cuts: tuple[int, ...] = ()
    sampling: Sampling = Sampling()
    stops: tuple[str, ...] = ()
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.head <= len(self.tokens):
            raise ValueError("head must lie within the prompt")
        if any(not self.head < c < len(self.tokens) for c in self.cuts) or list(self.cuts) != sorted(set(self.cuts)):
            raise ValueError("cuts must be sorted, distinct and inside the prompt after the head")

    def window(self, start: int) -> list[int]:
        """The prompt starting at `start` (`head` or one of `cuts`) after the fixed head."""
        return list(self.tokens) if start <= self.head else [*self.tokens[: self.head], *self.tokens[start:]]


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """Figures of one finished generation.

    `window_start` is the offset in the request's tokens where the prompt went on after the head
    (`head` when nothing was dropped, else the cut the scheduler chose).
    """

    prompt_tokens: int
    generated_tokens: int
    first_token_seconds: float | None
    seconds: float
    stop_reason: StopReason
    evaluated_tokens: int = 0
    reused_tokens: int = 0
    window_start: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of generation (after the first token)."""
        if self.first_token_seconds is None or self.generated_tokens < 2:
            return 0.0
        span = self.seconds - self.first_token_seconds
        return (self.generated_tokens - 1) / span if span > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits; `position` 1 means it runs next."""

    position: int


@dataclass(frozen=True, slots=True)
class Waiting:
    """The request's model is not ready yet (an inference server still loading it); text follows."""


@dataclass(frozen=True, slots=True)
class Started:
    """A worker took the request and chose its window (`window_start` as in GenerationStats)."""

    worker: int
    prompt_tokens: int
    evaluated_tokens: int = 0
    reused_tokens: int = 0
    window_start: int = 0


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of reply text, already cut at stop strings."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every generation."""

    stats: GenerationStats


Chunk = Queued | Started | Waiting | Text | Finished


# Not a token: a backend yields it while its model is not ready yet (the engine emits `Waiting`).
WAIT_TOKEN = -3


class Backend(Protocol):
    """Runs in one worker thread: a tokenizer plus a token generator over one model context."""

    tokenizer: Tokenizer
    n_ctx: int

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool]) -> Iterator[int]:
        """Yield generated token ids for `prompt` (blocking).

        `stop()` turns true when the request is cancelled or out of time. A backend that can
        interrupt its own work (a long prompt evaluation) checks it and then simply ends the
        iteration, leaving its context ready for the next request.
        """
        ...

    def piece(self, token: int) -> bytes:
        """Return the bytes of one generated token."""
        ...

    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT)."""
        ...

    def close(self) -> None:
        """Free the model context."""
        ...


@runtime_checkable
class ReusingBackend(Backend, Protocol):
    """A backend that keeps KV caches between requests (optional; see `bot.inference.local.state_cache`).

    `cached_tokens(key)` are the tokens of the KV cache `prepare(key, ...)` will start from (held
    live or saved for `key`, else whatever the context holds). `prepare` makes the context hold
    `key`, shifts `slide` tokens after the first `head` out of it when asked, and returns how many
    leading tokens of `prompt` are already evaluated.
    """

    context_shift: bool
    trim_fraction: float

    def cached_tokens(self, key: str) -> Sequence[int]:
        """Tokens of the KV cache `key` would start from."""
        ...

    def prepare(self, key: str, prompt: list[int], *, head: int = 0, slide: int = 0) -> int:
        """Load `key`'s state for `prompt`; return the number of prompt tokens reused."""
        ...
