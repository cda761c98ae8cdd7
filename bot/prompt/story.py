"""A character card as SillyTavern lays it out for Metharme: story string, example dialogue, post-history text.

Pure text work: the results are plain strings and turns that `bot.prompt.builder` neutralises and
tokenizes like any other untrusted text. SillyTavern's defaults are followed (its Metharme instruct
preset and the Default context preset), so a card reads here as it does there.
"""

from __future__ import annotations

import re

from bot.prompt.builder import PromptTurn
from bot.prompt.macros import expand

__all__ = ["DEFAULT_SYSTEM", "card_lines", "example_turns", "post_history", "story_string", "system_line"]

DEFAULT_SYSTEM = "Enter roleplay mode. You must act as {{char}}, whose persona follows:"

_ORIGINAL = re.compile(r"\{\{original\}\}", re.IGNORECASE)
_START = re.compile(r"<start>", re.IGNORECASE)
_USER_PREFIX = re.compile(r"(?:\{\{user\}\}|<user>):", re.IGNORECASE)
_CHAR_PREFIX = re.compile(r"(?:\{\{char\}\}|<bot>):", re.IGNORECASE)


def _original(text: str, original: str) -> str:
    """Replace `{{original}}`: the first one with `original`, any further ones with nothing (as SillyTavern)."""
    parts = _ORIGINAL.split(text)
    if len(parts) == 1:
        return text
    return parts[0] + original + "".join(parts[1:])


def system_line(system_prompt: str, *, char: str, user: str) -> str:
    """The card's `system_prompt` (`{{original}}` standing for the default), or `DEFAULT_SYSTEM`, macros filled."""
    system = _original(system_prompt.strip(), DEFAULT_SYSTEM) if system_prompt.strip() else DEFAULT_SYSTEM
    return expand(system, char=char, user=user).strip()


def card_lines(*, description: str, personality: str, scenario: str, char: str, user: str) -> list[str]:
    """A card's description, `{char}'s personality: …` and `Scenario: …`, the empty ones left out."""

    def field(text: str) -> str:
        return expand(text, char=char, user=user).strip()

    lines = [
        field(description),
        f"{char}'s personality: {field(personality)}" if field(personality) else "",
        f"Scenario: {field(scenario)}" if field(scenario) else "",
    ]
    return [line for line in lines if line]


def story_string(
    *,
    system_prompt: str,
    description: str,
    personality: str,
    scenario: str,
    lore_before: str,
    lore_after: str,
    user_persona: str,
    char: str,
    user: str,
) -> str:
    """The system block's text, as SillyTavern's default story string renders it.

    Order: system prompt, lore placed before the card, description, `{char}'s personality: …`,
    `Scenario: …`, lore placed after the card, the user's persona; each present field on its own
    line, empty ones left out. A card's own `system_prompt` replaces `DEFAULT_SYSTEM`, and
    `{{original}}` inside it stands for the default. Name macros are expanded in every field.
    """
    lines = [
        system_line(system_prompt, char=char, user=user),
        expand(lore_before, char=char, user=user).strip(),
        *card_lines(description=description, personality=personality, scenario=scenario, char=char, user=user),
        expand(lore_after, char=char, user=user).strip(),
        expand(user_persona, char=char, user=user).strip(),
    ]
    return "\n".join(line for line in lines if line)


def _speaker(line: str, *, char: str, user: str) -> tuple[str, str] | None:
    """The role a line of example dialogue starts and the rest of the line, or None for a continuation.

    The macro forms match in any case; a name already written out (`Mira: …`) matches as written,
    as SillyTavern matches after expanding the macros. The user's forms are tried first, as there.
    """
    text = line.lstrip(" \t")
    if match := _USER_PREFIX.match(text):
        return "user", text[match.end() :].lstrip(" \t")
    if match := _CHAR_PREFIX.match(text):
        return "model", text[match.end() :].lstrip(" \t")
    if user and text.startswith(f"{user}:"):
        return "user", text[len(user) + 1 :].lstrip(" \t")
    if char and text.startswith(f"{char}:"):
        return "model", text[len(char) + 1 :].lstrip(" \t")
    return None


def example_turns(
    mes_example: str, *, char: str, user: str, named: bool = False
) -> tuple[tuple[PromptTurn, ...], ...]:
    """Split a card's example dialogue into blocks of turns, as SillyTavern's `parseMesExamples` does.

    Blocks are separated by `<START>` (any case). In a block a line starting `{{user}}:` or
    `<USER>:` begins a user turn (speaker: `user`), one starting `{{char}}:` or `<BOT>:` a model
    turn; other lines continue the current turn, and lines before the first speaker's join the first
    turn (SillyTavern keeps them there too). Name macros are expanded, turns with no text and blocks
    with no turns are dropped. With `named` (several characters share the channel) model turns carry
    `char` as their speaker, so they are shown `Name: …` like the history's.
    """
    text = mes_example.replace("\r\n", "\n").replace("\r", "\n")
    blocks: list[tuple[PromptTurn, ...]] = []
    for block in _START.split(text):
        parts: list[tuple[str, list[str]]] = []  # (role, lines) of each turn
        leading: list[str] = []
        for line in block.split("\n"):
            started = _speaker(line, char=char, user=user)
            if started is not None:
                role, rest = started
                parts.append((role, [*leading, rest] if not parts else [rest]))
            elif parts:
                parts[-1][1].append(line)
            else:
                leading.append(line)
        turns = []
        for role, lines in parts:
            if content := expand("\n".join(lines), char=char, user=user).strip():
                if role == "user":
                    turns.append(PromptTurn("user", content, user))
                else:
                    turns.append(PromptTurn("model", content, char if named else None))
        if turns:
            blocks.append(tuple(turns))
    return tuple(blocks)


def post_history(text: str, *, char: str, user: str) -> str:
    """Post-history instructions: name macros expanded, `{{original}}` empty (there is no default text)."""
    return expand(_original(text, ""), char=char, user=user).strip()
