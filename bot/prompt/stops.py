"""Stop strings for Metharme replies and the final clean-up (streaming detection: `bot.inference.stops`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.prompt.builder import ROLE_MARKERS, find_marker, neutralise

__all__ = ["clean_reply", "reply_stops"]


def _clean_names(speaker_names: Iterable[str]) -> list[str]:
    # Names appear neutralised in the prompt, so that is the form the model echoes back.
    names = (neutralise(" ".join(name.split())) for name in speaker_names)
    return list(dict.fromkeys(name for name in names if name))


def reply_stops(speaker_names: Iterable[str]) -> list[str]:
    """Return the stop strings for a reply: the role markers, `</s>` and `\\n{name}:` for every speaker."""
    return [*ROLE_MARKERS, "</s>", *(f"\n{name}:" for name in _clean_names(speaker_names))]


def clean_reply(text: str, speaker_names: Iterable[str]) -> str:
    """Cut a finished reply where the model starts another turn, then strip surrounding whitespace.

    The cut falls at the first role or control marker in any variant `neutralise` detects (case,
    spacing, zero-width, fullwidth; `</s>` and `[INST]` included), and at the first line that
    starts with `{name}:` for a speaker, the first line included.
    """
    marker = find_marker(text)
    if marker is not None:
        text = text[:marker]
    names = _clean_names(speaker_names)
    if names:
        alternation = "|".join(re.escape(name) for name in names)
        # Leading blanks still make a speaker line: the model sometimes indents its imitation.
        line = re.search(rf"^[ \t]*(?:{alternation}):", text, flags=re.MULTILINE)
        if line is not None:
            text = text[: line.start()]
    return text.strip()
