"""Characters in the store, on real SQLite files (and PostgreSQL when configured): cards and avatars,
several characters per channel, swipes, lorebooks, members' personas, character webhooks, and migration
0003 from a database at 0002."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import event, inspect, text

from persistence import (
    CharacterWebhook,
    Database,
    Lorebook,
    LorebookExists,
    LorebookNotFound,
    PersonaExists,
    PersonaInUse,
    PersonaNotFound,
    Repository,
    Role,
    SessionNotFound,
    TurnNotFound,
    TurnStatus,
)
from persistence.database import alembic_config

GUILD = 111_111_111_111_111_111
OTHER_GUILD = 222_222_222_222_222_222
USER = 333_333_333_333_333_333
OTHER_USER = 444_444_444_444_444_444
CHANNEL = 555_555_555_555_555_555
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
CARD = json.dumps({"spec": "chara_card_v2", "spec_version": "2.0",
                   "data": {"name": "Mira", "description": "A ranger."}})
WORLD = json.dumps({"entries": {"0": {"key": ["dragon"], "content": "Dragons sleep under the hill."}}})


@contextmanager
def _statements(db: Database) -> Iterator[list[str]]:
    """The SQL statements run on the database while inside."""
    seen: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)


def _count(path: Path, sql: str, *params: Any) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


def _expected_card(name: str, description: str) -> dict[str, Any]:
    return {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": name, "description": description, "personality": "", "scenario": "", "first_mes": "",
            "mes_example": "", "creator_notes": "", "system_prompt": "", "post_history_instructions": "",
            "alternate_greetings": [], "tags": [], "creator": "", "character_version": "", "extensions": {},
        },
    }


# Reading a column named avatar (not avatar_sha).
AVATAR_COLUMN = re.compile(r"\bavatar\b(?!_)")


# --- migration 0003 --------------------------------------------------------------------------------


def _database_at_0002(path: Path) -> None:
    """A database as 0002's code left it: personas, sessions, turns and their messages."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(config, "0002")
    when = "2025-01-01 00:00:00.000000"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO guilds (id, name, created_at) VALUES (?, 'Tavern', ?)", (GUILD, when))
        conn.executemany(
            "INSERT INTO personas (id, guild_id, name, text, created_by, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (1, GUILD, "Mira", "Mira, elfe rôdeuse — « prudente ».", USER, when, when),
                (2, None, "Narrator", 'Tells the "story".\nTwo lines.', None, when, when),
            ],
        )
        conn.executemany(
            "INSERT INTO channel_sessions (id, channel_key, guild_id, active, persona_id, persona_text, settings, "
            "created_at, archived_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)",
            [
                (1, "discord:1", GUILD, 1, None, '{"temperature": 0.7}', when, when),
                (2, "discord:1", GUILD, 1, None, "{}", when, None),
                (3, "discord:2", GUILD, None, "An inline pirate.", "{}", when, None),
            ],
        )
        turns = [
            (1, 1, "user", USER, "Alice", "Hello Mira.", "complete"),
            (2, 1, "model", None, "", "Well met.", "complete"),
            (3, 2, "user", USER, "Alice", "Again.", "interrupted"),
            (4, 3, "model", None, "", "", "pending"),
            (5, 3, "user", USER, "Alice", "deleted later", "complete"),
        ]
        conn.executemany(
            "INSERT INTO turns (id, session_id, role, author_id, author_name, content, status, created_at) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, '{when}')",
            turns,
        )
        conn.executemany("INSERT INTO turn_messages (message_id, turn_id, part) VALUES (?, ?, ?)",
                         [(1001, 1, 0), (1002, 2, 0), (1003, 2, 1), (1004, 3, 0)])
        conn.execute("DELETE FROM turns WHERE id = 5")  # the newest id ever handed out stays 5


