"""Lorebooks (SillyTavern "World Info"): reading, export, and choosing the entries a reply needs.

A lorebook is a list of entries, each a piece of text (`content`) with trigger words (`keys`). Before
a reply, `activate` scans the last messages for those words and returns the content of the entries
they trigger, within a token budget, as `LoreInsert`s that the prompt builder places before or after
the character or at a depth in the conversation. The rules follow SillyTavern's `checkWorldInfo`
(public/scripts/world-info.js) so that books written for it behave the same here:

- entries are tried in priority order: books in the order given, inside a book by descending
  `order`; the budget is spent in that order (sticky entries first) and the first entry that does
  not fit ends the scan. Inserts come back in ascending `order`, so a higher order lands later,
  closer to the end of its position;
- a key matches case-insensitively unless the entry (or the call) says otherwise; a key without
  whitespace matches whole words, a key with whitespace as a substring; `/pattern/flags` is a
  regular expression, which ignores both settings;
- activated content is scanned again for keys (recursion) in further passes;
- probability, sticky, cooldown and delay behave as in SillyTavern, the timed ones through
  `LoreTimers`.

Where this differs from SillyTavern, on purpose:

- whole-word matching is on by default (`whole_words=True`; SillyTavern's global default is off) and
  word boundaries are Unicode-aware (JavaScript's `\\W` counts `é` as a boundary);
- each insert's text is counted alone and the inserts' total never exceeds the budget (SillyTavern
  counts the joined text and stops at `>=`);
- a card entry without `enabled` is enabled (SillyTavern reads a missing value as disabled); a card
  entry's top-level `case_sensitive` counts when `extensions.case_sensitive` is absent;
- positions without a place here go to the nearest one: the author's note (2 top, 3 bottom) to
  `depth` 4 as system, SillyTavern's default author's note place; the example messages (5 top,
  6 bottom), which follow the character description, to `after`; any other number to `after`;
- a card book's own `scan_depth`, `token_budget` and `recursive_scanning` count (SillyTavern ignores
  them): its scan depth is the default for its entries, its budget caps its own entries inside the
  call's budget, and without recursive scanning its content triggers nothing;
- inclusion groups, character filters, vector matching and "minimum activations" are not applied;
- the number of scan passes is bounded (`max_passes`).

Keys are untrusted regular expressions: each pattern is capped in length and estimated size before it
is compiled, each match has a timeout, and one activation spends at most `REGEX_TOTAL_SECONDS` on
them. A pattern that fails any of this does not match, and a warning is logged once.

Everything here is pure and blocking (callers run it on a thread): no Discord, no storage, no network.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal

import regex

from bot.errors import TavernError

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_ORDER",
    "MAX_ENTRIES",
    "MAX_FILE_BYTES",
    "LoreEntry",
    "LoreError",
    "LoreInsert",
    "LoreTimers",
    "Lorebook",
    "Position",
    "Role",
    "ScanMessage",
    "SelectiveLogic",
    "activate",
    "book_from_card",
    "read_world",
    "world_json",
]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_ENTRIES = 5000
MAX_SCAN_DEPTH = 1000  # SillyTavern's MAX_SCAN_DEPTH
MAX_PASSES = 16
DEFAULT_DEPTH = 4
DEFAULT_ORDER = 100
MAX_PATTERN_CHARS = 1000
# `regex` expands counted repeats when compiling: `(a{1000}){1000}` takes hundreds of MB before any
# timeout can help, so patterns whose estimated expansion is larger than this are refused unseen.
MAX_PATTERN_SIZE = 2000  # about 300 kB compiled; at most `_COMPILED_CACHE` of them are kept
_COMPILED_CACHE = 256
REGEX_MATCH_SECONDS = 0.05
REGEX_TOTAL_SECONDS = 0.5
_MAX_TIMER_ROWS = 10_000

Position = Literal["before", "after", "depth"]
Role = Literal["system", "user", "model"]


class LoreError(TavernError):
    """A lorebook that cannot be read."""

    user_message = "That lorebook could not be read."


class SelectiveLogic(IntEnum):
    """How secondary keys combine with a primary match (SillyTavern's `world_info_logic`)."""

    AND_ANY = 0
    NOT_ALL = 1
    NOT_ANY = 2
    AND_ALL = 3


# SillyTavern's `world_info_position` numbers, mapped to the places this bot has (module docstring).
_ST_POSITIONS: dict[int, tuple[Position, int | None]] = {
    0: ("before", None),
    1: ("after", None),
    2: ("depth", DEFAULT_DEPTH),
    3: ("depth", DEFAULT_DEPTH),
    4: ("depth", None),
    5: ("after", None),
    6: ("after", None),
}
_ROLES: dict[int, Role] = {0: "system", 1: "user", 2: "model"}
_DECORATORS = ("@@activate", "@@dont_activate")


@dataclass(frozen=True)
class LoreEntry:
    """One entry, normalised; missing fields carry SillyTavern's defaults.

    `None` in `case_sensitive`, `whole_words` and `scan_depth` means "use the book's or the call's
    setting"; `sticky`, `cooldown` and `delay` are off when `None` or 0. `delay_until_recursion` is a
    recursion level (0 off, `true` in a file reads as 1). `content` is without its leading
    `@@decorator` lines, which are in `decorators`.
    """

    uid: int | str
    keys: tuple[str, ...]
    secondary_keys: tuple[str, ...] = ()
    selective: bool = True
    selective_logic: SelectiveLogic = SelectiveLogic.AND_ANY
    content: str = ""
    constant: bool = False
    enabled: bool = True
    order: int = DEFAULT_ORDER
    position: Position = "before"
    depth: int = DEFAULT_DEPTH
    role: Role = "system"
    probability: int = 100
    use_probability: bool = True
    exclude_recursion: bool = False
    prevent_recursion: bool = False
    delay_until_recursion: int = 0
    case_sensitive: bool | None = None
    whole_words: bool | None = None
    scan_depth: int | None = None
    sticky: int | None = None
    cooldown: int | None = None
    delay: int | None = None
    comment: str = ""
    decorators: tuple[str, ...] = ()
    st_position: int = 0  # SillyTavern's position number, as read


@dataclass(frozen=True)
class Lorebook:
    """A parsed book. `raw` is the object as read (a world file or a card's `character_book`), kept for
    export; do not modify it. `recursive` False stops this book's content from triggering entries."""

    name: str
    entries: tuple[LoreEntry, ...]
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive: bool = True
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ScanMessage:
    """A history message; scanned as "name: text" (just the text when `name` is empty)."""

    name: str
    text: str


@dataclass(frozen=True)
class LoreInsert:
    """Text to place in the prompt. `depth` (messages from the end) and `role` matter for `depth` only."""

    text: str
    position: Position
    depth: int
    role: Role
    order: int
    constant: bool = False  # always on: placing it in the prompt's head costs the cache nothing


# --------------------------------------------------------------------------- reading


def read_world(data: bytes, *, name: str) -> Lorebook:
    """Parse a SillyTavern world file (`{"entries": {"0": {...}}}`); a JSON `character_book` (entries
    as a list) is accepted too. Raises `LoreError` for anything else."""
    if len(data) > MAX_FILE_BYTES:
        raise LoreError(f"That lorebook is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB.")
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise LoreError("That lorebook is not UTF-8 text.") from exc
    except (ValueError, RecursionError) as exc:
        raise LoreError("That lorebook is not valid JSON.") from exc
    if not isinstance(obj, dict):
        raise LoreError("That lorebook is not a JSON object with entries.")
    entries = obj.get("entries")
    if isinstance(entries, list):
        return book_from_card(obj, name=name)
    if not isinstance(entries, dict):
        raise LoreError("That lorebook has no entries object.")
    _check_count(len(entries))
    parsed = tuple(_world_entry(raw_entry, key) for key, raw_entry in entries.items())
    return Lorebook(name=name, entries=parsed, raw=MappingProxyType(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")


def book_from_card(character_book: Mapping[str, Any], *, name: str) -> Lorebook:
    """Parse a Character Card V2/V3 `character_book`, mapping its entries as SillyTavern's
    `convertCharacterBook` does. Raises `LoreError` when it is malformed or too large."""
    if not isinstance(character_book, Mapping):
        raise LoreError("The card's lorebook is not an object.")
    try:
        # Read-only mappings (a card's frozen data) serialise as the objects they are.
        text = json.dumps(dict(character_book), ensure_ascii=False, default=_plain)
    except (TypeError, ValueError, RecursionError) as exc:
        raise LoreError("The card's lorebook is not plain JSON data.") from exc
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise LoreError(f"The card's lorebook is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB.")
    raw = json.loads(text)  # a private copy: the caller's object may change later
    entries = raw.get("entries")
    if not isinstance(entries, list):
        raise LoreError("The card's lorebook has no list of entries.")
    _check_count(len(entries))
    world_entries = _card_world_entries(entries)
    parsed = tuple(_world_entry(entry, key) for key, entry in world_entries.items())
    where = "the lorebook"
    recursive = _bool(raw, "recursive_scanning", True, where)
    return Lorebook(
        name=name,
        entries=parsed,
        scan_depth=_int(raw, "scan_depth", None, where, low=0, high=MAX_SCAN_DEPTH),
        token_budget=_int(raw, "token_budget", None, where, low=0),
        recursive=recursive,
        raw=MappingProxyType(raw),
    )


def world_json(book: Lorebook) -> bytes:
    """The book as a SillyTavern world file. A book read from a world file comes back as it was read;
    one from a card is converted as SillyTavern converts it, with the card's book in `originalData`."""
    raw = dict(book.raw)
    if isinstance(raw.get("entries"), dict):
        world = raw
    elif isinstance(raw.get("entries"), list):
        world = {"entries": _card_world_entries(raw["entries"]), "originalData": raw}
    else:  # built in code: export the normalised entries
        world = {"entries": {str(entry.uid): _entry_as_world(entry) for entry in book.entries}}
    return json.dumps(world, ensure_ascii=False, indent=2).encode("utf-8")


def _check_count(count: int) -> None:
    if count > MAX_ENTRIES:
        raise LoreError(f"That lorebook has {count} entries; at most {MAX_ENTRIES} are allowed.")


def _card_world_entries(entries: list[Any]) -> dict[str, dict[str, Any]]:
    """SillyTavern's `convertCharacterBook`: card entries -> world entries keyed by uid."""
    result: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise LoreError(f"Lorebook entry {index + 1} is not an object.")
        ext = entry.get("extensions")
        if ext is None:
            ext = {}
        if not isinstance(ext, dict):
            raise LoreError(f"Lorebook entry {index + 1} has extensions that are not an object.")
        uid = entry.get("id")
        if uid is None:
            uid = index
        position = ext.get("position")
        if position is None:
            position = 0 if entry.get("position") == "before_char" else 1
        enabled = entry.get("enabled")

        def pick(name: str, default: Any, ext: dict[str, Any] = ext) -> Any:
            value = ext.get(name)
            return default if value is None else value

        result[str(uid)] = {
            "uid": uid,
            "key": entry.get("keys") if entry.get("keys") is not None else [],
            "keysecondary": entry.get("secondary_keys") or [],
            "comment": entry.get("comment") or "",
            "content": entry.get("content") if entry.get("content") is not None else "",
            "constant": entry.get("constant") or False,
            "selective": entry.get("selective") or False,
            "selectiveLogic": pick("selectiveLogic", 0),
            "order": entry.get("insertion_order") if entry.get("insertion_order") is not None else DEFAULT_ORDER,
            "position": position,
            "disable": enabled is not None and not enabled,
            "excludeRecursion": pick("exclude_recursion", False),
            "preventRecursion": pick("prevent_recursion", False),
            "delayUntilRecursion": pick("delay_until_recursion", False),
            "displayIndex": pick("display_index", index),
            "probability": pick("probability", 100),
            "useProbability": pick("useProbability", True),
            "depth": pick("depth", DEFAULT_DEPTH),
            "group": pick("group", ""),
            "groupOverride": pick("group_override", False),
            "groupWeight": pick("group_weight", 100),
            "scanDepth": ext.get("scan_depth"),
            "caseSensitive": pick("case_sensitive", entry.get("case_sensitive")),
            "matchWholeWords": ext.get("match_whole_words"),
            "useGroupScoring": ext.get("use_group_scoring"),
            "automationId": pick("automation_id", ""),
            "role": pick("role", 0),
            "vectorized": pick("vectorized", False),
            "sticky": ext.get("sticky"),
            "cooldown": ext.get("cooldown"),
            "delay": ext.get("delay"),
        }
    return result


def _world_entry(obj: Any, key: str) -> LoreEntry:
    if not isinstance(obj, dict):
        raise LoreError(f"Lorebook entry {key!r} is not an object.")
    given = obj.get("uid")
    uid: int | str = given if isinstance(given, int | str) and not isinstance(given, bool) else key
    if isinstance(uid, str) and uid.isdecimal() and len(uid) < 10:
        uid = int(uid)
    where = f"entry {uid}"
    st_position = _int(obj, "position", 0, where, low=-(2**31), high=2**31)
    position, fixed_depth = _ST_POSITIONS.get(st_position, ("after", None))
    depth = _int(obj, "depth", DEFAULT_DEPTH, where, low=0, high=MAX_SCAN_DEPTH)
    decorators, content = _split_decorators(_str(obj, "content", where))
    delay_until = obj.get("delayUntilRecursion")
    if isinstance(delay_until, bool) or delay_until is None:
        level = 1 if delay_until else 0
    else:
        level = _int(obj, "delayUntilRecursion", 0, where, low=0, high=1000)
    logic = _int(obj, "selectiveLogic", 0, where, low=-(2**31), high=2**31)
    return LoreEntry(
        uid=uid,
        keys=_keys(obj, "key", where),
        secondary_keys=_keys(obj, "keysecondary", where),
        selective=_bool(obj, "selective", True, where),
        selective_logic=SelectiveLogic(logic) if logic in SelectiveLogic._value2member_map_ else SelectiveLogic.AND_ANY,
        content=content,
        constant=_bool(obj, "constant", False, where),
        enabled=not _bool(obj, "disable", False, where),
        order=_int(obj, "order", DEFAULT_ORDER, where, low=-(2**31), high=2**31),
        position=position,
        depth=depth if fixed_depth is None else fixed_depth,
        role=_ROLES.get(_int(obj, "role", 0, where, low=-(2**31), high=2**31), "system"),
        probability=_int(obj, "probability", 100, where, low=0, high=100),
        use_probability=_bool(obj, "useProbability", True, where),
        exclude_recursion=_bool(obj, "excludeRecursion", False, where),
        prevent_recursion=_bool(obj, "preventRecursion", False, where),
        delay_until_recursion=level,
        case_sensitive=_bool(obj, "caseSensitive", None, where),
        whole_words=_bool(obj, "matchWholeWords", None, where),
        scan_depth=_int(obj, "scanDepth", None, where, low=0, high=MAX_SCAN_DEPTH),
        sticky=_int(obj, "sticky", None, where, low=0, high=10**6) or None,
        cooldown=_int(obj, "cooldown", None, where, low=0, high=10**6) or None,
        delay=_int(obj, "delay", None, where, low=0, high=10**9) or None,
        comment=_str(obj, "comment", where),
        decorators=decorators,
        st_position=st_position,
    )


def _entry_as_world(entry: LoreEntry) -> dict[str, Any]:
    """A normalised entry back in world-file fields (for books built in code, without `raw`)."""
    roles = {role: number for number, role in _ROLES.items()}
    content = "\n".join((*entry.decorators, entry.content)) if entry.decorators else entry.content
    return {
        "uid": entry.uid, "key": list(entry.keys), "keysecondary": list(entry.secondary_keys),
        "comment": entry.comment, "content": content, "constant": entry.constant, "selective": entry.selective,
        "selectiveLogic": int(entry.selective_logic), "order": entry.order, "position": entry.st_position,
        "disable": not entry.enabled, "excludeRecursion": entry.exclude_recursion,
        "preventRecursion": entry.prevent_recursion, "delayUntilRecursion": entry.delay_until_recursion,
        "probability": entry.probability, "useProbability": entry.use_probability, "depth": entry.depth,
        "role": roles[entry.role], "scanDepth": entry.scan_depth, "caseSensitive": entry.case_sensitive,
        "matchWholeWords": entry.whole_words, "sticky": entry.sticky, "cooldown": entry.cooldown,
        "delay": entry.delay,
    }  # fmt: skip


def _split_decorators(content: str) -> tuple[tuple[str, ...], str]:
    """SillyTavern's `parseDecorators`: leading `@@name` lines; `@@@name` is a fallback, used only
    when the line before it was a decorator this reader does not know."""
    if not content.startswith("@@"):
        return (), content
    lines = content.split("\n")
    found: list[str] = []
    fallback = False
    for index, line in enumerate(lines):
        if not line.startswith("@@"):
            return tuple(found), "\n".join(lines[index:])
        if line.startswith("@@@") and not fallback:
            continue
        name = line[1:] if line.startswith("@@@") else line
        if name.startswith(_DECORATORS):
            found.append(name.strip())
            fallback = False
        else:
            fallback = True
    return tuple(found), content  # SillyTavern keeps content made only of decorator lines


# Field readers: `None` (JSON null) and absence both mean the default, as SillyTavern's `??` does.


def _str(obj: Mapping[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise LoreError(f"Lorebook {where}: `{name}` should be text.")
    return value if isinstance(value, str) else str(value)


def _keys(obj: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = obj.get(name)
    if value is None:
        return ()
    if isinstance(value, str):  # older exports keep keys as one comma-separated string
        value = value.split(",")
    if not isinstance(value, list):
        raise LoreError(f"Lorebook {where}: `{name}` should be a list of keys.")
    keys = []
    for item in value:
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise LoreError(f"Lorebook {where}: every key in `{name}` should be text.")
        keys.append(item if isinstance(item, str) else str(item))
    return tuple(keys)


def _bool(obj: Mapping[str, Any], name: str, default: Any, where: str) -> Any:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise LoreError(f"Lorebook {where}: `{name}` should be true or false.")


def _int(obj: Mapping[str, Any], name: str, default: Any, where: str, *, low: int, high: int = 2**31) -> Any:
    value = obj.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise LoreError(f"Lorebook {where}: `{name}` should be a number.") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoreError(f"Lorebook {where}: `{name}` should be a number.")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LoreError(f"Lorebook {where}: `{name}` should be a finite number.")
        value = math.floor(value)
    return max(low, min(high, value))


# --------------------------------------------------------------------------- timers


@dataclass
class _Effect:
    start: int
    end: int
    protected: bool


class LoreTimers:
    """Sticky and cooldown state of one chat, keyed by (book name, entry uid).

    Each effect remembers the message count when it was set and when it ends, as SillyTavern's
    `chat_metadata.timedWorldInfo` does. `activate` reads and updates it; `to_json` / `from_json`
    keep it in a small JSON object between replies.
    """

    KINDS = ("sticky", "cooldown")

    def __init__(self) -> None:
        self._effects: dict[str, dict[tuple[str, str], _Effect]] = {kind: {} for kind in self.KINDS}

    def to_json(self) -> dict[str, list[list[Any]]]:
        return {
            kind: [[book, uid, e.start, e.end, e.protected] for (book, uid), e in effects.items()]
            for kind, effects in self._effects.items()
        }

    @classmethod
    def from_json(cls, data: object) -> LoreTimers:
        """Read what `to_json` wrote; malformed rows are dropped (the state is only a convenience)."""
        timers = cls()
        if not isinstance(data, Mapping):
            return timers
        for kind in cls.KINDS:
            rows = data.get(kind)
            if not isinstance(rows, list):
                continue
            for row in rows[:_MAX_TIMER_ROWS]:
                if (
                    isinstance(row, list)
                    and len(row) == 5
                    and isinstance(row[0], str)
                    and isinstance(row[1], str)
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in row[2:4])
                    and isinstance(row[4], bool)
                ):
                    timers._effects[kind][(row[0], row[1])] = _Effect(row[2], row[3], row[4])
        return timers

    def active(self, kind: str) -> dict[tuple[str, str], tuple[int, int]]:
        """The effects of one kind as {(book, uid): (start, end)}."""
        return {key: (e.start, e.end) for key, e in self._effects[kind].items()}

    def __bool__(self) -> bool:
        return any(self._effects.values())

    def _check(self, kind: str, chat_length: int, entries: Mapping[tuple[str, str], LoreEntry]) -> set[tuple[str, str]]:
        """SillyTavern's `checkTimedEffectOfType`: drop effects that are stale or over, return the live
        ones. A sticky entry that ends starts its cooldown."""
        live: set[tuple[str, str]] = set()
        effects = self._effects[kind]
        for key, effect in list(effects.items()):
            entry = entries.get(key)
            if chat_length <= effect.start and not effect.protected:
                del effects[key]  # the chat did not advance (a reply written again): roll anew
            elif entry is None:
                if chat_length >= effect.end:
                    del effects[key]
            elif not getattr(entry, kind):
                del effects[key]
            elif chat_length >= effect.end:
                del effects[key]
                if kind == "sticky" and entry.cooldown:
                    self._effects["cooldown"][key] = _Effect(chat_length, chat_length + entry.cooldown, True)
            else:
                live.add(key)
        return live

    def _set(self, key: tuple[str, str], entry: LoreEntry, chat_length: int) -> None:
        for kind in self.KINDS:
            length = getattr(entry, kind)
            if length and key not in self._effects[kind]:
                self._effects[kind][key] = _Effect(chat_length, chat_length + length, False)


# --------------------------------------------------------------------------- matching


def _warn_once(key: tuple[str, ...], message: str, *args: object) -> None:
    if key in _warned:
        return
    if len(_warned) > 10_000:
        _warned.clear()
    _warned.add(key)
    log.warning(message, *args)


_warned: set[tuple[str, ...]] = set()

_JS_REGEX = re.compile(r"^/([\s\S]+?)/([gimsuy]*)$")
_UNESCAPED_SLASH = re.compile(r"(^|[^\\])/")
_JS_CODE_POINT = re.compile(r"(?<!\\)((?:\\\\)*)\\u\{([0-9a-fA-F]{1,6})\}")
_JS_BACKREFERENCE = re.compile(r"(?<!\\)((?:\\\\)*)\\k<(\w+)>")
_QUANTIFIER = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def _js_regex(key: str) -> tuple[str, str] | None:
    """(pattern, flags) when `key` is written `/pattern/flags` as SillyTavern's `parseRegexFromString`
    reads it (an unescaped `/` inside makes it plain text)."""
    found = _JS_REGEX.match(key)
    if found is None or _UNESCAPED_SLASH.search(found.group(1)):
        return None
    return found.group(1), found.group(2)


def _pattern_size(pattern: str) -> int:
    """A generous estimate of how many nodes `regex` builds: counted repeats multiply what they repeat."""
    stack: list[int] = [0]
    last = 0  # size of the last atom or group, which a quantifier applies to
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            last = 1
            stack[-1] += 1
            continue
        if char == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            last = 1
            stack[-1] += 1
            continue
        if char == "(":
            stack.append(0)
            i += 1
            continue
        if char == ")" and len(stack) > 1:
            last = stack.pop() + 1
            stack[-1] += last
            i += 1
            continue
        if char == "{":
            found = _QUANTIFIER.match(pattern, i)
            if found and (found.group(1) or found.group(2)):
                bounds = [int(n) for n in found.groups() if n]
                times = max(bounds) if bounds else 1
                stack[-1] += last * max(times - 1, 0)
                last *= max(times, 1)
                i = found.end()
                continue
        last = 1
        stack[-1] += 1
        i += 1
    return sum(stack)


@lru_cache(maxsize=_COMPILED_CACHE)
def _compile(pattern: str, flags: str) -> regex.Pattern[str] | str:
    """The compiled pattern, or a short reason why it was refused."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    if _pattern_size(pattern) > MAX_PATTERN_SIZE:
        return "too large once its repeats are counted"
    # JavaScript syntax that Python's engines read differently: `[^]` is "any character" and
    # `\u{...}` a code point, `\k<name>` a back-reference.
    source = pattern.replace("[^]", r"[\s\S]")
    source = _JS_CODE_POINT.sub(lambda m: f"{m.group(1)}\\U{int(m.group(2), 16):08x}", source)
    source = _JS_BACKREFERENCE.sub(lambda m: f"{m.group(1)}(?P={m.group(2)})", source)
    options = regex.VERSION0
    if "i" in flags:
        options |= regex.IGNORECASE
    if "m" in flags:
        options |= regex.MULTILINE
    if "s" in flags:
        options |= regex.DOTALL
    try:
        return regex.compile(source, options)
    except (regex.error, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        return f"invalid ({exc})"


_WORD = re.compile(r"\w+")


def _has_word(haystack: str, needle: str) -> bool:
    r"""`needle` in `haystack` between boundaries, as SillyTavern's `(?:^|\W)needle(?:$|\W)`: the start,
    the end or any non-word character (punctuation counts)."""
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        before = start == 0 or not _WORD.match(haystack, start - 1, start)
        if before and (end == len(haystack) or not _WORD.match(haystack, end, end + 1)):
            return True
        start = haystack.find(needle, start + 1)
    return False


class _Matcher:
    """Key matching for one activation, holding its regular-expression time allowance."""

    def __init__(self, *, case_sensitive: bool, whole_words: bool) -> None:
        self.case_sensitive = case_sensitive
        self.whole_words = whole_words
        self.regex_seconds = REGEX_TOTAL_SECONDS
        self._timed_out: set[tuple[str, str]] = set()  # a pattern that timed out once is not tried again
        self._lower: dict[int, tuple[str, str]] = {}
        self._words: dict[int, tuple[str, frozenset[str]]] = {}

    def matches(self, haystack: str, key: str, entry: LoreEntry, book: str) -> bool:
        parsed = _js_regex(key)
        if parsed is not None:
            return self._regex(haystack, parsed, entry, book)
        case_sensitive = entry.case_sensitive if entry.case_sensitive is not None else self.case_sensitive
        if not case_sensitive:
            haystack, key = self._lowered(haystack), key.lower()
        whole_words = entry.whole_words if entry.whole_words is not None else self.whole_words
        if whole_words and len(key.split()) == 1:
            if _WORD.fullmatch(key):  # the common case: one plain word, looked up among the text's words
                return key in self._words_of(haystack)
            return _has_word(haystack, key)
        return key in haystack

    def _lowered(self, text: str) -> str:
        cached = self._lower.get(id(text))
        if cached is not None and cached[0] is text:
            return cached[1]
        lowered = text.lower()
        self._lower[id(text)] = (text, lowered)
        return lowered

    def _words_of(self, text: str) -> frozenset[str]:
        cached = self._words.get(id(text))
        if cached is not None and cached[0] is text:
            return cached[1]
        words = frozenset(_WORD.findall(text))
        self._words[id(text)] = (text, words)
        return words

    def _regex(self, haystack: str, parsed: tuple[str, str], entry: LoreEntry, book: str) -> bool:
        pattern, flags = parsed
        if parsed in self._timed_out:
            return False
        if self.regex_seconds <= 0:
            message = "Lorebook %r: the time for patterns in one reply is used up; the other pattern keys do not match"
            _warn_once((book, "*", "budget"), message, book)
            return False
        started = time.perf_counter()
        compiled = _compile(pattern, flags)  # compiling counts too: a book may hold thousands of patterns
        self.regex_seconds -= time.perf_counter() - started
        if isinstance(compiled, str):
            what = (book, entry.uid, pattern[:80], compiled)
            _warn_once((book, str(entry.uid), pattern), "Lorebook %r entry %s: key /%s/ ignored: %s", *what)
            return False
        timeout = max(0.001, min(REGEX_MATCH_SECONDS, self.regex_seconds))
        started = time.perf_counter()
        try:
            # `y` (sticky) anchors at the start; `g` and `u` change nothing for a yes/no test.
            found = (compiled.match if "y" in flags else compiled.search)(haystack, timeout=timeout)
        except TimeoutError:
            self._timed_out.add(parsed)
            message = "Lorebook %r entry %s: key /%s/ took longer than %.0f ms and does not match"
            _warn_once(
                (book, str(entry.uid), pattern, "timeout"), message, book, entry.uid, pattern[:80], timeout * 1000
            )
            found = None
        finally:
            self.regex_seconds -= time.perf_counter() - started
        return found is not None


# --------------------------------------------------------------------------- activation


@dataclass(eq=False)
class _Candidate:
    book: Lorebook
    entry: LoreEntry
    key: tuple[str, str]
    rank: int
    text: str | None = None  # expanded content, set when it is rolled


class _Buffer:
    """The text an entry's keys are matched against: the last messages (newest first) and the content
    of entries activated in earlier passes, joined as SillyTavern's `WorldInfoBuffer.get` does."""

    MATCHER = "\x01"

    def __init__(self, history: Sequence[ScanMessage]) -> None:
        recent = list(history[-MAX_SCAN_DEPTH:])
        recent.reverse()
        self._messages = [(f"{m.name}: {m.text}" if m.name else m.text).strip() for m in recent]
        self._recursion: list[str] = []
        self._cache: dict[int, str] = {}

    def add_recursion(self, text: str) -> None:
        self._recursion.append(text)
        self._cache.clear()

    def text(self, depth: int) -> str:
        if depth <= 0:
            return ""
        cached = self._cache.get(depth)
        if cached is None:
            joiner = "\n" + self.MATCHER
            cached = self.MATCHER + joiner.join(self._messages[:depth])
            if self._recursion:
                cached += joiner + joiner.join(self._recursion)
            self._cache[depth] = cached
        return cached


def activate(
    books: Sequence[Lorebook],
    history: Sequence[ScanMessage],
    *,
    count_tokens: Callable[[str], int],
    budget_tokens: int,
    scan_depth: int = 2,
    recursive: bool = True,
    rng: random.Random | None = None,
    timers: LoreTimers | None = None,
    expand: Callable[[str], str] = lambda s: s,
    case_sensitive: bool = False,
    whole_words: bool = True,
    chat_length: int | None = None,
    max_passes: int = MAX_PASSES,
) -> list[LoreInsert]:
    """Choose the entries of `books` that `history` (oldest first) triggers and return their inserts.

    `budget_tokens` bounds the inserts' total as `count_tokens` counts each insert's text (callers
    pass about 25% of the context); constant entries count too. `scan_depth` is how many of the last
    messages are scanned unless an entry or book says otherwise. `expand` applies macros to keys
    before matching and to content before it is counted, scanned and inserted. `timers` carries
    sticky and cooldown state between calls and is updated in place; without it those are off.
    `chat_length` is how many messages the chat has had in all (default `len(history)`): delay and
    the timers count in it, so it should grow by one per message.
    """
    rng = rng or random.Random()
    length = len(history) if chat_length is None else chat_length
    candidates: list[_Candidate] = []
    for book in books:
        ranked = sorted((e for e in book.entries if e.enabled), key=lambda e: -e.order)
        for entry in ranked:
            candidates.append(_Candidate(book, entry, (book.name, str(entry.uid)), len(candidates)))
    if not candidates:
        return []
    by_key = {c.key: c.entry for c in candidates}
    sticky: set[tuple[str, str]] = set()
    cooldown: set[tuple[str, str]] = set()
    if timers is not None:
        sticky = timers._check("sticky", length, by_key)
        cooldown = timers._check("cooldown", length, by_key)

    matcher = _Matcher(case_sensitive=case_sensitive, whole_words=whole_words)
    buffer = _Buffer(history)
    levels = sorted({c.entry.delay_until_recursion for c in candidates if c.entry.delay_until_recursion})
    state = _PassState(False, levels.pop(0) if levels else 0, recursive, scan_depth, length)
    activated: list[_Candidate] = []
    done: set[int] = set()  # ranks activated or failed their roll: never tried again
    used = 0
    used_by_book: dict[str, int] = {}
    for _pass in range(max(1, max_passes)):
        found = [
            c
            for c in candidates
            if c.rank not in done
            and _triggered(c, buffer, matcher, expand, state=state, sticky=sticky, cooldown=cooldown)
        ]
        found.sort(key=lambda c: (c.key not in sticky, c.rank))
        overflowed = False
        new: list[_Candidate] = []
        for candidate in found:
            entry = candidate.entry
            rolls = entry.use_probability and entry.probability != 100 and candidate.key not in sticky
            if rolls and rng.random() * 100 > entry.probability:
                done.add(candidate.rank)
                continue
            candidate.text = expand(entry.content)
            tokens = count_tokens(candidate.text) if candidate.text else 0
            if used + tokens > budget_tokens:
                overflowed = True
                break
            book_budget = candidate.book.token_budget
            book_used = used_by_book.get(candidate.book.name, 0)
            if book_budget is not None and book_used + tokens > book_budget:
                done.add(candidate.rank)  # this book is full; others may still fit
                continue
            used += tokens
            used_by_book[candidate.book.name] = book_used + tokens
            done.add(candidate.rank)
            new.append(candidate)
        activated.extend(new)
        if overflowed:
            break
        feeding = [c.text for c in new if c.text and recursive and c.book.recursive and not c.entry.prevent_recursion]
        if feeding:
            state.recursing = True
        elif levels:
            state.recursing, state.level = True, levels.pop(0)
        else:
            break
        if feeding:
            buffer.add_recursion("\n".join(feeding))

    if timers is not None:
        for candidate in activated:
            timers._set(candidate.key, candidate.entry, length)
    ordered = sorted(activated, key=lambda c: -c.entry.order)
    ordered.reverse()
    return [LoreInsert(c.text, c.entry.position, c.entry.depth, c.entry.role, c.entry.order, c.entry.constant)
            for c in ordered if c.text]


@dataclass
class _PassState:
    recursing: bool
    level: int
    recursive: bool
    scan_depth: int
    chat_length: int


def _triggered(
    candidate: _Candidate,
    buffer: _Buffer,
    matcher: _Matcher,
    expand: Callable[[str], str],
    *,
    state: _PassState,
    sticky: set[tuple[str, str]],
    cooldown: set[tuple[str, str]],
) -> bool:
    """Whether one entry activates in this pass (the checks of `checkWorldInfo`, in its order)."""
    entry = candidate.entry
    recursing, level, recursive, scan_depth = state.recursing, state.level, state.recursive, state.scan_depth
    chat_length = state.chat_length
    is_sticky, on_cooldown = candidate.key in sticky, candidate.key in cooldown
    if entry.delay and chat_length < entry.delay:
        return False
    if on_cooldown and not is_sticky:
        return False
    if entry.delay_until_recursion and not is_sticky and (not recursing or entry.delay_until_recursion > level):
        return False
    if recursing and recursive and entry.exclude_recursion and not is_sticky:
        return False
    if "@@activate" in entry.decorators:
        return True
    if "@@dont_activate" in entry.decorators:
        return False
    if entry.constant or is_sticky:
        return True
    if not entry.keys:
        return False
    depth = entry.scan_depth
    if depth is None:
        depth = candidate.book.scan_depth if candidate.book.scan_depth is not None else scan_depth
    text = buffer.text(min(depth, MAX_SCAN_DEPTH))
    if not text:
        return False
    name = candidate.book.name

    def hit(key: str) -> bool:
        key = expand(key).strip()
        return bool(key) and matcher.matches(text, key, entry, name)

    if not any(hit(key) for key in entry.keys):
        return False
    if not (entry.selective and entry.secondary_keys):
        return True
    return _secondary(entry.selective_logic, (hit(key) for key in entry.secondary_keys))


def _secondary(logic: SelectiveLogic, hits: Iterable[bool]) -> bool:
    # Lazy, as in SillyTavern: AND ANY stops at the first hit, NOT ALL at the first miss.
    any_hit, all_hit = False, True
    for found in hits:
        any_hit |= found
        all_hit &= found
        if logic is SelectiveLogic.AND_ANY and found:
            return True
        if logic is SelectiveLogic.NOT_ALL and not found:
            return True
    if logic is SelectiveLogic.NOT_ANY:
        return not any_hit
    if logic is SelectiveLogic.AND_ALL:
        return all_hit
    return False
