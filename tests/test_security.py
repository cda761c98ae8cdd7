"""Nobody let in: admin paths re-check Manage Server, channel options stay in their server, channel
permissions hold for buttons and messages, and one member (or one channel) cannot flood the bot.

Driven through SimCord against the real bot, a real SQLite file and the fake model.
"""

from __future__ import annotations

import json
import sys

import discord
import pytest
import simcord
from discord import app_commands
from simcord.backend import serializers
from sqlalchemy import select

from bot.config import Settings
from bot.discord_front.cooldowns import NOTICE_SECONDS, MessageCooldown
from bot.discord_front.keys import channel_key
from bot.discord_front.permissions import NotAllowed, WrongGuild, require_same_guild
from bot.discord_front.replies import CANNOT_TALK, REGENERATE_ID
from bot.errors import ChannelQueueFull
from persistence.models import Base
from persistence.records import Role
from tests.card_files import json_file, v2_card
from tests.discord_fixtures import (
    bot_env,
    capture_interactions,
    replay,
    start_session,
    stored_turns,
    tavern_guild,
)
from tests.fake_backend import FakeBackend

NOT_ALLOWED = NotAllowed.user_message


async def snapshot(t) -> dict[str, list[tuple]]:
    """Every row of every table, in primary-key order: equal snapshots mean nothing was written."""
    def read(s) -> dict[str, list[tuple]]:
        return {
            table.name: [tuple(row) for row in s.execute(select(table).order_by(*table.primary_key.columns))]
            for table in Base.metadata.sorted_tables
        }

    return await t.bot.repo.db.run(read)


def revoke_roles(t, member) -> None:
    """Take every role from a member (no public SimCord verb does this; the backend is not public API)."""
    t.env.backend.edit_member(member.guild.id, member.id, {"role_ids": []})



def loaded(bot, cog_name: str):
    """The extension module the bot loaded for a cog (discord.py imports its own copy of it)."""
    return sys.modules[type(bot.get_cog(cog_name)).__module__]


# --- every admin path re-checks Manage Server ------------------------------------------------------

WORLD = json.dumps({"entries": {"0": {"uid": 0, "key": ["tower"], "content": "The tower is old."}}}).encode()

# Each admin command path with options that would change something if it ran, against the scene the
# refusal test sets up: Bram plays the channel with Ysolde beside him, Wren waits unused; the lorebook
# "Tower" is attached here, "Maps" is not.
ADMIN_COMMANDS = {
    "session start": {"character": "Wren"},
    "session note": {"text": "It starts to rain.", "depth": 2, "role": "user"},
    "session stop": {},
    "session reset": {},
    "session settings": {"temperature": 1.5, "use_defaults": True},
    "session export": {},
    "character import": {"file": ("Aria.json", json_file(v2_card("Aria")))},
    "character create": {},
    "character edit": {"name": "Bram"},
    "character delete": {"name": "Wren"},
    "character use": {"name": "Wren"},
    "character add": {"name": "Wren"},
    "character remove": {"name": "Ysolde"},
    "lore import": {"file": ("Atlas.json", WORLD)},
    "lore attach": {"name": "Maps"},
    "lore detach": {"name": "Tower"},
    "lore delete": {"name": "Maps"},
}
PUBLIC_COMMANDS = {
    "character list", "character show", "character export", "character speak", "lore list", "me persona",
    "status", "privacy export", "privacy forget",
}


async def test_every_command_is_either_admin_only_or_meant_for_everyone(db_url):
    async with bot_env(db_url) as t:
        names = {command.qualified_name for command in t.bot.tree.walk_commands()
                 if isinstance(command, app_commands.Command)}
        # A new command must be added to one of the lists (and so to the refusal test below).
        assert names == set(ADMIN_COMMANDS) | PUBLIC_COMMANDS


