"""Engine behaviour: streaming, fairness, bounded queue, cancellation, failures (fake backend)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import replace

import pytest

from bot.config import ModelSettings, Settings
from bot.errors import ChannelQueueFull, EngineClosed, GenerationFailed, QueueFull
from bot.inference.api import Finished, GenerationRequest, Queued, Started, Text
from bot.inference.engine import CLOSE_STOP_SECONDS, Engine
from bot.inference.local.llama import llama_engine
from bot.prompt.builder import Conversation, PromptTurn
from tests.fake_backend import ByteTokenizer, FakeBackend, fake_engine, fake_request


def request(key: str, text: str = "hello", *, max_new_tokens: int = 200, timeout: float | None = None):
    conv = Conversation(system="A test persona.", turns=(PromptTurn("user", text, speaker="Alice"),))
    return fake_request(key, conv, max_new_tokens, timeout=timeout)


async def collect(generation) -> tuple[str, list, Finished]:
    text, events, finished = "", [], None
    async for chunk in generation:
        events.append(chunk)
        if isinstance(chunk, Text):
            text += chunk.text
        elif isinstance(chunk, Finished):
            finished = chunk
    assert finished is not None
    return text, events, finished


async def started(engine: Engine) -> Engine:
    await engine.start()
    return engine


async def test_streams_text_and_stats():
    engine = await started(fake_engine(FakeBackend("Well met, traveller.")))
    text, events, finished = await collect(engine.generate(request("c1")))
    assert text == "Well met, traveller."
    assert isinstance(events[0], Started) and events[0].prompt_tokens > 0
    assert finished.stats.stop_reason == "eos"
    assert finished.stats.generated_tokens == len(text.encode())
    assert engine.last_stats == finished.stats
    await engine.close()


async def test_stop_strings_cut_the_reply():
    backend = FakeBackend("I pour a drink.\nAlice: thanks!<|user|>more")
    engine = await started(fake_engine(backend))
    req = request("c1")
    req = replace(req, stops=("<|user|>", "\nAlice:"))
    text, _, finished = await collect(engine.generate(req))
    assert text == "I pour a drink."
    assert finished.stats.stop_reason == "stop"
    await engine.close()


async def test_max_new_tokens_limits_the_reply():
    engine = await started(fake_engine(FakeBackend("x" * 100)))
    text, _, finished = await collect(engine.generate(request("c1", max_new_tokens=10)))
    assert text == "x" * 10
    assert finished.stats.stop_reason == "length"
    await engine.close()


async def test_multibyte_text_survives_byte_tokens():
    engine = await started(fake_engine(FakeBackend("Ça va? 🍺 שלום")))
    text, _, _ = await collect(engine.generate(request("c1")))
    assert text == "Ça va? 🍺 שלום"
    await engine.close()


async def test_channels_run_in_parallel_on_two_workers():
    backend = FakeBackend("abcdefghij", token_delay=0.02)
    engine = await started(fake_engine(backend, workers=2))
    t0 = time.monotonic()
    results = await asyncio.gather(*(collect(engine.generate(request(f"c{i}"))) for i in range(2)))
    elapsed = time.monotonic() - t0
    assert [r[0] for r in results] == ["abcdefghij"] * 2
    # Two 0.2 s generations on two workers overlap.
    assert elapsed < 0.38
    await engine.close()


async def test_one_request_per_channel_at_a_time_in_fifo_order():
    order: list[str] = []
    lock = threading.Lock()

    def reply(prompt: str) -> str:
        with lock:
            order.append(prompt.rsplit("Alice: ", 1)[-1].removesuffix("<|model|>"))
        return "ok"

    backend = FakeBackend(reply, token_delay=0.01)
    engine = await started(fake_engine(backend, workers=2))
    gens = [engine.generate(request("same", f"m{i}")) for i in range(3)]
    assert engine.running == 1 and engine.queue_depth == 2
    await asyncio.gather(*(collect(g) for g in gens))
    assert order == ["m0", "m1", "m2"]
    await engine.close()


async def test_channels_take_turns_and_see_their_position():
    order: list[str] = []

    def reply(prompt: str) -> str:
        order.append(prompt.rsplit("Alice: ", 1)[-1].removesuffix("<|model|>"))
        return "ok"

    engine = await started(fake_engine(FakeBackend(reply, token_delay=0.005), per_key_queue=10))
    gens = [engine.generate(request("A", "A1"))]
    gens += [engine.generate(request("A", f"A{i}")) for i in (2, 3, 4)]
    gens += [engine.generate(request("B", "B1")), engine.generate(request("C", "C1"))]
    results = await asyncio.gather(*(collect(g) for g in gens))
    assert order == ["A1", "A2", "B1", "C1", "A3", "A4"]
    first_positions = {f"{i}": next(e.position for e in r[1] if isinstance(e, Queued))
                       for i, r in enumerate(results) if any(isinstance(e, Queued) for e in r[1])}
    # Position at submission; B1 and C1 then overtake A3 and A4 (channels take turns).
    assert first_positions == {"1": 1, "2": 2, "3": 3, "4": 2, "5": 3}
    for _, events, _ in results[1:]:
        positions = [e.position for e in events if isinstance(e, Queued)]
        assert positions[-1] == 1, "every waiting request is told when it is next"
    await engine.close()


async def test_queue_bounds_refuse_with_clear_errors():
    engine = await started(fake_engine(FakeBackend("z", token_delay=0.05), queue_size=2, per_key_queue=1))
    running = engine.generate(request("A"))
    engine.generate(request("A"))
    with pytest.raises(ChannelQueueFull) as per_channel:
        engine.generate(request("A"))
    assert "already has 1" in per_channel.value.user_message
    engine.generate(request("B"))
    with pytest.raises(QueueFull) as full:
        engine.generate(request("C"))
    assert "busy" in full.value.user_message
    running.cancel()
    await engine.close()


async def test_cancel_queued_request_moves_the_others_up():
    engine = await started(fake_engine(FakeBackend("slow reply", token_delay=0.02)))
    first = engine.generate(request("A"))
    second = engine.generate(request("B"))
    third = engine.generate(request("C"))
    second.cancel()
    _, _, finished = await collect(second)
    assert finished.stats.stop_reason == "cancelled"
    _, third_events, _ = await collect(third)
    assert [e.position for e in third_events if isinstance(e, Queued)] == [2, 1]
    await collect(first)
    await engine.close()


async def test_cancel_running_request_stops_between_tokens_and_worker_recovers():
    engine = await started(fake_engine(FakeBackend("x" * 1000, token_delay=0.01)))
    gen = engine.generate(request("A"))
    seen = ""
    async for chunk in gen:
        if isinstance(chunk, Text):
            seen += chunk.text
            if len(seen) >= 3:
                gen.cancel()
        if isinstance(chunk, Finished):
            assert chunk.stats.stop_reason == "cancelled"
            assert chunk.stats.generated_tokens < 50
    text, _, finished = await collect(engine.generate(request("A", max_new_tokens=2000)))
    assert finished.stats.stop_reason == "eos" and len(text) == 1000
    await engine.close()


async def test_cancel_key_cancels_running_and_queued():
    engine = await started(fake_engine(FakeBackend("y" * 500, token_delay=0.01), per_key_queue=5))
    gens = [engine.generate(request("A")) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert engine.cancel_key("A") == 3
    reasons = [(await collect(g))[2].stats.stop_reason for g in gens]
    assert reasons == ["cancelled"] * 3
    await engine.close()


async def test_model_failure_reaches_caller_and_worker_keeps_serving(caplog):
    backend = FakeBackend("abcdef", fail_after=3)
    engine = await started(fake_engine(backend))
    with pytest.raises(GenerationFailed):
        await collect(engine.generate(request("A")))
    assert "generation failed (key=A" in caplog.text
    backend.fail_after = None
    text, _, _ = await collect(engine.generate(request("A")))
    assert text == "abcdef"
    await engine.close()


async def test_time_limit_stops_generation():
    engine = await started(fake_engine(FakeBackend("t" * 1000, token_delay=0.01)))
    _, _, finished = await collect(engine.generate(request("A", timeout=0.1)))
    assert finished.stats.stop_reason == "timeout"
    assert finished.stats.generated_tokens < 100
    await engine.close()


async def test_a_prompt_wider_than_the_context_starts_at_the_first_cut_that_fits():
    turns = tuple(
        PromptTurn("user", f"message {i:02d}", speaker="A") if i % 2 == 0 else PromptTurn("model", f"reply {i}")
        for i in range(40)
    )
    conv = Conversation(system="A test persona.", turns=turns)
    wide = fake_request("A", conv, 10, n_ctx=4096)
    backend = FakeBackend("ok", n_ctx=200)
    engine = await started(fake_engine(backend))
    _, events, finished = await collect(engine.generate(wide))
    start = next(e for e in events if isinstance(e, Started)).window_start
    assert start == min(c for c in wide.cuts if len(wide.tokens) - c + wide.head + 10 <= 200)
    assert backend.prompts[-1] == ByteTokenizer().detokenize(wide.window(start)).decode()
    assert finished.stats.prompt_tokens + 10 <= 200 and finished.stats.window_start == start
    tight = GenerationRequest(key="A", tokens=wide.tokens, max_new_tokens=10, head=wide.head)  # no cuts
    with pytest.raises(GenerationFailed):
        await collect(engine.generate(tight))
    await engine.close()


async def test_on_worker_runs_after_the_workers_generation_on_its_thread():
    backend = FakeBackend("abcdefghij", token_delay=0.01)
    order: list[str] = []
    backend.is_end = lambda token: order.append("end") is None and token == 2  # type: ignore[method-assign]
    engine = await started(fake_engine(backend, workers=2))
    running = asyncio.ensure_future(collect(engine.generate(request("A"))))
    await asyncio.sleep(0.03)  # worker 0 is generating

    def probe(seen: FakeBackend) -> str:
        order.append("probe")
        assert seen is backend
        return threading.current_thread().name

    assert (await engine.on_worker(probe)).startswith("tavernkeep-worker-0")
    assert order[-2:] == ["end", "probe"]  # the whole generation ran before the probe
    assert (await running)[0] == "abcdefghij"
    assert (await engine.on_worker(probe, 1)).startswith("tavernkeep-worker-1")
    await engine.close()
    with pytest.raises(EngineClosed):
        await engine.on_worker(probe)


async def test_close_cancels_waiting_and_refuses_new_work():
    backend = FakeBackend("done", token_delay=0.01)
    engine = await started(fake_engine(backend))
    running = engine.generate(request("A"))
    waiting = engine.generate(request("B"))
    await engine.close(grace=5)
    text, _, finished = await collect(running)
    assert text == "done" and finished.stats.stop_reason == "eos"
    assert (await collect(waiting))[2].stats.stop_reason == "cancelled"
    assert backend.closed
    with pytest.raises(EngineClosed):
        engine.generate(request("C"))


async def test_close_grace_expiry_cancels_running():
    engine = await started(fake_engine(FakeBackend("w" * 10000, token_delay=0.01)))
    running = engine.generate(request("A"))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await engine.close(grace=0.1)
    assert time.monotonic() - t0 < 1.0
    assert (await collect(running))[2].stats.stop_reason == "cancelled"


def test_more_threads_than_cores_is_warned_about(caplog, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with caplog.at_level(logging.WARNING, logger="bot.inference.local.llama"):
        llama_engine(Settings(model=ModelSettings(workers=2, threads=2)), "model.gguf")
        llama_engine(Settings(model=ModelSettings(workers=2)), "model.gguf")  # threads 0: 2 each
        assert not caplog.records
        llama_engine(Settings(model=ModelSettings(workers=2, threads=3)), "model.gguf")
    assert "2 x 3 = 6 threads on 4 cores" in caplog.text


# ------------------------------------------------------------------ stopping inside a long prompt evaluation


async def test_cancel_and_time_limit_stop_a_long_prompt_evaluation_and_the_worker_serves_the_next():
    backend = FakeBackend("abc", eval_seconds=30)
    engine = await started(fake_engine(backend))
    gen = engine.generate(request("A"))
    await asyncio.sleep(0.1)  # evaluating the prompt
    t0 = time.monotonic()
    gen.cancel()
    _, _, finished = await collect(gen)
    assert time.monotonic() - t0 < 0.5
    assert finished.stats.stop_reason == "cancelled" and finished.stats.generated_tokens == 0
    t0 = time.monotonic()
    _, _, finished = await collect(engine.generate(request("A", timeout=0.2)))
    assert finished.stats.stop_reason == "timeout" and time.monotonic() - t0 < 0.7
    backend.eval_seconds = 0
    text, _, finished = await collect(engine.generate(request("A")))
    assert text == "abc" and finished.stats.stop_reason == "eos"
    await engine.close()


async def test_close_is_bounded_by_the_grace_during_a_prompt_evaluation():
    backend = FakeBackend("abc", eval_seconds=60)
    engine = await started(fake_engine(backend))
    running = engine.generate(request("A"))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await engine.close(grace=0.3)
    assert 0.3 <= time.monotonic() - t0 < 0.9
    assert (await collect(running))[2].stats.stop_reason == "cancelled"
    assert backend.closed


async def test_close_leaves_a_worker_that_does_not_stop_and_still_returns(monkeypatch, caplog):
    monkeypatch.setattr("bot.inference.engine.CLOSE_STOP_SECONDS", 0.2)
    assert CLOSE_STOP_SECONDS > 0.2
    release = threading.Event()
    backend = FakeBackend("abc")
    real_tokens = backend.tokens

    def stuck(prompt, sampling, stop):
        release.wait(10)  # a backend that cannot be interrupted
        return real_tokens(prompt, sampling, stop)

    backend.tokens = stuck  # type: ignore[method-assign]
    engine = await started(fake_engine(backend))
    running = engine.generate(request("A"))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await engine.close(grace=0.1)
    assert time.monotonic() - t0 < 0.8
    assert not backend.closed, "a model still in use is never freed"
    assert "worker 0 did not stop in time" in caplog.text
    release.set()
    assert (await collect(running))[2].stats.stop_reason == "cancelled"


def test_llama_cpp_python_is_pinned_to_the_tested_version():
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith("llama-cpp-python")]
    # bot/inference/local/llama.py uses private attributes of llama_cpp.Llama: only the tested release may run it.
    assert pins == [f"llama-cpp-python=={version('llama-cpp-python')}"]


# ------------------------------------------------------------------ regenerate with a fixed seed


async def test_regenerate_with_a_fixed_seed_samples_with_a_new_seed_each_time(db_url):
    from bot.core.sessions import ChatService, Speaker
    from persistence.database import Database
    from persistence.repository import Repository

    backend = FakeBackend("A reply.")
    engine = await started(fake_engine(backend))
    database = await Database.open(db_url)
    try:
        for seed, fixed in ((42, True), (-1, False)):
            service = ChatService(Repository(database), engine, Settings(model=ModelSettings(seed=seed)))
            session = await service.repo.start_session(f"s{seed}", persona_text="A bard.")
            await service.add_user_turn(session, Speaker(1, "Alice"), "Hello")
            seeds = []
            stream = await service.reply(session)
            async for _ in stream:
                pass
            turn = await stream.save()
            seeds.append(backend.samplings[-1].seed)
            for _ in range(3):
                stream = await service.regenerate(session, turn)
                async for _ in stream:
                    pass
                turn = await stream.save()
                seeds.append(backend.samplings[-1].seed)
            if fixed:
                assert seeds[0] == 42, "a first reply is reproducible for the seed"
                assert len(set(seeds)) == len(seeds), seeds
            else:
                assert seeds == [None] * 4, "without a fixed seed every sample is already new"
    finally:
        await database.close()
        await engine.close()
