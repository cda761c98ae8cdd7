"""What llama-server and OpenAI-compatible servers are sent and send back, as pure functions over JSON.

Prompts always go out as token-id arrays: llama-server parses special tokens in string prompts, so a
`</s>` typed by a user would become a real end-of-sequence token again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from bot.inference.api import Sampling

# The fields of llama-server's last stream event that are read. Without the filter it also echoes the
# whole prompt as text and every generation setting.
FINAL_FIELDS = ("content", "tokens", "stop", "stop_type", "tokens_cached", "tokens_evaluated", "timings", "id_slot")


@dataclass(frozen=True, slots=True)
class Piece:
    """Text of the reply as the server streamed it; `token` is its id when the server tells it."""

    data: bytes
    token: int | None = None


@dataclass(frozen=True, slots=True)
class End:
    """The server finished the reply; `timings` may hold llama-server's `tokens_cached`."""

    reason: Literal["eos", "length"]
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Figures:
    """The server's prompt figures so far (llama-server sends them with every token when asked)."""

    evaluated: int | None
    cached: int | None
    timings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Loading:
    """The server is loading its model: the reply waits for it."""


Event = Piece | Figures | End | Loading


class StreamError(Exception):
    """The server reported an error inside the stream."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        super().__init__(str(error.get("message") or error))


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a server says about itself: context per reply (0 = unknown), slots (0 = unknown), model."""

    n_ctx: int
    slots: int
    model: str


class Dialect(Protocol):
    """One server API: where a completion is posted, its body, and how its stream events read."""

    name: str
    completion_path: str
    pins_slots: bool

    def body(self, prompt: list[int], sampling: Sampling, n_predict: int, slot: int | None) -> dict[str, Any]:
        """The JSON body of a streaming completion of `prompt`."""
        ...

    def parse(self, event: dict[str, Any]) -> list[Event]:
        """The pieces (and the end) one `data:` event carries; raise StreamError for an error event."""
        ...

    def info(self, props: dict[str, Any] | None, models: dict[str, Any] | None) -> ServerInfo:
        """Context size, slot count and model name from `/props` and `/v1/models` (either may be missing)."""
        ...


def _sampling(sampling: Sampling) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
    }
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    return fields


def _models_info(models: dict[str, Any] | None) -> tuple[int, str]:
    """n_ctx and model name from `/v1/models`: vLLM's `max_model_len`, or llama-server's `meta.n_ctx`."""
    data = (models or {}).get("data") or [{}]
    first = data[0] if isinstance(data[0], dict) else {}
    meta = first.get("meta") if isinstance(first.get("meta"), dict) else {}
    n_ctx = first.get("max_model_len") or meta.get("n_ctx") or 0
    return int(n_ctx), str(first.get("id") or "")


