"""The engine on the real demo model (llama.cpp): generation, workers, cancellation, loop health."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import replace

import pytest

from bot.app import model_engine
from bot.config import ModelSettings, Settings
from bot.core.sessions import generation_request
from bot.inference.api import Finished, GenerationRequest, Sampling, Started, Text
from bot.inference.engine import Engine
from bot.prompt.builder import Conversation, PromptTurn

pytestmark = pytest.mark.model


def make_settings(path, *, workers: int = 1, n_ctx: int = 1024) -> Settings:
    return Settings(model=ModelSettings(path=str(path), n_ctx=n_ctx, workers=workers, threads=1))


async def request(
    engine: Engine, key: str, text: str, *, max_new_tokens: int = 24, seed: int | None = 7
) -> GenerationRequest:
    conv = Conversation(
        system="Enter roleplay mode. You must act as Bob, a cheerful pirate.",
        turns=(PromptTurn("user", text, speaker="Alice"),),
    )
    request, _ = await engine.with_tokenizer(lambda tokenizer: generation_request(
        tokenizer, conv, key=key, n_ctx=engine.n_ctx, max_new_tokens=max_new_tokens,
        sampling=Sampling(seed=seed), speakers=("Alice",),
    ))
    return request


async def run(generation) -> tuple[str, Finished, list]:
    text, finished, events = "", None, []
    async for chunk in generation:
        events.append(chunk)
        if isinstance(chunk, Text):
            text += chunk.text
        elif isinstance(chunk, Finished):
            finished = chunk
    assert finished is not None
    return text, finished, events


async def test_real_model_streams_a_reply(demo_model_path):
    engine = model_engine(make_settings(demo_model_path), str(demo_model_path))
    await engine.start()
    try:
        text, finished, events = await run(engine.generate(await request(engine, "c1", "Hello! Who are you?")))
        assert isinstance(events[0], Started) and events[0].prompt_tokens > 10
        assert sum(isinstance(e, Text) for e in events) > 1, "reply should arrive in several chunks"
        assert text.strip()
        assert finished.stats.stop_reason in ("eos", "stop", "length")
        assert finished.stats.generated_tokens <= 24
        assert "<|user|>" not in text and "<|model|>" not in text
    finally:
        await engine.close()
    assert engine.workers == 1


async def test_on_worker_sees_the_context_the_reply_was_generated_in(demo_model_path):
    engine = model_engine(make_settings(demo_model_path), str(demo_model_path))
    await engine.start()
    try:
        req = await request(engine, "c1", "Hello! Who are you?")
        _, finished, _ = await run(engine.generate(req))

        def inspect(backend) -> tuple[str, list[int], list[int]]:
            prompt = list(req.tokens)  # the widest window fits this context
            return threading.current_thread().name, prompt, backend.live_tokens()

        name, prompt, live = await engine.on_worker(inspect)
        assert name.startswith("tavernkeep-worker-0")
        assert len(prompt) == finished.stats.prompt_tokens
        # The worker's KV cache holds the prompt, then the reply it generated.
        assert live[: len(prompt)] == prompt and len(live) > len(prompt)
    finally:
        await engine.close()


async def test_real_model_same_seed_same_reply(demo_model_path):
    engine = model_engine(make_settings(demo_model_path), str(demo_model_path))
    await engine.start()
    try:
        first, _, _ = await run(engine.generate(await request(engine, "c1", "Tell me about your ship.")))
        second, _, _ = await run(engine.generate(await request(engine, "c1", "Tell me about your ship.")))
        assert first == second
    finally:
        await engine.close()


async def test_real_model_two_workers_serve_two_channels_and_loop_stays_free(demo_model_path):
    engine = model_engine(make_settings(demo_model_path, workers=2), str(demo_model_path))
    await engine.start()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(
            run(engine.generate(await request(engine, "a", "Where are we sailing?", max_new_tokens=40))),
            run(engine.generate(await request(engine, "b", "What is your name?", max_new_tokens=40))),
        )
        workers = {next(e.worker for e in events if isinstance(e, Started)) for _, _, events in results}
        assert workers == {0, 1}
        assert all(text.strip() for text, _, _ in results)
    finally:
        stop.set()
        await tick
        await engine.close()
    # A blocked loop would show one gap as long as the whole generation (about a second).
    assert len(gaps) > 20
    assert max(gaps) < 0.25


async def test_real_model_cancellation_frees_the_worker(demo_model_path):
    engine = model_engine(make_settings(demo_model_path), str(demo_model_path))
    await engine.start()
    try:
        gen = engine.generate(await request(engine, "c1", "Tell me a very long story.", max_new_tokens=400))
        pieces = 0
        async for chunk in gen:
            if isinstance(chunk, Text):
                pieces += 1
                if pieces == 2:
                    gen.cancel()
            if isinstance(chunk, Finished):
                assert chunk.stats.stop_reason in ("cancelled", "eos", "stop")
                assert chunk.stats.generated_tokens < 40
        text, _, _ = await run(engine.generate(await request(engine, "c1", "Hi again!")))
        assert text.strip()
    finally:
        await engine.close()


def test_worker_context_is_built_from_llama_params(demo_model_path):
    from bot.inference.local.llama import N_BATCH, LlamaBackend, llama_params

    settings = ModelSettings(path=str(demo_model_path), n_ctx=512, workers=2, threads=0)
    backend = LlamaBackend(str(demo_model_path), settings)
    try:
        params = llama_params(str(demo_model_path), settings)
        # threads 0: the cores shared among the workers; the same for prompt and generation.
        assert params["n_threads"] == params["n_threads_batch"] == max(1, (os.cpu_count() or 1) // 2)
        assert backend.llm.n_batch == params["n_batch"] == N_BATCH
        assert backend.llm.context_params.n_threads == params["n_threads"]
        assert backend.llm.context_params.n_threads_batch == params["n_threads_batch"]
        assert backend.n_ctx == 512
    finally:
        backend.close()


# ------------------------------------------------------------------ stopping inside a long prompt evaluation

LONG_TURNS = tuple(
    PromptTurn("user", f"Line {i}: the parrot squawks about island number {i} and its golden sand.", "Alice")
    if i % 2 == 0 else PromptTurn("model", f"Aye, island {i} has the finest sand of the seven seas, matey!")
    for i in range(70)
)
GREEDY = Sampling(temperature=0.0, seed=1)


def long_settings(path) -> ModelSettings:
    return ModelSettings(path=str(path), n_ctx=2048, threads=1)


async def test_cancel_during_a_long_prompt_evaluation_stops_it_and_the_worker_answers_right(demo_model_path):
    from bot.inference.engine import run_generation
    from bot.inference.local.llama import LlamaBackend
    from bot.inference.local.state_cache import StateCache

    settings = long_settings(demo_model_path)
    conv = Conversation("Enter roleplay mode. You must act as Bob, a cheerful pirate.", LONG_TURNS)
    fresh = LlamaBackend(str(demo_model_path), settings, n_batch=16)
    try:
        request, _ = generation_request(fresh.tokenizer, conv, key="c", n_ctx=2048, max_new_tokens=16,
                                        sampling=GREEDY)
        assert len(request.tokens) > 1500
        # For the time limit below: another channel and persona, so nothing can be reused.
        other, _ = generation_request(fresh.tokenizer, replace(conv, system="You must act as Ann, a grumpy cook."),
                                      key="d", n_ctx=2048, max_new_tokens=16, sampling=GREEDY)
        pieces: list[str] = []
        reference = await asyncio.to_thread(
            run_generation, fresh, request, threading.Event(),
            lambda chunk: pieces.append(chunk.text) if isinstance(chunk, Text) else None,
        )
        expected = "".join(pieces)
    finally:
        fresh.close()
    full_evaluation = reference.first_token_seconds
    assert full_evaluation is not None and full_evaluation > 1.0, "the prompt must take a while to evaluate"

    engine = Engine(lambda: LlamaBackend(str(demo_model_path), settings, cache=StateCache(2**28), n_batch=16))
    await engine.start()
    try:
        generation = engine.generate(request)
        async for chunk in generation:
            if isinstance(chunk, Started):
                break
        await asyncio.sleep(full_evaluation / 3)  # well inside the evaluation
        begin = time.perf_counter()
        generation.cancel()
        finished = None
        async for chunk in generation:
            if isinstance(chunk, Finished):
                finished = chunk
        cancel_seconds = time.perf_counter() - begin
        assert finished is not None and finished.stats.stop_reason == "cancelled"
        assert finished.stats.generated_tokens == 0
        assert cancel_seconds < min(0.5, full_evaluation / 4), (cancel_seconds, full_evaluation)
        # The next request on that worker reuses only what was evaluated in full, and answers as a fresh context.
        text, finished, events = await run(engine.generate(request))
        started = next(e for e in events if isinstance(e, Started))
        assert 0 < started.reused_tokens < len(request.tokens) * 0.75
        assert text == expected and finished.stats.generated_tokens == reference.generated_tokens

        # A time limit takes effect inside the evaluation too.
        begin = time.perf_counter()
        _, finished, _ = await run(engine.generate(replace(other, timeout=0.3)))
        assert finished.stats.stop_reason == "timeout" and time.perf_counter() - begin < 0.3 + 0.5

        # Shutdown: the grace, then a prompt evaluation in progress stops at once.
        running = engine.generate(replace(request, key="e"))
        await asyncio.sleep(0.2)
        begin = time.perf_counter()
        await engine.close(grace=0.3)
        assert time.perf_counter() - begin < 0.3 + 0.5
        assert (await run(running))[1].stats.stop_reason == "cancelled"
    finally:
        await engine.close()


# ------------------------------------------------------------------ regenerate with a fixed seed


async def test_regenerate_with_a_fixed_seed_gives_a_new_text_and_a_first_reply_stays_reproducible(
    demo_model_path, db_url
):
    from bot.core.sessions import ChatService, Speaker
    from persistence.database import Database
    from persistence.repository import Repository

    settings = Settings(model=ModelSettings(path=str(demo_model_path), n_ctx=1024, threads=1, seed=42,
                                            max_new_tokens=24))
    engine = model_engine(settings, str(demo_model_path))
    await engine.start()
    database = await Database.open(db_url)
    try:
        service = ChatService(Repository(database), engine, settings)

        async def first_reply(name: str):
            session = await service.repo.start_session(name, persona_text="Bob, a cheerful pirate.")
            await service.add_user_turn(session, Speaker(1, "Alice"), "Tell me about your ship.")
            stream = await service.reply(session)
            async for _ in stream:
                pass
            return session, await stream.save()

        session, turn = await first_reply("one")
        _, again = await first_reply("two")
        assert turn is not None and again is not None and turn.content == again.content
        seen = {turn.content}
        for _ in range(2):
            stream = await service.regenerate(session, turn)
            async for _ in stream:
                pass
            turn = await stream.save()
            assert turn is not None and turn.content not in seen
            seen.add(turn.content)
    finally:
        await database.close()
        await engine.close()
