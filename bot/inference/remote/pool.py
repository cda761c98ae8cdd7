"""The inference servers: where each channel's replies go, health checks, and streaming over aiohttp.

Everything here runs on the event loop. A channel (request key) stays with one server while that
server is healthy, so its history stays in that server's prompt cache; on llama-server it also keeps
its slot (`id_slot`) while no other channel needs it. New channels go to the least loaded server. A
server that fails is marked down and skipped until its health check passes again; the reply that
failed goes on on another server, from the text already streamed, without a word to the user.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bot.config import InferenceSettings
from bot.errors import GenerationFailed, PersonaTooLarge, TavernError
from bot.inference.api import Sampling
from bot.inference.remote.dialects import Dialect, End, Event, Figures, Loading, Piece, ServerInfo, StreamError

log = logging.getLogger(__name__)

# Pause between polls of a server that is loading its model.
LOAD_POLL_SECONDS = 1.0


class ServerFailed(Exception):
    """A server could not serve a reply (unreachable, died mid-stream, internal error); another may."""


class ServerContextExceeded(PersonaTooLarge):
    """The server's context is smaller than the prompt (it was restarted with a smaller one, say)."""

    def __init__(self, tokens: int, allowed: int) -> None:
        super().__init__(tokens, allowed)
        self.user_message = (
            f"This conversation's prompt is {tokens} tokens, but the inference server now holds at most "
            f"{allowed} per reply. An admin can restart the bot so it fits its prompts to the server again."
        )
        self.args = (self.user_message,)


class ServerLoading(TavernError):
    """No server finished loading its model within `inference.load_wait_seconds`."""

    user_message = "The inference server is still loading its model. Please try again in a minute."


@dataclass(eq=False)
class Slot:
    """One reply a server can run at once; `key` is the channel whose history its cache holds."""

    id: int
    key: str | None = None
    busy: bool = False
    used: float = 0.0


@dataclass(eq=False)
class Server:
    """One inference server and what the pool knows of it."""

    url: str
    slots: list[Slot] = field(default_factory=list)
    n_ctx: int = 0
    model: str = ""
    healthy: bool = False
    probed: bool = False
    waiting: int = 0
    channels: set[str] = field(default_factory=set)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def running(self) -> int:
        """Replies being generated on the server now."""
        return sum(slot.busy for slot in self.slots)

    @property
    def load(self) -> float:
        """Running and waiting replies per slot."""
        return (self.running + self.waiting) / max(1, len(self.slots))


@dataclass(frozen=True, slots=True)
class ServerFigures:
    """The server's own figures of the last finished reply (for `/status`)."""

    url: str
    prompt_tokens: int
    evaluated: int | None
    cached: int | None
    timings: dict[str, Any]