async def test_upgrading_a_database_at_0002_keeps_every_row_and_gives_personas_cards(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _database_at_0002(path)

    async with await Database.open(f"sqlite+aiosqlite:///{path}") as db:
        repo = Repository(db)
        mira = await repo.get_persona(GUILD, "Mira")
        narrator = await repo.get_persona(None, "Narrator")
        assert mira is not None and narrator is not None
        assert (mira.id, mira.text, mira.created_by, mira.avatar_sha) == (1, "Mira, elfe rôdeuse — « prudente ».",
                                                                          USER, None)
        assert json.loads(mira.card or "") == _expected_card("Mira", mira.text)
        assert json.loads(narrator.card or "") == _expected_card("Narrator", 'Tells the "story".\nTwo lines.')
        assert "rôdeuse — « prudente »" in (mira.card or "")  # written as json.dumps(..., ensure_ascii=False)
        assert await repo.get_avatar(mira.id) is None

        session = await repo.get_active_session("discord:1")
        assert session is not None
        assert (session.id, session.persona_name, session.persona_text) == (2, "Mira", mira.text)
        assert session.persona_card == mira.card
        inline = await repo.get_active_session("discord:2")
        assert inline is not None and (inline.persona_text, inline.persona_card) == ("An inline pirate.", None)
        assert await repo.channel_characters(session.id) == []

        old = await repo.session_turns(1)
        assert [(t.id, t.content, t.message_ids) for t in old] == [(1, "Hello Mira.", (1001,)),
                                                                    (2, "Well met.", (1002, 1003))]
        assert all((t.character_id, t.swipe, t.swipe_count) == (None, 0, 0) for t in old)
        assert [t.status for t in await repo.recent_turns(3, 10)] == [TurnStatus.PENDING]
        assert (await repo.turn_by_message(1004)).content == "Again."  # type: ignore[union-attr]
        assert (await repo.append_turn(3, Role.USER, "new")).id == 6  # ids are still never reused

    config = alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.downgrade(config, "0002")
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
        assert {r[1] for r in conn.execute("PRAGMA table_info(personas)")}.isdisjoint({"card", "avatar", "avatar_sha"})
        assert {r[1] for r in conn.execute("PRAGMA table_info(turns)")}.isdisjoint(
            {"character_id", "swipe", "swipe_count"})
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables.isdisjoint({"turn_swipes", "channel_characters", "lorebooks", "channel_lorebooks",
                                  "user_personas", "character_webhooks"})
        assert conn.execute("SELECT count(*) FROM personas").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM turns").fetchone() == (5,)
        assert conn.execute("SELECT count(*) FROM turn_messages").fetchone() == (4,)
        assert "AUTOINCREMENT" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'turns'").fetchone()[0]
    command.upgrade(config, "head")  # and up again
    assert _count(path, "SELECT count(*) FROM personas WHERE card IS NOT NULL") == 2


def test_migration_0003_runs_as_a_postgresql_script(capsys: pytest.CaptureFixture[str]) -> None:
    """Offline (no rows to read), the cards are built by PostgreSQL itself."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql://localhost/tavernkeep")
    capsys.readouterr()
    command.upgrade(config, "0002:0003", sql=True)
    script = capsys.readouterr().out
    assert "UPDATE personas SET card=CAST(json_build_object('spec', 'chara_card_v2'" in script
    assert "ALTER TABLE turns ADD CONSTRAINT fk_turns_character_id_personas FOREIGN KEY(character_id) " \
           "REFERENCES personas (id) ON DELETE SET NULL" in script
    assert "CREATE UNIQUE INDEX uq_lorebooks_global_name ON lorebooks (name) WHERE guild_id IS NULL" in script
    assert "_alembic_tmp" not in script
    command.downgrade(config, "0003:0002", sql=True)
    assert "ALTER TABLE turns DROP COLUMN character_id" in capsys.readouterr().out


# --- cards and avatars -----------------------------------------------------------------------------


async def test_cards_and_avatars_are_stored_and_avatars_never_read_with_a_persona(
    repo: Repository, db: Database
) -> None:
    created = await repo.create_persona(GUILD, "Mira", "A ranger.", created_by=USER, card=CARD, avatar=PNG)
    assert (created.card, created.avatar_sha) == (CARD, hashlib.sha256(PNG).hexdigest())
    assert not hasattr(created, "avatar")
    plain = await repo.create_persona(GUILD, "Bram", "A smith.")  # today's callers
    assert (plain.card, plain.avatar_sha) == (None, None)

    with _statements(db) as statements:
        assert await repo.get_persona(GUILD, "Mira") == created
        assert await repo.get_persona_by_id(created.id) == created
        assert await repo.list_personas(GUILD) == [plain, created]
        session = await repo.start_session("discord:1", guild_id=GUILD, persona_id=created.id)
        assert await repo.get_active_session("discord:1") == session
        assert await repo.list_active_sessions() == [session]
    assert statements and not [q for q in statements if AVATAR_COLUMN.search(q)]
    assert (session.persona_name, session.persona_text, session.persona_card) == ("Mira", "A ranger.", CARD)

    assert await repo.get_avatar(created.id) == PNG
    assert await repo.get_avatar(plain.id) is None
    assert await repo.get_avatar(9999) is None
    assert await repo.get_persona_by_id(9999) is None


async def test_update_persona_changes_card_avatar_and_name_when_given(repo: Repository) -> None:
    mira = await repo.create_persona(GUILD, "Mira", "A ranger.", card=CARD, avatar=PNG)
    await repo.create_persona(GUILD, "Bram", "A smith.")

    kept = await repo.update_persona(GUILD, "Mira", "A tired ranger.")  # the old call keeps card and avatar
    assert kept is not None and (kept.text, kept.card, kept.avatar_sha) == ("A tired ranger.", CARD, mira.avatar_sha)

    card = CARD.replace("A ranger.", "A ranger of the north.")
    avatar = PNG[::-1]
    changed = await repo.update_persona(GUILD, "Mira", "A ranger of the north.", card=card, avatar=avatar,
                                        new_name="Mira North")
    assert changed is not None and changed.id == mira.id
    assert (changed.name, changed.card, changed.avatar_sha) == ("Mira North", card, hashlib.sha256(avatar).hexdigest())
    assert await repo.get_persona(GUILD, "Mira") is None
    assert await repo.get_avatar(mira.id) == avatar

    with pytest.raises(PersonaExists):
        await repo.update_persona(GUILD, "Mira North", "x", new_name="Bram")
    assert await repo.get_persona_by_id(mira.id) == changed  # nothing changed
    assert await repo.update_persona(GUILD, "Nobody", "x", new_name="Someone") is None
    same = await repo.update_persona(GUILD, "Mira North", "Same name.", new_name="Mira North")
    assert same is not None and same.name == "Mira North"

    session = await repo.start_session("discord:1", guild_id=GUILD, persona_id=mira.id)
    assert session.persona_card == card


# --- several characters per channel ----------------------------------------------------------------


async def test_channel_characters_are_added_in_order_carried_over_on_reset_and_removed(repo: Repository) -> None:
    mira = await repo.create_persona(GUILD, "Mira", "A ranger.", card=CARD, avatar=PNG)
    bram = await repo.create_persona(GUILD, "Bram", "A smith.")
    ysolde = await repo.create_persona(GUILD, "Ysolde", "A knight.")
    session = await repo.start_session("discord:1", guild_id=GUILD, persona_id=mira.id)
    assert await repo.channel_characters(session.id) == []

    await repo.add_channel_character(session.id, ysolde.id)
    await repo.add_channel_character(session.id, bram.id)
    await repo.add_channel_character(session.id, ysolde.id)  # idempotent: keeps its place
    assert [p.name for p in await repo.channel_characters(session.id)] == ["Ysolde", "Bram"]
    assert (await repo.channel_characters(session.id))[1] == bram

    with pytest.raises(SessionNotFound):
        await repo.add_channel_character(9999, bram.id)
    with pytest.raises(PersonaNotFound):
        await repo.add_channel_character(session.id, 9999)

    fresh = await repo.archive_session(session.id)
    assert fresh.persona_id == mira.id
    assert [p.name for p in await repo.channel_characters(fresh.id)] == ["Ysolde", "Bram"]
    assert [p.name for p in await repo.channel_characters(session.id)] == ["Ysolde", "Bram"]  # history keeps them

    assert await repo.remove_channel_character(fresh.id, ysolde.id) is True
    assert await repo.remove_channel_character(fresh.id, ysolde.id) is False
    await repo.add_channel_character(fresh.id, ysolde.id)  # back in, now last
    assert [p.name for p in await repo.channel_characters(fresh.id)] == ["Bram", "Ysolde"]


async def test_a_persona_held_as_a_channel_character_is_not_deleted(repo: Repository) -> None:
    """Like the main persona: refused while an open session (running or paused) has it among its
    characters, naming the channels; once only archived sessions have it, it goes, and its channel
    memberships and webhooks go with it."""
    main = await repo.create_persona(GUILD, "Mira", "A ranger.")
    bram = await repo.create_persona(GUILD, "Bram", "A smith.")
    first = await repo.start_session("discord:1", guild_id=GUILD, persona_id=main.id)
    await repo.start_session("discord:2", guild_id=GUILD, persona_id=bram.id)
    paused = await repo.start_session("discord:3", guild_id=GUILD, persona_id=main.id)
    await repo.set_session_active(paused.id, False)
    await repo.add_channel_character(first.id, bram.id)
    await repo.add_channel_character(paused.id, bram.id)
    await repo.save_character_webhook(CharacterWebhook(CHANNEL, bram.id, 77, "secret", None))

    with pytest.raises(PersonaInUse) as refused:
        await repo.delete_persona(GUILD, "Bram")
    assert refused.value.channel_keys == ("discord:1", "discord:2", "discord:3")
    assert await repo.get_persona(GUILD, "Bram") == bram

    await repo.start_session("discord:2", persona_id=main.id)
    fresh = await repo.archive_session(first.id)  # the fresh session still has Bram
    await repo.remove_channel_character(paused.id, bram.id)
    with pytest.raises(PersonaInUse) as refused:
        await repo.delete_persona(GUILD, "Bram")
    assert refused.value.channel_keys == ("discord:1",)

    await repo.remove_channel_character(fresh.id, bram.id)
    reply = await repo.append_turn(first.id, Role.MODEL, "Hammer ready.", author_name="Bram", character_id=bram.id)
    assert await repo.delete_persona(GUILD, "Bram") is True

    members = text("SELECT count(*) FROM channel_characters WHERE persona_id = :id").bindparams(id=bram.id)
    assert await repo.db.run(lambda s: s.scalar(members)) == 0
    assert await repo.get_character_webhook(CHANNEL, bram.id) is None
    assert await repo.character_webhook_ids() == set()
    [kept] = await repo.recent_turns(first.id, 10)
    assert (kept.id, kept.content, kept.author_name, kept.character_id) == (reply.id, "Hammer ready.", "Bram", None)


# --- which character wrote a turn ------------------------------------------------------------------


async def test_model_turns_remember_their_character(repo: Repository, db: Database) -> None:
    mira = await repo.create_persona(GUILD, "Mira", "A ranger.")
    session = await repo.start_session("discord:1", guild_id=GUILD, persona_id=mira.id)
    said = await repo.append_turn(session.id, Role.USER, "Hi", author_id=USER, author_name="Alice")
    reply = await repo.append_turn(session.id, Role.MODEL, "Hello.", author_name="Mira", character_id=mira.id,
                                   message_ids=[10])
    assert (said.character_id, reply.character_id, reply.author_name) == (None, mira.id, "Mira")
    assert [t.character_id for t in await repo.recent_turns(session.id, 10)] == [None, mira.id]
    assert await repo.turn_by_message(10) == reply

    with pytest.raises(PersonaNotFound):
        await repo.append_turn(session.id, Role.MODEL, "Who?", character_id=9999)
    assert await repo.count_turns(session.id) == 2


# --- swipes ----------------------------------------------------------------------------------------


async def test_regenerated_versions_are_kept_selected_and_edited(repo: Repository, db: Database) -> None:
    session = await repo.start_session("discord:1", persona_text="A bard.")
    await repo.append_turn(session.id, Role.USER, "Sing!", author_name="Alice")
    reply = await repo.append_turn(session.id, Role.MODEL, "La la.", message_ids=[20])
    assert (reply.swipe, reply.swipe_count) == (0, 0) and await repo.swipes(reply.id) == []

    again = await repo.add_swipe(reply.id, "Tra la la.")  # a regenerate: the first version is kept as 0
    assert (again.content, again.swipe, again.swipe_count, again.message_ids) == ("Tra la la.", 1, 2, (20,))
    assert await repo.swipes(reply.id) == ["La la.", "Tra la la."]
    hidden = await repo.add_swipe(reply.id, "Hum.", select=False)
    assert (hidden.content, hidden.swipe, hidden.swipe_count) == ("Tra la la.", 1, 3)

    first = await repo.select_swipe(reply.id, 0)
    assert first is not None and (first.content, first.swipe, first.swipe_count) == ("La la.", 0, 3)
    assert await repo.select_swipe(reply.id, 3) is None
    assert await repo.select_swipe(reply.id, -1) is None
    assert await repo.select_swipe(9999, 0) is None
    assert (await repo.latest_turn(session.id)).content == "La la."  # type: ignore[union-attr]

    # A continue extends the version shown, not another one.
    continued = await repo.edit_turn(reply.id, "La la. And la!", status=TurnStatus.COMPLETE)
    assert continued is not None and (continued.content, continued.swipe) == ("La la. And la!", 0)
    assert await repo.swipes(reply.id) == ["La la. And la!", "Tra la la.", "Hum."]
    third = await repo.select_swipe(reply.id, 2)
    assert third is not None and third.content == "Hum."

    # The window read is the same two statements as before: no join, no read of the versions.
    with _statements(db) as statements:
        window = await repo.recent_turns(session.id, 10)
    assert [(t.content, t.swipe, t.swipe_count) for t in window] == [("Sing!", 0, 0), ("Hum.", 2, 3)]
    reads = [q for q in statements if q.startswith("SELECT")]
    assert len(reads) == 2 and not [q for q in reads if "turn_swipes" in q]

    with pytest.raises(TurnNotFound):
        await repo.add_swipe(9999, "x")
    plain = await repo.append_turn(session.id, Role.MODEL, "Only one.")
    assert await repo.select_swipe(plain.id, 0) == plain  # one version: its content
    assert await repo.select_swipe(plain.id, 1) is None
    edited = await repo.edit_turn(plain.id, "Still one.")
    assert edited is not None and edited.swipe_count == 0 and await repo.swipes(plain.id) == []

    assert await repo.delete_turn(reply.id)
    assert await repo.swipes(reply.id) == []


async def test_a_greeting_and_its_alternates_are_one_turn_with_versions(repo: Repository) -> None:
    session = await repo.start_session("discord:1", persona_text="A bard.")
    greeting = await repo.append_turn(session.id, Role.MODEL, "")
    shown = await repo.set_swipes(greeting.id, ["Welcome!", "Oh, a guest.", "Hm?"])
    assert (shown.content, shown.swipe, shown.swipe_count) == ("Welcome!", 0, 3)
    second = await repo.set_swipes(greeting.id, ["Hello.", "Hi."], selected=1)  # replaces them all
    assert (second.content, second.swipe, second.swipe_count) == ("Hi.", 1, 2)
    assert await repo.swipes(greeting.id) == ["Hello.", "Hi."]
    more = await repo.add_swipe(greeting.id, "Greetings.")
    assert (more.swipe, more.swipe_count) == (2, 3)
    assert await repo.swipes(greeting.id) == ["Hello.", "Hi.", "Greetings."]

    with pytest.raises(ValueError):
        await repo.set_swipes(greeting.id, [])
    with pytest.raises(ValueError):
        await repo.set_swipes(greeting.id, ["a"], selected=1)
    with pytest.raises(TurnNotFound):
        await repo.set_swipes(9999, ["a"])
    assert await repo.swipes(greeting.id) == ["Hello.", "Hi.", "Greetings."]


async def test_swipes_survive_a_restart(db_url: str) -> None:
    async with await Database.open(db_url) as db:
        repo = Repository(db)
        session = await repo.start_session("discord:1", persona_text="A bard.")
        reply = await repo.append_turn(session.id, Role.MODEL, "One.")
        await repo.add_swipe(reply.id, "Two.")
        await repo.add_swipe(reply.id, "Three.", select=False)
        shown = await repo.select_swipe(reply.id, 0)
        shown = await repo.edit_turn(reply.id, "One, continued.")

    async with await Database.open(db_url) as db:
        repo = Repository(db)
        [turn] = await repo.recent_turns(session.id, 10)
        assert turn == shown
        assert (turn.content, turn.swipe, turn.swipe_count) == ("One, continued.", 0, 3)
        assert await repo.swipes(reply.id) == ["One, continued.", "Two.", "Three."]
        assert (await repo.select_swipe(reply.id, 2)).content == "Three."  # type: ignore[union-attr]


# --- lorebooks -------------------------------------------------------------------------------------


async def test_lorebook_round_trip(repo: Repository, db: Database) -> None:
    created = await repo.create_lorebook(GUILD, "Dragons", WORLD, created_by=USER)
    assert isinstance(created, Lorebook)
    assert (created.guild_id, created.name, created.data, created.created_by) == (GUILD, "Dragons", WORLD, USER)
    assert await repo.get_lorebook(GUILD, "Dragons") == created
    assert await repo.get_lorebook(OTHER_GUILD, "Dragons") is None

    with pytest.raises(LorebookExists):
        await repo.create_lorebook(GUILD, "Dragons", "{}")
    await repo.create_lorebook(OTHER_GUILD, "Dragons", "{}")  # fine elsewhere
    glob = await repo.create_lorebook(None, "World", "{}")
    with pytest.raises(LorebookExists):
        await repo.create_lorebook(None, "World", "{}")
    assert await repo.get_lorebook(None, "World") == glob

    elves = await repo.create_lorebook(GUILD, "Elves", "{}")
    with _statements(db) as statements:
        listed = await repo.list_lorebooks(GUILD)
    assert [(b.id, b.name, b.data) for b in listed] == [(created.id, "Dragons", ""), (elves.id, "Elves", "")]
    assert not [q for q in statements if "lorebooks.data" in q]  # the list reads no world
    assert await repo.list_lorebooks(GUILD, with_data=True) == [created, elves]
    assert [b.name for b in await repo.list_lorebooks(None)] == ["World"]

    replaced = await repo.replace_lorebook(GUILD, "Dragons", "{}")
    assert replaced is not None and replaced.data == "{}" and replaced.updated_at >= created.updated_at
    assert replaced.created_at == created.created_at
    assert await repo.replace_lorebook(GUILD, "Nothing", "{}") is None

    assert await repo.delete_lorebook(GUILD, "Elves") is True
    assert await repo.delete_lorebook(GUILD, "Elves") is False
    assert [b.name for b in await repo.list_lorebooks(GUILD)] == ["Dragons"]


async def test_lorebooks_attach_to_a_channel_in_order_and_stay_through_resets(repo: Repository) -> None:
    dragons = await repo.create_lorebook(GUILD, "Dragons", WORLD)
    elves = await repo.create_lorebook(GUILD, "Elves", "{}")
    world = await repo.create_lorebook(None, "World", "{}")
    session = await repo.start_session("discord:1", guild_id=GUILD)
    assert await repo.channel_lorebooks("discord:1") == []

    assert await repo.attach_lorebook("discord:1", elves.id) is True
    assert await repo.attach_lorebook("discord:1", world.id) is True
    assert await repo.attach_lorebook("discord:1", dragons.id) is True
    assert await repo.attach_lorebook("discord:1", elves.id) is False
    assert await repo.attach_lorebook("discord:2", dragons.id) is True
    with pytest.raises(LorebookNotFound):
        await repo.attach_lorebook("discord:1", 9999)
    assert await repo.channel_lorebooks("discord:1") == [elves, world, dragons]  # with their data

    await repo.archive_session(session.id)
    assert [b.name for b in await repo.channel_lorebooks("discord:1")] == ["Elves", "World", "Dragons"]

    assert await repo.detach_lorebook("discord:1", world.id) is True
    assert await repo.detach_lorebook("discord:1", world.id) is False
    assert await repo.delete_lorebook(GUILD, "Dragons")  # detached everywhere
    assert await repo.channel_lorebooks("discord:1") == [elves]
    assert await repo.channel_lorebooks("discord:2") == []


# --- members' personas -----------------------------------------------------------------------------


async def test_user_personas_are_per_guild_and_forgotten_with_the_member(repo: Repository) -> None:
    assert await repo.get_user_persona(GUILD, USER) is None
    await repo.set_user_persona(GUILD, USER, "Alice, a wandering bard.")
    await repo.set_user_persona(OTHER_GUILD, USER, "Alice elsewhere.")
    await repo.set_user_persona(GUILD, OTHER_USER, "Bob, a smith.")
    await repo.set_user_persona(None, USER, "Alice at the terminal.")
    assert await repo.get_user_persona(GUILD, USER) == "Alice, a wandering bard."
    assert await repo.get_user_persona(0, USER) == await repo.get_user_persona(None, USER) == "Alice at the terminal."

    await repo.set_user_persona(GUILD, USER, "Alice, a retired bard.")
    assert await repo.get_user_persona(GUILD, USER) == "Alice, a retired bard."
    await repo.set_user_persona(OTHER_GUILD, USER, None)
    await repo.set_user_persona(OTHER_GUILD, USER, None)  # removing nothing is fine
    assert await repo.get_user_persona(OTHER_GUILD, USER) is None
    await repo.set_user_persona(OTHER_GUILD, USER, "Alice again.")

    session = await repo.start_session("discord:1", guild_id=GUILD, persona_text="A bard.")
    await repo.append_turn(session.id, Role.USER, "Hello.", author_id=USER, author_name="Alice")
    await repo.append_turn(session.id, Role.MODEL, "Hi Alice.")
    assert await repo.forget_user(USER, GUILD) == 1  # still the number of turns deleted
    assert await repo.get_user_persona(GUILD, USER) is None
    assert await repo.get_user_persona(GUILD, OTHER_USER) == "Bob, a smith."
    assert await repo.get_user_persona(OTHER_GUILD, USER) == "Alice again."
    assert await repo.get_user_persona(None, USER) == "Alice at the terminal."

    assert await repo.forget_user(USER, None) == 0  # no turns outside guilds, but the persona goes
    assert await repo.get_user_persona(None, USER) is None


# --- character webhooks ----------------------------------------------------------------------------


async def test_character_webhooks_round_trip(repo: Repository) -> None:
    mira = await repo.create_persona(GUILD, "Mira", "A ranger.", avatar=PNG)
    bram = await repo.create_persona(GUILD, "Bram", "A smith.")
    assert await repo.get_character_webhook(CHANNEL, mira.id) is None
    assert await repo.character_webhook_ids() == set()

    saved = await repo.save_character_webhook(CharacterWebhook(CHANNEL, mira.id, 70, "token-a", mira.avatar_sha))
    assert saved == CharacterWebhook(CHANNEL, mira.id, 70, "token-a", mira.avatar_sha)
    assert "token-a" not in repr(saved)
    await repo.save_character_webhook(CharacterWebhook(CHANNEL, bram.id, 70, "token-a"))  # one webhook, two names
    await repo.save_character_webhook(CharacterWebhook(CHANNEL + 1, mira.id, 71, "token-b"))
    assert await repo.get_character_webhook(CHANNEL, mira.id) == saved
    assert await repo.character_webhook_ids() == {70, 71}
    assert [w.persona_id for w in await repo.channel_webhooks(CHANNEL)] == sorted([mira.id, bram.id])

    replaced = await repo.save_character_webhook(CharacterWebhook(CHANNEL, mira.id, 72, "token-c", "f" * 64))
    assert await repo.get_character_webhook(CHANNEL, mira.id) == replaced
    assert replaced.webhook_id == 72 and len(await repo.channel_webhooks(CHANNEL)) == 2

    with pytest.raises(PersonaNotFound):
        await repo.save_character_webhook(CharacterWebhook(CHANNEL, 9999, 73, "token-d"))

    assert await repo.delete_character_webhook(70) == 1  # Bram's; Mira moved to 72
    assert await repo.delete_character_webhook(70) == 0
    assert await repo.character_webhook_ids() == {71, 72}
    assert [w.webhook_id for w in await repo.channel_webhooks(CHANNEL)] == [72]
    assert await repo.channel_webhooks(CHANNEL + 2) == []


async def test_a_fresh_database_has_the_new_tables_and_indexes(db: Database) -> None:
    def names(s: Any) -> set[str]:
        found = inspect(s.connection())
        tables = set(found.get_table_names())
        return tables | {i["name"] for table in tables for i in found.get_indexes(table) if i["name"]}

    names = await db.run(names)
    assert {
        "turn_swipes", "channel_characters", "lorebooks", "channel_lorebooks", "user_personas",
        "character_webhooks", "uq_lorebooks_global_name", "ix_character_webhooks_webhook_id",
    } <= names