async def test_a_non_admin_who_can_see_admin_commands_is_refused_and_nothing_changes(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern, name="Bram", persona="Bram is a bard.")
        repo = t.bot.repo
        ysolde = await repo.create_persona(tavern.guild.id, "Ysolde", "Ysolde is a knight.")
        await repo.add_channel_character(session.id, ysolde.id)
        await repo.create_persona(tavern.guild.id, "Wren", "Wren is a thief.")
        tower = await repo.create_lorebook(tavern.guild.id, "Tower", WORLD.decode())
        await repo.attach_lorebook(channel_key(tavern.channel.id), tower.id)
        await repo.create_lorebook(tavern.guild.id, "Maps", WORLD.decode())
        await tavern.alice.send(tavern.channel, "Hello.")
        # A server may show the session commands to anyone (default_permissions is only a default);
        # the /character and /lore groups mix public and admin commands, so everyone sees them.
        assert "session export" not in tavern.bob.available_commands(tavern.channel)
        [session_command] = [c for c in await t.bot.tree.fetch_commands() if c.name == "session"]
        tavern.guild.set_command_permissions(session_command.id, {tavern.bob: True})
        assert set(ADMIN_COMMANDS) <= set(tavern.bob.available_commands(tavern.channel))

        before = await snapshot(t)
        posted = [m.id for m in tavern.channel.history()]
        writes = len(t.env.http_requests)
        for command, options in ADMIN_COMMANDS.items():
            refused = await tavern.bob.slash(tavern.channel, command, **options)
            assert refused.ephemeral and refused.modal is None, command
            assert refused.response.content == NOT_ALLOWED, command
            assert refused.response.components == [] and refused.response.message.attachments == [], command
        assert await snapshot(t) == before
        assert [m.id for m in tavern.channel.history()] == posted  # no greeting, no webhook post
        # Only the refusals themselves went out: no webhook made, no message posted or edited.
        assert {(r.method, r.path.split("/")[1]) for r in t.env.http_requests[writes:]} <= {("POST", "interactions")}


async def test_buttons_and_forms_of_admin_actions_check_the_member_again(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern, name="Bram", persona="Bram is a bard.")
        await tavern.alice.send(tavern.channel, "Hello.")
        # Opened while an admin; answered after losing Manage Server.
        reset_questions = [await tavern.admin.slash(tavern.channel, "session reset") for _ in range(2)]
        create_form = await tavern.admin.slash(tavern.channel, "character create")
        edit_form = await tavern.admin.slash(tavern.channel, "character edit", name="Bram")
        revoke_roles(t, tavern.admin)
        await t.env.settle()
        before = await snapshot(t)

        for question, label in zip(reset_questions, ("Reset", "Cancel"), strict=True):
            clicked = await tavern.admin.click(question.response, label=label)
            assert clicked.ephemeral and clicked.response.content == NOT_ALLOWED, label
        created = await tavern.admin.submit_modal(create_form, {"persona_name": "Sneaky", "persona_text": "Evil."})
        edited = await tavern.admin.submit_modal(edit_form, {"persona_text": "Bram serves Sneaky now."})
        for submitted in (created, edited):
            assert submitted.ephemeral and submitted.response.content == NOT_ALLOWED
        assert await snapshot(t) == before
        assert [type(e) for e in t.env.errors] == [NotAllowed] * 4  # UI errors SimCord records


# --- channel options stay in their server ----------------------------------------------------------


