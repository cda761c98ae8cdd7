"""The [inference] settings, and server behaviour a real llama-server cannot be made to show on cue
(a model still loading, a context smaller than the bot thinks), on a small aiohttp server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bot.config import ConfigError, InferenceSettings, Settings, load_settings
from bot.inference.api import GenerationRequest, Sampling, Text
from bot.inference.remote.backend import RemoteEngine
from bot.inference.remote.pool import ServerContextExceeded, ServerLoading


def test_servers_from_the_environment_are_a_comma_separated_list() -> None:
    settings = load_settings(None, {
        "TAVERNKEEP_INFERENCE_BACKEND": "llama-server",
        "TAVERNKEEP_INFERENCE_SERVERS": "http://gpu1:8080/, http://gpu2:8080",
    })
    assert settings.inference.backend == "llama-server"
    assert settings.inference.servers == ["http://gpu1:8080", "http://gpu2:8080"]


def test_the_default_is_local_without_servers() -> None:
    assert load_settings(None, {}).inference == InferenceSettings()
    assert InferenceSettings().backend == "local"


@pytest.mark.parametrize(("env", "message"), [
    ({"TAVERNKEEP_INFERENCE_BACKEND": "openai"}, "needs at least one URL in servers"),
    ({"TAVERNKEEP_INFERENCE_BACKEND": "llama-server", "TAVERNKEEP_INFERENCE_SERVERS": "gpu1:8080"}, "base URL"),
    ({"TAVERNKEEP_INFERENCE_BACKEND": "kobold"}, "inference.backend"),
])
def test_bad_inference_settings_stop_the_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="inference") as caught:
        load_settings(None, env)
    assert message in str(caught.value)


def test_the_composition_root_builds_the_engine_the_config_names(demo_model_path: Path) -> None:
    from bot import app

    remote = Settings(inference=InferenceSettings(backend="openai", servers=["http://127.0.0.1:9"]))
    assert isinstance(app.model_engine(remote, str(demo_model_path)), RemoteEngine)
    assert not isinstance(app.model_engine(Settings(), str(demo_model_path)), RemoteEngine)


class FakeServer:
    """Answers as llama-server does: `loading` 503s first, then `reply` streamed; `n_ctx` per slot."""

    def __init__(self, *, loading: int = 0, n_ctx: int = 512, refuse_above: int | None = None) -> None:
        self.loading = loading
        self.n_ctx = n_ctx
        self.refuse_above = refuse_above
        self.prompts: list[list[int]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/props", self.props)
        app.router.add_post("/completion", self.completion)
        return app

    def _loading(self) -> web.Response | None:
        if self.loading:
            self.loading -= 1
            return web.json_response(
                {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, status=503
            )
        return None

    async def health(self, _request: web.Request) -> web.Response:
        return self._loading() or web.json_response({"status": "ok"})

    async def props(self, _request: web.Request) -> web.Response:
        return web.json_response({"default_generation_settings": {"n_ctx": self.n_ctx}, "total_slots": 1,
                                  "model_path": "/models/fake.gguf"})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        busy = self._loading()
        if busy is not None:
            return busy
        body = await request.json()
        assert all(isinstance(t, int) for t in body["prompt"]) and body["cache_prompt"] is True
        self.prompts.append(body["prompt"])
        if self.refuse_above is not None and len(body["prompt"]) > self.refuse_above:
            return web.json_response({"error": {
                "code": 400, "message": "request exceeds the available context size",
                "type": "exceed_context_size_error", "n_prompt_tokens": len(body["prompt"]),
                "n_ctx": self.refuse_above,
            }}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for token, text in ((72, "Hel"), (108, "lo")):
            event = {"content": text, "tokens": [token], "stop": False}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        final = {"content": "", "tokens": [], "stop": True, "stop_type": "eos", "tokens_cached": len(body["prompt"]),
                 "timings": {"cache_n": 0, "prompt_n": len(body["prompt"])}}
        await response.write(f"data: {json.dumps(final)}\n\n".encode())
        return response


@pytest.fixture
async def serve() -> AsyncIterator:
    runners: list[web.AppRunner] = []

    async def start(fake: FakeServer) -> str:
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def settings_for(url: str, **inference: object) -> Settings:
    return Settings(inference=InferenceSettings(backend="llama-server", servers=[url], health_interval_seconds=0.1,
                                                connect_timeout_seconds=2, read_timeout_seconds=5, **inference))


async def reply_text(engine: RemoteEngine, tokens: tuple[int, ...]) -> str:
    request = GenerationRequest(key="c", tokens=tokens, max_new_tokens=8, sampling=Sampling(seed=1))
    return "".join([c.text async for c in engine.generate(request) if isinstance(c, Text)])


async def test_a_loading_server_is_waited_out_at_start_and_during_a_reply(serve, demo_model_path: Path) -> None:
    fake = FakeServer(loading=3)
    engine = RemoteEngine(settings_for(await serve(fake), load_wait_seconds=10), str(demo_model_path))
    await engine.start()
    try:
        assert engine.n_ctx == 512 and engine.workers == 1
        fake.loading = 2  # reloading its model
        request = GenerationRequest(key="c", tokens=(1, 2, 3), max_new_tokens=8, sampling=Sampling(seed=1))
        chunks = [chunk async for chunk in engine.generate(request)]
        kinds = [type(c).__name__ for c in chunks]
        assert kinds == ["Started", "Waiting", "Text", "Text", "Finished"]  # told once, while it loads
        assert "".join(c.text for c in chunks if isinstance(c, Text)) == "Hello"
        assert engine.last_stats is not None and engine.last_stats.stop_reason == "eos"
    finally:
        await engine.close(grace=1)


async def test_a_server_still_loading_after_the_wait_gets_a_notice(serve, demo_model_path: Path) -> None:
    fake = FakeServer()
    engine = RemoteEngine(settings_for(await serve(fake), load_wait_seconds=1), str(demo_model_path))
    await engine.start()
    try:
        fake.loading = 1000
        with pytest.raises(ServerLoading):
            await reply_text(engine, (1, 2, 3))
    finally:
        await engine.close(grace=1)


async def test_a_prompt_above_the_server_context_is_the_usual_too_large_notice(serve, demo_model_path: Path) -> None:
    fake = FakeServer(refuse_above=3)
    engine = RemoteEngine(settings_for(await serve(fake)), str(demo_model_path))
    await engine.start()
    try:
        with pytest.raises(ServerContextExceeded) as caught:
            await reply_text(engine, (1, 2, 3, 4, 5))
        assert (caught.value.tokens, caught.value.allowed) == (5, 3)
        assert "5 tokens" in caught.value.user_message
        assert await reply_text(engine, (1, 2)) == "Hello"  # the next reply is served as usual
    finally:
        await engine.close(grace=1)
