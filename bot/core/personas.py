"""Personas as the Discord commands use them: name and text rules, lookup, putting one in a channel.

No Discord objects here: the cogs pass plain ids and render the results.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.core.sessions import ChatService
from bot.errors import TavernError
from persistence.errors import PersonaExists
from persistence.errors import PersonaInUse as StorePersonaInUse
from persistence.records import ChannelSession, Persona
from persistence.repository import Repository

NAME_MAX = 64
TEXT_MAX = 4000
CHOICES_MAX = 25  # Discord shows at most 25 autocomplete choices


class UnknownPersona(TavernError):
    """No persona of this guild has the given name."""

    def __init__(self, name: str) -> None:
        super().__init__(f'There is no persona called "{name}" here; /persona list shows them.')


class PersonaNameTaken(TavernError):
    """The guild already has a persona with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f'A persona called "{name}" already exists here. Pick another name, or use /persona edit.')


class PersonaInUse(TavernError):
    """A persona that open channel sessions play cannot be deleted; `channel_keys` names them."""

    def __init__(self, name: str, channel_keys: tuple[str, ...]) -> None:
        self.name = name
        self.channel_keys = channel_keys
        super().__init__(
            f'The persona "{name}" is played in {len(channel_keys)} channel(s); give them another one first '
            "(/persona use), or reset them."
        )


class InvalidPersona(TavernError):
    """A persona name or text breaks the rules."""


class NoPersona(TavernError):
    """A session was started without a persona and the channel has none yet."""

    def __init__(self, guild_has_personas: bool) -> None:
        if guild_has_personas:
            message = "Choose a persona for this channel: /session start persona:<name> (see /persona list)."
        else:
            message = "This server has no personas yet. Create one with /persona create, then run /session start."
        super().__init__(message)


def clean_name(name: str) -> str:
    """The name with runs of whitespace collapsed; InvalidPersona unless it is 1 to NAME_MAX characters."""
    cleaned = " ".join(name.split())
    if not 1 <= len(cleaned) <= NAME_MAX:
        raise InvalidPersona(f"A persona name must be 1 to {NAME_MAX} characters long.")
    return cleaned


def clean_text(text: str) -> str:
    """The persona text without surrounding blank space; InvalidPersona if empty or too long."""
    cleaned = text.strip()
    if not cleaned:
        raise InvalidPersona("The persona text is empty.")
    if len(cleaned) > TEXT_MAX:
        raise InvalidPersona(f"The persona text is {len(cleaned)} characters long; at most {TEXT_MAX} are allowed.")
    return cleaned


async def find_persona(repo: Repository, guild_id: int, name: str) -> Persona:
    """The guild's persona called `name`; UnknownPersona if there is none."""
    persona = await repo.get_persona(guild_id, name)
    if persona is None:
        raise UnknownPersona(name)
    return persona


async def create_persona(
    service: ChatService, guild_id: int, name: str, text: str, *, created_by: int | None
) -> Persona:
    """Store a new persona after checking its name, length and fit in the model's context."""
    name, text = clean_name(name), clean_text(text)
    await service.check_persona(text)
    try:
        return await service.repo.create_persona(guild_id, name, text, created_by=created_by)
    except PersonaExists as exc:
        raise PersonaNameTaken(name) from exc


async def update_persona(service: ChatService, guild_id: int, name: str, text: str) -> Persona:
    """Replace a persona's text after the same checks as on creation."""
    text = clean_text(text)
    await service.check_persona(text)
    persona = await service.repo.update_persona(guild_id, name, text)
    if persona is None:
        raise UnknownPersona(name)
    return persona


async def delete_persona(repo: Repository, guild_id: int, name: str) -> None:
    """Delete the guild's persona; UnknownPersona if absent, PersonaInUse while a channel plays it
    (a running or paused session: it would be left with no character to answer as)."""
    try:
        deleted = await repo.delete_persona(guild_id, name)
    except StorePersonaInUse as exc:
        raise PersonaInUse(name, exc.channel_keys) from exc
    if not deleted:
        raise UnknownPersona(name)


async def matching_names(repo: Repository, guild_id: int, typed: str) -> list[str]:
    """Persona names of the guild containing `typed` (case-insensitive), those starting with it first."""
    needle = typed.casefold().strip()
    names = [p.name for p in await repo.list_personas(guild_id) if needle in p.name.casefold()]
    names.sort(key=lambda name: not name.casefold().startswith(needle))
    return names[:CHOICES_MAX]


@dataclass(frozen=True, slots=True)
class SessionStart:
    """What starting a channel's session did."""

    session: ChannelSession
    created: bool
    turns: int

    def message(self) -> str:
        """A one-line answer for the person who started it."""
        name = self.session.persona_name or "the character"
        if self.created:
            return f'Roleplay started in this channel with the persona "{name}".'
        return f'Roleplay resumed in this channel with the persona "{name}" ({self.turns} turns of history).'


def _has_persona(session: ChannelSession) -> bool:
    return session.persona_id is not None or bool(session.persona_text.strip())


async def start_session(
    service: ChatService, channel_key: str, guild_id: int, persona_name: str | None = None
) -> SessionStart:
    """Start or resume a channel's session, switching to the named persona when one is given.

    Without a name the current persona is kept; a channel without one raises NoPersona.
    """
    repo = service.repo
    current = await repo.get_active_session(channel_key)
    if persona_name is not None:
        persona = await find_persona(repo, guild_id, persona_name)
        # Checked again on use: the model (and so the context size) may have changed since creation.
        await service.check_persona(persona.text)
        session = await repo.start_session(channel_key, guild_id=guild_id, persona_id=persona.id)
    elif current is not None and _has_persona(current):
        session = await repo.start_session(channel_key, guild_id=guild_id)
    else:
        raise NoPersona(guild_has_personas=bool(await repo.list_personas(guild_id)))
    turns = 0 if current is None else await repo.count_turns(session.id)
    return SessionStart(session, created=current is None, turns=turns)
