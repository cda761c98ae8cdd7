"""Streaming stop-string detection: plain, exact matching over text that arrives in pieces."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopScanner"]


class StopScanner:
    """Feed streamed text; get back what is safe to emit, holding back a possible start of a stop string.

    Matching is exact and case-sensitive. Only the longest suffix of the unsent text that is a proper
    prefix of some stop string is held back, so output lags the stream by as little as possible, and
    any chunking of the same stream yields the same output: the text before the first stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        # An empty stop string would match before any text: it can only be a caller's mistake.
        self._stops = tuple(dict.fromkeys(stop for stop in stops if stop))
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string was seen; further input is ignored."""
        return self._stopped

    def feed(self, text: str) -> str:
        """Add streamed text and return the part that can be emitted now."""
        if self._stopped:
            return ""
        return self._advance(self._held + text, final=False)

    def flush(self) -> str:
        """End of stream: return the held-back text up to any stop in it (nothing once stopped)."""
        if self._stopped:
            return ""
        return self._advance(self._held, final=True)

    def _advance(self, buffer: str, *, final: bool) -> str:
        # Emitted text never holds the start of a stop (it would have been held back), so the first
        # stop in `buffer` is the first in the stream, unless a longer stop that began earlier can
        # still complete: `a` inside `xay` must wait until `xa` is followed by `y` or not.
        cut = min((i for stop in self._stops if (i := buffer.find(stop)) >= 0), default=len(buffer))
        pending = len(buffer) if final else self._pending_start(buffer, cut)
        if cut < len(buffer) and pending >= cut:
            self._stopped = True
            self._held = ""
            return buffer[:cut]
        self._held = buffer[pending:]
        return buffer[:pending]

    def _pending_start(self, buffer: str, limit: int) -> int:
        """Start of the longest suffix of `buffer` that begins before `limit` and could still become a stop."""
        for start in range(max(0, len(buffer) - self._longest + 1), min(limit, len(buffer))):
            tail = buffer[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self._stops):
                return start
        return len(buffer)
