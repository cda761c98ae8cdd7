"""Characters: cards and avatars on personas, several characters per channel, swipes, lorebooks, user
personas and character webhooks.

Every persona becomes a character: its `card` is filled with a minimal Character Card V2 whose
description is the persona text. On SQLite `turns` is copied once (for the foreign key of its new
`character_id`); `personas` only gains columns in place. The downgrade drops what the upgrade added
(SQLite copies `personas` and `turns` for that); a turn keeps the version it showed.

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01 00:00:00+00:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

personas = sa.table(
    "personas",
    sa.column("id", sa.Integer()),
    sa.column("name", sa.String(100)),
    sa.column("text", sa.Text()),
    sa.column("card", sa.Text()),
)

# The fields of a Character Card V2's `data` besides name and description, all empty.
EMPTY_FIELDS: dict[str, object] = {
    "personality": "",
    "scenario": "",
    "first_mes": "",
    "mes_example": "",
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "alternate_greetings": [],
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
}


def minimal_card(name: str, description: str) -> str:
    """The Character Card V2 JSON of a persona that only had a name and a text."""
    data = {"name": name, "description": description, **EMPTY_FIELDS}
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}, ensure_ascii=False)


def _card_sql() -> sa.ColumnElement[str]:
    """`minimal_card` as a PostgreSQL expression over the row, for SQL scripts (offline, no rows to read).
    Same fields; only the spacing of the JSON text differs. SQLite has no offline mode here: its batch
    copy of `turns` needs a live connection."""
    build = sa.func.json_build_object

    def empty(value: object) -> sa.ColumnElement[object]:
        if isinstance(value, list | dict):
            return sa.cast(sa.literal(json.dumps(value)), sa.JSON)
        return sa.literal(value)

    fields = [sa.literal("name"), personas.c.name, sa.literal("description"), personas.c.text]
    for key, value in EMPTY_FIELDS.items():
        fields += [sa.literal(key), empty(value)]
    card = build(sa.literal("spec"), sa.literal("chara_card_v2"), sa.literal("spec_version"), sa.literal("2.0"),
                 sa.literal("data"), build(*fields))
    return sa.cast(card, sa.Text)


def _fill_cards() -> None:
    if context.is_offline_mode():
        op.execute(personas.update().values(card=_card_sql()))
        return
    bind = op.get_bind()
    rows = bind.execute(sa.select(personas.c.id, personas.c.name, personas.c.text)).all()
    update = personas.update().where(personas.c.id == sa.bindparam("pid")).values(card=sa.bindparam("card"))
    if rows:
        bind.execute(update, [{"pid": pid, "card": minimal_card(name, text)} for pid, name, text in rows])


def _turns_sequence() -> int | None:
    """SQLite: the highest turn id ever handed out (the copy below would reset it to the highest kept)."""
    if context.is_offline_mode() or op.get_context().dialect.name != "sqlite":
        return None
    return op.get_bind().exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'turns'").scalar()


def upgrade() -> None:
    """Add the character columns and tables; give every persona a card."""
    op.add_column("personas", sa.Column("card", sa.Text(), nullable=True))
    op.add_column("personas", sa.Column("avatar", sa.LargeBinary(), nullable=True))
    op.add_column("personas", sa.Column("avatar_sha", sa.String(length=64), nullable=True))
    _fill_cards()

    # SQLite copies `turns` for the foreign key (a key added inline in place would be read back without
    # its name and ON DELETE rule); the copy keeps AUTOINCREMENT and the highest id handed out.
    sequence = _turns_sequence()
    with op.batch_alter_table("turns", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("character_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("swipe", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("swipe_count", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.create_foreign_key(
            batch.f("fk_turns_character_id_personas"), "personas", ["character_id"], ["id"], ondelete="SET NULL"
        )
    _restore_turns_sequence(sequence)

    op.create_table(
        "turn_swipes",
        sa.Column("turn_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name=op.f("fk_turn_swipes_turn_id_turns"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("turn_id", "number", name=op.f("pk_turn_swipes")),
    )
    op.create_table(
        "channel_characters",
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("persona_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["persona_id"], ["personas.id"], name=op.f("fk_channel_characters_persona_id_personas"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"], ["channel_sessions.id"],
            name=op.f("fk_channel_characters_session_id_channel_sessions"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "persona_id", name=op.f("pk_channel_characters")),
    )
    op.create_table(
        "lorebooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("created_by", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["guild_id"], ["guilds.id"], name=op.f("fk_lorebooks_guild_id_guilds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lorebooks")),
        sa.UniqueConstraint("guild_id", "name", name=op.f("uq_lorebooks_guild_id_name")),
    )
    op.create_index(
        "uq_lorebooks_global_name",
        "lorebooks",
        ["name"],
        unique=True,
        sqlite_where=sa.text("guild_id IS NULL"),
        postgresql_where=sa.text("guild_id IS NULL"),
    )
    op.create_table(
        "channel_lorebooks",
        sa.Column("channel_key", sa.String(length=200), nullable=False),
        sa.Column("lorebook_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["lorebook_id"], ["lorebooks.id"], name=op.f("fk_channel_lorebooks_lorebook_id_lorebooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("channel_key", "lorebook_id", name=op.f("pk_channel_lorebooks")),
    )
    op.create_table(
        "user_personas",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("guild_id", "user_id", name=op.f("pk_user_personas")),
    )
    op.create_table(
        "character_webhooks",
        sa.Column("channel_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("persona_id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.BigInteger(), nullable=False),
        sa.Column("token", sa.String(length=200), nullable=False),
        sa.Column("avatar_sha", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["persona_id"], ["personas.id"], name=op.f("fk_character_webhooks_persona_id_personas"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("channel_id", "persona_id", name=op.f("pk_character_webhooks")),
    )
    op.create_index("ix_character_webhooks_webhook_id", "character_webhooks", ["webhook_id"], unique=False)


def _restore_turns_sequence(sequence: int | None) -> None:
    if sequence is not None:
        op.execute(sa.text("UPDATE sqlite_sequence SET seq = :seq WHERE name = 'turns'").bindparams(seq=sequence))


def downgrade() -> None:
    """Drop every table and column the upgrade added."""
    op.drop_index("ix_character_webhooks_webhook_id", table_name="character_webhooks")
    op.drop_table("character_webhooks")
    op.drop_table("user_personas")
    op.drop_table("channel_lorebooks")
    op.drop_index("uq_lorebooks_global_name", table_name="lorebooks")
    op.drop_table("lorebooks")
    op.drop_table("channel_characters")
    op.drop_table("turn_swipes")

    sequence = _turns_sequence()
    with op.batch_alter_table("turns", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("swipe_count")
        batch.drop_column("swipe")
        batch.drop_column("character_id")
    _restore_turns_sequence(sequence)

    with op.batch_alter_table("personas") as batch:
        batch.drop_column("avatar_sha")
        batch.drop_column("avatar")
        batch.drop_column("card")
