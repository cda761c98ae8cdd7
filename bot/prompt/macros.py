"""SillyTavern's name macros in character card text: `{{char}}`, `{{user}}` and the older `<BOT>`, `<USER>`."""

from __future__ import annotations

import re

__all__ = ["expand"]

# Case-insensitive like SillyTavern (`{{Char}}`, `<bot>`). Other `{{...}}` macros are left as written:
# a card made for SillyTavern may use ones this bot has no value for, and text is safer than a guess.
_NAME_MACRO = re.compile(r"\{\{(char|user)\}\}|<(bot|user)>", re.IGNORECASE)


def expand(text: str, *, char: str, user: str) -> str:
    """Replace the name macros in `text` with `char` and `user`.

    One pass: a name that itself reads like a macro is inserted as written, never expanded again.
    The names are plain text; like the rest of the card they are neutralised when the prompt is built.
    """

    def name(match: re.Match[str]) -> str:
        macro = (match.group(1) or match.group(2)).lower()
        return char if macro in ("char", "bot") else user

    return _NAME_MACRO.sub(name, text)
