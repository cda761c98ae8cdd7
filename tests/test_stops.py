"""Stop strings: streaming scanner and final reply clean-up."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.inference.stops import StopScanner
from bot.prompt.builder import ROLE_MARKERS
from bot.prompt.stops import clean_reply, reply_stops

# A small alphabet makes stop strings, and near misses of them, frequent.
ALPHABET = "ab<|>\nA:"


def before_first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for stop in stops if stop and (i := text.find(stop)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def longest_pending(text: str, stops: list[str]) -> int:
    return max(
        (k for k in range(1, len(text) + 1) for stop in stops if len(stop) > k and stop.startswith(text[-k:])),
        default=0,
    )


def scan(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(chunk) for chunk in chunks) + scanner.flush()
    return out, scanner.stopped


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    stops=st.lists(st.text(alphabet=ALPHABET, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_any_chunking_gives_the_text_before_the_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected = before_first_stop(text, stops)
    assert scan(stops, [text]) == expected
    assert scan(stops, chunks) == expected
    assert scan(stops, list(text)) == expected


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=30),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), min_size=1, max_size=3),
)
def test_holds_back_only_a_possible_stop_start(text: str, stops: list[str]) -> None:
    if before_first_stop(text, stops)[1]:
        return
    emitted = StopScanner(stops).feed(text)
    assert emitted == text[: len(text) - longest_pending(text, stops)]


def test_streaming_with_reply_stops() -> None:
    stops = reply_stops(["Alice"])
    scanner = StopScanner(stops)
    assert scanner.feed("Hello there") == "Hello there"
    assert scanner.feed("! <|") == "! "  # "<|" may start a marker
    assert scanner.feed("us") == ""
    assert scanner.feed("er|>Alice: more") == ""
    assert scanner.stopped
    assert scanner.feed("ignored") == ""
    assert scanner.flush() == ""


def test_speaker_line_stops_but_similar_names_pass() -> None:
    scanner = StopScanner(reply_stops(["Alice"]))
    assert scanner.feed("Nods.\nAli") == "Nods."
    assert scanner.feed("cia: hi") == "\nAlicia: hi"
    assert scanner.feed("\nAlice:") == ""
    assert scanner.stopped


def test_role_markers_match_case_sensitively() -> None:
    scanner = StopScanner(reply_stops([]))
    assert scanner.feed("a <|USER|> b") == "a <|USER|> b"
    assert not scanner.stopped
    assert scanner.feed("</s") == ""
    assert scanner.flush() == "</s"


def test_reply_stops() -> None:
    assert reply_stops(["Alice", " Bob  Smith ", "", "Alice", "<|user|>"]) == [
        *ROLE_MARKERS,
        "</s>",
        "\nAlice:",
        "\nBob Smith:",
        "\n<user>:",  # names appear neutralised in the prompt, so that is what gets echoed
    ]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("  She smiles.  ", "She smiles."),
        ("She smiles.<|user|>Alice: hi", "She smiles."),
        ("She smiles.<|USER|>", "She smiles."),
        ("She smiles. < | model | > again", "She smiles."),
        ("She smiles.\uff1c\uff5cuser\uff5c\uff1e", "She smiles."),
        ("She smiles.<\u200b|system|>", "She smiles."),
        ("She smiles.</s>junk", "She smiles."),
        ("She smiles.[INST] next", "She smiles."),
        ("She smiles.\nAlice: no way", "She smiles."),
        ("She smiles.\n  Bob: me too", "She smiles."),
        ("Alice: I speak first", ""),
        ("She tells Alice: be careful.", "She tells Alice: be careful."),
        ("She smiles.\nAlicia: different person", "She smiles.\nAlicia: different person"),
        ("She smiles.\nA.B*: regex chars", "She smiles."),
        ("Line one.\n\nLine two.\n", "Line one.\n\nLine two."),
        ("a < b | c > d", "a < b | c > d"),
    ],
)
def test_clean_reply(reply: str, expected: str) -> None:
    assert clean_reply(reply, ["Alice", "Bob", "A.B*", ""]) == expected


def test_clean_reply_without_speakers() -> None:
    assert clean_reply("Hi.\nAlice: x<|user|>", []) == "Hi.\nAlice: x"


def test_a_longer_stop_that_began_earlier_wins() -> None:
    scanner = StopScanner(["b", "<b>"])
    assert scanner.feed("x<b") == "x"  # "b" is complete, but "<b>" may still follow from "<"
    assert not scanner.stopped
    assert scanner.feed(">tail") == ""
    assert scanner.stopped

    scanner = StopScanner(["b", "<b>"])
    assert scanner.feed("x<b") == "x"
    assert scanner.feed("!") == "<"  # "<b>" did not come: the stop is the inner "b"
    assert scanner.stopped

    scanner = StopScanner(["b", "<b>"])
    assert scanner.feed("x<b") == "x"
    assert scanner.flush() == "<"
    assert scanner.stopped


# --------------------------------------------------------------------------- the character's echoed name


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Mira: Welcome, traveller.", "Welcome, traveller."),
        ("  Mira:Welcome.", "Welcome."),
        ("\n\tmira : Welcome.", "Welcome."),
        ("\uff2d\uff49\uff52\uff41\uff1a Welcome.", "Welcome."),
        ("M\u200bira: Welcome.\nMira: more", "Welcome.\nMira: more"),
        ("Mira: Mira: twice", "Mira: twice"),
        ("Mirabel: someone else", "Mirabel: someone else"),
        ("Mira smiles: welcome.", "Mira smiles: welcome."),
        ("She says: Mira: hi", "She says: Mira: hi"),
        ("Mira\n: split", "Mira\n: split"),
        ("Mira", "Mira"),
        ("Mira:", ""),
        ("Mira: Hi.\nAlice: I stay", "Hi."),
    ],
)
def test_a_reply_that_echoes_the_characters_name_loses_it(reply: str, expected: str) -> None:
    assert clean_reply(reply, ["Alice"], "Mira") == expected


def test_no_character_no_echo() -> None:
    assert clean_reply("Mira: hi", []) == "Mira: hi"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="Mira: \nxy", max_size=16))
def test_streamed_text_never_shows_the_echo(text: str) -> None:
    """While streaming, every prefix shows a prefix of the final text: the name never flashes up."""
    final = clean_reply(text, [], "Mira")
    for end in range(len(text) + 1):
        shown = clean_reply(text[:end], [], "Mira", partial=True)
        assert final.startswith(shown) or not final, (text[:end], shown, final)
