"""The repository: each call is one function over a sync session, run whole by `Database.run`, with
explicit commits and plain records out. Writes to a channel's sessions and turns take the channel's
lock first (`persistence.locks`: a no-op on SQLite, where writers take turns anyway). A row that two
writers may create at once (a guild, a bot-wide value, a member's persona, a character's webhook) is
written by one upsert, so on PostgreSQL the second writer updates it instead of breaking its key."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Integer, Row, Select, bindparam, delete, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from persistence.database import Database
from persistence.errors import (
    DuplicateMessage,
    LorebookExists,
    LorebookNotFound,
    PersonaExists,
    PersonaInUse,
    PersonaNotFound,
    SessionNotFound,
    TurnNotFound,
)
from persistence.locks import lock_channel, lock_session_channel, lock_turn_channel
from persistence.models import (
    Base,
    ChannelCharacterRow,
    ChannelLorebookRow,
    ChannelSessionRow,
    CharacterWebhookRow,
    GuildRow,
    LorebookRow,
    MetaRow,
    PersonaRow,
    TurnMessageRow,
    TurnRow,
    TurnSwipeRow,
    UserPersonaRow,
    utcnow,
)
from persistence.records import (
    PROMPT_ROLES,
    ChannelSession,
    CharacterWebhook,
    Lorebook,
    Persona,
    Role,
    Turn,
    TurnStatus,
    WindowBudget,
)

log = logging.getLogger(__name__)


# --- row -> record ---------------------------------------------------------------------------------


def _persona(row: PersonaRow) -> Persona:
    return Persona(
        id=row.id,
        guild_id=row.guild_id,
        name=row.name,
        text=row.text,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        card=row.card,
        avatar_sha=row.avatar_sha,
    )


def _session(row: ChannelSessionRow, persona: PersonaRow | None) -> ChannelSession:
    if persona is not None:
        name: str | None = persona.name
        text = persona.text
        card = persona.card
    else:
        name, text, card = None, row.persona_text or "", None
    avatar_sha = persona.avatar_sha if persona is not None else None
    return ChannelSession(
        id=row.id,
        channel_key=row.channel_key,
        guild_id=row.guild_id,
        active=row.active,
        persona_id=row.persona_id,
        persona_name=name,
        persona_text=text,
        settings=dict(row.settings or {}),
        created_at=row.created_at,
        archived_at=row.archived_at,
        persona_card=card,
        persona_avatar_sha=avatar_sha,
    )


def _turn(row: TurnRow) -> Turn:
    return Turn(
        id=row.id,
        session_id=row.session_id,
        role=Role(row.role),
        author_id=row.author_id,
        author_name=row.author_name,
        content=row.content,
        status=TurnStatus(row.status),
        created_at=row.created_at,
        message_ids=tuple(m.message_id for m in sorted(row.messages, key=lambda m: m.part)),
        character_id=row.character_id,
        swipe=row.swipe,
        swipe_count=row.swipe_count,
    )


def _lorebook(row: LorebookRow) -> Lorebook:
    return Lorebook(
        id=row.id,
        guild_id=row.guild_id,
        name=row.name,
        data=row.data,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _webhook(row: CharacterWebhookRow) -> CharacterWebhook:
    return CharacterWebhook(
        channel_id=row.channel_id,
        persona_id=row.persona_id,
        webhook_id=row.webhook_id,
        token=row.token,
        avatar_sha=row.avatar_sha,
    )


# --- queries ---------------------------------------------------------------------------------------


def _persona_query(guild_id: int | None, name: str) -> Select[tuple[PersonaRow]]:
    guild = PersonaRow.guild_id.is_(None) if guild_id is None else PersonaRow.guild_id == guild_id
    return select(PersonaRow).where(guild, PersonaRow.name == name)


def _persona_taken(s: Session, guild_id: int | None, name: str) -> bool:
    return s.scalar(_persona_query(guild_id, name).with_only_columns(PersonaRow.id)) is not None


def _lorebook_query(guild_id: int | None, name: str) -> Select[tuple[LorebookRow]]:
    guild = LorebookRow.guild_id.is_(None) if guild_id is None else LorebookRow.guild_id == guild_id
    return select(LorebookRow).where(guild, LorebookRow.name == name)


def _lorebook_taken(s: Session, guild_id: int | None, name: str) -> bool:
    return s.scalar(_lorebook_query(guild_id, name).with_only_columns(LorebookRow.id)) is not None


def _avatar_sha(avatar: bytes) -> str:
    return hashlib.sha256(avatar).hexdigest()


# Members' personas outside any guild (the terminal) are stored under guild 0.
NO_GUILD = 0


def _open_session_query(channel_key: str) -> Select[tuple[ChannelSessionRow]]:
    return select(ChannelSessionRow).where(
        ChannelSessionRow.channel_key == channel_key, ChannelSessionRow.archived_at.is_(None)
    )


# Plain dict lookups: calling an enum per column of every turn of a window is measurable.
_ROLES = {role.value: role for role in Role}
_STATUSES = {status.value: status for status in TurnStatus}
_PENDING = TurnStatus.PENDING.value


# The tables themselves, not the mapped classes: a statement over plain table columns runs
# without the ORM's loading layer, which costs more than SQLite itself for a window of turns.
_TURNS = TurnRow.__table__
_TURN_MESSAGES = TurnMessageRow.__table__


@functools.cache
def newest_turns_query() -> Select[Any]:
    """The newest `:limit` turns of `:session_id`, newest first (walking the (session_id, id) index
    backwards, so rows come as they are read and a reader can stop early).

    Plain columns, not ORM rows: a prompt window is hundreds of turns, and building and tracking
    that many mapped objects costs several times what SQLite spends finding them.
    """
    turns = _TURNS.c
    return (
        select(turns.id, turns.session_id, turns.role, turns.author_id, turns.author_name,
               turns.content, turns.status, turns.created_at, turns.character_id, turns.swipe, turns.swipe_count)
        .where(turns.session_id == bindparam("session_id", type_=Integer))
        .order_by(turns.id.desc())
        .limit(bindparam("limit", type_=Integer))
    )


@functools.cache
def messages_from_query() -> Select[Any]:
    """The Discord messages of the turns of `:session_id` from id `:first` on, in turn and part order."""
    messages = _TURN_MESSAGES.c
    turns = _TURNS.c
    return (
        select(messages.turn_id, messages.message_id)
        .join_from(_TURN_MESSAGES, _TURNS, turns.id == messages.turn_id)
        .where(turns.session_id == bindparam("session_id", type_=Integer),
               turns.id >= bindparam("first", type_=Integer))
        .order_by(turns.id, messages.part)
    )


def _within(rows: Iterable[Row[Any]], budget: WindowBudget) -> Iterator[Row[Any]]:
    """Of turn rows read newest first, those that can still fit a prompt window.

    A turn can be in the prompt only if the newer turns leave it room, and they need at least
    their lower bounds (`WindowBudget`): so reading stops once the bounds of the rows read use
    up the room. On real conversations that is a fraction of the turns that could fit at the
    minimum size. A turn whose bound alone exceeds the whole room can never be in the prompt:
    it is passed on (the prompt builder skips it) but takes no room, so the older turns behind it
    are still read. Pending turns (replies not written yet) are left out. Bounds are in characters
    scaled by chars_per_token: integer arithmetic.
    """
    scale = max(1, budget.chars_per_token)
    room, per_turn, used = budget.tokens * scale, budget.per_turn * scale, 0
    for row in rows:
        if used >= room:
            return
        if row.status == _PENDING:
            continue
        yield row
        if row.role in PROMPT_ROLES and row.content:  # turns the prompt leaves out cost nothing
            cost = per_turn + len(row.content)
            if cost <= room and _most_tokens(row) <= budget.tokens:
                used += cost


# Room for a turn's marker and line breaks, in tokens, above what its text takes.
_MARKER_TOKENS = 8
# A member's label as the prompt shows it may add " (member)" to the name (`bot.prompt` speaker labels).
_LABEL_EXTRA = len(" (member): ")


def _most_tokens(row: Row[Any]) -> int:
    """An upper bound of a turn's tokens in a prompt: no token is shorter than a byte, and the prompt
    shows the text with its author's label on every line and `<`, `>`, `[`, `]` swapped for look-alikes
    of up to 3 bytes. A turn over the room by this bound may be one the builder skips (too large alone),
    so `_within` does not count it and reads on."""
    text: str = row.content
    swapped = sum(text.count(ch) for ch in "<>[]")
    label = len(row.author_name.encode("utf-8", "replace")) + _LABEL_EXTRA if row.author_name else 0
    lines = max(1, len(text.splitlines()))
    return _MARKER_TOKENS + len(text.encode("utf-8", "replace")) + 2 * swapped + lines * (label + 1)


def _recent_turns(s: Session, session_id: int, limit: int, budget: WindowBudget | None = None) -> list[Turn]:
    """The newest `limit` turns of a session, oldest first; with `budget`, only those that can fit
    (`_within`). Two statements in one read transaction: the turns, then their messages."""
    result = s.execute(newest_turns_query(), {"session_id": session_id, "limit": limit})
    if budget is None:
        rows = result.all()
    else:  # fetched 64 at a time, so reading stops near where the window does
        rows = list(_within(itertools.chain.from_iterable(result.partitions(64)), budget))
        result.close()
    if not rows:
        return []
    message_ids: dict[int, list[int]] = {}
    params = {"session_id": session_id, "first": rows[-1].id}
    for turn_id, message_id in s.execute(messages_from_query(), params).all():
        message_ids.setdefault(turn_id, []).append(message_id)
    rows.reverse()
    return [
        Turn(
            id=turn_id,
            session_id=session,
            role=_ROLES[role],
            author_id=author_id,
            author_name=author_name,
            content=content,
            status=_STATUSES[status],
            created_at=created_at,
            message_ids=tuple(message_ids.get(turn_id, ())),
            character_id=character_id,
            swipe=swipe,
            swipe_count=swipe_count,
        )
        for (turn_id, session, role, author_id, author_name, content, status, created_at,
             character_id, swipe, swipe_count) in rows
    ]


def _turn_query(turn_id: int) -> Select[tuple[TurnRow]]:
    return select(TurnRow).where(TurnRow.id == turn_id).options(selectinload(TurnRow.messages))


def _swipe_update(turn_id: int, number: int) -> Any:
    return update(TurnSwipeRow).where(TurnSwipeRow.turn_id == turn_id, TurnSwipeRow.number == number)


def _dialect_insert(s: Session, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into `model`'s table in the session's dialect, which can say what to do on a
    conflict (`on_conflict_do_update` / `on_conflict_do_nothing`): PostgreSQL or SQLite.

    Its ON CONFLICT update runs no `onupdate` defaults: an upsert that moves `updated_at` sets it."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"no upsert on {dialect}")


def _add_guild_if_missing(s: Session, guild_id: int | None) -> None:
    if guild_id is not None:
        s.execute(_dialect_insert(s, GuildRow).values(id=guild_id, name="").on_conflict_do_nothing())


def _session_row(s: Session, session_id: int) -> ChannelSessionRow:
    row = s.get(ChannelSessionRow, session_id)
    if row is None:
        raise SessionNotFound(session_id)
    return row


def _session_record(s: Session, row: ChannelSessionRow) -> ChannelSession:
    persona = None if row.persona_id is None else s.get(PersonaRow, row.persona_id)
    return _session(row, persona)


def _check_distinct(message_ids: Sequence[int]) -> None:
    if len(set(message_ids)) != len(message_ids):
        raise DuplicateMessage(m for m in message_ids if message_ids.count(m) > 1)


def _flush_messages(
    s: Session, message_ids: Sequence[int], session_id: int | None = None, character_id: int | None = None
) -> None:
    """Flush; on an integrity error roll back and say which rule the write broke, from the rows
    themselves (never from the driver's message): a message id already mapped (`DuplicateMessage`),
    a session that does not exist (`SessionNotFound`), or a character that does not (`PersonaNotFound`).

    The constraints are the check (no lookup before every write): the rows are looked up only
    after a refused flush.
    """
    try:
        s.flush()
    except IntegrityError as error:
        s.rollback()
        if message_ids:
            query = select(TurnMessageRow.message_id).where(TurnMessageRow.message_id.in_(message_ids))
            if taken := list(s.scalars(query)):
                raise DuplicateMessage(taken) from error
        if session_id is not None and s.get(ChannelSessionRow, session_id) is None:
            raise SessionNotFound(session_id) from error
        if character_id is not None and s.get(PersonaRow, character_id) is None:
            raise PersonaNotFound(character_id) from error
        raise


def _user_turns_query(user_id: int, guild_id: int | None) -> Select[Any]:
    return (
        select(ChannelSessionRow.channel_key, TurnRow)
        .join(ChannelSessionRow, ChannelSessionRow.id == TurnRow.session_id)
        .where(TurnRow.author_id == user_id, _guild_filter(guild_id))
    )


class Repository:
    """Persistence API of the bot. Every method runs in its own session and returns records."""

    def __init__(self, db: Database) -> None:
        """Use the sessions of an opened `Database`."""
        self.db = db

    # --- guilds ------------------------------------------------------------------------------------

    async def ensure_guild(self, guild_id: int, name: str) -> None:
        """Create the guild row, or update its name."""

        def ensure(s: Session) -> None:
            insert = _dialect_insert(s, GuildRow).values(id=guild_id, name=name)
            s.execute(insert.on_conflict_do_update(
                index_elements=[GuildRow.id],
                set_={"name": insert.excluded.name},
                where=GuildRow.name != insert.excluded.name,  # the same name again writes nothing
            ))
            s.commit()

        await self.db.run(ensure, write=True)

    async def get_meta(self, key: str) -> str | None:
        """Return a stored bot-wide value, or None."""

        def get(s: Session) -> str | None:
            row = s.get(MetaRow, key)
            return row.value if row else None

        return await self.db.run(get)

    async def set_meta(self, key: str, value: str) -> None:
        """Store a bot-wide value."""

        def put(s: Session) -> None:
            insert = _dialect_insert(s, MetaRow).values(key=key, value=value)
            s.execute(insert.on_conflict_do_update(
                index_elements=[MetaRow.key],
                set_={"value": insert.excluded.value, "updated_at": utcnow()},
                where=MetaRow.value != insert.excluded.value,  # updated_at: when the value last changed
            ))
            s.commit()

        await self.db.run(put, write=True)

    # --- personas ----------------------------------------------------------------------------------

    async def create_persona(
        self,
        guild_id: int | None,
        name: str,
        text: str,
        created_by: int | None = None,
        *,
        card: str | None = None,
        avatar: bytes | None = None,
    ) -> Persona:
        """Create a persona (a character: `text` its description, `card` the card's JSON text, `avatar`
        PNG bytes); raise `PersonaExists` if the guild already has one with this name."""

        def create(s: Session) -> Persona:
            if _persona_taken(s, guild_id, name):
                raise PersonaExists(guild_id, name)
            _add_guild_if_missing(s, guild_id)
            row = PersonaRow(
                guild_id=guild_id,
                name=name,
                text=text,
                created_by=created_by,
                card=card,
                avatar=avatar,
                avatar_sha=None if avatar is None else _avatar_sha(avatar),
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError as error:
                s.rollback()
                if _persona_taken(s, guild_id, name):  # another writer took the name first (PostgreSQL)
                    raise PersonaExists(guild_id, name) from error
                raise
            s.commit()
            return _persona(row)

        return await self.db.run(create, write=True)

    async def update_persona(
        self,
        guild_id: int | None,
        name: str,
        text: str,
        *,
        card: str | None = None,
        avatar: bytes | None = None,
        new_name: str | None = None,
    ) -> Persona | None:
        """Replace a persona's text, and its card, avatar and name when given (None keeps them);
        None if there is no such persona, `PersonaExists` (nothing changed) if `new_name` is taken."""

        def update(s: Session) -> Persona | None:
            row = s.scalar(_persona_query(guild_id, name))
            if row is None:
                return None
            renamed = new_name if new_name is not None and new_name != name else None
            if renamed is not None:
                if _persona_taken(s, guild_id, renamed):
                    raise PersonaExists(guild_id, renamed)
                row.name = renamed
            row.text = text
            if card is not None:
                row.card = card
            if avatar is not None:
                row.avatar, row.avatar_sha = avatar, _avatar_sha(avatar)
            row.updated_at = utcnow()
            try:
                s.flush()
            except IntegrityError as error:
                s.rollback()
                if renamed is not None and _persona_taken(s, guild_id, renamed):
                    raise PersonaExists(guild_id, renamed) from error
                raise
            s.commit()
            return _persona(row)

        return await self.db.run(update, write=True)

    async def get_persona_by_id(self, persona_id: int) -> Persona | None:
        """The persona with this id (cards included, no avatar)."""

        def get(s: Session) -> Persona | None:
            row = s.get(PersonaRow, persona_id)
            return None if row is None else _persona(row)

        return await self.db.run(get)

    async def get_avatar(self, persona_id: int) -> bytes | None:
        """A persona's avatar (PNG bytes); None if it has none or does not exist."""
        query = select(PersonaRow.avatar).where(PersonaRow.id == persona_id)
        return await self.db.run(lambda s: s.scalar(query))

    async def delete_persona(self, guild_id: int | None, name: str) -> bool:
        """Delete a persona; False if absent. `PersonaInUse` (nothing deleted) while an open session,
        running or paused, plays it, as its main persona or one of its other characters: that channel
        would lose a character. Archived sessions keep their turns and lose the link; the persona's
        webhooks and channel memberships go with it."""

        def remove(s: Session) -> bool:
            persona_id = s.scalar(_persona_query(guild_id, name).with_only_columns(PersonaRow.id))
            if persona_id is None:
                return False
            characters = select(ChannelCharacterRow.session_id).where(ChannelCharacterRow.persona_id == persona_id)
            users = (
                select(ChannelSessionRow.channel_key)
                .where(
                    or_(ChannelSessionRow.persona_id == persona_id, ChannelSessionRow.id.in_(characters)),
                    ChannelSessionRow.archived_at.is_(None),
                )
                .order_by(ChannelSessionRow.id)
            )
            if channel_keys := list(s.scalars(users)):
                raise PersonaInUse(name, channel_keys)
            s.execute(delete(PersonaRow).where(PersonaRow.id == persona_id))
            s.commit()
            return True

        return await self.db.run(remove, write=True)

    async def get_persona(self, guild_id: int | None, name: str) -> Persona | None:
        """The persona called `name` in this guild (`None` guild: global personas)."""

        def get(s: Session) -> Persona | None:
            row = s.scalar(_persona_query(guild_id, name))
            return None if row is None else _persona(row)

        return await self.db.run(get)

    async def list_personas(self, guild_id: int | None) -> list[Persona]:
        """The personas of one guild, by name."""
        guild = PersonaRow.guild_id.is_(None) if guild_id is None else PersonaRow.guild_id == guild_id
        query = select(PersonaRow).where(guild).order_by(PersonaRow.name)
        return await self.db.run(lambda s: [_persona(r) for r in s.scalars(query)])

    # --- sessions ----------------------------------------------------------------------------------

    async def get_active_session(self, channel_key: str) -> ChannelSession | None:
        """The non-archived session of a channel (running or paused), if any (read on every message)."""
        query = _open_session_query(channel_key).options(selectinload(ChannelSessionRow.persona))

        def read(s: Session) -> ChannelSession | None:
            row = s.scalar(query)
            return None if row is None else _session(row, row.persona)

        return await self.db.run(read)

    async def start_session(
        self,
        channel_key: str,
        *,
        guild_id: int | None = None,
        persona_id: int | None = None,
        persona_text: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ChannelSession:
        """Open a session for the channel, or re-activate the open one.

        On an existing session the persona is replaced when `persona_id` or `persona_text` is
        given (both columns are set, so one clears the other) and kept otherwise; `settings`
        replaces the overrides when given; `guild_id` fills in a missing guild.
        """

        def start(s: Session) -> ChannelSession:
            lock_channel(s, channel_key)
            if persona_id is not None and s.get(PersonaRow, persona_id) is None:
                raise PersonaNotFound(persona_id)
            _add_guild_if_missing(s, guild_id)
            row = s.scalar(_open_session_query(channel_key))
            if row is None:
                row = ChannelSessionRow(
                    channel_key=channel_key,
                    guild_id=guild_id,
                    active=True,
                    persona_id=persona_id,
                    persona_text=persona_text,
                    settings=dict(settings or {}),
                )
                s.add(row)
            else:
                row.active = True
                if persona_id is not None or persona_text is not None:
                    row.persona_id, row.persona_text = persona_id, persona_text
                if settings is not None:
                    row.settings = dict(settings)
                if row.guild_id is None and guild_id is not None:
                    row.guild_id = guild_id
            s.flush()
            record = _session_record(s, row)
            s.commit()
            return record

        try:
            return await self.db.run(start, write=True)
        except IntegrityError:
            # Another writer deleted the persona between the check and the insert (possible on
            # PostgreSQL): the second try says so (PersonaNotFound).
            return await self.db.run(start, write=True)

    async def _change_session(self, session_id: int, **values: Any) -> ChannelSession:
        def change(s: Session) -> ChannelSession:
            lock_session_channel(s, session_id)
            row = _session_row(s, session_id)
            for name, value in values.items():
                setattr(row, name, value)
            record = _session_record(s, row)
            s.commit()
            return record

        return await self.db.run(change, write=True)

    async def set_session_active(self, session_id: int, active: bool) -> ChannelSession:
        """Pause (`False`) or resume (`True`) a session."""
        return await self._change_session(session_id, active=active)

    async def update_session_settings(self, session_id: int, settings: Mapping[str, Any]) -> ChannelSession:
        """Replace a session's per-channel overrides."""
        return await self._change_session(session_id, settings=dict(settings))

    async def archive_session(self, session_id: int) -> ChannelSession:
        """Archive a session and return a fresh, empty one with the same channel, persona, other
        characters (in their order) and settings.

        Idempotent: if the session is already archived, the channel's open session is returned
        (or opened if there is none).
        """

        def archive(s: Session) -> ChannelSession:
            lock_session_channel(s, session_id)
            old = _session_row(s, session_id)
            if old.archived_at is None:
                old.archived_at = utcnow()
                s.flush()
            else:
                current = s.scalar(_open_session_query(old.channel_key))
                if current is not None:
                    return _session_record(s, current)
            new = ChannelSessionRow(
                channel_key=old.channel_key,
                guild_id=old.guild_id,
                active=old.active,
                persona_id=old.persona_id,
                persona_text=old.persona_text,
                settings=dict(old.settings or {}),
            )
            s.add(new)
            s.flush()
            members = select(ChannelCharacterRow).where(ChannelCharacterRow.session_id == old.id)
            s.add_all(
                ChannelCharacterRow(session_id=new.id, persona_id=member.persona_id, position=member.position)
                for member in s.scalars(members)
            )
            record = _session_record(s, new)
            s.commit()
            log.debug("archived session %s of %s, opened %s", session_id, old.channel_key, new.id)
            return record

        return await self.db.run(archive, write=True)

    async def list_active_sessions(self) -> list[ChannelSession]:
        """Every open (non-archived) session that is not paused."""
        query = (
            select(ChannelSessionRow)
            .where(ChannelSessionRow.archived_at.is_(None), ChannelSessionRow.active.is_(True))
            .order_by(ChannelSessionRow.id)
            .options(selectinload(ChannelSessionRow.persona))
        )
        return await self.db.run(lambda s: [_session(r, r.persona) for r in s.scalars(query)])

    # --- the other characters of a channel -----------------------------------------------------------

    async def add_channel_character(self, session_id: int, persona_id: int) -> None:
        """Let a character play in a session besides its main persona, after those already there; a
        no-op if it already does. `SessionNotFound` / `PersonaNotFound` if either is missing."""

        def add(s: Session) -> None:
            lock_session_channel(s, session_id)
            if s.get(ChannelCharacterRow, (session_id, persona_id)) is not None:
                return
            last = select(func.max(ChannelCharacterRow.position)).where(ChannelCharacterRow.session_id == session_id)
            position = s.scalar(last)
            s.add(ChannelCharacterRow(
                session_id=session_id, persona_id=persona_id, position=0 if position is None else position + 1
            ))
            try:
                s.flush()
            except IntegrityError as error:
                s.rollback()
                if s.get(ChannelSessionRow, session_id) is None:
                    raise SessionNotFound(session_id) from error
                if s.get(PersonaRow, persona_id) is None:
                    raise PersonaNotFound(persona_id) from error
                if s.get(ChannelCharacterRow, (session_id, persona_id)) is not None:
                    return  # another writer added it first
                raise
            s.commit()

        await self.db.run(add, write=True)

    async def remove_channel_character(self, session_id: int, persona_id: int) -> bool:
        """Take a character out of a session's other characters; False if it was not among them."""
        query = delete(ChannelCharacterRow).where(
            ChannelCharacterRow.session_id == session_id, ChannelCharacterRow.persona_id == persona_id
        )

        def remove(s: Session) -> bool:
            removed = bool(s.execute(query).rowcount)  # type: ignore[attr-defined]
            s.commit()
            return removed

        return await self.db.run(remove, write=True)

    async def channel_characters(self, session_id: int) -> list[Persona]:
        """The characters of a session besides its main persona, in the order they were added (cards
        included, no avatars)."""
        query = (
            select(PersonaRow)
            .join(ChannelCharacterRow, ChannelCharacterRow.persona_id == PersonaRow.id)
            .where(ChannelCharacterRow.session_id == session_id)
            .order_by(ChannelCharacterRow.position)
        )
        return await self.db.run(lambda s: [_persona(r) for r in s.scalars(query)])

    # --- turns -------------------------------------------------------------------------------------

    async def append_turn(
        self,
        session_id: int,
        role: Role | str,
        content: str,
        *,
        author_id: int | None = None,
        author_name: str = "",
        message_ids: Iterable[int] = (),
        status: TurnStatus | str = TurnStatus.COMPLETE,
        character_id: int | None = None,
    ) -> Turn:
        """Store a turn and the Discord messages carrying it, all or nothing. `character_id`: the
        character (persona) that wrote a model turn; its name goes in `author_name`, as for any turn.

        Raises `DuplicateMessage` (nothing stored) if a message id is already mapped, `SessionNotFound`
        or `PersonaNotFound` if the session or the character does not exist.
        """
        ids = list(message_ids)
        _check_distinct(ids)
        row = TurnRow(
            session_id=session_id,
            role=Role(role).value,
            author_id=author_id,
            author_name=author_name,
            content=content,
            status=TurnStatus(status).value,
            character_id=character_id,
            swipe=0,
            swipe_count=0,
            messages=[TurnMessageRow(message_id=m, part=i) for i, m in enumerate(ids)],
        )

        def append(s: Session) -> Turn:
            lock_session_channel(s, session_id)
            s.add(row)
            _flush_messages(s, ids, session_id, character_id)
            s.commit()
            return _turn(row)

        return await self.db.run(append, write=True)

    async def recent_turns(self, session_id: int, limit: int, budget: WindowBudget | None = None) -> list[Turn]:
        """The newest `limit` turns of a session, oldest first; with `budget`, only those of them
        that can still fit a prompt window (see `_within`)."""
        if limit <= 0:
            return []
        return await self.db.run(lambda s: _recent_turns(s, session_id, limit, budget))

    async def turn_by_message(self, message_id: int) -> Turn | None:
        """The turn a Discord message belongs to."""
        query = (
            select(TurnRow)
            .join(TurnMessageRow, TurnMessageRow.turn_id == TurnRow.id)
            .where(TurnMessageRow.message_id == message_id)
            .options(selectinload(TurnRow.messages))
        )

        def find(s: Session) -> Turn | None:
            row = s.scalar(query)
            return None if row is None else _turn(row)

        return await self.db.run(find)

    async def edit_turn(
        self, turn_id: int, content: str, *, status: TurnStatus | str | None = None
    ) -> Turn | None:
        """Replace a turn's content (and status, if given); None if there is no such turn. A turn with
        stored versions (swipes) has the one shown replaced too, so a continued reply keeps its version."""

        def edit(s: Session) -> Turn | None:
            lock_turn_channel(s, turn_id)
            row = s.scalar(_turn_query(turn_id))
            if row is None:
                return None
            row.content = content
            if status is not None:
                row.status = TurnStatus(status).value
            if row.swipe_count:
                s.execute(_swipe_update(turn_id, row.swipe).values(content=content))
            s.commit()
            return _turn(row)

        return await self.db.run(edit, write=True)

    # --- swipes: the versions of a turn ------------------------------------------------------------

    async def add_swipe(self, turn_id: int, content: str, *, select: bool = True) -> Turn:
        """Store another version of a turn (a regenerated reply), after the others. A turn without
        stored versions first keeps its current content as version 0. With `select` the new version
        is the one shown (the turn's content). `TurnNotFound` if the turn does not exist."""

        def add(s: Session) -> Turn:
            lock_turn_channel(s, turn_id)
            row = s.scalar(_turn_query(turn_id))
            if row is None:
                raise TurnNotFound(turn_id)
            if not row.swipe_count:
                s.add(TurnSwipeRow(turn_id=turn_id, number=0, content=row.content))
                row.swipe, row.swipe_count = 0, 1
            number = row.swipe_count
            s.add(TurnSwipeRow(turn_id=turn_id, number=number, content=content))
            row.swipe_count = number + 1
            if select:
                row.content, row.swipe = content, number
            s.commit()
            return _turn(row)

        return await self.db.run(add, write=True)

    async def set_swipes(self, turn_id: int, contents: Sequence[str], selected: int = 0) -> Turn:
        """Make `contents` the versions of a turn (a greeting and its alternates), replacing any stored,
        and show version `selected`. `ValueError` for no versions or `selected` out of range,
        `TurnNotFound` if the turn does not exist."""
        versions = list(contents)
        if not versions:
            raise ValueError("a turn needs at least one version")
        if not 0 <= selected < len(versions):
            raise ValueError(f"version {selected} is not one of the {len(versions)} given")

        def put(s: Session) -> Turn:
            lock_turn_channel(s, turn_id)
            row = s.scalar(_turn_query(turn_id))
            if row is None:
                raise TurnNotFound(turn_id)
            s.execute(delete(TurnSwipeRow).where(TurnSwipeRow.turn_id == turn_id))
            s.add_all(TurnSwipeRow(turn_id=turn_id, number=i, content=text) for i, text in enumerate(versions))
            row.content, row.swipe, row.swipe_count = versions[selected], selected, len(versions)
            s.commit()
            return _turn(row)

        return await self.db.run(put, write=True)

    async def select_swipe(self, turn_id: int, number: int) -> Turn | None:
        """Show version `number` of a turn (its content becomes that version's text); None if the turn
        is gone or has no such version. A turn without stored versions has one: 0, its content."""

        def choose(s: Session) -> Turn | None:
            lock_turn_channel(s, turn_id)
            row = s.scalar(_turn_query(turn_id))
            if row is None or not 0 <= number < max(1, row.swipe_count):
                return None
            if row.swipe_count and number != row.swipe:
                version = s.get(TurnSwipeRow, (turn_id, number))
                if version is None:
                    return None
                row.content, row.swipe = version.content, number
                s.commit()
            return _turn(row)

        return await self.db.run(choose, write=True)

    async def swipes(self, turn_id: int) -> list[str]:
        """The stored versions of a turn in order (empty if it has none stored, or does not exist)."""
        query = select(TurnSwipeRow.content).where(TurnSwipeRow.turn_id == turn_id).order_by(TurnSwipeRow.number)
        return await self.db.run(lambda s: list(s.scalars(query)))

    async def delete_turn(self, turn_id: int) -> bool:
        """Delete a turn and its message mappings; False if it did not exist."""

        def remove(s: Session) -> bool:
            lock_turn_channel(s, turn_id)
            result = s.execute(delete(TurnRow).where(TurnRow.id == turn_id))
            s.commit()
            return bool(result.rowcount)  # type: ignore[attr-defined]

        return await self.db.run(remove, write=True)

    async def add_turn_messages(self, turn_id: int, message_ids: Iterable[int]) -> Turn:
        """Map more Discord messages (the next parts) to a turn; `DuplicateMessage` if one is taken."""
        ids = list(message_ids)
        _check_distinct(ids)

        def add(s: Session) -> Turn:
            lock_turn_channel(s, turn_id)
            row = s.scalar(_turn_query(turn_id))
            if row is None:
                raise TurnNotFound(turn_id)
            if mapped := [m.message_id for m in row.messages if m.message_id in ids]:
                raise DuplicateMessage(mapped)  # already this turn's (the index catches other turns')
            start = max((m.part for m in row.messages), default=-1) + 1
            row.messages.extend(TurnMessageRow(message_id=m, part=start + i) for i, m in enumerate(ids))
            _flush_messages(s, ids)
            s.commit()
            return _turn(row)

        return await self.db.run(add, write=True)

    async def count_turns(self, session_id: int) -> int:
        """How many turns a session has."""
        query = select(func.count()).select_from(TurnRow).where(TurnRow.session_id == session_id)
        return int(await self.db.run(lambda s: s.scalar(query)) or 0)

    async def latest_turn(self, session_id: int) -> Turn | None:
        """The newest turn of a session."""
        turns = await self.recent_turns(session_id, 1)
        return turns[0] if turns else None

    # --- lorebooks ---------------------------------------------------------------------------------

    async def create_lorebook(
        self, guild_id: int | None, name: str, data: str, *, created_by: int | None = None
    ) -> Lorebook:
        """Store a lorebook (`data`: a SillyTavern world as JSON text); `LorebookExists` if the guild
        (or, for `None`, the global scope) already has one with this name."""

        def create(s: Session) -> Lorebook:
            if _lorebook_taken(s, guild_id, name):
                raise LorebookExists(guild_id, name)
            _add_guild_if_missing(s, guild_id)
            row = LorebookRow(guild_id=guild_id, name=name, data=data, created_by=created_by)
            s.add(row)
            try:
                s.flush()
            except IntegrityError as error:
                s.rollback()
                if _lorebook_taken(s, guild_id, name):  # another writer took the name first (PostgreSQL)
                    raise LorebookExists(guild_id, name) from error
                raise
            s.commit()
            return _lorebook(row)

        return await self.db.run(create, write=True)

    async def replace_lorebook(self, guild_id: int | None, name: str, data: str) -> Lorebook | None:
        """Replace a lorebook's data; None if there is no such lorebook."""

        def replace(s: Session) -> Lorebook | None:
            row = s.scalar(_lorebook_query(guild_id, name))
            if row is None:
                return None
            row.data = data
            row.updated_at = utcnow()
            s.commit()
            return _lorebook(row)

        return await self.db.run(replace, write=True)

    async def get_lorebook(self, guild_id: int | None, name: str) -> Lorebook | None:
        """The lorebook called `name` in this guild (`None` guild: global lorebooks), with its data."""

        def get(s: Session) -> Lorebook | None:
            row = s.scalar(_lorebook_query(guild_id, name))
            return None if row is None else _lorebook(row)

        return await self.db.run(get)

    async def list_lorebooks(self, guild_id: int | None, *, with_data: bool = False) -> list[Lorebook]:
        """The lorebooks of one guild, by name. Without `with_data` their `data` is left empty (""): a
        world can be hundreds of kilobytes and a list (or a name completion) needs none of it."""
        guild = LorebookRow.guild_id.is_(None) if guild_id is None else LorebookRow.guild_id == guild_id
        columns = [LorebookRow.id, LorebookRow.guild_id, LorebookRow.name, LorebookRow.created_by,
                   LorebookRow.created_at, LorebookRow.updated_at]
        query = select(*columns, LorebookRow.data if with_data else literal("")).where(guild)

        def read(s: Session) -> list[Lorebook]:
            rows = s.execute(query.order_by(LorebookRow.name)).all()
            return [
                Lorebook(id=i, guild_id=g, name=n, data=d, created_by=by, created_at=c, updated_at=u)
                for i, g, n, by, c, u, d in rows
            ]

        return await self.db.run(read)

    async def delete_lorebook(self, guild_id: int | None, name: str) -> bool:
        """Delete a lorebook (and detach it from every channel); False if absent."""

        def remove(s: Session) -> bool:
            lorebook_id = s.scalar(_lorebook_query(guild_id, name).with_only_columns(LorebookRow.id))
            if lorebook_id is None:
                return False
            s.execute(delete(LorebookRow).where(LorebookRow.id == lorebook_id))
            s.commit()
            return True

        return await self.db.run(remove, write=True)

    async def attach_lorebook(self, channel_key: str, lorebook_id: int) -> bool:
        """Attach a lorebook to a channel (after those attached before; it stays through resets);
        False if it already is, `LorebookNotFound` if there is no such lorebook."""

        def attach(s: Session) -> bool:
            lock_channel(s, channel_key)
            if s.get(ChannelLorebookRow, (channel_key, lorebook_id)) is not None:
                return False
            last = select(func.max(ChannelLorebookRow.position)).where(ChannelLorebookRow.channel_key == channel_key)
            position = s.scalar(last)
            s.add(ChannelLorebookRow(
                channel_key=channel_key, lorebook_id=lorebook_id, position=0 if position is None else position + 1
            ))
            try:
                s.flush()
            except IntegrityError as error:
                s.rollback()
                if s.get(LorebookRow, lorebook_id) is None:
                    raise LorebookNotFound(lorebook_id) from error
                if s.get(ChannelLorebookRow, (channel_key, lorebook_id)) is not None:
                    return False  # another writer attached it first
                raise
            s.commit()
            return True

        return await self.db.run(attach, write=True)

    async def detach_lorebook(self, channel_key: str, lorebook_id: int) -> bool:
        """Detach a lorebook from a channel; False if it was not attached."""
        query = delete(ChannelLorebookRow).where(
            ChannelLorebookRow.channel_key == channel_key, ChannelLorebookRow.lorebook_id == lorebook_id
        )

        def detach(s: Session) -> bool:
            removed = bool(s.execute(query).rowcount)  # type: ignore[attr-defined]
            s.commit()
            return removed

        return await self.db.run(detach, write=True)

    async def channel_lorebooks(self, channel_key: str) -> list[Lorebook]:
        """The lorebooks attached to a channel, with their data, in the order they were attached."""
        query = (
            select(LorebookRow)
            .join(ChannelLorebookRow, ChannelLorebookRow.lorebook_id == LorebookRow.id)
            .where(ChannelLorebookRow.channel_key == channel_key)
            .order_by(ChannelLorebookRow.position)
        )
        return await self.db.run(lambda s: [_lorebook(r) for r in s.scalars(query)])

    # --- members' personas -------------------------------------------------------------------------

    async def set_user_persona(self, guild_id: int | None, user_id: int, text: str | None) -> None:
        """Store how a member describes themselves in one guild (`None` or 0: outside any guild);
        `text` None removes it."""
        guild = NO_GUILD if guild_id is None else guild_id

        def put(s: Session) -> None:
            if text is None:
                s.execute(delete(UserPersonaRow).where(UserPersonaRow.guild_id == guild,
                                                       UserPersonaRow.user_id == user_id))
            else:
                insert = _dialect_insert(s, UserPersonaRow).values(
                    guild_id=guild, user_id=user_id, text=text, updated_at=utcnow()
                )
                s.execute(insert.on_conflict_do_update(
                    index_elements=[UserPersonaRow.guild_id, UserPersonaRow.user_id],
                    set_={"text": insert.excluded.text, "updated_at": insert.excluded.updated_at},
                ))
            s.commit()

        await self.db.run(put, write=True)

    async def get_user_persona(self, guild_id: int | None, user_id: int) -> str | None:
        """A member's persona in one guild (`None` or 0: outside any guild), if they set one."""
        query = select(UserPersonaRow.text).where(
            UserPersonaRow.guild_id == (NO_GUILD if guild_id is None else guild_id), UserPersonaRow.user_id == user_id
        )
        return await self.db.run(lambda s: s.scalar(query))

    # --- character webhooks ------------------------------------------------------------------------

    async def get_character_webhook(self, channel_id: int, persona_id: int) -> CharacterWebhook | None:
        """The webhook a character posts through in a channel, if one was saved."""

        def get(s: Session) -> CharacterWebhook | None:
            row = s.get(CharacterWebhookRow, (channel_id, persona_id))
            return None if row is None else _webhook(row)

        return await self.db.run(get)

    async def save_character_webhook(self, webhook: CharacterWebhook) -> CharacterWebhook:
        """Store (or replace) the webhook of a character in a channel; `PersonaNotFound` if the
        character does not exist."""

        def save(s: Session) -> CharacterWebhook:
            insert = _dialect_insert(s, CharacterWebhookRow).values(
                channel_id=webhook.channel_id,
                persona_id=webhook.persona_id,
                webhook_id=webhook.webhook_id,
                token=webhook.token,
                avatar_sha=webhook.avatar_sha,
            )
            upsert = insert.on_conflict_do_update(
                index_elements=[CharacterWebhookRow.channel_id, CharacterWebhookRow.persona_id],
                set_={
                    "webhook_id": insert.excluded.webhook_id,
                    "token": insert.excluded.token,
                    "avatar_sha": insert.excluded.avatar_sha,
                },
            )
            try:
                row = s.scalars(upsert.returning(CharacterWebhookRow)).one()
            except IntegrityError as error:
                s.rollback()
                if s.get(PersonaRow, webhook.persona_id) is None:
                    raise PersonaNotFound(webhook.persona_id) from error
                raise
            s.commit()
            return _webhook(row)

        return await self.db.run(save, write=True)

    async def delete_character_webhook(self, webhook_id: int) -> int:
        """Forget a webhook (e.g. deleted in Discord) for every character using it; how many rows went."""
        query = delete(CharacterWebhookRow).where(CharacterWebhookRow.webhook_id == webhook_id)

        def remove(s: Session) -> int:
            deleted = int(s.execute(query).rowcount)  # type: ignore[attr-defined]
            s.commit()
            return deleted

        return await self.db.run(remove, write=True)

    async def character_webhook_ids(self) -> set[int]:
        """Every webhook id the characters post through (messages from these are the bot's own)."""
        query = select(CharacterWebhookRow.webhook_id).distinct()
        return await self.db.run(lambda s: set(s.scalars(query)))

    async def channel_webhooks(self, channel_id: int) -> list[CharacterWebhook]:
        """The character webhooks saved for one channel, by persona id."""
        query = (
            select(CharacterWebhookRow)
            .where(CharacterWebhookRow.channel_id == channel_id)
            .order_by(CharacterWebhookRow.persona_id)
        )
        return await self.db.run(lambda s: [_webhook(r) for r in s.scalars(query)])

    # --- user data ---------------------------------------------------------------------------------

    async def session_turns(self, session_id: int, *, after_id: int = 0, limit: int = 1000) -> list[Turn]:
        """A page of a session's turns, oldest first, with ids above `after_id` (for exports)."""
        query = (
            select(TurnRow)
            .where(TurnRow.session_id == session_id, TurnRow.id > after_id)
            .order_by(TurnRow.id)
            .limit(limit)
            .options(selectinload(TurnRow.messages))
        )
        return await self.db.run(lambda s: [_turn(r) for r in s.scalars(query)])

    async def count_user_turns(self, user_id: int, guild_id: int | None) -> int:
        """How many turns a user wrote in one guild (archived sessions included)."""
        query = _user_turns_query(user_id, guild_id).with_only_columns(func.count())
        return int(await self.db.run(lambda s: s.scalar(query)) or 0)

    async def user_turns(
        self, user_id: int, guild_id: int | None, *, after_id: int = 0, limit: int = 1000
    ) -> list[tuple[str, Turn]]:
        """A page of the turns a user wrote in one guild (archived sessions included), oldest first,
        with ids above `after_id`, each with its channel key."""
        query = (
            _user_turns_query(user_id, guild_id)
            .where(TurnRow.id > after_id)
            .order_by(TurnRow.id)
            .limit(limit)
            .options(selectinload(TurnRow.messages))
        )
        return await self.db.run(lambda s: [(key, _turn(row)) for key, row in s.execute(query).all()])

    async def forget_user(self, user_id: int, guild_id: int | None) -> int:
        """Delete every turn a user wrote in one guild (their message mappings go with them), and their
        persona in that guild.

        Returns how many turns were deleted. Nothing else is changed: other members' turns are theirs,
        and the character's replies stay as written (a name is also an ordinary word: "Will", "Rose").
        """
        sessions = select(ChannelSessionRow.id).where(_guild_filter(guild_id))
        mine = delete(TurnRow).where(TurnRow.author_id == user_id, TurnRow.session_id.in_(sessions))
        persona = delete(UserPersonaRow).where(
            UserPersonaRow.guild_id == (NO_GUILD if guild_id is None else guild_id), UserPersonaRow.user_id == user_id
        )

        def forget(s: Session) -> tuple[int, bool]:
            deleted = int(s.execute(mine).rowcount)  # type: ignore[attr-defined]
            had_persona = bool(s.execute(persona).rowcount)  # type: ignore[attr-defined]
            s.commit()
            return deleted, had_persona

        deleted, had_persona = await self.db.run(forget, write=True)
        log.info("forgot user %s in guild %s: %d turns deleted%s", user_id, guild_id, deleted,
                 ", persona removed" if had_persona else "")
        return deleted

    async def newest_message_id(self, session_id: int) -> int | None:
        """The highest Discord message id mapped to a turn of the session; None if there is none."""
        query = (
            select(func.max(TurnMessageRow.message_id))
            .join(TurnRow, TurnRow.id == TurnMessageRow.turn_id)
            .where(TurnRow.session_id == session_id)
        )
        return await self.db.run(lambda s: s.scalar(query))


def _guild_filter(guild_id: int | None) -> Any:
    if guild_id is None:
        return ChannelSessionRow.guild_id.is_(None)
    return ChannelSessionRow.guild_id == guild_id
