"""Storage of guilds, personas (characters), channel sessions, turns, lorebooks and webhooks (SQLAlchemy + Alembic)."""

from persistence.database import Database
from persistence.errors import (
    DuplicateMessage,
    LorebookExists,
    LorebookNotFound,
    NotFound,
    PersistenceError,
    PersonaExists,
    PersonaInUse,
    PersonaNotFound,
    SessionNotFound,
    TurnNotFound,
)
from persistence.records import ChannelSession, CharacterWebhook, Lorebook, Persona, Role, Turn, TurnStatus
from persistence.repository import Repository

__all__ = [
    "ChannelSession",
    "CharacterWebhook",
    "Database",
    "DuplicateMessage",
    "Lorebook",
    "LorebookExists",
    "LorebookNotFound",
    "NotFound",
    "PersistenceError",
    "Persona",
    "PersonaExists",
    "PersonaInUse",
    "PersonaNotFound",
    "Repository",
    "Role",
    "SessionNotFound",
    "Turn",
    "TurnNotFound",
    "TurnStatus",
]
