"""Lorebooks: reading world files and card books, export, and SillyTavern's activation rules."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.core.lore import (
    MAX_ENTRIES,
    Lorebook,
    LoreEntry,
    LoreError,
    LoreInsert,
    LoreTimers,
    ScanMessage,
    SelectiveLogic,
    activate,
    book_from_card,
    read_world,
    world_json,
)
from bot.errors import TavernError


def count(text: str) -> int:
    return len(text) // 4 + 1


def world(*entries: dict[str, Any], name: str = "world") -> Lorebook:
    """A world file with the given entries (uids by position unless given), read back."""
    data = {"entries": {str(i): {"uid": i, **entry} for i, entry in enumerate(entries)}}
    return read_world(json.dumps(data).encode(), name=name)


def chat(*texts: str, name: str = "Alice") -> list[ScanMessage]:
    return [ScanMessage(name, text) for text in texts]


def run(books: Lorebook | list[Lorebook], history: list[ScanMessage], **kwargs: Any) -> list[str]:
    kwargs.setdefault("budget_tokens", 10_000)
    kwargs.setdefault("count_tokens", count)
    inserts = activate(books if isinstance(books, list) else [books], history, **kwargs)
    return [insert.text for insert in inserts]


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# --------------------------------------------------------------------------- reading


def test_world_entry_defaults_are_sillytaverns() -> None:
    book = world({"key": ["dragon"], "content": "Dragons fly."})
    (entry,) = book.entries
    assert entry == LoreEntry(uid=0, keys=("dragon",), content="Dragons fly.")
    assert (entry.order, entry.position, entry.depth, entry.role, entry.probability) == (
        100,
        "before",
        4,
        "system",
        100,
    )
    assert entry.selective and entry.use_probability and entry.enabled and not entry.constant
    assert entry.selective_logic is SelectiveLogic.AND_ANY
    assert (entry.case_sensitive, entry.whole_words, entry.scan_depth, entry.sticky) == (None, None, None, None)
    assert book.raw["entries"]["0"]["content"] == "Dragons fly."


def test_world_entry_fields_are_read() -> None:
    (entry,) = world(
        {
            "key": ["a"], "keysecondary": ["b"], "selectiveLogic": 3, "comment": "note", "content": "x",
            "constant": True, "selective": False, "order": 7, "position": 4, "depth": 2, "role": 2,
            "disable": True, "excludeRecursion": True, "preventRecursion": True, "delayUntilRecursion": 2,
            "probability": 40, "useProbability": False, "scanDepth": 5, "caseSensitive": True,
            "matchWholeWords": False, "sticky": 3, "cooldown": 4, "delay": 5, "uid": 42,
        }
    ).entries  # fmt: skip
    assert entry == LoreEntry(
        uid=42, keys=("a",), secondary_keys=("b",), selective=False, selective_logic=SelectiveLogic.AND_ALL,
        content="x", constant=True, enabled=False, order=7, position="depth", depth=2, role="model",
        probability=40, use_probability=False, exclude_recursion=True, prevent_recursion=True,
        delay_until_recursion=2, case_sensitive=True, whole_words=False, scan_depth=5, sticky=3, cooldown=4,
        delay=5, comment="note", st_position=4,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("st_position", "position", "depth"),
    [(0, "before", 7), (1, "after", 7), (2, "depth", 4), (3, "depth", 4), (4, "depth", 7), (5, "after", 7),
     (6, "after", 7), (7, "after", 7)],
)  # fmt: skip
def test_positions_map_to_the_nearest_place(st_position: int, position: str, depth: int) -> None:
    (entry,) = world({"key": ["k"], "position": st_position, "depth": 7}).entries
    assert (entry.position, entry.depth, entry.st_position) == (position, depth, st_position)


BAD_FILES = [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (b"{}", "no entries"),
    (b'{"entries": 5}', "no entries"),
    (b'{"entries": {"0": "text"}}', "not an object"),
    (b'{"entries": {"0": {"key": 5}}}', "list of keys"),
    (b'{"entries": {"0": {"key": [["x"]]}}}', "should be text"),
    (b'{"entries": {"0": {"content": {"a": 1}}}}', "should be text"),
    (b'{"entries": {"0": {"order": "high"}}}', "should be a number"),
    (b'{"entries": {"0": {"constant": "yes"}}}', "true or false"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
]


@pytest.mark.parametrize(("data", "words"), BAD_FILES)
def test_bad_world_files_raise_a_clear_lore_error(data: bytes, words: str) -> None:
    with pytest.raises(LoreError) as caught:
        read_world(data, name="bad")
    assert isinstance(caught.value, TavernError)
    assert words in caught.value.user_message


def test_oversized_and_overfull_world_files_are_refused() -> None:
    with pytest.raises(LoreError, match="larger than 8 MiB"):
        read_world(b" " * (8 * 1024 * 1024 + 1), name="big")
    many = {"entries": {str(i): {"key": ["k"]} for i in range(MAX_ENTRIES + 1)}}
    with pytest.raises(LoreError, match=f"at most {MAX_ENTRIES}"):
        read_world(json.dumps(many).encode(), name="many")


def test_lenient_values_are_read_as_sillytavern_reads_them() -> None:
    data = {"entries": {"5": {"key": "sword, shield", "order": "12.7", "selective": 1, "probability": 250,
                              "depth": None, "delayUntilRecursion": True, "content": None}}}  # fmt: skip
    (entry,) = read_world(b"\xef\xbb\xbf" + json.dumps(data).encode(), name="w").entries
    assert entry.uid == 5  # the entry's key when it has no uid
    assert entry.keys == ("sword", " shield")
    assert (entry.order, entry.selective, entry.probability, entry.depth) == (12, True, 100, 4)
    assert (entry.delay_until_recursion, entry.content) == (1, "")


CARD_BOOK = {
    "name": "Card lore",
    "scan_depth": 5,
    "token_budget": 300,
    "recursive_scanning": False,
    "extensions": {},
    "entries": [
        {"keys": ["castle"], "content": "A castle.", "enabled": True, "insertion_order": 3,
         "position": "before_char", "secondary_keys": ["gate"], "selective": True},
        {"keys": ["moat"], "content": "A moat.", "enabled": False, "insertion_order": 1, "position": "after_char",
         "id": 9, "comment": "water", "case_sensitive": True,
         "extensions": {"position": 4, "depth": 1, "role": 1, "probability": 30, "useProbability": True,
                        "selectiveLogic": 2, "exclude_recursion": True, "prevent_recursion": True,
                        "delay_until_recursion": 3, "match_whole_words": False, "scan_depth": 2,
                        "sticky": 2, "cooldown": 1, "delay": 4}},
        {"keys": ["tower"], "content": "A tower.", "position": "after_char", "enabled": True},
    ],
}  # fmt: skip


def test_card_book_entries_map_as_convert_character_book_does() -> None:
    book = book_from_card(CARD_BOOK, name="card")
    castle, moat, tower = book.entries
    assert (book.name, book.scan_depth, book.token_budget, book.recursive) == ("card", 5, 300, False)
    assert castle == LoreEntry(uid=0, keys=("castle",), secondary_keys=("gate",), content="A castle.", order=3)
    assert moat == LoreEntry(
        uid=9, keys=("moat",), selective=False, selective_logic=SelectiveLogic.NOT_ANY, content="A moat.",
        enabled=False, order=1, position="depth", depth=1, role="user", probability=30, exclude_recursion=True,
        prevent_recursion=True, delay_until_recursion=3, case_sensitive=True, whole_words=False, scan_depth=2,
        sticky=2, cooldown=1, delay=4, comment="water", st_position=4,
    )  # fmt: skip
    assert (tower.uid, tower.position, tower.st_position, tower.order, tower.selective) == (2, "after", 1, 100, False)
    assert book.raw["entries"][0]["keys"] == ["castle"]


def test_card_book_is_copied_and_missing_enabled_means_enabled() -> None:
    source = {"entries": [{"keys": ["k"], "content": "c"}]}
    book = book_from_card(source, name="card")
    source["entries"][0]["content"] = "changed"
    assert book.entries[0].enabled
    assert book.raw["entries"][0]["content"] == "c"


@pytest.mark.parametrize(
    ("book", "words"),
    [
        ([], "not an object"),
        ({"entries": {"0": {}}}, "no list of entries"),
        ({"entries": ["x"]}, "entry 1 is not an object"),
        ({"entries": [{"keys": ["k"], "extensions": []}]}, "extensions"),
        ({"entries": [{"keys": ["k"], "content": object()}]}, "plain JSON"),
        ({"entries": [{"keys": ["k"]}] * (MAX_ENTRIES + 1)}, f"at most {MAX_ENTRIES}"),
        ({"entries": [{"keys": ["k"], "content": "x" * (8 * 1024 * 1024)}]}, "larger than 8 MiB"),
    ],
)
def test_bad_card_books_raise_lore_error(book: Any, words: str) -> None:
    with pytest.raises(LoreError, match=words):
        book_from_card(book, name="card")


def test_world_file_with_a_list_of_entries_reads_as_a_card_book() -> None:
    book = read_world(json.dumps(CARD_BOOK).encode(), name="pasted")
    assert book == book_from_card(CARD_BOOK, name="pasted")


def test_world_json_round_trips() -> None:
    original = {"entries": {"0": {"uid": 0, "key": ["k"], "content": "c", "group": "g", "vectorized": True}}, "x": 1}
    book = read_world(json.dumps(original).encode(), name="w")
    assert json.loads(world_json(book)) == original
    card = book_from_card(CARD_BOOK, name="card")
    exported = json.loads(world_json(card))
    assert exported["originalData"] == CARD_BOOK
    assert set(exported["entries"]) == {"0", "9", "2"}
    assert read_world(world_json(card), name="card").entries == card.entries
    built = Lorebook("built", (LoreEntry(uid=1, keys=("k",), content="c", decorators=("@@activate",)),))
    assert read_world(world_json(built), name="built").entries == built.entries


# --------------------------------------------------------------------------- matching


def test_keys_match_case_insensitively_unless_told() -> None:
    assert run(world({"key": ["Dragon"], "content": "hit"}), chat("a DRAGON appears")) == ["hit"]
    assert run(world({"key": ["Dragon"], "content": "hit", "caseSensitive": True}), chat("a DRAGON appears")) == []
    assert run(world({"key": ["Dragon"], "content": "hit"}), chat("a DRAGON"), case_sensitive=True) == []
    assert run(
        world({"key": ["Dragon"], "content": "hit", "caseSensitive": False}), chat("dragon"), case_sensitive=True
    )


def test_single_word_keys_match_whole_words_and_phrases_as_substrings() -> None:
    cat = world({"key": ["cat"], "content": "hit"})
    assert run(cat, chat("I concatenate strings")) == []
    assert run(cat, chat("the cat!")) == ["hit"]
    assert run(cat, chat("cat")) == ["hit"]
    assert run(cat, chat("(cat)")) == ["hit"]
    oneil = world({"key": ["O'Neil"], "content": "hit"})
    assert run(oneil, chat("ask o'neil, then")) == ["hit"]
    assert run(oneil, chat("ask xo'neil")) == []
    assert run(oneil, chat("ask o'neils")) == []
    assert run(world({"key": ["black cat"], "content": "hit"}), chat("two black cats")) == ["hit"]
    assert run(world({"key": ["cat"], "content": "hit", "matchWholeWords": False}), chat("concatenate")) == ["hit"]
    assert run(cat, chat("concatenate"), whole_words=False) == ["hit"]
    # Word boundaries are Unicode-aware: an accented letter is part of the word.
    assert run(world({"key": ["caf"], "content": "hit"}), chat("un café")) == []


def test_regular_expression_keys() -> None:
    def hits(key: str, text: str) -> bool:
        return run(world({"key": [key], "content": "hit"}), chat(text, name="")) == ["hit"]

    assert hits("/drag(on|ons)\\b/i", "DRAGONS")
    assert not hits("/dragon/", "DRAGON")  # a pattern's own flags decide its case
    assert hits("/^a.b$/ms", "x\na\nb")
    assert hits("/a.b/gu", "a\u00e9b")
    assert hits("/(?<n>o)\\k<n>/", "book")
    assert hits("/x[^]y/", "x\ny")  # JavaScript's "any character"
    assert hits("/\\u{1F600}/u", "smile \U0001f600")
    assert hits("/a\\/b/", "a/b")
    assert not hits("/a/b/", "a")  # an unescaped slash: plain text, not a pattern
    assert hits("/a/b/", "x /a/b/ y")


def test_broken_patterns_do_not_match_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    book = world({"key": ["/(unclosed/", "fine"], "content": "hit"}, name="broken")
    with caplog.at_level(logging.WARNING, logger="bot.core.lore"):
        assert run(book, chat("(unclosed")) == []
        assert run(book, chat("(unclosed")) == []
        assert run(book, chat("fine")) == ["hit"]
    warnings = [r.getMessage() for r in caplog.records if "unclosed" in r.getMessage()]
    assert len(warnings) == 1 and "'broken'" in warnings[0] and "entry 0" in warnings[0]


def test_catastrophic_pattern_returns_quickly(caplog: pytest.LogCaptureFixture) -> None:
    entries = [{"key": ["/(a+)+$/"], "content": f"evil {i}"} for i in range(30)]
    entries.append({"key": ["/(a|aa)+$/", "/(x+x+)+y/"], "content": "evil too"})
    entries.append({"key": ["b"], "content": "plain"})
    book = world(*entries, name="evil")
    text = "a" * 50_000 + " b"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bot.core.lore"):
        assert run(book, chat(text, text)) == ["plain"]
    assert time.monotonic() - started < 2.0
    assert any("took longer" in r.getMessage() for r in caplog.records)


def test_pattern_that_would_expand_hugely_is_refused_unseen() -> None:
    book = world({"key": ["/((a{1000}){1000}){1000}/", "/x{99999}/"], "content": "bomb"})
    started = time.monotonic()
    assert run(book, chat("a" * 100)) == []
    assert time.monotonic() - started < 2.0
    assert run(world({"key": ["/a{3}(bc){2}/"], "content": "small"}), chat("aaabcbc")) == ["small"]
    long_key = "a" * 1001
    assert run(world({"key": [f"/{long_key}/"], "content": "long"}), chat(long_key)) == []
    assert run(world({"key": [long_key], "content": "plain"}), chat(long_key)) == ["plain"]  # plain text has no cap


@pytest.mark.parametrize(
    ("logic", "text", "expected"),
    [
        (SelectiveLogic.AND_ANY, "dragon red", True),
        (SelectiveLogic.AND_ANY, "dragon", False),
        (SelectiveLogic.NOT_ALL, "dragon red", True),
        (SelectiveLogic.NOT_ALL, "dragon red big", False),
        (SelectiveLogic.NOT_ANY, "dragon", True),
        (SelectiveLogic.NOT_ANY, "dragon big", False),
        (SelectiveLogic.AND_ALL, "dragon red big", True),
        (SelectiveLogic.AND_ALL, "dragon red", False),
    ],
)
def test_secondary_keys_follow_selective_logic(logic: SelectiveLogic, text: str, expected: bool) -> None:
    entry = {"key": ["dragon"], "keysecondary": ["red", "big"], "selectiveLogic": int(logic), "content": "hit"}
    assert run(world(entry), chat(text)) == (["hit"] if expected else [])
    assert run(world(entry), chat("red big")) == []  # the primary key is always needed


def test_secondary_keys_count_only_for_selective_entries() -> None:
    entry = {"key": ["dragon"], "keysecondary": ["red"], "selective": False, "content": "hit"}
    assert run(world(entry), chat("dragon")) == ["hit"]


def test_constant_disabled_and_keyless_entries() -> None:
    book = world(
        {"constant": True, "content": "always"},
        {"key": ["dragon"], "disable": True, "content": "never"},
        {"content": "no keys"},
        {"key": ["dragon"], "content": "   "},
    )
    assert run(book, chat("dragon")) == ["   ", "always"]  # equal order: the first one goes last
    assert run(book, []) == ["always"]


def test_decorators() -> None:
    book = world(
        {"content": "@@activate\nforced"},
        {"key": ["dragon"], "content": "@@dont_activate\nsuppressed"},
        {"key": ["dragon"], "content": "@@unknown\n@@@activate\nfallback"},
    )
    assert run(book, chat("dragon")) == ["fallback", "forced"]


def test_expand_applies_to_keys_and_content() -> None:
    book = world({"key": ["{{char}}"], "content": "{{char}} meets {{user}}."})

    def expand(text: str) -> str:
        return text.replace("{{char}}", "Seraphina").replace("{{user}}", "Alice")

    assert run(book, chat("hello Seraphina"), expand=expand) == ["Seraphina meets Alice."]
    assert run(book, chat("hello {{char}}"), expand=expand) == []


# --------------------------------------------------------------------------- order, depth, budget


def test_higher_order_wins_the_budget_and_is_inserted_later() -> None:
    book = world(
        {"key": ["k"], "content": "low " * 10, "order": 1},
        {"key": ["k"], "content": "high " * 10, "order": 50},
        {"key": ["k"], "content": "mid " * 10, "order": 10},
    )
    assert run(book, chat("k")) == ["low " * 10, "mid " * 10, "high " * 10]
    assert run(book, chat("k"), budget_tokens=30) == ["mid " * 10, "high " * 10]
    assert run(book, chat("k"), budget_tokens=13) == ["high " * 10]


def test_first_book_wins_ties_and_is_inserted_last() -> None:
    first = world({"key": ["k"], "content": "first", "order": 5}, name="first")
    second = world({"key": ["k"], "content": "second", "order": 5}, name="second")
    assert run([first, second], chat("k")) == ["second", "first"]
    assert run([first, second], chat("k"), budget_tokens=2) == ["first"]


def test_budget_drops_entries_that_do_not_fit_and_constants_count() -> None:
    book = world(
        {"constant": True, "content": "x" * 36, "order": 100},  # 10 tokens
        {"key": ["k"], "content": "y" * 36, "order": 50},
        {"key": ["k"], "content": "z", "order": 1},
    )
    assert run(book, chat("k"), budget_tokens=21) == ["z", "y" * 36, "x" * 36]
    # As in SillyTavern, the first entry that does not fit ends the scan: smaller ones after it stay out.
    assert run(book, chat("k"), budget_tokens=15) == ["x" * 36]
    assert run(book, chat("k"), budget_tokens=5) == []


def test_book_token_budget_caps_its_own_entries() -> None:
    capped = book_from_card(
        {"token_budget": 4, "entries": [{"keys": ["k"], "content": "a" * 8, "insertion_order": 9},
                                        {"keys": ["k"], "content": "b" * 20, "insertion_order": 5},
                                        {"keys": ["k"], "content": "c", "insertion_order": 1}]},
        name="capped",
    )  # fmt: skip
    other = world({"key": ["k"], "content": "other", "order": 1}, name="other")
    assert run([capped, other], chat("k")) == ["other", "c", "a" * 8]


def test_insert_fields() -> None:
    book = world(
        {"key": ["k"], "content": "deep", "position": 4, "depth": 3, "role": 1, "order": 2},
        {"key": ["k"], "content": "after", "position": 1, "order": 1},
    )
    inserts = activate([book], chat("k"), count_tokens=count, budget_tokens=100)
    assert inserts == [LoreInsert("after", "after", 4, "system", 1), LoreInsert("deep", "depth", 3, "user", 2)]


def test_scan_depth_counts_the_last_messages_with_speaker_names() -> None:
    book = world({"key": ["dragon"], "content": "hit"})
    history = chat("a dragon", "hello", "hi")
    assert run(book, history) == []
    assert run(book, history, scan_depth=3) == ["hit"]
    assert run(book, history, scan_depth=0) == []
    assert run(world({"key": ["dragon"], "content": "hit", "scanDepth": 3}), history) == ["hit"]
    assert run(world({"key": ["dragon"], "content": "hit", "scanDepth": 1}), chat("dragon", "x"), scan_depth=5) == []
    deep_book = book_from_card({"scan_depth": 3, "entries": [{"keys": ["dragon"], "content": "hit"}]}, name="c")
    assert run(deep_book, history) == ["hit"]
    assert run(world({"key": ["Dragon"], "content": "named"}), [ScanMessage("Dragon", "hello")]) == ["named"]
    # Messages are separate: a phrase split over two messages does not match.
    assert run(world({"key": ["red dragon"], "content": "hit"}), chat("red", "dragon")) == []


# --------------------------------------------------------------------------- recursion


def test_recursion_scans_activated_content() -> None:
    book = world(
        {"key": ["castle"], "content": "The castle has a moat.", "order": 2},
        {"key": ["moat"], "content": "The moat holds eels.", "order": 1},
        {"key": ["eels"], "content": "Eels bite.", "order": 0},
    )
    assert run(book, chat("the castle")) == ["Eels bite.", "The moat holds eels.", "The castle has a moat."]
    assert run(book, chat("the castle"), recursive=False) == ["The castle has a moat."]
    assert run(book, chat("the castle"), max_passes=2) == ["The moat holds eels.", "The castle has a moat."]


def test_prevent_and_exclude_recursion() -> None:
    prevented = world(
        {"key": ["castle"], "content": "moat", "preventRecursion": True}, {"key": ["moat"], "content": "M"}
    )
    assert run(prevented, chat("castle")) == ["moat"]
    excluded = world(
        {"key": ["castle"], "content": "moat"}, {"key": ["moat"], "content": "M", "excludeRecursion": True}
    )
    assert run(excluded, chat("castle")) == ["moat"]
    assert run(excluded, chat("castle moat")) == ["M", "moat"]  # the chat itself still triggers it


def test_book_without_recursive_scanning_does_not_trigger_others() -> None:
    card = book_from_card(
        {"recursive_scanning": False, "entries": [{"keys": ["castle"], "content": "moat"}]}, name="card"
    )
    other = world({"key": ["moat"], "content": "M"}, name="other")
    assert run([card, other], chat("castle")) == ["moat"]


def test_delay_until_recursion() -> None:
    book = world(
        {"key": ["castle"], "content": "a moat", "order": 3},
        {"key": ["moat"], "content": "level one", "delayUntilRecursion": True, "order": 2},
        {"key": ["castle"], "content": "level two", "delayUntilRecursion": 2, "order": 1},
    )
    assert run(book, chat("castle")) == ["level two", "level one", "a moat"]
    # Only in a recursion pass, which needs another entry to start it (the chat alone does not).
    assert run(world({"key": ["moat"], "content": "late", "delayUntilRecursion": 1}), chat("moat")) == []
    started = world({"key": ["moat"], "content": "late", "delayUntilRecursion": 1}, {"key": ["x"], "content": "y"})
    assert run(started, chat("x moat")) == ["late", "y"]
    assert run(started, chat("x moat"), recursive=False) == ["y"]


def test_recursion_is_bounded() -> None:
    chain = world(*({"key": [f"w{i}"], "content": f"w{i + 1}"} for i in range(100)))
    assert len(run(chain, chat("w0"))) == 16


# --------------------------------------------------------------------------- probability and timers


def test_probability_rolls_with_the_rng() -> None:
    book = world({"key": ["k"], "content": "maybe", "probability": 50})
    assert run(book, chat("k"), rng=FixedRandom(0.3)) == ["maybe"]
    assert run(book, chat("k"), rng=FixedRandom(0.7)) == []
    assert run(world({"key": ["k"], "content": "sure", "probability": 0, "useProbability": False}), chat("k"),
               rng=FixedRandom(0.99)) == ["sure"]  # fmt: skip
    constant = world({"constant": True, "content": "c", "probability": 10})
    assert run(constant, [], rng=FixedRandom(0.5)) == []
    seen = sum(bool(run(book, chat("k"), rng=random.Random(seed))) for seed in range(200))
    assert 60 < seen < 140


def test_failed_roll_is_not_retried_by_recursion() -> None:
    book = world(
        {"key": ["a"], "content": "b", "order": 2},
        {"key": ["a", "b"], "content": "rolled", "probability": 50, "order": 1},
    )
    rng = FixedRandom(0.9)
    assert run(book, chat("a"), rng=rng) == ["b"]


def test_delay_needs_enough_messages() -> None:
    book = world({"key": ["k"], "content": "late", "delay": 3})
    assert run(book, chat("k", "k")) == []
    assert run(book, chat("k", "k", "k")) == ["late"]
    assert run(book, chat("k"), chat_length=3) == ["late"]


def test_sticky_stays_active_then_ends() -> None:
    book = world({"key": ["dragon"], "content": "sticky", "sticky": 2}, name="b")
    timers = LoreTimers()
    assert run(book, chat("dragon"), timers=timers, chat_length=1) == ["sticky"]
    assert timers.active("sticky") == {("b", "0"): (1, 3)}
    assert run(book, chat("nothing"), timers=timers, chat_length=2) == ["sticky"]
    assert run(book, chat("nothing"), timers=timers, chat_length=3) == []
    assert not timers
    assert run(book, chat("nothing"), chat_length=2) == []  # without timers, no stickiness


def test_sticky_survives_its_failed_roll_and_budget_order() -> None:
    book = world(
        {"key": ["dragon"], "content": "sticky " * 4, "sticky": 3, "probability": 50, "order": 1},
        {"key": ["nothing"], "content": "fresh " * 4, "order": 99},
    )
    timers = LoreTimers()
    assert run(book, chat("dragon"), timers=timers, chat_length=1, rng=FixedRandom(0.1)) == ["sticky " * 4]
    # Sticky entries spend the budget first and do not roll again.
    assert run(book, chat("nothing"), timers=timers, chat_length=2, rng=FixedRandom(0.9), budget_tokens=8) == [
        "sticky " * 4
    ]


def test_cooldown_blocks_retriggering() -> None:
    book = world({"key": ["dragon"], "content": "cool", "cooldown": 2}, name="b")
    timers = LoreTimers()
    assert run(book, chat("dragon"), timers=timers, chat_length=1) == ["cool"]
    assert run(book, chat("dragon"), timers=timers, chat_length=2) == []
    assert run(book, chat("dragon"), timers=timers, chat_length=3) == ["cool"]


def test_cooldown_starts_when_sticky_ends() -> None:
    book = world({"key": ["dragon"], "content": "both", "sticky": 2, "cooldown": 2}, name="b")
    timers = LoreTimers()
    seen = [bool(run(book, chat("dragon"), timers=timers, chat_length=n)) for n in range(1, 8)]
    assert seen == [True, True, False, False, True, True, False]


def test_writing_a_reply_again_rolls_anew() -> None:
    book = world({"key": ["dragon"], "content": "maybe", "sticky": 5, "probability": 50}, name="b")
    timers = LoreTimers()
    assert run(book, chat("dragon"), timers=timers, chat_length=4, rng=FixedRandom(0.1)) == ["maybe"]
    # The same chat length again (the reply is written again): the sticky effect set then is dropped.
    assert run(book, chat("dragon"), timers=timers, chat_length=4, rng=FixedRandom(0.9)) == []


def test_timers_round_trip_through_json() -> None:
    book = world({"key": ["dragon"], "content": "s", "sticky": 3, "cooldown": 1}, name="b")
    timers = LoreTimers()
    run(book, chat("dragon"), timers=timers, chat_length=1)
    restored = LoreTimers.from_json(json.loads(json.dumps(timers.to_json())))
    assert restored.to_json() == timers.to_json()
    assert run(book, chat("x"), timers=restored, chat_length=2) == ["s"]
    for garbage in (None, [], {"sticky": "x"}, {"sticky": [["b", 0, 1, 2, False], ["b", "0", "1", 2, False], 5]}):
        assert not LoreTimers.from_json(garbage)


def test_timers_of_removed_entries_expire() -> None:
    timers = LoreTimers.from_json({"sticky": [["gone", "1", 1, 3, False]], "cooldown": [["gone", "2", 1, 9, True]]})
    book = world({"key": ["k"], "content": "c"}, name="b")
    run(book, chat("x"), timers=timers, chat_length=2)
    assert set(timers.active("sticky")) == {("gone", "1")}
    run(book, chat("x"), timers=timers, chat_length=3)
    assert timers.active("sticky") == {} and set(timers.active("cooldown")) == {("gone", "2")}


# --------------------------------------------------------------------------- properties and real tokens

_words = st.sampled_from(["dragon", "castle", "moat", "red", "Big", "/dr.g/i", "black cat", "eel"])
_entries = st.fixed_dictionaries(
    {
        "key": st.lists(_words, max_size=3),
        "keysecondary": st.lists(_words, max_size=2),
        "selectiveLogic": st.integers(0, 3),
        "content": st.text(st.sampled_from("dragon castle moat red eel xyz \n"), max_size=60),
        "constant": st.booleans(),
        "order": st.integers(-5, 200),
        "position": st.integers(0, 7),
        "probability": st.integers(0, 100),
        "preventRecursion": st.booleans(),
        "excludeRecursion": st.booleans(),
        "delayUntilRecursion": st.integers(0, 2),
        "sticky": st.integers(0, 3),
        "cooldown": st.integers(0, 3),
        "delay": st.integers(0, 4),
        "scanDepth": st.none() | st.integers(0, 4),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    books=st.lists(st.lists(_entries, max_size=8), min_size=1, max_size=3),
    history=st.lists(st.tuples(st.sampled_from(["Alice", "Bob", ""]), st.text(max_size=40) | _words), max_size=6),
    budget=st.integers(0, 120),
    seed=st.integers(0, 1000),
    lengths=st.lists(st.integers(0, 10), min_size=1, max_size=3),
)
def test_inserts_never_exceed_the_budget(
    books: list[list[dict[str, Any]]], history: list[tuple[str, str]], budget: int, seed: int, lengths: list[int]
) -> None:
    lore = [world(*entries, name=f"book{i}") for i, entries in enumerate(books)]
    messages = [ScanMessage(name, text) for name, text in history]
    timers = LoreTimers()
    for chat_length in lengths:
        inserts = activate(lore, messages, count_tokens=count, budget_tokens=budget, rng=random.Random(seed),
                           timers=timers, chat_length=chat_length)  # fmt: skip
        assert sum(count(insert.text) for insert in inserts) <= budget
        assert [insert.order for insert in inserts] == sorted(insert.order for insert in inserts)


def test_budget_with_the_real_tokenizer(spm_vocab: Any) -> None:
    from bot.prompt.builder import count_tokens

    def tokens(text: str) -> int:
        return count_tokens(spm_vocab, text)

    contents = [f"Entry {i}: the old castle of Varn has {i} towers and a moat full of eels." for i in range(12)]
    book = world(*({"key": ["castle"], "content": text, "order": i} for i, text in enumerate(contents)))
    one = tokens(contents[0])
    inserts = activate([book], chat("the castle"), count_tokens=tokens, budget_tokens=one * 4 + 2)
    assert 3 <= len(inserts) <= 4
    assert sum(tokens(insert.text) for insert in inserts) <= one * 4 + 2
    assert [insert.order for insert in inserts] == list(range(12 - len(inserts), 12))


def test_regex_time_per_activation_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    book = world(*({"key": [f"/(?:(a+)+$)|q{i}q/"], "content": f"evil {i}"} for i in range(60)), name="many")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bot.core.lore"):
        assert run(book, chat("a" * 50_000 + "b")) == []
    assert time.monotonic() - started < 2.0  # 60 timeouts of 50 ms would take 3 s
    assert any("used up" in r.getMessage() for r in caplog.records)
