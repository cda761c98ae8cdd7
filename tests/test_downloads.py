"""Fetching untrusted links: a real aiohttp server on 127.0.0.1, and nothing sent to any other address.

Refusals of other addresses happen before a connection (literal hosts) or inside the resolver (names),
so those tests send no traffic; names other than `localhost` go through a fixed resolver, never DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler

from bot.core import downloads
from bot.core.downloads import (
    CARD_TYPES,
    DownloadError,
    GuardedResolver,
    address_allowed,
    fetch_file,
    guarded_session,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"card" * 100
KB = 1024
STREAM_LIMIT = 64 * 1024 * 1024
PRIVATE = "That link points to a private address."


@dataclass
class Site:
    server: TestServer
    hits: list[str] = field(default_factory=list)
    streamed: list[int] = field(default_factory=lambda: [0])

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


class FixedResolver(AbstractResolver):
    """Answers from a table, as DNS would; unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"unknown name {host}")
        return [ResolveResult(hostname=host, host=address, port=port,
                              family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for address in self.table[host]]

    async def close(self) -> None:
        pass


def build_app(site: Site) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        site.hits.append(request.path)
        return await handler(request)

    async def card(_: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def card_json(_: web.Request) -> web.Response:
        return web.Response(body=b'{"spec": "chara_card_v2"}',
                            headers={"Content-Type": "application/json; charset=utf-8"})

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * (200 * KB), content_type="application/octet-stream")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/zip"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"z" * (64 * KB)
        try:
            while site.streamed[0] < STREAM_LIMIT:
                await response.write(chunk)
                site.streamed[0] += len(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return response

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=PNG, content_type="image/png")

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        for _ in range(200):
            await response.write(b".")
            await asyncio.sleep(0.05)
        return response

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>not a card</html>", content_type="text/html")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def chain(request: web.Request) -> web.Response:
        left = int(request.match_info["left"])
        raise web.HTTPFound(f"/chain/{left - 1}" if left > 1 else "/card.png")

    app = web.Application(middlewares=[record])
    app.add_routes([
        web.get("/card.png", card), web.get("/card.json", card_json), web.get("/big", big),
        web.get("/stream", stream), web.get("/slow", slow), web.get("/drip", drip), web.get("/page", page),
        web.get("/redirect", redirect), web.get("/loop", loop), web.get("/chain/{left}", chain),
    ])
    return app


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    site = Site(server=None)  # type: ignore[arg-type]
    site.server = TestServer(build_app(site), host="127.0.0.1")
    await site.server.start_server()
    yield site
    await site.server.close()


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let 127.0.0.1 count as public, so a redirect from the test server to elsewhere can be refused."""
    real = downloads.address_allowed
    monkeypatch.setattr(downloads, "address_allowed",
                        lambda ip: ip == ipaddress.IPv4Address("127.0.0.1") or real(ip))


async def refused(url: str, **kwargs: object) -> str:
    kwargs.setdefault("max_bytes", 100 * KB)
    kwargs.setdefault("timeout", 5.0)
    with pytest.raises(DownloadError) as caught:
        await fetch_file(url, **kwargs)  # type: ignore[arg-type]
    return caught.value.user_message


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("address", [
    "0.0.0.0", "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
    "169.254.169.254", "192.0.0.1", "198.18.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "::", "::1", "fe80::1", "fec0::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:0.0.0.0", "::7f00:1", "64:ff9b::7f00:1", "2002:7f00:1::1",
    "2002:a00:1::1",
])
def test_private_and_special_addresses_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


async def test_the_resolver_keeps_only_public_addresses_and_refuses_a_name_with_none() -> None:
    inner = FixedResolver({"mixed.test": ["10.0.0.1", "93.184.216.34", "::1"], "inside.test": ["10.0.0.1", "::1"]})
    guard = GuardedResolver(inner=inner)
    assert [r["host"] for r in await guard.resolve("mixed.test", 443, family=socket.AF_UNSPEC)] == ["93.184.216.34"]
    with pytest.raises(downloads.PrivateAddress):
        await guard.resolve("inside.test", 443)
    everything = GuardedResolver(allow_private=True, inner=inner)
    assert len(await everything.resolve("inside.test", 443)) == 2


# --------------------------------------------------------------------------- loopback server


async def test_fetch_works_when_private_addresses_are_allowed(site: Site) -> None:
    assert await fetch_file(site.url("/card.png"), max_bytes=100 * KB, timeout=5, allow_private=True) == PNG
    body = await fetch_file(site.url("/card.json"), max_bytes=100 * KB, timeout=5, allow_private=True)
    assert body.startswith(b'{"spec"')


async def test_loopback_is_refused_by_literal_address_and_by_name(site: Site) -> None:
    assert await refused(site.url("/card.png")) == PRIVATE
    assert await refused(f"http://localhost:{site.port}/card.png") == PRIVATE
    assert site.hits == []


async def test_a_name_that_resolves_to_loopback_is_refused_where_it_connects(site: Site) -> None:
    """No pre-check sees `example.test`: only the connector's resolver stands between it and 127.0.0.1."""
    resolver = FixedResolver({"example.test": ["127.0.0.1"]})
    url = f"http://example.test:{site.port}/card.png"
    async with guarded_session(resolver=resolver) as session:
        assert await refused(url, session=session) == PRIVATE
    assert site.hits == []
    async with guarded_session(allow_private=True, resolver=resolver) as session:
        assert await fetch_file(url, max_bytes=100 * KB, timeout=5, allow_private=True, session=session) == PNG
    assert resolver.asked == ["example.test", "example.test"]
    assert site.hits == ["/card.png"]


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "[::]"])
async def test_ipv6_and_unspecified_loopback_literals_are_refused(site: Site, host: str) -> None:
    assert await refused(f"http://{host}:{site.port}/card.png") == PRIVATE
    assert site.hits == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "https://10.0.0.1/card.png",
                                 "http://[fe80::1%25eth0]/card.png", "http://[fd00::1]:8080/"])
