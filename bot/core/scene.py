"""A channel's scene: its characters (from their cards), lorebooks, author's note and the member being
answered, turned into the prompt builder's conversation for one speaker.

Pure and blocking (lorebook keys may be regular expressions): the session service runs `compose`
on the engine's tokenizer thread, never on the event loop.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bot.core import cards, lore
from bot.prompt import macros, story
from bot.prompt.builder import Conversation, Injection, PromptTurn

Role = Literal["system", "user", "model"]


@dataclass(frozen=True)
class Character:
    """A character as the prompt needs it: its id in the store (None for a terminal persona), name and card."""

    id: int | None
    name: str
    card: cards.CharacterCard
    avatar_sha: str | None = None

    @property
    def stored_name(self) -> str:
        """The name stored on the character's turns: "" for a plain persona of no store (the terminal's)."""
        return self.name if self.id is not None else ""

    @property
    def talkativeness(self) -> float:
        """How likely the character speaks up unprompted (card `extensions.talkativeness`)."""
        return self.card.talkativeness

    def book(self) -> lore.Lorebook | None:
        """The card's own lorebook, if it has entries (read once per character object)."""
        return self._book

    @functools.cached_property
    def _book(self) -> lore.Lorebook | None:
        raw = self.card.character_book
        if not raw:
            return None
        try:
            return lore.book_from_card(raw, name=f"{self.name} (card)")
        except lore.LoreError:
            return None  # checked on import; a card stored before that check just has no lore


@dataclass(frozen=True)
class Note:
    """The channel's author's note: text placed `depth` turns from the end, as `role`."""

    text: str = ""
    depth: int = 4
    role: Role = "system"


@dataclass(frozen=True)
class Scene:
    """Who speaks, to whom, with what around them. `cast` holds every character of the channel."""

    speaker: Character
    cast: tuple[Character, ...]
    user: str
    user_persona: str = ""
    books: tuple[lore.Lorebook, ...] = ()
    note: Note = field(default_factory=Note)
    cards_in_prompt: Literal["speaker", "all"] = "speaker"
    prefill_name: bool = True
    lore_budget: int = 0
    lore_scan_depth: int = 2
    lore_in_head: Literal["constant", "all"] = "constant"
    lore_depth: int = 4

    @property
    def group(self) -> bool:
        """Several characters share the channel: model turns carry the speaker's name."""
        return len(self.cast) > 1


@dataclass(frozen=True)
class HistoryTurn:
    """A stored turn as the scene reads it."""

    role: Literal["user", "model"]
    text: str
    speaker: str  # the member's label, or the character who wrote a model turn


def _expand(text: str, scene: Scene, char: str) -> str:
    return macros.expand(text, char=char, user=scene.user)


def _story(scene: Scene, before: Sequence[str], after: Sequence[str]) -> str:
    """The system block: one card (the speaker's), or every card of the cast joined."""
    lore_before, lore_after = "\n".join(before), "\n".join(after)
    if scene.cards_in_prompt == "all" and scene.group:
        # Every card, the main character's system prompt naming everyone: the same head whoever speaks.
        names = " and ".join(c.name for c in scene.cast)
        lines = [story.system_line(scene.cast[0].card.system_prompt, char=names, user=scene.user), lore_before]
        for c in scene.cast:
            card = c.card
            lines += story.card_lines(description=card.description, personality=card.personality,
                                      scenario=card.scenario, char=c.name, user=scene.user)
        lines += [lore_after, _expand(scene.user_persona, scene, names)]
        return "\n".join(line.strip() for line in lines if line.strip())
    card = scene.speaker.card
    return story.story_string(
        system_prompt=card.system_prompt, description=card.description, personality=card.personality,
        scenario=card.scenario, lore_before=lore_before, lore_after=lore_after,
        user_persona=scene.user_persona, char=scene.speaker.name, user=scene.user,
    )


