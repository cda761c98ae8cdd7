"""Characters as the commands use them: import and export cards, write and edit them, put them in channels.

A character is stored as a persona row with its card (JSON) and avatar; a plain persona written in
the form is a card with only a name and a description. No Discord objects here: the cogs pass plain
ids and bytes and render the results. Card files are parsed on a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from bot.core import cards, lore
from bot.core.scene import Character
from bot.core.sessions import ChatService, character_of
from bot.errors import TavernError
from persistence.errors import LorebookExists, PersonaExists
from persistence.errors import PersonaInUse as StorePersonaInUse
from persistence.records import ChannelSession, Persona
from persistence.repository import Repository

NAME_MAX = 64
TEXT_MAX = 4000  # one field in a Discord form
CHOICES_MAX = 25  # Discord shows at most 25 autocomplete choices
# Fields `/character edit` offers (a Discord form holds at most five inputs).
EDITABLE = ("description", "personality", "scenario", "first_mes", "mes_example")


class UnknownPersona(TavernError):
    """No character of this guild has the given name."""

    def __init__(self, name: str) -> None:
        super().__init__(f'There is no character called "{name}" here; /character list shows them.')


class PersonaNameTaken(TavernError):
    """The guild already has a character with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f'A character called "{name}" already exists here. Pick another name, use /character edit, '
            "or import with replace: True."
        )


class PersonaInUse(TavernError):
    """A character that open channel sessions play cannot be deleted; `channel_keys` names them."""

    def __init__(self, name: str, channel_keys: tuple[str, ...]) -> None:
        self.name = name
        self.channel_keys = channel_keys
        super().__init__(
            f'The character "{name}" plays in {len(channel_keys)} channel(s); take it out there first '
            "(/character use or /character remove), or reset them."
        )


class InvalidPersona(TavernError):
    """A character name or text breaks the rules."""


class NoPersona(TavernError):
    """A session was started without a character and the channel has none yet."""

    def __init__(self, guild_has_personas: bool) -> None:
        if guild_has_personas:
            message = "Choose a character for this channel: /session start character:<name> (see /character list)."
        else:
            message = (
                "This server has no characters yet. Import a card with /character import or write one with "
                "/character create, then run /session start."
            )
        super().__init__(message)


class CastFull(TavernError):
    """The channel has as many characters as it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"This channel already has {limit} characters, the most it may have.")


class LorebookNameTaken(TavernError):
    """The guild already has a lorebook with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f'A lorebook called "{name}" already exists here; import with replace: True.')


class UnknownLorebook(TavernError):
    """No lorebook of this guild has the given name."""

    def __init__(self, name: str) -> None:
        super().__init__(f'There is no lorebook called "{name}" here; /lore list shows them.')


def clean_name(name: str) -> str:
    """The name with runs of whitespace collapsed; InvalidPersona unless it is 1 to NAME_MAX characters."""
    cleaned = " ".join(name.split())
    if not 1 <= len(cleaned) <= NAME_MAX:
        raise InvalidPersona(f"A character name must be 1 to {NAME_MAX} characters long.")
    return cleaned


def clean_text(text: str) -> str:
    """The description without surrounding blank space; InvalidPersona if empty or too long."""
    cleaned = text.strip()
    if not cleaned:
        raise InvalidPersona("The description is empty.")
    if len(cleaned) > TEXT_MAX:
        raise InvalidPersona(f"The description is {len(cleaned)} characters long; at most {TEXT_MAX} are allowed.")
    return cleaned


async def find_persona(repo: Repository, guild_id: int, name: str) -> Persona:
    """The guild's character called `name`; UnknownPersona if there is none."""
    persona = await repo.get_persona(guild_id, name)
    if persona is None:
        raise UnknownPersona(name)
    return persona


async def _check(service: ChatService, name: str, card: cards.CharacterCard) -> None:
    await service.check_card(Character(None, name, card))


async def create_persona(
    service: ChatService, guild_id: int, name: str, text: str, *, created_by: int | None
) -> Persona:
    """Store a new character written in the form (name and description) after checking it fits."""
    name, text = clean_name(name), clean_text(text)
    card = cards.card_from_text(name, text)
    await _check(service, name, card)
    try:
        return await service.repo.create_persona(guild_id, name, text, created_by=created_by,
                                                 card=cards.stored_json(card))
    except PersonaExists as exc:
        raise PersonaNameTaken(name) from exc


