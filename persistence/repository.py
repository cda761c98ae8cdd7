"""Async repository: one session per call, explicit commits, plain records out."""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Integer, Row, Select, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, selectinload

from persistence.database import Database
from persistence.errors import (
    DuplicateMessage,
    PersonaExists,
    PersonaNotFound,
    SessionNotFound,
    TurnNotFound,
)
from persistence.models import (
    ChannelSessionRow,
    GuildRow,
    MetaRow,
    PersonaRow,
    TurnMessageRow,
    TurnRow,
    utcnow,
)
from persistence.records import PROMPT_ROLES, ChannelSession, Persona, Role, Turn, TurnStatus, WindowBudget

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
    )


def _session(row: ChannelSessionRow, persona: PersonaRow | None) -> ChannelSession:
    if persona is not None:
        name: str | None = persona.name
        text = persona.text
    else:
        name, text = None, row.persona_text or ""
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
    )


# --- queries ---------------------------------------------------------------------------------------


def _persona_query(guild_id: int | None, name: str) -> Select[tuple[PersonaRow]]:
    guild = PersonaRow.guild_id.is_(None) if guild_id is None else PersonaRow.guild_id == guild_id
    return select(PersonaRow).where(guild, PersonaRow.name == name)


def _open_session_query(channel_key: str) -> Select[tuple[ChannelSessionRow]]:
    return select(ChannelSessionRow).where(
        ChannelSessionRow.channel_key == channel_key, ChannelSessionRow.archived_at.is_(None)
    )


