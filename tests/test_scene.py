"""Who answers in a channel with several characters, and how a scene becomes the builder's conversation."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from bot.core import cards
from bot.core.scene import Character, HistoryTurn, Note, Scene, choose_speakers, compose, names_in


def character(id_: int, name: str, talkativeness: float = 0.5, **fields: str) -> Character:
    card = cards.with_fields(cards.card_from_text(name, f"{name} is here."), **fields)
    raw = dict(card.raw)
    data = dict(raw["data"])
    data["extensions"] = {"talkativeness": talkativeness}
    raw["data"] = data
    return Character(id_, name, cards.from_stored(cards.stored_json(cards.CharacterCard(card.spec, raw, None)), None))


MIRA, GRIM, ODA = character(1, "Mira", 0.0), character(2, "Grim", 0.0), character(3, "Oda", 0.0)
CAST = (MIRA, GRIM, ODA)


def pick(text: str, *, replied_to: int | None = None, limit: int = 1, cast=CAST, seed: int = 0) -> list[str]:
    return [c.name for c in choose_speakers(cast, text, replied_to=replied_to, limit=limit, rng=random.Random(seed))]


def test_a_named_character_answers_by_whole_word_and_case() -> None:
    assert pick("grim, pour me one") == ["Grim"]
    assert pick("Hey ODA!") == ["Oda"]
    assert pick("the grimace on her face") == ["Mira"], "a name inside another word is no mention"
    assert pick("Oda and Grim, both of you", limit=2) == ["Oda", "Grim"]
    assert pick("Oda and Grim, both of you", limit=1) == ["Oda"]


def test_a_reply_to_a_characters_message_is_answered_by_it() -> None:
    assert pick("and then?", replied_to=GRIM.id) == ["Grim"]
    assert pick("Mira, what do you think?", replied_to=GRIM.id) == ["Mira"], "a name beats the reply"


def test_talkativeness_rolls_else_the_main_character() -> None:
    assert pick("hello all") == ["Mira"], "nobody rolled: the main character answers"
    chatty = (MIRA, character(2, "Grim", 1.0), ODA)
    assert pick("hello all", cast=chatty) == ["Grim"]
    always = tuple(character(i, n, 1.0) for i, n in enumerate(("A", "B", "C"), 1))
    assert pick("hello", cast=always, limit=2) == ["A", "B"], "never more than the limit answer"


def test_a_single_character_always_answers() -> None:
    assert pick("Grim!", cast=(MIRA,)) == ["Mira"]


@given(st.text(max_size=200), st.integers(min_value=1, max_value=3), st.integers(0, 2**16))
def test_speakers_are_always_some_of_the_cast_within_the_limit(text: str, limit: int, seed: int) -> None:
    chosen = choose_speakers(CAST, text, replied_to=None, limit=limit, rng=random.Random(seed))
    assert 1 <= len(chosen) <= limit and all(c in CAST for c in chosen)
    assert len({c.id for c in chosen}) == len(chosen)


def test_names_in_keeps_the_order_of_first_mention() -> None:
    assert [c.name for c in names_in("Oda? Mira! oda again", CAST)] == ["Oda", "Mira"]


def scene(speaker: Character = MIRA, cast: tuple[Character, ...] = (MIRA,), **options) -> Scene:
    return Scene(speaker=speaker, cast=cast, user="Alice", **options)


def test_compose_puts_the_card_macros_examples_note_and_tail_in_place() -> None:
    mira = character(1, "Mira", personality="Sharp, {{user}}-wary.", scenario="A tavern.",
                     mes_example="<START>\n{{user}}: Hi\n{{char}}: Hello, {{user}}.", system_prompt="")
    history = [HistoryTurn("user", "hello", "Alice"), HistoryTurn("model", "Hi.", "Mira")]
    conversation = compose(scene(mira, (mira,), note=Note("Keep it short.", 1, "system")), history,
                           count_tokens=len)
    assert conversation.system.startswith("Enter roleplay mode. You must act as Mira, whose persona follows:")
    assert "Mira's personality: Sharp, Alice-wary." in conversation.system
    assert "Scenario: A tavern." in conversation.system
    assert conversation.examples and conversation.examples[0][0].text == "Hi"
    assert [i.text for i in conversation.injections] == ["Keep it short."]
    assert conversation.reply_prefix == "", "one character: no name prefill"
    assert all(t.speaker is None for t in conversation.turns if t.role == "model")


def test_a_group_scene_names_model_turns_and_prefills_the_speaker() -> None:
    history = [HistoryTurn("user", "hello", "Alice"), HistoryTurn("model", "Hi.", "Grim")]
    conversation = compose(scene(MIRA, CAST), history, count_tokens=len)
    assert conversation.reply_prefix == "Mira:"
    assert [t.speaker for t in conversation.turns if t.role == "model"] == ["Grim"]
    assert set(conversation.characters) == {"Mira", "Grim", "Oda"}


def test_all_cards_mode_keeps_the_head_the_same_whoever_speaks() -> None:
    history = [HistoryTurn("user", "hello", "Alice")]
    heads = {compose(scene(who, CAST, cards_in_prompt="all"), history, count_tokens=len).system for who in CAST}
    assert len(heads) == 1
    (head,) = heads
    assert all(f"{c.name} is here." in head for c in CAST)
    assert head.count("Enter roleplay mode.") == 1
    assert head.startswith("Enter roleplay mode. You must act as Mira and Grim and Oda, whose persona follows:")
    speaker_only = {compose(scene(who, CAST), history, count_tokens=len).system for who in CAST}
    assert len(speaker_only) == 3
