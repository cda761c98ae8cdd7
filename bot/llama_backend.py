"""The llama.cpp backend: one `llama_cpp.Llama` context, used only from its worker thread."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from bot.config import ModelSettings, Settings
from bot.engine import Engine, Sampling

log = logging.getLogger(__name__)


class LlamaBackend:
    """A llama.cpp context over a memory-mapped GGUF (weights are shared between workers by mmap)."""

    def __init__(self, model_path: str, settings: ModelSettings) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)
        self.llm = llama_cpp.Llama(
            model_path=model_path,
            n_ctx=settings.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=settings.gpu_layers,
            seed=settings.seed if settings.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
            verbose=False,
        )
        self.tokenizer = self.llm
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab

    def tokens(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Yield sampled tokens; llama-cpp-python reuses the longest cached prefix of `prompt`."""
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        return self.llm.generate(
            prompt,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
        )

    def piece(self, token: int) -> bytes:
        """Bytes of one token."""
        return self.llm.detokenize([token])

    def is_end(self, token: int) -> bool:
        """End-of-generation tokens as the model's vocabulary defines them."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        """Free the context and model."""
        self.llm.close()


def llama_engine(settings: Settings, model_path: str) -> Engine:
    """An unstarted Engine whose workers each own a LlamaBackend over `model_path`."""
    return Engine(
        lambda: LlamaBackend(model_path, settings.model),
        workers=settings.model.workers,
        queue_size=settings.engine.queue_size,
        per_key_queue=settings.engine.per_channel_queue,
        model_name=os.path.basename(model_path),
    )