async def import_card(
    service: ChatService, guild_id: int, data: bytes, *, created_by: int | None, replace: bool = False
) -> Persona:
    """Store the character of a card file (PNG, JSON or CHARX), its lorebook and avatar included.

    A bad file raises CardError (nothing stored); a name in use raises PersonaNameTaken unless `replace`.
    """
    limit = service.settings.characters.max_card_bytes
    card = await asyncio.to_thread(cards.read_card, data, max_bytes=limit)
    name = clean_name(card.name) if card.name.strip() else ""
    if not name:
        raise cards.CardError("The card has no name.")
    if card.character_book:
        await asyncio.to_thread(lore.book_from_card, card.character_book, name=name)  # refuse a broken book now
    await _check(service, name, card)
    stored = cards.stored_json(card)
    repo = service.repo
    if replace and await repo.get_persona(guild_id, name) is not None:
        updated = await repo.update_persona(guild_id, name, card.description, card=stored, avatar=card.avatar)
        if updated is not None:
            return updated
    try:
        return await repo.create_persona(guild_id, name, card.description, created_by=created_by, card=stored,
                                         avatar=card.avatar)
    except PersonaExists as exc:
        raise PersonaNameTaken(name) from exc


async def load_card(repo: Repository, persona: Persona) -> cards.CharacterCard:
    """The character's whole card, avatar included (for export and editing)."""
    avatar = await repo.get_avatar(persona.id)
    if persona.card:
        return await asyncio.to_thread(cards.from_stored, persona.card, avatar)
    card = cards.card_from_text(persona.name, persona.text)
    return cards.with_avatar(card, avatar) if avatar else card


async def update_persona(service: ChatService, guild_id: int, name: str, text: str) -> Persona:
    """Replace a character's description after the same checks as on creation."""
    return await edit_character(service, guild_id, name, {"description": text})


async def edit_character(service: ChatService, guild_id: int, name: str, changes: dict[str, str]) -> Persona:
    """Change card fields (`EDITABLE`); everything else on the card is kept exactly."""
    persona = await find_persona(service.repo, guild_id, name)
    fields = {key: value.strip() for key, value in changes.items() if key in EDITABLE}
    if "description" in fields:
        fields["description"] = clean_text(fields["description"])
    for key, value in fields.items():
        if len(value) > TEXT_MAX:
            raise InvalidPersona(f"{key} is {len(value)} characters long; at most {TEXT_MAX} are allowed.")
    card = cards.with_fields(await load_card(service.repo, persona), **fields)
    await _check(service, persona.name, card)
    updated = await service.repo.update_persona(guild_id, persona.name, card.description,
                                                card=cards.stored_json(card))
    if updated is None:
        raise UnknownPersona(name)
    return updated


async def export_card(repo: Repository, guild_id: int, name: str, kind: str) -> tuple[str, bytes]:
    """The character as a card file: (file name, bytes), `kind` "png" (with `chara` and `ccv3`) or "json"."""
    persona = await find_persona(repo, guild_id, name)
    card = await load_card(repo, persona)
    safe = re.sub(r"[^\w.-]+", "_", persona.name).strip("_") or "character"
    if kind == "json":
        return f"{safe}.json", await asyncio.to_thread(cards.export_json, card)
    return f"{safe}.png", await asyncio.to_thread(cards.export_png, card)


async def delete_persona(repo: Repository, guild_id: int, name: str) -> None:
    """Delete the guild's character; UnknownPersona if absent, PersonaInUse while a channel plays it
    (a running or paused session: it would be left with no character to answer as)."""
    try:
        deleted = await repo.delete_persona(guild_id, name)
    except StorePersonaInUse as exc:
        raise PersonaInUse(name, exc.channel_keys) from exc
    if not deleted:
        raise UnknownPersona(name)


