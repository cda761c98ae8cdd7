"""Remote inference against real llama-server processes on loopback, running the demo model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.config import InferenceSettings, Settings
from bot.errors import GenerationFailed
from bot.inference.api import Finished, GenerationRequest, Sampling, Started, Text
from bot.inference.engine import ModelLoadError
from bot.inference.remote.backend import RemoteEngine, load_vocabulary
from tests.llama_server import LlamaServer, server_binary

pytestmark = pytest.mark.model

SAMPLING = Sampling(temperature=0.0, seed=7)
STORY = b"<|im_start|>user\nTell me a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n"
COUNT = b"<|im_start|>user\nCount from 1 to 300, one number per line.<|im_end|>\n<|im_start|>assistant\n1\n2\n3\n"


@pytest.fixture(scope="module")
def binary() -> Path:
    path, reason = server_binary()
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def vocab(demo_model_path: Path):
    return load_vocabulary(str(demo_model_path))


@pytest.fixture(scope="module")
def server(binary: Path, demo_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """The module's shared server: two slots of 1024 tokens."""
    running = LlamaServer(binary, demo_model_path, tmp_path_factory.mktemp("server") / "llama-server.log")
    running.start()
    yield running
    running.stop()


@pytest.fixture
def spare(binary: Path, demo_model_path: Path, tmp_path: Path) -> Iterator[LlamaServer]:
    """A server of one slot for one test, to kill."""
    running = LlamaServer(binary, demo_model_path, tmp_path / "spare.log", ctx=1024, slots=1)
    running.start()
    yield running
    running.stop()


def settings_for(*urls: str, backend: str = "llama-server") -> Settings:
    return Settings(inference=InferenceSettings(
        backend=backend, servers=list(urls), health_interval_seconds=0.2, connect_timeout_seconds=2,
        read_timeout_seconds=20, load_wait_seconds=5,
    ))


async def started(settings: Settings, demo_model_path: Path) -> RemoteEngine:
    engine = RemoteEngine(settings, str(demo_model_path))
    await engine.start()
    return engine


@pytest.fixture
async def engine(server: LlamaServer, demo_model_path: Path) -> AsyncIterator[RemoteEngine]:
    running = await started(settings_for(server.url), demo_model_path)
    yield running
    await running.close(grace=1)


def prompt_of(vocab, text: bytes) -> tuple[int, ...]:
    return tuple(vocab.tokenize(text, add_bos=False, special=True))


