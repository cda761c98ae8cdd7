"""Per-channel write locks on PostgreSQL, and the key of the migration lock.

SQLite has one writer at a time (`BEGIN IMMEDIATE`, see `persistence.database`), so there every write
is serialized already and these calls cost nothing. PostgreSQL runs writers side by side: a write that
reads before it writes (the next swipe number, the next message part, archiving a session) or whose
turn ids must follow commit order (readers page through turns by id) first takes its channel's lock.

The locks are transaction-scoped advisory locks (`pg_advisory_xact_lock`), in the two-key form: the
first key names what is locked, the second is the channel key hashed by the server (`hashtext`), so
every process agrees on it whatever its Python. Two channels that share a hash only wait for each
other; the lock goes with the transaction's commit or rollback, never left behind.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from persistence.models import ChannelSessionRow, TurnRow

# First keys of the advisory locks ("Tk" and a number): the two-key form is a key space of its own.
CHANNEL_SPACE = 0x546B_0001
MIGRATION_LOCK = (0x546B_0000, 0)


def _on_postgresql(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def _lock(key: object) -> object:
    return func.pg_advisory_xact_lock(CHANNEL_SPACE, func.hashtext(key))


def lock_channel(s: Session, channel_key: str) -> None:
    """Wait for and hold, until the transaction ends, the write lock of `channel_key` (PostgreSQL)."""
    if _on_postgresql(s):
        s.execute(select(_lock(channel_key)))


def lock_session_channel(s: Session, session_id: int) -> None:
    """`lock_channel` for the channel of a session (nothing is locked if there is no such session)."""
    if _on_postgresql(s):
        s.execute(select(_lock(ChannelSessionRow.channel_key)).where(ChannelSessionRow.id == session_id))


def lock_turn_channel(s: Session, turn_id: int) -> None:
    """`lock_channel` for the channel of a turn (nothing is locked if there is no such turn)."""
    if _on_postgresql(s):
        s.execute(
            select(_lock(ChannelSessionRow.channel_key))
            .join(TurnRow, TurnRow.session_id == ChannelSessionRow.id)
            .where(TurnRow.id == turn_id)
        )
