"""Rate limits and server errors through discord.py's real HTTP client, against a loopback aiohttp server.

The bot keeps no retry layer of its own: discord.py waits out short rate limits and retries 500,
502, 504 and 524 inside each call. A rate limit longer than `MAX_RATELIMIT_WAIT` raises
`discord.RateLimited`; a streaming edit that meets one is skipped and the reply goes on.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import discord
import pytest
from aiohttp import web

from bot.config import Settings
from bot.core.sessions import Speaker
from bot.discord_front.client import MAX_RATELIMIT_WAIT, TavernBot, create_bot
from bot.discord_front.keys import channel_key
from persistence.database import Database
from persistence.records import Role, TurnStatus
from tests.fake_backend import FakeBackend, fake_engine

CHANNEL = 4242
BOT_ID = 1000
REPLY = "The bridge sways, but it holds. Step where the planks are dark."
RATE_HEADERS = {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset-After": "5.0",
                "X-RateLimit-Bucket": "loopback-bucket"}


def as_json(body: object, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON as Discord sends it: discord.py reads a body as JSON only for exactly `application/json`."""
    return web.Response(body=json.dumps(body).encode(), status=status,
                        headers={**(headers or {}), "Content-Type": "application/json"})


@dataclass
class Failure:
    status: int
    retry_after: float = 0.0


@dataclass
class FakeDiscord:
    """The few REST routes a reply uses; `fail[(method, kind)]` lists answers to give before succeeding."""

    fail: dict[tuple[str, str], list[Failure]] = field(default_factory=dict)
    calls: list[tuple[str, str, float]] = field(default_factory=list)
    messages: dict[int, str] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(5000))

    def message(self, message_id: int, content: str) -> dict:
        return {
            "id": str(message_id), "channel_id": str(CHANNEL), "content": content, "type": 0,
            "author": {"id": str(BOT_ID), "username": "Tavernkeep", "discriminator": "0", "avatar": None,
                       "bot": True},
            "timestamp": "2026-01-01T00:00:00+00:00", "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "components": [],
        }

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.removeprefix("/api/v10")
        kind = "typing" if path.endswith("/typing") else "messages" if "/messages" in path else path
        self.calls.append((request.method, kind, time.perf_counter()))
        planned = self.fail.get((request.method, kind))
        if planned:
            failure = planned.pop(0)
            if failure.status == 429:
                body = {"message": "You are being rate limited.", "retry_after": failure.retry_after, "global": False}
                headers = {**RATE_HEADERS, "X-RateLimit-Remaining": "0",
                           "X-RateLimit-Reset-After": str(failure.retry_after), "X-RateLimit-Scope": "user",
                           "Retry-After": str(max(1, round(failure.retry_after))), "Via": "1.1 google"}
                return as_json(body, status=429, headers=headers)
            return as_json({"message": "Server error", "code": 0}, status=failure.status)
        if path == "/users/@me":
            return as_json({"id": str(BOT_ID), "username": "Tavernkeep", "discriminator": "0",
                                      "avatar": None, "bot": True})
        if kind == "typing" or request.method == "DELETE":
            return web.Response(status=204, headers=RATE_HEADERS)
        body = json.loads(await request.text() or "{}")
        message_id = next(self._ids) if request.method == "POST" else int(path.rsplit("/", 1)[1])
        if "content" in body:
            self.messages[message_id] = body["content"]
        return as_json(self.message(message_id, self.messages.get(message_id, "")), headers=RATE_HEADERS)

    def count(self, method: str, kind: str = "messages") -> int:
        return sum(1 for m, k, _ in self.calls if (m, k) == (method, kind))