async def test_private_literals_are_refused_without_connecting(url: str) -> None:
    assert await refused(url) == PRIVATE


async def test_a_session_without_the_guard_is_not_accepted(site: Site) -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(ValueError):
            await fetch_file(site.url("/card.png"), max_bytes=KB, timeout=5, allow_private=True, session=plain)
    async with guarded_session(allow_private=True) as lax:
        with pytest.raises(ValueError):
            await fetch_file(site.url("/card.png"), max_bytes=KB, timeout=5, session=lax)
    assert site.hits == []


async def test_oversize_by_content_length(site: Site) -> None:
    assert await refused(site.url("/big"), allow_private=True) == "The file is larger than 100 KB."
    assert await fetch_file(site.url("/big"), max_bytes=200 * KB, timeout=5, allow_private=True) == b"x" * (200 * KB)


async def test_oversize_by_a_chunked_body_stops_reading(site: Site) -> None:
    started = time.monotonic()
    message = await refused(site.url("/stream"), allow_private=True, max_bytes=256 * KB)
    assert message == "The file is larger than 256 KB."
    assert time.monotonic() - started < 3
    await asyncio.sleep(0.2)  # let the handler notice the closed connection
    assert site.streamed[0] < 16 * KB * KB


async def test_a_slow_server_runs_into_the_timeout(site: Site) -> None:
    started = time.monotonic()
    message = await refused(site.url("/slow"), allow_private=True, timeout=0.3)
    assert message == "That link took too long to answer."
    assert time.monotonic() - started < 2


async def test_the_timeout_covers_the_whole_body_not_each_read(site: Site) -> None:
    started = time.monotonic()
    assert await refused(site.url("/drip"), allow_private=True, timeout=0.5) == "That link took too long to answer."
    assert time.monotonic() - started < 2


async def test_a_wrong_content_type_is_refused(site: Site) -> None:
    message = await refused(site.url("/page"), allow_private=True)
    assert message == "That link does not serve a card (content type text/html)."
    assert await fetch_file(site.url("/page"), max_bytes=KB, timeout=5, allow_private=True,
                            allowed_types={"text/html"}) == b"<html>not a card</html>"
    assert "text/html" not in CARD_TYPES


async def test_a_missing_file_reports_the_status(site: Site) -> None:
    assert await refused(site.url("/nothing-here"), allow_private=True) == "The server answered 404."


async def test_redirects_are_followed_and_each_hop_checked(site: Site, loopback_is_public: None) -> None:
    assert await fetch_file(site.url("/redirect?to=/card.png"), max_bytes=KB, timeout=5) == PNG
    for target in ("http://169.254.169.254/latest/meta-data/", f"http://[::1]:{site.port}/card.png",
                   f"http://10.0.0.7:{site.port}/card.png"):
        assert await refused(site.url(f"/redirect?to={target}")) == PRIVATE
    assert await refused(site.url("/redirect?to=file:///etc/passwd")) == "That link is not an http(s) URL."


async def test_a_redirect_to_a_name_with_a_private_address_is_refused(site: Site, loopback_is_public: None) -> None:
    resolver = FixedResolver({"inside.test": ["10.0.0.5"]})
    async with guarded_session(resolver=resolver) as session:
        assert await refused(site.url("/redirect?to=http://inside.test/card.png"), session=session) == PRIVATE
    assert resolver.asked == ["inside.test"]


async def test_redirects_are_capped(site: Site) -> None:
    assert await refused(site.url("/loop"), allow_private=True) == "That link redirects too many times."
    assert site.hits == ["/loop"] * 4
    assert await fetch_file(site.url("/chain/3"), max_bytes=KB, timeout=5, allow_private=True) == PNG
    assert await refused(site.url("/chain/4"), allow_private=True) == "That link redirects too many times."


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/card.png", "javascript:alert(1)",
                                 "example.com/card.png", "gopher://example.com/", ""])
async def test_only_http_and_https_links_are_fetched(url: str) -> None:
    assert await refused(url, allow_private=True) == "That link is not an http(s) URL."


async def test_credentials_in_the_link_are_refused(site: Site) -> None:
    url = site.url("/card.png").replace("http://", "http://user:secret@")
    assert await refused(url, allow_private=True) == "That link must not contain a user name or password."
    assert site.hits == []
