"""Storage of guilds, personas, channel sessions and turns (SQLAlchemy async + Alembic)."""

from persistence.database import Database
from persistence.errors import (
    DuplicateMessage,
    NotFound,
    PersistenceError,
    PersonaExists,
    PersonaInUse,
    PersonaNotFound,
    SessionNotFound,
    TurnNotFound,
)
from persistence.records import ChannelSession, Persona, Role, Turn, TurnStatus
from persistence.repository import Repository

__all__ = [
    "ChannelSession",
    "Database",
    "DuplicateMessage",
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