class LlamaServer:
    """llama.cpp's server: `/completion` with `cache_prompt` and a pinned slot per channel."""

    name = "llama-server"
    completion_path = "/completion"
    pins_slots = True

    def body(self, prompt: list[int], sampling: Sampling, n_predict: int, slot: int | None) -> dict[str, Any]:
        """`/completion`: token ids, streamed, the slot's cache reused, the token ids of the reply returned."""
        return {
            "prompt": prompt,
            "stream": True,
            "cache_prompt": True,
            "id_slot": -1 if slot is None else slot,
            "n_predict": n_predict,
            "return_tokens": True,
            # Timings with every token: a reply the engine cuts (length, stop string) still has its figures.
            "timings_per_token": True,
            "response_fields": list(FINAL_FIELDS),
            **_sampling(sampling),
        }

    def parse(self, event: dict[str, Any]) -> list[Event]:
        """A partial event holds one token and its text (a token that ends mid-character comes with the next)."""
        if "error" in event:
            raise StreamError(event["error"] if isinstance(event["error"], dict) else {"message": event["error"]})
        tokens = [int(t) for t in event.get("tokens") or ()]
        data = str(event.get("content") or "").encode()
        out: list[Event] = [Piece(b"", t) for t in tokens[:-1]]
        if tokens or data:
            out.append(Piece(data, tokens[-1] if tokens else None))
        timings = event.get("timings") if isinstance(event.get("timings"), dict) else None
        if timings is not None:
            cached, evaluated = timings.get("cache_n"), timings.get("prompt_n")
            out.append(Figures(
                int(evaluated) if evaluated is not None else None,
                int(cached) if cached is not None else None,
                timings,
            ))
        if event.get("stop"):
            out.append(End(
                "eos" if event.get("stop_type") == "eos" else "length",
                timings={"tokens_cached": event["tokens_cached"]} if "tokens_cached" in event else {},
            ))
        return out

    def info(self, props: dict[str, Any] | None, models: dict[str, Any] | None) -> ServerInfo:
        """`/props`: `default_generation_settings.n_ctx` is the context of one slot, `total_slots` their number."""
        props = props or {}
        settings = props.get("default_generation_settings") or {}
        n_ctx = int(settings.get("n_ctx") or 0)
        model = os.path.basename(str(props.get("model_path") or ""))
        if not n_ctx or not model:
            models_ctx, models_name = _models_info(models)
            n_ctx = n_ctx or models_ctx
            model = model or os.path.basename(models_name)
        return ServerInfo(n_ctx, int(props.get("total_slots") or 0), model)


class OpenAICompletions:
    """An OpenAI-compatible server (vLLM, llama-server's `/v1`): `/v1/completions` with token-id prompts."""

    name = "openai"
    completion_path = "/v1/completions"
    pins_slots = False

    def __init__(self, model: str = "") -> None:
        self.model = model

    def body(self, prompt: list[int], sampling: Sampling, n_predict: int, slot: int | None) -> dict[str, Any]:
        """`/v1/completions`: the prompt as token ids, streamed, with usage at the end."""
        fields = _sampling(sampling)
        # `repetition_penalty`, `top_k` and `min_p` are extensions vLLM and llama-server both accept.
        fields["repetition_penalty"] = fields.pop("repeat_penalty")
        return {
            "model": self.model,
            "prompt": prompt,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": n_predict,
            **fields,
        }

    def parse(self, event: dict[str, Any]) -> list[Event]:
        """Text chunks (no token ids); the end comes with `finish_reason`, the figures with `usage`."""
        if "error" in event:
            raise StreamError(event["error"] if isinstance(event["error"], dict) else {"message": event["error"]})
        out: list[Event] = []
        choices = event.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        text = str(choice.get("text") or "")
        if text:
            out.append(Piece(text.encode()))
        usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
        timings = event.get("timings") if isinstance(event.get("timings"), dict) else {}
        if usage is not None or timings:
            prompt_tokens = (usage or {}).get("prompt_tokens")
            cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", timings.get("cache_n"))
            evaluated = prompt_tokens - (cached or 0) if prompt_tokens is not None else timings.get("prompt_n")
            out.append(Figures(evaluated, cached, timings))
        finish = choice.get("finish_reason")
        if finish:
            out.append(End("eos" if finish == "stop" else "length"))
        return out

    def info(self, props: dict[str, Any] | None, models: dict[str, Any] | None) -> ServerInfo:
        """`/v1/models` names the model (sent with every request); llama-server's `/props` adds its slots."""
        n_ctx, model = _models_info(models)
        slots = 0
        if props:
            from_props = LlamaServer().info(props, None)
            n_ctx = n_ctx or from_props.n_ctx
            slots = from_props.slots
        self.model = self.model or model
        return ServerInfo(n_ctx, slots, os.path.basename(model))


def dialect(backend: str) -> Dialect:
    """The dialect of an `inference.backend` value."""
    if backend == "llama-server":
        return LlamaServer()
    if backend == "openai":
        return OpenAICompletions()
    raise ValueError(f"no server dialect for backend {backend!r}")
