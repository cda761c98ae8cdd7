"""Plain records returned by the repository: no ORM objects ever leave `persistence/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """Who wrote a turn."""

    USER = "user"
    MODEL = "model"
    SYSTEM = "system"


# The roles whose turns (when not empty) go into a prompt; system notes never do. The window read's
# bound and the prompt builder must agree on this.
PROMPT_ROLES = frozenset({Role.USER, Role.MODEL})


class TurnStatus(StrEnum):
    """Whether a turn was stored whole, cut short (crash, shutdown, cancel), or is a reply's place
    reserved before it is written (empty until then; never part of a prompt)."""

    COMPLETE = "complete"
    INTERRUPTED = "interrupted"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class Persona:
    """A named persona (a character), reusable across the channels of one guild.

    `text` is the card's description; `card` the whole character card as JSON text. The avatar is
    never part of the record (it can be megabytes): read it with `Repository.get_avatar`, and tell
    versions apart by `avatar_sha`.
    """

    id: int
    guild_id: int | None
    name: str
    text: str
    created_by: int | None
    created_at: datetime
    updated_at: datetime
    card: str | None = None
    avatar_sha: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelSession:
    """One conversation in one channel; `reset` archives it and opens a fresh one."""

    id: int
    channel_key: str
    guild_id: int | None
    active: bool
    persona_id: int | None
    persona_name: str | None
    persona_text: str
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    archived_at: datetime | None = None
    persona_card: str | None = None
    persona_avatar_sha: str | None = None


@dataclass(frozen=True, slots=True)
class WindowBudget:
    """What a prompt window can hold: `tokens` of room, and a lower bound of any turn's tokens,
    `per_turn + len(content) / chars_per_token` (`chars_per_token`: the vocabulary's longest token)."""

    tokens: int
    per_turn: int
    chars_per_token: int


@dataclass(frozen=True, slots=True)
class Turn:
    """One user or model turn of a channel session.

    `character_id`: the character that wrote a model turn. `swipe_count` versions of the turn are
    stored (0: none, the content is the only one); `swipe` is the one shown, whose text `content` is.
    """

    id: int
    session_id: int
    role: Role
    author_id: int | None
    author_name: str
    content: str
    status: TurnStatus
    created_at: datetime
    message_ids: tuple[int, ...] = ()
    character_id: int | None = None
    swipe: int = 0
    swipe_count: int = 0


@dataclass(frozen=True, slots=True)
class Lorebook:
    """A named lorebook of one guild (`guild_id` None: global); `data` is a SillyTavern world as JSON text."""

    id: int
    guild_id: int | None
    name: str
    data: str
    created_by: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CharacterWebhook:
    """The webhook a character posts through in one channel; `avatar_sha` is the avatar it was set up with."""

    channel_id: int
    persona_id: int
    webhook_id: int
    token: str = field(repr=False)  # a credential: kept out of logs
    avatar_sha: str | None = None
