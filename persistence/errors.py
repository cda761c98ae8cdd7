"""Errors raised by the persistence layer (no driver exceptions leak to callers)."""

from __future__ import annotations

from collections.abc import Iterable


class PersistenceError(Exception):
    """Base class of every error raised by `persistence`."""


class NotFound(PersistenceError, LookupError):
    """A row the caller referred to by id does not exist."""


class SessionNotFound(NotFound):
    """No channel session has the given id."""

    def __init__(self, session_id: int) -> None:
        super().__init__(f"channel session {session_id} does not exist")
        self.session_id = session_id


class PersonaNotFound(NotFound):
    """No persona has the given id."""

    def __init__(self, persona_id: int) -> None:
        super().__init__(f"persona {persona_id} does not exist")
        self.persona_id = persona_id


class TurnNotFound(NotFound):
    """No turn has the given id."""

    def __init__(self, turn_id: int) -> None:
        super().__init__(f"turn {turn_id} does not exist")
        self.turn_id = turn_id


class LorebookNotFound(NotFound):
    """No lorebook has the given id."""

    def __init__(self, lorebook_id: int) -> None:
        super().__init__(f"lorebook {lorebook_id} does not exist")
        self.lorebook_id = lorebook_id


class PersonaExists(PersistenceError):
    """A persona with this name already exists in this guild (or globally)."""

    def __init__(self, guild_id: int | None, name: str) -> None:
        scope = "globally" if guild_id is None else f"in guild {guild_id}"
        super().__init__(f"a persona named {name!r} already exists {scope}")
        self.guild_id = guild_id
        self.name = name


class LorebookExists(PersistenceError):
    """A lorebook with this name already exists in this guild (or globally)."""

    def __init__(self, guild_id: int | None, name: str) -> None:
        scope = "globally" if guild_id is None else f"in guild {guild_id}"
        super().__init__(f"a lorebook named {name!r} already exists {scope}")
        self.guild_id = guild_id
        self.name = name


class PersonaInUse(PersistenceError):
    """A persona cannot be deleted while open channel sessions play it (as their main persona or
    as one of their other characters)."""

    def __init__(self, name: str, channel_keys: Iterable[str]) -> None:
        self.name = name
        self.channel_keys = tuple(channel_keys)
        super().__init__(f"persona {name!r} is played in {', '.join(self.channel_keys)}")


class DuplicateMessage(PersistenceError):
    """A Discord message id is already mapped to a turn (ids are unique across the store)."""

    def __init__(self, message_ids: Iterable[int]) -> None:
        self.message_ids = tuple(sorted(set(message_ids)))
        ids = ", ".join(map(str, self.message_ids)) or "?"
        super().__init__(f"message id(s) already stored: {ids}")