def _lore(scene: Scene, history: Sequence[HistoryTurn], count: Callable[[str], int],
          rng: random.Random) -> list[lore.LoreInsert]:
    books = [*(b for c in (scene.cast if scene.cards_in_prompt == "all" else (scene.speaker,))
               if (b := c.book()) is not None), *scene.books]
    if not books or scene.lore_budget <= 0:
        return []
    scanned = [lore.ScanMessage(name=t.speaker, text=t.text) for t in history]
    return lore.activate(
        books, scanned, count_tokens=count, budget_tokens=scene.lore_budget, scan_depth=scene.lore_scan_depth,
        rng=rng, expand=lambda text: _expand(text, scene, scene.speaker.name),
    )


def compose(
    scene: Scene,
    history: Sequence[HistoryTurn],
    *,
    count_tokens: Callable[[str], int],
    continue_last: bool = False,
    rng: random.Random | None = None,
    history_truncated: bool = False,
) -> Conversation:
    """The conversation the prompt builder fits for `scene.speaker`'s next reply to `history` (oldest first)."""
    rng = rng or random.Random()
    before: list[str] = []
    after: list[str] = []
    injections: list[Injection] = []
    for insert in _lore(scene, history, count_tokens, rng):
        if insert.position in ("before", "after") and (scene.lore_in_head == "all" or _is_constant(insert)):
            (before if insert.position == "before" else after).append(insert.text)
        elif insert.position in ("before", "after"):
            injections.append(Injection(insert.text, scene.lore_depth, "system", insert.order))
        else:
            injections.append(Injection(insert.text, insert.depth, insert.role, insert.order))
    card = scene.speaker.card
    if card.depth_prompt is not None:
        text, depth, role = card.depth_prompt
        if text.strip():
            injections.append(Injection(_expand(text, scene, scene.speaker.name), depth, _role(role)))
    if scene.note.text.strip():
        injections.append(Injection(_expand(scene.note.text, scene, scene.speaker.name), scene.note.depth,
                                    scene.note.role))
    group = scene.group
    turns = tuple(
        PromptTurn(role="user", text=t.text, speaker=t.speaker or "User")
        if t.role == "user"
        else PromptTurn(role="model", text=t.text, speaker=(t.speaker or scene.speaker.name) if group else None)
        for t in history
        if t.text
    )
    examples = story.example_turns(card.mes_example, char=scene.speaker.name, user=scene.user, named=group)
    tail = story.post_history(card.post_history_instructions, char=scene.speaker.name, user=scene.user)
    prefix = f"{scene.speaker.name}:" if group and scene.prefill_name and not continue_last else ""
    return Conversation(
        system=_story(scene, before, after),
        turns=turns,
        continue_last=continue_last,
        character=tuple(c.name for c in scene.cast) if group else scene.speaker.name,
        examples=examples,
        injections=tuple(injections),
        tail=tail,
        reply_prefix=prefix,
        history_truncated=history_truncated,
    )


def _is_constant(insert: lore.LoreInsert) -> bool:
    return insert.constant


def _role(value: object) -> Role:
    if value in ("user", 1, "1"):
        return "user"
    if value in ("assistant", "model", 2, "2"):
        return "model"
    return "system"


def names_in(text: str, cast: Sequence[Character]) -> list[Character]:
    """Characters named in `text` as whole words (case-insensitive), in the order they first appear."""
    folded = text.casefold()
    found: list[tuple[int, Character]] = []
    for character in cast:
        name = character.name.casefold().strip()
        if not name:
            continue
        start = 0
        while (index := folded.find(name, start)) >= 0:
            end = index + len(name)
            if (index == 0 or not folded[index - 1].isalnum()) and (end == len(folded) or not folded[end].isalnum()):
                found.append((index, character))
                break
            start = index + 1
    return [c for _, c in sorted(found, key=lambda pair: pair[0])]


def choose_speakers(
    cast: Sequence[Character],
    text: str,
    *,
    replied_to: int | None,
    limit: int,
    rng: random.Random,
) -> list[Character]:
    """Who answers a message: characters named in it, else the one whose message it replies to, else those
    whose talkativeness roll succeeds, else the main character (`cast[0]`). At most `limit` answer."""
    if not cast:
        return []
    if len(cast) == 1:
        return [cast[0]]
    named = names_in(text, cast)
    if named:
        return named[:limit]
    if replied_to is not None:
        for character in cast:
            if character.id == replied_to:
                return [character]
    rolled = [c for c in cast if rng.random() < c.talkativeness]
    return rolled[:limit] or [cast[0]]
