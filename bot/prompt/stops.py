"""Stop strings for Metharme replies and the final clean-up (streaming detection: `bot.inference.stops`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.prompt.builder import (
    ROLE_MARKERS,
    character_label,
    character_names,
    find_marker,
    fold_text,
    neutralise,
    speaker_label,
)

__all__ = ["clean_reply", "reply_stops", "strip_character_echo"]


def _clean_names(speaker_names: Iterable[str], character: str = "", characters: Iterable[str] = ()) -> list[str]:
    """The names a reply stops at, as the prompt shows them: members' labels, then the other characters'."""
    present = (*character_names(character), *character_names(characters))
    own = fold_text(neutralise(character_label(character)))
    # Names appear labelled and neutralised in the prompt, so that is the form the model echoes back.
    members = (neutralise(speaker_label(name, present)) for name in speaker_names)
    others = (
        label
        for label in (neutralise(character_label(name)) for name in character_names(characters))
        if fold_text(label) != own  # the speaker's own name, also when listed among those present
    )
    return list(dict.fromkeys(name for name in (*members, *others) if name))


def reply_stops(speaker_names: Iterable[str], character: str = "", *, characters: Iterable[str] = ()) -> list[str]:
    """Return the stop strings for a reply: the role markers, `</s>` and `\\n{label}:` for every speaker.

    `character` is the one speaking, `characters` every character present (the speaker among them or
    not): the reply also stops where another character's line starts, never at the speaker's own.
    Members' labels are `speaker_label(name, characters present)`: a member named like a character
    stops the reply at `\\nMira (member):`, never at the character's own `\\nMira:`.
    """
    names = _clean_names(speaker_names, character, characters)
    return [*ROLE_MARKERS, "</s>", *(f"\n{name}:" for name in names)]


def _echo_end(text: str, character: str) -> int | None:
    """Where a leading `{character}:` ends in `text` (any variant `neutralise` folds, leading blanks
    allowed), -1 when `text` is still a proper start of one, None when it is not one."""
    target = fold_text(neutralise(character))
    if not target:
        return None
    target += ":"
    seen = ""
    start = len(text) - len(text.lstrip())  # blank lines before the name are fine, not inside it
    for index, ch in enumerate(text[start:], start):
        if ch in "\r\n":
            return None
        seen += fold_text(ch)
        if seen == target:
            return index + 1
        if not target.startswith(seen):
            return None
    return -1


def strip_character_echo(text: str, character: str, *, partial: bool = False) -> str:
    """Remove a leading `{character}:` the model wrote before its reply (`Mira: Hello` -> ` Hello`).

    With `partial` (the reply is still streaming) a text that could still grow into that prefix
    gives "", so the name never flashes up before it is removed.
    """
    end = _echo_end(text, character) if character else None
    if end is None:
        return text
    if end < 0:
        return "" if partial else text
    return text[end:]


def clean_reply(
    text: str,
    speaker_names: Iterable[str],
    character: str = "",
    *,
    partial: bool = False,
    characters: Iterable[str] = (),
) -> str:
    """Cut a finished reply where the model starts another turn, then strip surrounding whitespace.

    The cut falls at the first role or control marker in any variant `neutralise` detects (case,
    spacing, zero-width, fullwidth; `</s>` and `[INST]` included), and at the first line that
    starts with `{label}:` for a speaker or another of the `characters` present (see
    `reply_stops`), the first line included. A leading `{character}:` is removed first (see
    `strip_character_echo`; `partial` while the reply still streams).
    """
    marker = find_marker(text)
    if marker is not None:
        text = text[:marker]
    text = strip_character_echo(text, character, partial=partial)
    names = _clean_names(speaker_names, character, characters)
    if names:
        alternation = "|".join(re.escape(name) for name in names)
        # Leading blanks still make a speaker line: the model sometimes indents its imitation.
        line = re.search(rf"^[ \t]*(?:{alternation}):", text, flags=re.MULTILINE)
        if line is not None:
            text = text[: line.start()]
    return text.strip()