class ServerPool:
    """The configured servers, their health, and which channel runs where."""

    def __init__(
        self,
        dialect: Dialect,
        settings: InferenceSettings,
        continuation: Callable[[bytes], list[int]] | None = None,
    ) -> None:
        self.dialect = dialect
        self.settings = settings
        self.servers = [Server(url) for url in settings.servers]
        # Tokens of reply text already streamed, to go on with it on another server (run off the loop).
        self.continuation = continuation
        self.last_figures: ServerFigures | None = None
        self._homes: dict[str, Server] = {}
        # Per channel: the tokens its server's cache holds, as far as the pool knows. Replaced whole,
        # never changed in place: worker threads read it (`cached_tokens`).
        self._cached: dict[str, tuple[int, ...]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._health: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle

    @property
    def n_ctx(self) -> int:
        """Context per reply: the smallest of the servers that answered."""
        sizes = [s.n_ctx for s in self.servers if s.probed and s.n_ctx]
        return min(sizes) if sizes else self.settings.n_ctx

    @property
    def capacity(self) -> int:
        """Replies all servers can generate at once."""
        return sum(len(s.slots) for s in self.servers)

    @property
    def model(self) -> str:
        """The model name the first server reports."""
        return next((s.model for s in self.servers if s.model), "")

    async def open(self) -> None:
        """Reach every server (waiting out model loads), read their context and slots, start health checks.

        Raises ServerFailed when no server answers.
        """
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.settings.connect_timeout_seconds, sock_read=self.settings.read_timeout_seconds
        )
        self._session = aiohttp.ClientSession(timeout=timeout)
        results = await asyncio.gather(*(self._wait_ready(s) for s in self.servers), return_exceptions=True)
        for server, result in zip(self.servers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("inference server %s is not available: %s", server.url, result)
        if not any(s.healthy for s in self.servers):
            await self.close()
            reasons = "; ".join(f"{s.url}: {r}" for s, r in zip(self.servers, results, strict=True))
            raise ServerFailed(f"no inference server is available ({reasons})")
        default = next(len(s.slots) for s in self.servers if s.probed)
        for server in self.servers:
            if not server.probed:
                server.slots = self._slots(self.settings.slots_per_server or default)
        self._health = asyncio.get_running_loop().create_task(self._health_loop(), name="inference-health")

    async def close(self) -> None:
        """Stop health checks and close the HTTP session."""
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
            self._health = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, server: Server, path: str) -> tuple[int, Any]:
        assert self._session is not None
        limit = aiohttp.ClientTimeout(total=self.settings.connect_timeout_seconds)
        async with self._session.get(server.url + path, timeout=limit) as response:
            try:
                body = await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = None
            return response.status, body

    async def _wait_ready(self, server: Server) -> None:
        """Wait until `server` answers its health check (not loading), then read what it is."""
        deadline = time.monotonic() + self.settings.load_wait_seconds
        told = False
        while True:
            status, _ = await self._get(server, "/health")
            if status == 200:
                break
            if status != 503:
                raise ServerFailed(f"health check answered {status}")
            if time.monotonic() >= deadline:
                raise ServerFailed(f"still loading its model after {self.settings.load_wait_seconds:.0f} s")
            if not told:
                log.warning("inference server %s is loading its model; waiting", server.url)
                told = True
            await asyncio.sleep(LOAD_POLL_SECONDS)
        await self._probe(server)
        server.healthy = True

    async def _probe(self, server: Server) -> None:
        props_status, props = await self._get(server, "/props")
        models_status, models = await self._get(server, "/v1/models")
        info: ServerInfo = self.dialect.info(
            props if props_status == 200 and isinstance(props, dict) else None,
            models if models_status == 200 and isinstance(models, dict) else None,
        )
        n_ctx = min(info.n_ctx, self.settings.n_ctx) if info.n_ctx and self.settings.n_ctx else info.n_ctx
        if not n_ctx:
            n_ctx = self.settings.n_ctx
        if not n_ctx:
            raise ServerFailed("reports no context size; set inference.n_ctx")
        if server.probed and n_ctx < server.n_ctx:
            log.warning("inference server %s came back with a context of %d tokens instead of %d: longer prompts "
                        "fail there until the bot is restarted", server.url, n_ctx, server.n_ctx)
        beyond = [i for i in self.settings.slot_ids if info.slots and i >= info.slots]
        if beyond:
            raise ServerFailed(f"has {info.slots} slots, so it has no slot {beyond[0]} of inference.slot_ids")
        slots = self.settings.slots_per_server or info.slots or 1
        wanted = self._slots(slots)
        if not server.probed or ([s.id for s in server.slots] != [s.id for s in wanted] and not server.running):
            server.slots = wanted
        server.n_ctx, server.model, server.probed = n_ctx, info.model, True
        log.info("inference server %s: %s, %d tokens of context per reply, %d at once",
                 server.url, info.model or "model", n_ctx, len(server.slots))

    def _slots(self, count: int) -> list[Slot]:
        """The slots this process uses on a server of `count`: those of `inference.slot_ids`, else all."""
        return [Slot(i) for i in self.settings.slot_ids or range(count)]

    async def tokenize(self, server: Server, text: str) -> list[int] | None:
        """The server's tokens of `text` (no special-token parsing, no BOS); None when it cannot tokenize."""
        assert self._session is not None
        body = {"content": text, "add_special": False, "parse_special": False}
        limit = aiohttp.ClientTimeout(total=self.settings.connect_timeout_seconds)
        try:
            async with self._session.post(server.url + "/tokenize", json=body, timeout=limit) as response:
                if response.status != 200:
                    return None
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return tokens

    # ------------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_seconds)
            await asyncio.gather(*(self.check(s) for s in self.servers))

    async def check(self, server: Server) -> bool:
        """Run one health check of `server`; mark it up or down; return whether it is healthy."""
        try:
            status, _ = await self._get(server, "/health")
            if status == 200 and not server.healthy:
                await self._probe(server)
                log.info("inference server %s is back", server.url)
                server.healthy = True
            elif status != 200 and server.healthy:
                self.mark_down(server, f"health check answered {status}")
        except (aiohttp.ClientError, TimeoutError, ServerFailed) as exc:
            if server.healthy:
                self.mark_down(server, f"health check failed: {exc or type(exc).__name__}")
        return server.healthy

    def mark_down(self, server: Server, reason: str) -> None:
        """Skip `server` until a health check passes; its channels move on their next reply."""
        if server.healthy:
            log.warning("inference server %s is down (%s); its channels move to the other servers", server.url, reason)
        server.healthy = False
        for key in server.channels:
            self._homes.pop(key, None)
            self._cached.pop(key, None)
        server.channels.clear()
        for slot in server.slots:
            slot.key = None
        self._wake(server)

    # ------------------------------------------------------------------ placement

    def cached_tokens(self, key: str) -> tuple[int, ...]:
        """Tokens the cache of `key`'s server holds for it, as far as known (safe from any thread)."""
        return self._cached.get(key, ())

    def home(self, key: str, skip: Sequence[Server] = ()) -> Server:
        """The server for `key`: the one it has while healthy, else the least loaded healthy one."""
        home = self._homes.get(key)
        if home is not None and home.healthy and home not in skip:
            return home
        candidates = [s for s in self.servers if s.healthy and s not in skip]
        if not candidates:
            raise ServerFailed("no healthy inference server")
        chosen = min(candidates, key=lambda s: (s.load, len(s.channels)))
        if home is not None:
            home.channels.discard(key)
        self._cached.pop(key, None)
        self._homes[key] = chosen
        chosen.channels.add(key)
        return chosen

    async def _acquire(self, server: Server, key: str) -> Slot:
        """A free slot of `server` for `key`: the one holding its cache, else an unused one, else the least recent."""
        server.waiting += 1
        try:
            while True:
                if not server.healthy:
                    raise ServerFailed("went down")
                free = [s for s in server.slots if not s.busy]
                if free:
                    break
                waiter = asyncio.get_running_loop().create_future()
                server.waiters.append(waiter)
                await waiter
        finally:
            server.waiting -= 1
        slot = next((s for s in free if s.key == key), None) or min(free, key=lambda s: (s.key is not None, s.used))
        if slot.key != key:
            if slot.key is not None:
                self._cached.pop(slot.key, None)  # its history leaves this slot's cache
            slot.key = key
        slot.busy = True
        return slot

    def _release(self, server: Server, slot: Slot) -> None:
        slot.busy = False
        slot.used = time.monotonic()
        self._wake(server)

    def _wake(self, server: Server) -> None:
        waiters, server.waiters = server.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ generation

    async def generate(self, key: str, prompt: list[int], sampling: Sampling, put: Callable[[object], None]) -> None:
        """Stream the reply to `prompt` for `key` into `put` (Piece events, a Loading while the server loads
        its model, then one End), or put an exception.

        When a server fails, the reply goes on on another healthy server: its prompt is the original
        one plus the reply text streamed so far.
        """
        try:
            await self._generate(key, prompt, sampling, put)
        except asyncio.CancelledError:
            raise
        except ServerFailed as exc:
            log.warning("no inference server could write the reply (key=%s): %s", key, exc)
            failure = GenerationFailed()
            failure.__cause__ = exc
            put(failure)
        except Exception as exc:
            put(exc)

    async def _generate(self, key: str, prompt: list[int], sampling: Sampling, put: Callable[[object], None]) -> None:
        streamed = bytearray()
        failed: list[Server] = []

        def forward(event: Event) -> None:
            if isinstance(event, Piece):
                streamed.extend(event.data)
            put(event)

        while True:
            server = self.home(key, failed)
            attempt = prompt
            if streamed and self.continuation is not None:
                more = await asyncio.get_running_loop().run_in_executor(None, self.continuation, bytes(streamed))
                attempt = [*prompt, *more]
            try:
                put(await self._run_on(server, key, attempt, sampling, forward))
                return
            except ServerFailed as exc:
                failed.append(server)
                self.mark_down(server, str(exc) or type(exc).__name__)
                if not any(s.healthy and s not in failed for s in self.servers):
                    raise
                log.info("the reply for key=%s goes on on another inference server", key)

    async def _run_on(
        self, server: Server, key: str, prompt: list[int], sampling: Sampling, forward: Callable[[Event], None]
    ) -> End:
        """Stream one attempt on `server`, forwarding its pieces; return how it ended."""
        slot = await self._acquire(server, key)
        tokens: list[int] = []
        end: End | None = None
        figures: Figures | None = None

        def collect(event: Event) -> None:
            nonlocal figures
            if isinstance(event, Figures):
                figures = event
                return
            if isinstance(event, Piece) and event.token is not None:
                tokens.append(event.token)
            forward(event)

        try:
            loading_since: float | None = None
            while True:
                try:
                    end = await self._stream(server, slot, prompt, sampling, collect)
                    break
                except _Loading:
                    if any(s.healthy and s is not server for s in self.servers):
                        raise ServerFailed("loading its model") from None
                    now = time.monotonic()
                    if loading_since is None:
                        loading_since = now
                        log.warning("inference server %s is loading its model; the reply waits", server.url)
                        forward(Loading())
                    elif now - loading_since > self.settings.load_wait_seconds:
                        raise ServerLoading() from None
                    await asyncio.sleep(LOAD_POLL_SECONDS)
        finally:
            # Also when the engine cut the reply (length, stop string, cancel): the cache holds the prompt
            # and what was generated of the reply.
            self._release(server, slot)
            held = (*prompt, *tokens)
            if end is not None and end.timings.get("tokens_cached") is not None:
                held = held[: int(end.timings["tokens_cached"])]
            if slot.key == key and self._homes.get(key) is server:
                self._cached[key] = held
            if figures is not None:
                timings = {**figures.timings, **(end.timings if end is not None else {})}
                self.last_figures = ServerFigures(server.url, len(prompt), figures.evaluated, figures.cached, timings)
        assert end is not None  # the loop only ends with a stream that ended
        return end

    async def _stream(
        self, server: Server, slot: Slot, prompt: list[int], sampling: Sampling, collect: Callable[[Event], None]
    ) -> End:
        assert self._session is not None
        n_predict = max(1, server.n_ctx - len(prompt))
        body = self.dialect.body(prompt, sampling, n_predict, slot.id if self.dialect.pins_slots else None)
        end: End | None = None
        try:
            async with self._session.post(server.url + self.dialect.completion_path, json=body) as response:
                if response.status != 200:
                    await self._refusal(server, response)
                # SSE lines are read by hand: aiohttp's line reader refuses lines above its buffer size.
                buffer = b""
                async for chunk in response.content.iter_any():
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        end = self._feed(line, end, collect)
                end = self._feed(buffer, end, collect)
        except StreamError as exc:
            if exc.error.get("type") == "exceed_context_size_error":
                raise _too_large(exc.error, len(prompt), server.n_ctx) from None
            raise ServerFailed(f"error in the stream: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerFailed(f"{type(exc).__name__}: {exc}") from None
        if end is None:
            raise ServerFailed("the reply stream ended before the reply did")
        return end

    def _feed(self, line: bytes, end: End | None, collect: Callable[[Event], None]) -> End | None:
        for event in self._events(line):
            if isinstance(event, End):
                end = _merge(end, event)
            else:
                collect(event)
        return end

    def _events(self, line: bytes) -> list[Event]:
        line = line.strip()
        if not line.startswith(b"data:"):
            if line.startswith(b"error:"):
                line = b"data:" + line[len(b"error:"):]
            else:
                return []
        payload = line[len(b"data:"):].strip()
        if payload == b"[DONE]" or not payload:
            return []
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise ServerFailed(f"unreadable stream event: {payload[:80]!r}") from exc
        return self.dialect.parse(event) if isinstance(event, dict) else []

    async def _refusal(self, server: Server, response: aiohttp.ClientResponse) -> None:
        """Turn an error status into the right exception."""
        try:
            body = await response.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {"message": str(error or body)}
        if response.status == 503:
            raise _Loading()
        if error.get("type") == "exceed_context_size_error":
            raise _too_large(error, 0, server.n_ctx)
        if response.status >= 500:
            raise ServerFailed(f"answered {response.status}: {error.get('message')}")
        log.error("inference server %s refused a request (%d): %s", server.url, response.status, error.get("message"))
        raise GenerationFailed()


class _Loading(Exception):
    """The server answered 503: it is loading its model."""


def _too_large(error: dict[str, Any], prompt: int, n_ctx: int) -> ServerContextExceeded:
    return ServerContextExceeded(int(error.get("n_prompt_tokens") or prompt), int(error.get("n_ctx") or n_ctx))


def _merge(old: End | None, new: End) -> End:
    """Join the end events of one stream (OpenAI sends `usage` after `finish_reason`)."""
    return new if old is None else End(old.reason, timings={**old.timings, **new.timings})
