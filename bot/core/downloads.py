"""Fetching a user-supplied http(s) link (a character card or a lorebook) without letting it reach the bot's network.

The link is untrusted, and so is every server it leads to. Each hop is checked (scheme, no credentials,
literal addresses); host names are checked where aiohttp connects, by a resolver that drops private
addresses, so a name that resolves to a public address for a pre-check and a private one for the
connection (DNS rebinding) is still refused. Size, time and content type are bounded as well.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Collection
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from bot.errors import TavernError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Card PNGs (chub.ai serves image/png), CHARX archives (zip or a bare byte stream) and JSON cards or
# lorebooks (application/json, or text/plain from paste sites and raw file hosts). S3 labels untyped
# uploads binary/octet-stream. WebP is left out: cards carry their data in PNG text chunks.
CARD_TYPES: frozenset[str] = frozenset({
    "image/png",
    "application/json",
    "text/plain",
    "application/zip",
    "application/x-zip-compressed",
    "application/octet-stream",
    "binary/octet-stream",
})

MAX_REDIRECTS = 3
URL_MAX = 2048
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHOWN_TYPE = re.compile(r"[a-z0-9.+\-]{1,40}/[a-z0-9.+\-]{1,40}")


class DownloadError(TavernError):
    """A link could not be fetched; the message says why in one short sentence."""

    user_message = "I could not download that link."


class PrivateAddress(OSError):
    """Raised by the resolver when every address of a name is off limits (an OSError, as aiohttp expects)."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves only to addresses that are not public")


