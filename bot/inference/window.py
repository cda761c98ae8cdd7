"""Where a new prompt meets a cached one, and which window of a request to evaluate.

Pure functions over token lists: they know nothing of the template. A request's `head` is kept
in every window, and its `cuts` are the only places where a shorter window may start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bot.inference.api import GenerationRequest

# Tokens that must match to recognise where one window starts inside another: long enough that a
# coincidental match of ordinary text is out of the question, short enough to fit any turn.
ALIGN_PROBE = 24
_MAX_CANDIDATES = 64


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in slices first: whole-slice equality runs in C, the per-token loop only near the end.
    step = 256
    while i + step <= n and list(a[i : i + step]) == list(b[i : i + step]):
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_run(haystack: Sequence[int], needle: Sequence[int], start: int = 0) -> int:
    """First index >= `start` where `needle` occurs in `haystack`, or -1."""
    if not needle:
        return -1
    hay = list(haystack)
    needle = list(needle)
    first = needle[0]
    last = len(hay) - len(needle)
    i = start
    while i <= last:
        try:
            i = hay.index(first, i, last + 1)
        except ValueError:
            return -1
        if hay[i : i + len(needle)] == needle:
            return i
        i += 1
    return -1


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """How a new prompt relates to a cached token list past their shared persona.

    - ``prefix``: the prompt extends (or diverges from) the cache; reuse the common prefix.
    - ``align``: the prompt starts `offset` tokens of older turns before where the cache starts;
      dropping them from the prompt keeps the cached window (chunked trimming keeps its place).
    - ``slide``: the window moved on: the cache holds `offset` tokens of turns the prompt no longer
      has, right after the persona. Shift them out, or trim the prompt and re-evaluate.
    """

    kind: Literal["prefix", "align", "slide"]
    head: int
    offset: int = 0


def plan_window(prompt: Sequence[int], head: int, cached: Sequence[int], probe: int = ALIGN_PROBE) -> WindowPlan:
    """Compare `prompt` (persona of `head` tokens, then turns) with the tokens of a cached context.

    Turns often start alike (marker, speaker name), so every place where one window's first tokens
    occur in the other is a candidate, and the one followed by the longest identical run wins.
    """
    if len(cached) <= head or common_prefix(prompt[:head], cached[:head]) < head:
        return WindowPlan("prefix", head)
    best = WindowPlan("prefix", head)
    best_run = common_prefix(prompt[head:], cached[head:])
    for kind, hay, needle in (("slide", cached, prompt), ("align", prompt, cached)):
        size = min(probe, len(needle) - head)
        if size < probe:
            continue
        start = head + 1
        for _ in range(_MAX_CANDIDATES):
            at = find_run(hay, needle[head : head + size], start)
            if at < 0:
                break
            run = common_prefix(hay[at:], needle[head:])
            if run > best_run:
                best, best_run = WindowPlan(kind, head, at - head), run  # type: ignore[arg-type]
            start = at + 1
    return best


def fitting_starts(request: GenerationRequest, limit: int) -> list[int]:
    """Window starts (`head`, then the cuts) whose prompt plus the reply budget fits in `limit` tokens."""
    size = len(request.tokens) + request.max_new_tokens
    return [s for s in (request.head, *request.cuts) if size - (s - request.head) <= limit]


def fit_window(
    request: GenerationRequest,
    *,
    n_ctx: int,
    cached: Sequence[int] | None = None,
    context_shift: bool = False,
    trim_fraction: float = 0.5,
) -> tuple[int, int]:
    """Choose where the request's window starts; return that start and the tokens to shift out of the cache.

    The widest window that fits `n_ctx` is the default. With a cache (`cached` tokens): when the
    cache starts later in the conversation and that start is a cut, the window keeps it (align);
    when the window slid past the cache's start, the cache is shifted (`context_shift`) or, when it
    cannot shift, the window is trimmed by a large chunk (the first cut that leaves `trim_fraction`
    of the turn room free), so later requests keep that start as long as they fit and a full
    re-evaluation happens only when a chunk's worth of new conversation has arrived.
    """
    fits = fitting_starts(request, n_ctx)
    if not fits:
        raise ValueError(f"no window of the {len(request.tokens)}-token prompt fits a context of {n_ctx}")
    start, head = fits[0], request.head
    if not cached:
        return start, 0
    plan = plan_window(request.window(start), head, cached)
    if plan.kind == "slide" and context_shift:
        return start, plan.offset
    if plan.kind == "align":
        aligned = start + plan.offset
        return (aligned, 0) if aligned in request.cuts else (start, 0)
    if plan.kind == "slide":
        room = n_ctx - request.max_new_tokens - head
        trimmed = fitting_starts(request, n_ctx - int(room * trim_fraction))
        return (trimmed[0], 0) if trimmed else (start, 0)
    return start, 0