# Plain dict lookups: calling an enum per column of every turn of a window is measurable.
_ROLES = {role.value: role for role in Role}
_STATUSES = {status.value: status for status in TurnStatus}


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
               turns.content, turns.status, turns.created_at)
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
    minimum size. Bounds are in characters scaled by chars_per_token: integer arithmetic.
    """
    scale = max(1, budget.chars_per_token)
    room, per_turn, used = budget.tokens * scale, budget.per_turn * scale, 0
    for row in rows:
        if used >= room:
            return
        yield row
        if row.role in PROMPT_ROLES and row.content:  # turns the prompt leaves out cost nothing
            used += per_turn + len(row.content)


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
        )
        for turn_id, session, role, author_id, author_name, content, status, created_at in rows
    ]


def _turn_query(turn_id: int) -> Select[tuple[TurnRow]]:
    return select(TurnRow).where(TurnRow.id == turn_id).options(selectinload(TurnRow.messages))


def _is_duplicate_message(error: IntegrityError) -> bool:
    return "turn_messages" in str(error.orig)


class Repository:
    """Persistence API of the bot. Every method runs in its own session and returns records."""

    def __init__(self, db: Database) -> None:
        """Use the sessions of an opened `Database`."""
        self.db = db

    # --- helpers -----------------------------------------------------------------------------------

    @staticmethod
    async def _add_guild_if_missing(s: AsyncSession, guild_id: int | None) -> None:
        if guild_id is not None and await s.get(GuildRow, guild_id) is None:
            s.add(GuildRow(id=guild_id, name=""))
            await s.flush()

    @staticmethod
    async def _session_row(s: AsyncSession, session_id: int) -> ChannelSessionRow:
        row = await s.get(ChannelSessionRow, session_id)
        if row is None:
            raise SessionNotFound(session_id)
        return row

    @staticmethod
    async def _session_record(s: AsyncSession, row: ChannelSessionRow) -> ChannelSession:
        persona = None if row.persona_id is None else await s.get(PersonaRow, row.persona_id)
        return _session(row, persona)

    @staticmethod
    async def _check_persona(s: AsyncSession, persona_id: int | None) -> None:
        if persona_id is not None and await s.get(PersonaRow, persona_id) is None:
            raise PersonaNotFound(persona_id)

    @staticmethod
    def _check_distinct(message_ids: Sequence[int]) -> None:
        if len(set(message_ids)) != len(message_ids):
            raise DuplicateMessage(m for m in message_ids if message_ids.count(m) > 1)

    @staticmethod
    def _flush_messages(s: Session, message_ids: Sequence[int]) -> None:
        """Flush; on an integrity error roll back, and a unique violation on `turn_messages` becomes
        DuplicateMessage naming the taken ids.

        The unique index is the check (no lookup before every write): the taken ids are looked up
        only after a refused flush.
        """
        try:
            s.flush()
        except IntegrityError as error:
            s.rollback()
            if not _is_duplicate_message(error):
                raise
            taken = s.scalars(select(TurnMessageRow.message_id).where(TurnMessageRow.message_id.in_(message_ids)))
            raise DuplicateMessage(list(taken) or message_ids) from error

    # --- guilds ------------------------------------------------------------------------------------

    async def ensure_guild(self, guild_id: int, name: str) -> None:
        """Create the guild row, or update its name."""
        async with self.db.write() as s:
            row = await s.get(GuildRow, guild_id)
            if row is None:
                s.add(GuildRow(id=guild_id, name=name))
            elif row.name != name:
                row.name = name
            await s.commit()

    async def get_meta(self, key: str) -> str | None:
        """Return a stored bot-wide value, or None."""
        async with self.db.read() as s:
            row = await s.get(MetaRow, key)
            return row.value if row else None

    async def set_meta(self, key: str, value: str) -> None:
        """Store a bot-wide value."""
        async with self.db.write() as s:
            row = await s.get(MetaRow, key)
            if row is None:
                s.add(MetaRow(key=key, value=value))
            else:
                row.value = value
            await s.commit()

    # --- personas ----------------------------------------------------------------------------------

    async def create_persona(
        self, guild_id: int | None, name: str, text: str, created_by: int | None = None
    ) -> Persona:
        """Create a persona; raise `PersonaExists` if the guild already has one with this name."""
        async with self.db.write() as s:
            if await s.scalar(_persona_query(guild_id, name)) is not None:
                raise PersonaExists(guild_id, name)
            await self._add_guild_if_missing(s, guild_id)
            row = PersonaRow(guild_id=guild_id, name=name, text=text, created_by=created_by)
            s.add(row)
            try:
                await s.flush()
            except IntegrityError as error:
                raise PersonaExists(guild_id, name) from error
            await s.commit()
            return _persona(row)

    async def update_persona(self, guild_id: int | None, name: str, text: str) -> Persona | None:
        """Replace a persona's text; None if there is no such persona."""
        async with self.db.write() as s:
            row = await s.scalar(_persona_query(guild_id, name))
            if row is None:
                return None
            row.text = text
            row.updated_at = utcnow()
            await s.commit()
            return _persona(row)

    async def delete_persona(self, guild_id: int | None, name: str) -> bool:
        """Delete a persona (sessions using it fall back to their inline text); False if absent."""
        async with self.db.write() as s:
            persona_id = await s.scalar(_persona_query(guild_id, name).with_only_columns(PersonaRow.id))
            if persona_id is None:
                return False
            await s.execute(delete(PersonaRow).where(PersonaRow.id == persona_id))
            await s.commit()
            return True

    async def get_persona(self, guild_id: int | None, name: str) -> Persona | None:
        """The persona called `name` in this guild (`None` guild: global personas)."""
        async with self.db.read() as s:
            row = await s.scalar(_persona_query(guild_id, name))
            return None if row is None else _persona(row)

    async def list_personas(self, guild_id: int | None) -> list[Persona]:
        """The personas of one guild, by name."""
        guild = PersonaRow.guild_id.is_(None) if guild_id is None else PersonaRow.guild_id == guild_id
        async with self.db.read() as s:
            rows = await s.scalars(select(PersonaRow).where(guild).order_by(PersonaRow.name))
            return [_persona(r) for r in rows]

    # --- sessions ----------------------------------------------------------------------------------

    async def get_active_session(self, channel_key: str) -> ChannelSession | None:
        """The non-archived session of a channel (running or paused), if any (read on every message)."""
        query = _open_session_query(channel_key).options(selectinload(ChannelSessionRow.persona))

        def read(s: Session) -> ChannelSession | None:
            row = s.scalar(query)
            return None if row is None else _session(row, row.persona)

        return await self.db.run_sync(read)

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
        args = (channel_key, guild_id, persona_id, persona_text, settings)
        try:
            return await self._start_session(*args)
        except IntegrityError:
            # Another writer opened the channel's session first (possible on PostgreSQL): use it.
            return await self._start_session(*args)

    async def _start_session(
        self,
        channel_key: str,
        guild_id: int | None,
        persona_id: int | None,
        persona_text: str | None,
        settings: Mapping[str, Any] | None,
    ) -> ChannelSession:
        async with self.db.write() as s:
            await self._check_persona(s, persona_id)
            await self._add_guild_if_missing(s, guild_id)
            row = await s.scalar(_open_session_query(channel_key))
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
            await s.flush()
            record = await self._session_record(s, row)
            await s.commit()
            return record

    async def set_session_active(self, session_id: int, active: bool) -> ChannelSession:
        """Pause (`False`) or resume (`True`) a session."""
        async with self.db.write() as s:
            row = await self._session_row(s, session_id)
            row.active = active
            record = await self._session_record(s, row)
            await s.commit()
            return record

    async def update_session_settings(self, session_id: int, settings: Mapping[str, Any]) -> ChannelSession:
        """Replace a session's per-channel overrides."""
        async with self.db.write() as s:
            row = await self._session_row(s, session_id)
            row.settings = dict(settings)
            record = await self._session_record(s, row)
            await s.commit()
            return record

    async def archive_session(self, session_id: int) -> ChannelSession:
        """Archive a session and return a fresh, empty one with the same channel, persona and settings.

        Idempotent: if the session is already archived, the channel's open session is returned
        (or opened if there is none).
        """
        async with self.db.write() as s:
            old = await self._session_row(s, session_id)
            if old.archived_at is None:
                old.archived_at = utcnow()
                await s.flush()
            else:
                current = await s.scalar(_open_session_query(old.channel_key))
                if current is not None:
                    return await self._session_record(s, current)
            new = ChannelSessionRow(
                channel_key=old.channel_key,
                guild_id=old.guild_id,
                active=old.active,
                persona_id=old.persona_id,
                persona_text=old.persona_text,
                settings=dict(old.settings or {}),
            )
            s.add(new)
            await s.flush()
            record = await self._session_record(s, new)
            await s.commit()
            log.debug("archived session %s of %s, opened %s", session_id, old.channel_key, new.id)
            return record

    async def list_active_sessions(self) -> list[ChannelSession]:
        """Every open (non-archived) session that is not paused."""
        query = (
            select(ChannelSessionRow)
            .where(ChannelSessionRow.archived_at.is_(None), ChannelSessionRow.active.is_(True))
            .order_by(ChannelSessionRow.id)
            .options(selectinload(ChannelSessionRow.persona))
        )
        async with self.db.read() as s:
            return [_session(r, r.persona) for r in await s.scalars(query)]

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
    ) -> Turn:
        """Store a turn and the Discord messages carrying it, all or nothing.

        Raises `DuplicateMessage` (nothing stored) if a message id is already mapped.
        """
        ids = list(message_ids)
        self._check_distinct(ids)
        row = TurnRow(
            session_id=session_id,
            role=Role(role).value,
            author_id=author_id,
            author_name=author_name,
            content=content,
            status=TurnStatus(status).value,
            messages=[TurnMessageRow(message_id=m, part=i) for i, m in enumerate(ids)],
        )

        def append(s: Session) -> Turn:
            s.add(row)
            try:
                self._flush_messages(s, ids)
            except IntegrityError as error:  # the session's foreign key (no lookup before every write)
                if s.get(ChannelSessionRow, session_id) is None:
                    raise SessionNotFound(session_id) from error
                raise
            s.commit()
            return _turn(row)

        return await self.db.run_sync(append, write=True)

    async def recent_turns(self, session_id: int, limit: int, budget: WindowBudget | None = None) -> list[Turn]:
        """The newest `limit` turns of a session, oldest first; with `budget`, only those of them
        that can still fit a prompt window (see `_within`)."""
        if limit <= 0:
            return []
        return await self.db.run_sync(lambda s: _recent_turns(s, session_id, limit, budget))

    async def turn_by_message(self, message_id: int) -> Turn | None:
        """The turn a Discord message belongs to."""
        query = (
            select(TurnRow)
            .join(TurnMessageRow, TurnMessageRow.turn_id == TurnRow.id)
            .where(TurnMessageRow.message_id == message_id)
            .options(selectinload(TurnRow.messages))
        )
        async with self.db.read() as s:
            row = await s.scalar(query)
            return None if row is None else _turn(row)

    async def edit_turn(
        self, turn_id: int, content: str, *, status: TurnStatus | str | None = None
    ) -> Turn | None:
        """Replace a turn's content (and status, if given); None if there is no such turn."""

        def edit(s: Session) -> Turn | None:
            row = s.scalar(_turn_query(turn_id))
            if row is None:
                return None
            row.content = content
            if status is not None:
                row.status = TurnStatus(status).value
            s.commit()
            return _turn(row)

        return await self.db.run_sync(edit, write=True)

    async def delete_turn(self, turn_id: int) -> bool:
        """Delete a turn and its message mappings; False if it did not exist."""
        async with self.db.write() as s:
            result = await s.execute(delete(TurnRow).where(TurnRow.id == turn_id))
            await s.commit()
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def add_turn_messages(self, turn_id: int, message_ids: Iterable[int]) -> Turn:
        """Map more Discord messages (the next parts) to a turn; `DuplicateMessage` if one is taken."""
        ids = list(message_ids)
        self._check_distinct(ids)

        def add(s: Session) -> Turn:
            row = s.scalar(_turn_query(turn_id))
            if row is None:
                raise TurnNotFound(turn_id)
            if mapped := [m.message_id for m in row.messages if m.message_id in ids]:
                raise DuplicateMessage(mapped)  # already this turn's (the index catches other turns')
            start = max((m.part for m in row.messages), default=-1) + 1
            row.messages.extend(TurnMessageRow(message_id=m, part=start + i) for i, m in enumerate(ids))
            self._flush_messages(s, ids)
            s.commit()
            return _turn(row)

        return await self.db.run_sync(add, write=True)

    async def count_turns(self, session_id: int) -> int:
        """How many turns a session has."""
        async with self.db.read() as s:
            count = await s.scalar(
                select(func.count()).select_from(TurnRow).where(TurnRow.session_id == session_id)
            )
            return int(count or 0)

    async def latest_turn(self, session_id: int) -> Turn | None:
        """The newest turn of a session."""
        turns = await self.recent_turns(session_id, 1)
        return turns[0] if turns else None

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
        async with self.db.read() as s:
            return [_turn(r) for r in await s.scalars(query)]

    async def user_turns(self, user_id: int, guild_id: int | None) -> list[tuple[str, Turn]]:
        """Every turn a user wrote in one guild (archived sessions included), with its channel key."""
        query = (
            select(ChannelSessionRow.channel_key, TurnRow)
            .join(ChannelSessionRow, ChannelSessionRow.id == TurnRow.session_id)
            .where(TurnRow.author_id == user_id, _guild_filter(guild_id))
            .order_by(TurnRow.id)
            .options(selectinload(TurnRow.messages))
        )
        async with self.db.read() as s:
            return [(key, _turn(row)) for key, row in (await s.execute(query)).all()]

    async def forget_user(self, user_id: int, guild_id: int | None, *, placeholder: str = "[removed]") -> int:
        """Delete a user's turns in one guild and scrub their names from the model turns there.

        Returns how many of the user's turns were deleted. Model replies stay (they belong to the
        conversation), but every display name the user wrote under is replaced by `placeholder`.
        """
        async with self.db.write() as s:
            sessions = select(ChannelSessionRow.id).where(_guild_filter(guild_id))
            mine = select(TurnRow).where(TurnRow.author_id == user_id, TurnRow.session_id.in_(sessions))
            rows = list(await s.scalars(mine))
            names = {r.author_name for r in rows if r.author_name.strip()}
            touched = {r.session_id for r in rows}
            for row in rows:
                await s.delete(row)
            if names and touched:
                others = select(TurnRow).where(
                    TurnRow.session_id.in_(touched), TurnRow.author_id.is_distinct_from(user_id)
                )
                # Whole words only, any case: scrubbing "Al" must not turn "Also" into "[removed]so".
                pattern = re.compile(
                    "|".join(rf"(?<!\w){re.escape(n)}(?!\w)" for n in sorted(names, key=len, reverse=True)),
                    re.IGNORECASE,
                )
                for row in await s.scalars(others):
                    row.content = pattern.sub(placeholder, row.content)
            await s.commit()
        log.info("forgot user %s in guild %s: %d turns deleted", user_id, guild_id, len(rows))
        return len(rows)


    async def newest_message_id(self, session_id: int) -> int | None:
        """The highest Discord message id mapped to a turn of the session; None if there is none."""
        query = (
            select(func.max(TurnMessageRow.message_id))
            .join(TurnRow, TurnRow.id == TurnMessageRow.turn_id)
            .where(TurnRow.session_id == session_id)
        )
        async with self.db.read() as s:
            return await s.scalar(query)


def _guild_filter(guild_id: int | None) -> Any:
    if guild_id is None:
        return ChannelSessionRow.guild_id.is_(None)
    return ChannelSessionRow.guild_id == guild_id