def address_allowed(ip: IPAddress) -> bool:
    """Whether a connection to `ip` may be made on behalf of a user: public unicast addresses only."""
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address can carry an IPv4 one that the kernel or a gateway will reach instead.
        if ip.ipv4_mapped is not None:
            return address_allowed(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None and not address_allowed(embedded):
            return False
        if ip.is_site_local:
            return False
    # `is_global` alone misses some ranges on older Pythons (e.g. ::7f00:1 is "global" on 3.11).
    special = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified)
    return ip.is_global and not special


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` (aiohttp's default resolver unless given) and keeps only allowed addresses."""

    def __init__(self, *, allow_private: bool = False, inner: AbstractResolver | None = None) -> None:
        self.allow_private = allow_private
        self._owns_inner = inner is None
        self._inner = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family=family)
        if self.allow_private:
            return results
        # The resolver's answer may be an unparsable or zone-suffixed string: anything not understood is dropped.
        kept = [result for result in results
                if (ip := _literal_address(result["host"])) is not None and address_allowed(ip)]
        if not kept:
            log.info("refused %s: it resolves to %s", host, ", ".join(r["host"] for r in results))
            raise PrivateAddress(host)
        return kept

    async def close(self) -> None:
        if self._owns_inner:
            await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCP connector that only connects to addresses its `GuardedResolver` lets through."""

    def __init__(self, *, allow_private: bool = False, resolver: AbstractResolver | None = None,
                 **kwargs: Any) -> None:
        self.guard = GuardedResolver(allow_private=allow_private, inner=resolver)
        super().__init__(resolver=self.guard, **kwargs)

    @property
    def allow_private(self) -> bool:
        return self.guard.allow_private

    async def close(self, **kwargs: Any) -> None:  # type: ignore[override]
        await super().close(**kwargs)
        await self.guard.close()


def guarded_session(*, allow_private: bool = False, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """A session fit for `fetch_file`: guarded connector, no proxies or .netrc from the environment."""
    return aiohttp.ClientSession(
        connector=GuardedConnector(allow_private=allow_private, resolver=resolver),
        trust_env=False,
        headers={"User-Agent": "Tavernkeep (character import)"},
    )


def check_url(url: URL, *, allow_private: bool) -> None:
    """Refuse a hop before any connection: wrong scheme, credentials, no host, or a disallowed literal address."""
    if url.scheme not in ("http", "https"):
        raise DownloadError("That link is not an http(s) URL.")
    if url.user is not None or url.password is not None:
        raise DownloadError("That link must not contain a user name or password.")
    if not url.host:
        raise DownloadError("That link has no host name.")
    # aiohttp connects to literal addresses without asking the resolver, so they are checked here.
    ip = _literal_address(url.host)
    if ip is not None and not allow_private and not address_allowed(ip):
        raise DownloadError("That link points to a private address.")


def _parse(url: str) -> URL:
    url = url.strip()
    if len(url) > URL_MAX:
        raise DownloadError("That link is too long.")
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise DownloadError("That is not a valid link.") from exc
    if not parsed.is_absolute():
        raise DownloadError("That link is not an http(s) URL.")
    return parsed


def _shown_type(content_type: str) -> str:
    """The server's content type, only if it looks like one: it is echoed back to the user."""
    return content_type if _SHOWN_TYPE.fullmatch(content_type) else "unknown"


def _refused_address(exc: BaseException) -> bool:
    """Whether a connection error was caused by the resolver refusing the addresses."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, PrivateAddress) or isinstance(getattr(seen, "os_error", None), PrivateAddress):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _size_label(max_bytes: int) -> str:
    if max_bytes >= 1024 * 1024 and max_bytes % (1024 * 1024) == 0:
        return f"{max_bytes // (1024 * 1024)} MB"
    if max_bytes >= 1024 and max_bytes % 1024 == 0:
        return f"{max_bytes // 1024} KB"
    return f"{max_bytes} bytes"


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    too_large = DownloadError(f"The file is larger than {_size_label(max_bytes)}.")
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            # Drop the connection rather than draining the rest of an oversized body.
            response.close()
            raise too_large
    return bytes(body)


async def _fetch(session: aiohttp.ClientSession, url: URL, *, max_bytes: int, request_timeout: float,
                 allow_private: bool, allowed_types: Collection[str]) -> bytes:
    for hop in range(MAX_REDIRECTS + 1):
        check_url(url, allow_private=allow_private)
        async with session.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=request_timeout),
                               # Cards are PNG or zip already; identity keeps decompression out of the path.
                               headers={"Accept-Encoding": "identity"}) as response:
            if response.status in _REDIRECTS and "Location" in response.headers:
                try:
                    target = url.join(URL(response.headers["Location"]))
                except ValueError as exc:
                    raise DownloadError("That link redirects to an invalid address.") from exc
                log.debug("hop %d: %s redirects to %s", hop, url, target)
                url = target
                continue
            if response.status != 200:
                raise DownloadError(f"The server answered {response.status}.")
            # aiohttp strips parameters ("; charset=utf-8") and lowercases; a missing type reads as octet-stream.
            if response.content_type not in allowed_types:
                raise DownloadError(
                    f"That link does not serve a card (content type {_shown_type(response.content_type)}).")
            return await _read_capped(response, max_bytes)
    raise DownloadError("That link redirects too many times.")


# `timeout` is one deadline over every hop and the body, applied with asyncio.timeout below.
async def fetch_file(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False,  # noqa: ASYNC109
                     allowed_types: Collection[str] = CARD_TYPES,
                     session: aiohttp.ClientSession | None = None) -> bytes:
    """Download `url` (http or https) and return its body, or raise `DownloadError` with a short reason.

    At most `max_bytes` are read and `timeout` seconds spent over all redirects together. A given
    `session` must come from `guarded_session` (its connector enforces the address rule); without
    one, a session is made for this call and closed after it.
    """
    parsed = _parse(url)
    if session is not None:
        connector = session.connector
        if not isinstance(connector, GuardedConnector) or (connector.allow_private and not allow_private):
            raise ValueError("fetch_file needs a session from guarded_session() with the same allow_private")
    try:
        async with asyncio.timeout(timeout):
            if session is not None:
                return await _fetch(session, parsed, max_bytes=max_bytes, request_timeout=timeout,
                                    allow_private=allow_private, allowed_types=allowed_types)
            async with guarded_session(allow_private=allow_private) as own:
                return await _fetch(own, parsed, max_bytes=max_bytes, request_timeout=timeout,
                                    allow_private=allow_private, allowed_types=allowed_types)
    except TimeoutError as exc:
        raise DownloadError("That link took too long to answer.") from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise DownloadError("That link's server has an invalid certificate.") from exc
    except aiohttp.ClientError as exc:
        if _refused_address(exc):
            raise DownloadError("That link points to a private address.") from exc
        log.info("download of %s failed: %r", parsed.with_query(None).with_fragment(None), exc)
        raise DownloadError("I could not download that link.") from exc
