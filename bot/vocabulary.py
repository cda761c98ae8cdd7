"""The vocabulary protocol shared by the prompt and inference wings (a leaf: imports nothing of the bot)."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    """A model's vocabulary, as `llama_cpp.Llama` offers it (read-only, safe from any thread)."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes: ...

    def token_bos(self) -> int: ...

    def token_eos(self) -> int: ...

    def n_vocab(self) -> int: ...