def request(key: str, tokens: tuple[int, ...], max_new_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(key=key, tokens=tokens, max_new_tokens=max_new_tokens, sampling=SAMPLING, timeout=60)


async def reply(engine: RemoteEngine, req: GenerationRequest) -> tuple[list[object], str]:
    chunks = [chunk async for chunk in engine.generate(req)]
    return chunks, "".join(c.text for c in chunks if isinstance(c, Text))


async def test_a_reply_streams_from_the_server(engine: RemoteEngine, vocab, server: LlamaServer) -> None:
    chunks, text = await reply(engine, request("stream", prompt_of(vocab, STORY)))
    assert engine.workers == 2 and engine.n_ctx == 1024
    assert isinstance(chunks[0], Started)
    assert sum(isinstance(c, Text) for c in chunks) >= 2
    assert isinstance(chunks[-1], Finished)
    assert text.strip()
    stats = chunks[-1].stats
    assert stats.stop_reason in ("length", "eos") and 1 <= stats.generated_tokens <= 24
    assert engine.server_timings["predicted_n"] >= stats.generated_tokens


async def test_the_second_turn_reuses_the_server_cache(engine: RemoteEngine, vocab) -> None:
    first = prompt_of(vocab, b"<|im_start|>user\nWhat do cats eat?<|im_end|>\n<|im_start|>assistant\n")
    _, text = await reply(engine, request("cached", first))
    assert engine.last_stats is not None and engine.last_stats.reused_tokens <= 3  # "<|im_start|>user\n" at most
    second = (*first, *prompt_of(vocab, text.encode() + b"<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n"),
              *prompt_of(vocab, b"<|im_start|>assistant\n"))
    await reply(engine, request("cached", second))
    stats = engine.last_stats
    assert stats is not None
    # The server's own count: the whole first prompt came from the slot's cache.
    assert stats.reused_tokens >= len(first)
    assert stats.evaluated_tokens == len(second) - stats.reused_tokens


async def test_cancel_closes_the_stream_and_the_server_stops(engine: RemoteEngine, vocab, server: LlamaServer) -> None:
    generation = engine.generate(request("cancel", prompt_of(vocab, COUNT), max_new_tokens=500))
    texts = 0
    async for chunk in generation:
        if isinstance(chunk, Text):
            texts += 1
            if texts == 3:
                generation.cancel()
                cancelled_at = time.monotonic()
        if isinstance(chunk, Finished):
            assert chunk.stats.stop_reason == "cancelled"
            assert chunk.stats.generated_tokens < 100
    assert time.monotonic() - cancelled_at < 1.0
    for _ in range(40):  # the server notices the closed connection at its next token
        slots = server.get("/slots")
        if isinstance(slots, list) and not any(slot["is_processing"] for slot in slots):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the server went on generating after the stream was closed")


async def test_typed_markers_reach_the_server_as_plain_text(engine: RemoteEngine, vocab, server: LlamaServer) -> None:
    head = prompt_of(vocab, b"<|im_start|>user\nBob: hello ")
    front = tuple(vocab.tokenize(b"</s> <|model|> ", add_bos=False, special=False))
    marker = tuple(vocab.tokenize(b"<|im_end|>", add_bos=False, special=False))
    tail = prompt_of(vocab, b"<|im_end|>\n<|im_start|>assistant\n")
    im_end = tuple(vocab.tokenize(b"<|im_end|>", add_bos=False, special=True))
    assert len(im_end) == 1 and len(marker) > 1  # the marker typed is several plain-text pieces
    prompt = (*head, *front, *marker, *tail)
    await reply(engine, request("typed", prompt, max_new_tokens=4))
    assert engine.last_stats is not None and engine.last_stats.prompt_tokens == len(prompt)
    slot = next(s for server_ in engine.pool.servers for s in server_.slots if s.key == "typed")

    def reused(tokens: tuple[int, ...]) -> int:
        answer = server.post("/completion", {"prompt": list(tokens), "id_slot": slot.id, "cache_prompt": True,
                                             "n_predict": 1, "temperature": 0})
        assert answer["tokens_evaluated"] == len(tokens)
        return int(answer["timings"]["cache_n"])

    # The slot's cache holds exactly the ids sent: the same prompt again is reused in full, while the
    # same text with a real <|im_end|> where the user typed one parts from it exactly there.
    assert reused(prompt) == len(prompt) - 1
    assert reused((*head, *front, *im_end, *tail)) == len(head) + len(front)


async def test_openai_completions_stream_token_prompts(server: LlamaServer, vocab, demo_model_path: Path) -> None:
    engine = await started(settings_for(server.url, backend="openai"), demo_model_path)
    try:
        first = prompt_of(vocab, STORY)
        chunks, text = await reply(engine, request("openai", first))
        assert sum(isinstance(c, Text) for c in chunks) >= 2 and text.strip()
        second = (*first, *prompt_of(vocab, text.encode() + b"<|im_end|>\n<|im_start|>user\nMore.<|im_end|>\n"))
        await reply(engine, request("openai", second, max_new_tokens=4))
        assert engine.last_stats is not None and engine.last_stats.reused_tokens >= len(first) - 1
    finally:
        await engine.close(grace=1)


async def test_a_server_killed_mid_reply_fails_the_reply_and_the_queue_moves_on(
    spare: LlamaServer, vocab, demo_model_path: Path
) -> None:
    engine = await started(settings_for(spare.url), demo_model_path)
    try:
        assert engine.workers == 1
        first = engine.generate(request("dies", prompt_of(vocab, COUNT), max_new_tokens=500))
        queued = engine.generate(request("next", prompt_of(vocab, STORY)))
        with pytest.raises(GenerationFailed):
            async for chunk in first:
                if isinstance(chunk, Text):
                    spare.kill()
        started_at = time.monotonic()
        with pytest.raises(GenerationFailed):
            async for _ in queued:
                pass
        assert time.monotonic() - started_at < 5
        # Back up on the same port: the health check notices, and replies work again.
        await asyncio.to_thread(spare.start)
        for _ in range(50):
            if engine.pool.servers[0].healthy:
                break
            await asyncio.sleep(0.1)
        _, text = await reply(engine, request("again", prompt_of(vocab, STORY), max_new_tokens=8))
        assert text.strip()
    finally:
        await engine.close(grace=1)


async def test_two_servers_one_going_down_moves_its_channel_without_a_notice(
    spare: LlamaServer, server: LlamaServer, vocab, demo_model_path: Path
) -> None:
    engine = await started(settings_for(spare.url, server.url), demo_model_path)
    try:
        assert engine.workers == 3
        await reply(engine, request("first", prompt_of(vocab, STORY), max_new_tokens=2))
        await reply(engine, request("second", prompt_of(vocab, STORY), max_new_tokens=2))
        homes = {key: s.url for s in engine.pool.servers for key in s.channels}
        assert homes == {"first": spare.url, "second": server.url}  # the new channel went to the idle server
        await reply(engine, request("first", prompt_of(vocab, STORY), max_new_tokens=2))
        assert "first" in engine.pool.servers[0].channels  # it stays while the server is healthy
        texts = []
        async for chunk in engine.generate(request("first", prompt_of(vocab, COUNT), max_new_tokens=40)):
            if isinstance(chunk, Text):
                texts.append(chunk.text)
                if len(texts) == 3:
                    spare.kill()
            last = chunk
        assert isinstance(last, Finished) and last.stats.stop_reason in ("length", "eos")
        assert len(texts) > 3  # the reply went on on the other server
        text = "".join(texts)
        assert text.startswith("4\n5\n6")
        assert engine.pool.servers[0].healthy is False and "first" in engine.pool.servers[1].channels
    finally:
        await engine.close(grace=1)


async def test_processes_sharing_a_server_keep_to_their_own_slots(
    server: LlamaServer, vocab, demo_model_path: Path
) -> None:
    """Two bot processes (shards) on one server, each with `inference.slot_ids` of its own: their
    channels talk at once, and each second turn still finds its whole first prompt in its slot's cache."""
    settings = [settings_for(server.url).model_copy(deep=True) for _ in range(2)]
    for ids, each in zip(([0], [1]), settings, strict=True):
        each.inference.slot_ids = ids
    engines = [await started(each, demo_model_path) for each in settings]
    try:
        assert [e.workers for e in engines] == [1, 1]
        firsts = [prompt_of(vocab, f"<|im_start|>user\nName a {animal}.<|im_end|>\n<|im_start|>assistant\n".encode())
                  for animal in ("bird", "fish")]
        for turn in range(2):
            prompts = [first + prompt_of(vocab, b"Go on.") * turn for first in firsts]
            await asyncio.gather(*(reply(e, request(f"shard{i}", p, max_new_tokens=4))
                                   for i, (e, p) in enumerate(zip(engines, prompts, strict=True))))
        for engine, first in zip(engines, firsts, strict=True):
            assert engine.last_stats is not None and engine.last_stats.reused_tokens >= len(first)
        used = {slot["id"] for slot in server.get("/slots") if "id_task" in slot}  # type: ignore[union-attr]
        assert used == {0, 1}
    finally:
        for engine in engines:
            await engine.close(grace=1)


async def test_a_slot_the_server_does_not_have_stops_the_start(server: LlamaServer, demo_model_path: Path) -> None:
    settings = settings_for(server.url)
    settings.inference.slot_ids = [0, 5]
    with pytest.raises(ModelLoadError, match=r"has 2 slots, so it has no slot 5 of inference\.slot_ids"):
        await started(settings, demo_model_path)
