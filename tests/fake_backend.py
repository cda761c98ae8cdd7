"""A model-free backend with the real engine around it, for fast tests of the layers above."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bot.core.sessions import generation_request
from bot.inference.api import GenerationRequest, Sampling
from bot.inference.engine import Engine
from bot.prompt.builder import Conversation

_OFFSET = 3  # ids 0..2 are UNK, BOS, EOS as in Llama vocabularies


class ByteTokenizer:
    """One token per UTF-8 byte; never produces BOS/EOS from text."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokenize bytes."""
        return ([1] if add_bos else []) + [b + _OFFSET for b in text]

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """Bytes of tokens; BOS/EOS render as their Llama spellings when `special`."""
        out = bytearray()
        for token in tokens:
            if token >= _OFFSET:
                out.append(token - _OFFSET)
            elif special and token in (1, 2):
                out += b"<s>" if token == 1 else b"</s>"
        return bytes(out)

    def token_bos(self) -> int:
        """BOS id."""
        return 1

    def token_eos(self) -> int:
        """EOS id."""
        return 2

    def n_vocab(self) -> int:
        """Vocabulary size: the control ids and one token per byte."""
        return _OFFSET + 256


Reply = Callable[[str], str]


def echo_reply(prompt: str) -> str:
    """Default scripted reply: acknowledge the last line of the prompt."""
    last = prompt.rsplit("<|user|>", 1)[-1].removesuffix("<|model|>").splitlines()[-1:] or [""]
    return f"You said: {last[0]}"


class FakeBackend:
    """Generates a scripted reply byte by byte; records every prompt it was given."""

    def __init__(
        self,
        reply: Reply | str = echo_reply,
        *,
        n_ctx: int = 4096,
        token_delay: float = 0.0,
        fail_after: int | None = None,
        eval_seconds: float = 0.0,
    ) -> None:
        self.tokenizer = ByteTokenizer()
        self.n_ctx = n_ctx
        self.reply = reply
        self.token_delay = token_delay
        self.fail_after = fail_after
        self.eval_seconds = eval_seconds  # a prompt evaluation that takes this long, interruptible by `stop()`
        self.prompts: list[str] = []
        self.samplings: list[Sampling] = []
        self.closed = False
        self.lock = threading.Lock()

    def tokens(self, prompt: list[int], sampling: Sampling, stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Yield the reply's bytes as tokens, then EOS (nothing when stopped during the evaluation)."""
        text = self.tokenizer.detokenize(prompt).decode("utf-8", errors="replace")
        with self.lock:
            self.prompts.append(text)
            self.samplings.append(sampling)
        until = time.monotonic() + self.eval_seconds
        while time.monotonic() < until:
            if stop():
                return
            time.sleep(0.005)
        reply = self.reply(text) if callable(self.reply) else self.reply
        for index, byte in enumerate(reply.encode()):
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("simulated model failure")
            if self.token_delay:
                time.sleep(self.token_delay)
            yield byte + _OFFSET
        yield 2

    def piece(self, token: int) -> bytes:
        """Bytes of one token."""
        return self.tokenizer.detokenize([token])

    def is_end(self, token: int) -> bool:
        """EOS ends generation."""
        return token == 2

    def close(self) -> None:
        """Mark closed."""
        self.closed = True


def fake_engine(backend: FakeBackend | None = None, **engine_options: int) -> Engine:
    """An unstarted Engine whose workers share one FakeBackend (call `await engine.start()`)."""
    shared = backend or FakeBackend()
    return Engine(lambda: shared, model_name="fake", **engine_options)  # type: ignore[arg-type]


def fake_request(
    key: str, conversation: Conversation, max_new_tokens: int, *, n_ctx: int = 4096, **options: Any
) -> GenerationRequest:
    """The request the core builds for `conversation`, tokenized by the fake backend's tokenizer."""
    request, _ = generation_request(
        ByteTokenizer(), conversation, key=key, n_ctx=n_ctx, max_new_tokens=max_new_tokens, **options
    )
    return request