async def test_a_channel_of_another_server_is_refused(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        elsewhere = t.env.create_guild("Elsewhere")
        secret = elsewhere.create_text_channel("secret")
        await t.bot.repo.start_session(channel_key(secret.id), guild_id=elsewhere.id, persona_text="Spy.")
        # Discord's client only offers this server's channels; SimCord refuses the same way.
        with pytest.raises(simcord.SetupError, match="must belong to this guild"):
            await tavern.admin.slash(tavern.channel, "session export", channel=secret)

        # A forged option still fails on the server side. discord.py builds a channel option with the
        # interaction's guild id whatever the channel's server, so the id alone is not enough to trust...
        seen = capture_interactions(t.bot)
        await tavern.admin.slash(tavern.channel, "status")
        [interaction] = seen
        payload = dict(serializers.channel_payload(t.env.backend, t.env.backend.get_channel(secret.id)))
        payload["permissions"] = "0"
        forged = app_commands.AppCommandChannel(state=t.bot._connection, data=payload, guild_id=interaction.guild_id)
        require_same_guild(interaction, forged)  # passes: the option claims this server
        # ...so /session export looks the channel up in the client's cache, which knows its server.
        with pytest.raises(WrongGuild):
            require_same_guild(interaction, t.bot.get_channel(secret.id))
        sessions = loaded(t.bot, "Sessions")
        with pytest.raises(WrongGuild, match="not in this server"):
            await sessions.export_target(t.bot, interaction, forged)
        cog = t.bot.get_cog("Sessions")
        with pytest.raises(WrongGuild):
            await cog.export.callback(cog, interaction, forged)
        # A channel the bot does not know at all is refused the same way.
        payload["id"] = "1"
        with pytest.raises(WrongGuild):
            await sessions.export_target(t.bot, interaction, app_commands.AppCommandChannel(
                state=t.bot._connection, data=payload, guild_id=interaction.guild_id))
        assert (await sessions.export_target(t.bot, interaction, None)).id == tavern.channel.id


async def test_session_export_needs_the_right_to_read_that_channel(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        [gm_role] = [r for r in t.bot.get_guild(tavern.guild.id).roles if r.name == "GM"]
        hidden_history = tavern.guild.create_text_channel(
            "gm-secrets", overwrites={gm_role: discord.PermissionOverwrite(read_message_history=False)}
        )
        await start_session(t, tavern, channel=hidden_history)
        refused = await tavern.admin.slash(tavern.channel, "session export", channel=hidden_history)
        assert refused.ephemeral
        assert refused.response.content == "You can't read that channel's history, so you can't export it."
        assert refused.response.message.attachments == []


# --- channel permissions ---------------------------------------------------------------------------


async def test_members_who_may_not_talk_in_a_thread_cannot_post_or_press_its_buttons(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        quiet = tavern.guild.add_member(t.env.create_user("Quiet"))
        outsider = tavern.guild.add_member(t.env.create_user("Outsider"))
        channel = tavern.guild.create_text_channel("story", overwrites={
            quiet: discord.PermissionOverwrite(send_messages_in_threads=False),
            outsider: discord.PermissionOverwrite(view_channel=False),
        })
        raw = t.env.backend.create_thread(channel.id, "Side quest", tavern.alice.id)  # backend: not public API
        await t.env.settle()
        thread = simcord.ChannelHandle(t.env, tavern.guild, raw)
        await start_session(t, tavern, channel=thread)
        await tavern.alice.send(thread, "We follow the river.")
        reply = thread.last_message
        assert reply.author.bot

        refused = await quiet.click(reply, custom_id=REGENERATE_ID)
        assert refused.ephemeral and refused.response.content == CANNOT_TALK
        # Discord does not let them post there, nor the outsider see the reply at all.
        with pytest.raises(simcord.BackendError, match="Missing Permissions"):
            await quiet.send(thread, "Let me in!")
        with pytest.raises(simcord.BackendError):
            await outsider.send(channel, "Hello?")
        with pytest.raises(simcord.SetupError, match="not visible"):
            await outsider.click(reply, custom_id=REGENERATE_ID)
        assert [turn.content for turn in await stored_turns(t, thread)] == [
            "We follow the river.", reply.content
        ]
        assert len(t.backend.prompts) == 1


# --- per-member cooldown ---------------------------------------------------------------------------

LIMITED = Settings.model_validate({"discord": {"cooldown_messages": 2, "cooldown_seconds": 60}})


async def test_a_member_over_the_message_limit_is_told_once_and_not_stored(db_url):
    async with bot_env(db_url, settings=LIMITED) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        for text in ("One.", "Two."):
            await tavern.alice.send(tavern.channel, text)
        assert len(t.backend.prompts) == 2

        third = await tavern.alice.send(tavern.channel, "Three!")
        notice = tavern.channel.last_message
        assert notice.author.bot and notice.reference.message_id == third.id
        assert notice.content == "Slow down a little: at most 2 messages every 60 s here. Try again in 60 s."
        [post] = [r for r in t.env.http_requests
                  if r.method == "POST" and (r.json or {}).get("content") == notice.content]
        assert post.json["allowed_mentions"] == {"parse": [], "replied_user": False}
        await tavern.alice.send(tavern.channel, "Four!!")  # still over: not stored, no second notice
        assert [m.content for m in tavern.channel.history() if m.author.bot].count(notice.content) == 1
        assert [turn.content for turn in await stored_turns(t, tavern.channel) if turn.role is Role.USER] == [
            "One.", "Two."
        ]
        assert len(t.backend.prompts) == 2

        # Other members are counted on their own (so is each server: see the unit test below).
        await tavern.bob.send(tavern.channel, "Bob here.")
        assert tavern.channel.last_message.content == "You said: Bob: Bob here."

        await t.env.advance_time(NOTICE_SECONDS)
        assert all(m.id != notice.id for m in tavern.channel.history())  # the notice deleted itself
        await t.env.advance_time(60)
        await tavern.alice.send(tavern.channel, "Five, after a rest.")
        assert tavern.channel.last_message.content == "You said: Alice: Five, after a rest."
        assert len(t.backend.prompts) == 4


async def test_out_of_character_and_ignored_messages_do_not_count(db_url):
    async with bot_env(db_url, settings=LIMITED) as t:
        tavern = tavern_guild(t.env)
        lobby = tavern.guild.create_text_channel("lobby")
        await start_session(t, tavern)
        for _ in range(3):
            await tavern.alice.send(tavern.channel, "// ooc, brb")
            await tavern.alice.send(lobby, "No roleplay here.")
        await tavern.alice.send(tavern.channel, "Back!")
        await tavern.alice.send(tavern.channel, "Still here.")
        assert [turn.content for turn in await stored_turns(t, tavern.channel) if turn.role is Role.USER] == [
            "Back!", "Still here."
        ]


def test_cooldown_window_slides_per_member_and_server():
    now = [0.0]
    limit = MessageCooldown(2, 10.0, clock=lambda: now[0])
    assert limit.take(1, 7) is None and limit.take(1, 7) is None
    refused = limit.take(1, 7)
    assert refused is not None and refused.notify and refused.retry_after == 10.0
    assert limit.take(1, 7) == type(refused)(retry_after=10.0, notify=False)
    assert limit.take(1, 8) is None and limit.take(2, 7) is None  # another member; another server
    now[0] = 4.0
    assert limit.take(1, 7).retry_after == 6.0
    now[0] = 10.0  # the first two left the window
    assert limit.take(1, 7) is None
    assert MessageCooldown(0, 10.0, clock=lambda: now[0]).take(1, 7) is None  # 0 turns it off
    with pytest.raises(ValueError):
        MessageCooldown(-1, 10.0)


def test_cooldown_forgets_members_who_went_quiet():
    now = [0.0]
    limit = MessageCooldown(1, 5.0, clock=lambda: now[0])
    for user in range(300):
        limit.take(1, user)
    now[0] = 100.0
    limit.take(1, 1000)
    assert len(limit._taken) < 10


# --- floods in one channel -------------------------------------------------------------------------


async def test_a_flood_in_one_channel_is_merged_and_capped(db_url):
    settings = Settings.model_validate({"discord": {"cooldown_messages": 3, "cooldown_seconds": 60}})
    backend = FakeBackend("Patience, everyone.", token_delay=0.01)
    async with bot_env(db_url, backend=backend, settings=settings) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        first = await tavern.alice.send(tavern.channel, "Hi.")
        bob_first = await tavern.bob.send(tavern.channel, "Hello.")
        # Messages arriving at once (replays with new ids: actors wait for each reply).
        for n in range(1, 9):
            replay(t.env, first, id=str(first.id + n * 1_000_000), content=f"Alice spam {n}")
            replay(t.env, bob_first, id=str(bob_first.id + n * 1_000_000), content=f"Bob spam {n}")
        await t.env.settle()
        users = [turn for turn in await stored_turns(t, tavern.channel) if turn.role is Role.USER]
        assert sum(turn.author_name == "Alice" for turn in users) == 3  # her limit, first message included
        assert sum(turn.author_name == "Bob" for turn in users) == 3
        assert len(t.backend.prompts) <= 4  # merged: two greetings, then at most two rounds for the flood
        notices = [m for m in tavern.channel.history() if m.author.bot and m.content.startswith("Slow down")]
        assert len(notices) == 2  # one per member
        assert users[-1].id < (await stored_turns(t, tavern.channel))[-1].id  # the flood was answered


async def test_a_full_channel_queue_gets_a_clear_message(db_url):
    settings = Settings.model_validate({"engine": {"per_channel_queue": 1}})

    def reply(prompt: str) -> str:
        return "z" * 300 if "Blocker" in prompt else "Answered."

    async with bot_env(db_url, backend=FakeBackend(reply, token_delay=0.002), settings=settings) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        session = await start_session(t, tavern)
        other = await start_session(t, tavern, channel=cellar, name="Blocker", persona="Blocker talks long.")
        # The test (not the bot) keeps the one worker busy and the channel's engine queue full.
        blocker = await t.bot.service.reply(other)
        waiting = await t.bot.service.reply(session)
        await tavern.alice.send(tavern.channel, "Anyone there?")
        assert tavern.channel.last_message.content == ChannelQueueFull(1).user_message
        [said] = await stored_turns(t, tavern.channel)  # kept: the next reply answers it
        assert said.content == "Anyone there?"
        for stream in (waiting, blocker):
            stream.cancel()
            async for _chunk in stream:
                pass
        await tavern.alice.send(tavern.channel, "Hello?")
        assert tavern.channel.last_message.content == "Answered."
        assert "Alice: Anyone there?\nAlice: Hello?" in t.backend.prompts[-1]
        assert t.env.errors == []
