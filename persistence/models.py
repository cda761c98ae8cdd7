"""SQLAlchemy ORM models. Alembic owns the schema: keep `migrations/versions` in step with this file."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always hands back aware UTC datetimes.

    SQLite has no time zone storage: values are normalised to UTC before they are
    written and tagged as UTC when read back. Naive datetimes are refused.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC; refuse naive values."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Tag values read back from SQLite as UTC; convert others to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], datetime | None] | None:
        """On SQLite, parse the stored ISO text with `datetime.fromisoformat` (in C): the dialect's
        own parser and `replace(tzinfo=...)` cost most of what reading a window of turns costs."""
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: str | None) -> datetime | None:
            if value is None:
                return None
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:  # as stored: UTC without an offset; tagged by parsing it with one
                return datetime.fromisoformat(value + "+00:00")
            return parsed.astimezone(UTC)

        return process


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable names for migrations)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class GuildRow(Base):
    """A Discord guild, keyed by its snowflake."""

    __tablename__ = "guilds"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PersonaRow(Base):
    """A named persona of one guild (`guild_id` NULL: a global persona)."""

    __tablename__ = "personas"
    __table_args__ = (
        UniqueConstraint("guild_id", "name"),
        # NULLs are distinct in a UNIQUE constraint: global names need their own index.
        Index(
            "uq_personas_global_name",
            "name",
            unique=True,
            sqlite_where=text("guild_id IS NULL"),
            postgresql_where=text("guild_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("guilds.id"))
    name: Mapped[str] = mapped_column(String(100))
    # The card's description, kept in step with `card` by the callers (older code reads only this).
    text: Mapped[str] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The whole character card as JSON text (opaque here).
    card: Mapped[str | None] = mapped_column(Text)
    # PNG bytes, possibly megabytes: never loaded with the row (reading it by accident raises).
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True, deferred_raiseload=True)
    avatar_sha: Mapped[str | None] = mapped_column(String(64))


class ChannelSessionRow(Base):
    """One conversation in one channel; at most one non-archived row per `channel_key`."""

    __tablename__ = "channel_sessions"
    __table_args__ = (
        Index(
            "uq_channel_sessions_open_channel_key",
            "channel_key",
            unique=True,
            sqlite_where=text("archived_at IS NULL"),
            postgresql_where=text("archived_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel_key: Mapped[str] = mapped_column(String(200))
    guild_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("guilds.id"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    persona_id: Mapped[int | None] = mapped_column(ForeignKey("personas.id", ondelete="SET NULL"))
    persona_text: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column()

    persona: Mapped[PersonaRow | None] = relationship(lazy="raise")


class TurnRow(Base):
    """One turn of a channel session."""

    __tablename__ = "turns"
    __table_args__ = (
        Index("ix_turns_session_id_id", "session_id", "id"),
        # AUTOINCREMENT: ids of deleted turns are never handed out again.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("channel_sessions.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    author_id: Mapped[int | None] = mapped_column(BigInteger)
    author_name: Mapped[str] = mapped_column(String(200), default="")
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Which character wrote a model turn (several can play one channel).
    character_id: Mapped[int | None] = mapped_column(ForeignKey("personas.id", ondelete="SET NULL"))
    # The version shown (`content` is its text) and how many versions `turn_swipes` holds (0: none).
    # Kept on the turn so that reading a window needs no join.
    swipe: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    swipe_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    messages: Mapped[list[TurnMessageRow]] = relationship(
        lazy="raise",
        order_by="TurnMessageRow.part",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class TurnMessageRow(Base):
    """A Discord message carrying (part of) a turn; message ids are unique across the store."""

    __tablename__ = "turn_messages"
    __table_args__ = (UniqueConstraint("turn_id", "part"),)

    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"))
    part: Mapped[int] = mapped_column(Integer)


class TurnSwipeRow(Base):
    """One version of a turn (a regenerated reply, or a greeting and its alternates), numbered from 0."""

    __tablename__ = "turn_swipes"

    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChannelCharacterRow(Base):
    """A character playing in a channel session besides its main persona (`channel_sessions.persona_id`)."""

    __tablename__ = "channel_characters"

    session_id: Mapped[int] = mapped_column(
        ForeignKey("channel_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class LorebookRow(Base):
    """A named lorebook (a SillyTavern world, JSON text opaque here) of one guild (NULL: global)."""

    __tablename__ = "lorebooks"
    __table_args__ = (
        UniqueConstraint("guild_id", "name"),
        Index(
            "uq_lorebooks_global_name",
            "name",
            unique=True,
            sqlite_where=text("guild_id IS NULL"),
            postgresql_where=text("guild_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("guilds.id"))
    name: Mapped[str] = mapped_column(String(100))
    data: Mapped[str] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ChannelLorebookRow(Base):
    """A lorebook attached to a channel (kept across resets: it belongs to the channel, not a session)."""

    __tablename__ = "channel_lorebooks"

    channel_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    lorebook_id: Mapped[int] = mapped_column(ForeignKey("lorebooks.id", ondelete="CASCADE"), primary_key=True)
    # Attach order (timestamps can tie).
    position: Mapped[int] = mapped_column(Integer)
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class UserPersonaRow(Base):
    """How a member describes themselves to the characters, per guild (`guild_id` 0: no guild)."""

    __tablename__ = "user_personas"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CharacterWebhookRow(Base):
    """The webhook a character posts through in one channel."""

    __tablename__ = "character_webhooks"
    __table_args__ = (Index("ix_character_webhooks_webhook_id", "webhook_id"),)

    channel_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), primary_key=True)
    webhook_id: Mapped[int] = mapped_column(BigInteger)
    token: Mapped[str] = mapped_column(String(200))
    # The avatar the webhook was last set up with (compared against the persona's).
    avatar_sha: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MetaRow(Base):
    """Small bot-wide values (e.g. the hash of the last synced command tree)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