@asynccontextmanager
async def loopback_bot(
    db_url: str, monkeypatch: pytest.MonkeyPatch, server: FakeDiscord, reply: str = REPLY
) -> AsyncIterator[TavernBot]:
    """The real bot, logged in over HTTP to `server` on 127.0.0.1, with a session and one message to answer
    (with `reply`)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    settings = Settings.model_validate({"discord": {"api_base_url": f"http://127.0.0.1:{port}/api/v10"}})
    database = await Database.open(db_url)
    engine = fake_engine(FakeBackend(reply, token_delay=0.01))
    await engine.start()
    bot = create_bot(settings, engine=engine, database=database, edit_interval=0.0, reply_delay=0)
    try:
        # What `Client.login` does, without its setup hook (command sync, recovery): loop, then HTTP.
        await bot._async_setup_hook()
        await bot.http.static_login("not-a-real-token")
        session = await bot.repo.start_session(channel_key(CHANNEL), persona_text="Mira is a ranger.")
        await bot.service.add_user_turn(session, Speaker(7, "Alice"), "Is the bridge safe?", message_id=77)
        yield bot
    finally:
        await bot.http.close()
        await engine.close(grace=0)
        await database.close()
        await runner.cleanup()


async def reply_once(bot: TavernBot) -> float:
    """Ask for a reply in the channel and wait for it; the seconds it took."""
    started = time.perf_counter()
    bot.replies.request_reply(bot.get_partial_messageable(CHANNEL), None)  # type: ignore[arg-type]
    await bot.replies.drain(60)
    return time.perf_counter() - started


async def stored_reply(bot: TavernBot) -> tuple[str, TurnStatus]:
    session = await bot.repo.get_active_session(channel_key(CHANNEL))
    assert session is not None
    [_, turn] = await bot.repo.recent_turns(session.id, 10)
    assert turn.role is Role.MODEL
    return turn.content, turn.status


def test_the_client_raises_instead_of_waiting_out_long_rate_limits() -> None:
    assert MAX_RATELIMIT_WAIT == 30.0  # discord.py's smallest allowed value


async def test_a_long_rate_limit_on_streaming_edits_skips_them_and_the_reply_ends_exact(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeDiscord(fail={("PATCH", "messages"): [Failure(429, retry_after=120.0)] * 2})
    async with loopback_bot(db_url, monkeypatch, server) as bot:
        seconds = await reply_once(bot)
        assert seconds < 10  # nothing waited out the 120 s limit
        [reply_id] = server.messages
        assert server.messages[reply_id] == REPLY
        assert server.count("POST") == 1 and server.count("PATCH") >= 3  # 2 refused, later ones landed
        assert await stored_reply(bot) == (REPLY, TurnStatus.COMPLETE)


async def test_a_short_rate_limit_is_waited_out_once_by_discord_py(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeDiscord(fail={("POST", "messages"): [Failure(429, retry_after=0.4)]})
    async with loopback_bot(db_url, monkeypatch, server) as bot:
        await reply_once(bot)
        posts = [at for method, kind, at in server.calls if (method, kind) == ("POST", "messages")]
        assert len(posts) == 2 and posts[1] - posts[0] >= 0.4  # one wait, inside discord.py, no second layer
        assert list(server.messages.values()) == [REPLY]
        assert await stored_reply(bot) == (REPLY, TurnStatus.COMPLETE)


async def test_a_server_error_on_the_final_edit_is_retried_by_discord_py(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeDiscord()
    # The first token must show at once: a reply opening with "T" is held back while it could still be
    # the nameless persona's echoed name ("the character:"), and the next update would come 60 s later.
    reply = "Step where the planks are dark; the bridge sways, but it holds."
    async with loopback_bot(db_url, monkeypatch, server, reply) as bot:
        bot.replies.edit_interval = 60.0  # only the first post streams; the final edit must land
        server.fail[("PATCH", "messages")] = [Failure(502)]
        await reply_once(bot)
        assert server.count("POST") == 1 and server.count("PATCH") == 2  # the 502, then discord.py's retry
        assert list(server.messages.values()) == [reply]
        assert await stored_reply(bot) == (reply, TurnStatus.COMPLETE)