async def matching_names(repo: Repository, guild_id: int, typed: str) -> list[str]:
    """Character names of the guild containing `typed` (case-insensitive), those starting with it first."""
    needle = typed.casefold().strip()
    names = [p.name for p in await repo.list_personas(guild_id) if needle in p.name.casefold()]
    names.sort(key=lambda name: not name.casefold().startswith(needle))
    return names[:CHOICES_MAX]


@dataclass(frozen=True, slots=True)
class SessionStart:
    """What starting a channel's session did; `greeting` is the character's first message, if it posted one."""

    session: ChannelSession
    created: bool
    turns: int
    greeting: int | None = None  # the greeting's turn id

    def message(self) -> str:
        """A one-line answer for the person who started it."""
        name = self.session.persona_name or "the character"
        if self.created:
            return f'Roleplay started in this channel with "{name}".'
        return f'Roleplay resumed in this channel with "{name}" ({self.turns} turns of history).'


def _has_persona(session: ChannelSession) -> bool:
    return session.persona_id is not None or bool(session.persona_text.strip())


async def start_session(
    service: ChatService, channel_key: str, guild_id: int, persona_name: str | None = None, *, user: str = "User"
) -> SessionStart:
    """Start or resume a channel's session, switching to the named character when one is given.

    Without a name the current character is kept; a channel without one raises NoPersona. A session
    with no history yet gets the character's greeting as its first turn (`user` fills `{{user}}`).
    """
    repo = service.repo
    current = await repo.get_active_session(channel_key)
    if persona_name is not None:
        persona = await find_persona(repo, guild_id, persona_name)
        # Checked again on use: the model (and so the context size) may have changed since creation.
        await service.check_card(character_of(persona))
        session = await repo.start_session(channel_key, guild_id=guild_id, persona_id=persona.id)
    elif current is not None and _has_persona(current):
        session = await repo.start_session(channel_key, guild_id=guild_id)
    else:
        raise NoPersona(guild_has_personas=bool(await repo.list_personas(guild_id)))
    turns = await repo.count_turns(session.id)
    greeting = await service.greet(session, user) if turns == 0 else None
    return SessionStart(session, created=current is None, turns=turns,
                        greeting=greeting.id if greeting is not None else None)


async def add_to_cast(service: ChatService, session: ChannelSession, guild_id: int, name: str) -> Persona:
    """Add a character to the channel's cast (the main one stays first); CastFull past the limit."""
    persona = await find_persona(service.repo, guild_id, name)
    if persona.id == session.persona_id:
        return persona
    cast = await service.repo.channel_characters(session.id)
    limit = service.settings.characters.max_per_channel
    if all(p.id != persona.id for p in cast) and len(cast) + 1 >= limit:
        raise CastFull(limit)
    await service.check_card(character_of(persona))
    await service.repo.add_channel_character(session.id, persona.id)
    return persona


async def remove_from_cast(service: ChatService, session: ChannelSession, guild_id: int, name: str) -> bool:
    """Take a character out of the channel's cast (not the main one: /character use replaces that)."""
    persona = await find_persona(service.repo, guild_id, name)
    if persona.id == session.persona_id:
        raise InvalidPersona(f'"{persona.name}" is this channel\'s main character; /character use replaces it.')
    return await service.repo.remove_channel_character(session.id, persona.id)


# --- lorebooks ------------------------------------------------------------------------------------


async def import_lorebook(
    service: ChatService, guild_id: int, name: str, data: bytes, *, created_by: int | None, replace: bool = False
) -> lore.Lorebook:
    """Store a SillyTavern world file under `name`; LoreError for a bad file (nothing stored)."""
    name = clean_name(name)
    limit = service.settings.characters.max_card_bytes
    if len(data) > limit:
        raise lore.LoreError(f"The file is larger than {limit // 2**20} MB.")
    book = await asyncio.to_thread(lore.read_world, data, name=name)
    text = data.decode("utf-8-sig")  # read_world accepted it, so it is UTF-8 JSON; kept as written
    repo = service.repo
    if replace and await repo.replace_lorebook(guild_id, name, text) is not None:
        return book
    try:
        await repo.create_lorebook(guild_id, name, text, created_by=created_by)
    except LorebookExists as exc:
        raise LorebookNameTaken(name) from exc
    return book
