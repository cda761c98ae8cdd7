"""The session, character and status commands, driven through SimCord against a real SQLite file."""

from __future__ import annotations

import logging
import pkgutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import discord
import pytest
import simcord
from discord.ext import commands

import cogs
from bot.core import characters
from bot.core.cards import card_from_text
from bot.core.characters import PersonaNameTaken
from bot.core.scene import Character
from bot.discord_front.client import INITIAL_EXTENSIONS
from bot.discord_front.errors import GENERIC_MESSAGE
from bot.discord_front.keys import channel_key
from bot.discord_front.permissions import GUILD_ONLY_MESSAGE, NotAllowed, WrongGuild, require_same_guild
from bot.errors import PersonaTooLarge
from bot.inference.engine import Text
from cogs.sessions import RESET_TIMEOUT
from persistence.models import ChannelSessionRow
from tests.discord_fixtures import bot_env, tavern_guild

NOT_ALLOWED = NotAllowed.user_message
PERSONA = "Bram is a travelling bard.\nHe speaks in rhyme when nervous.\n\nHe owes the innkeeper money."
EDIT_FIELDS = ("persona_text", "character_personality", "character_scenario", "character_first_mes",
               "character_mes_example")


# --- fixtures --------------------------------------------------------------------------------------


@asynccontextmanager
async def tavern_bot(db_url: str) -> AsyncIterator[SimpleNamespace]:
    """The real bot (fake model, real SQLite file) in SimCord, with a guild, an admin and a player."""
    async with bot_env(db_url) as running:
        place = tavern_guild(running.env)
        yield SimpleNamespace(
            env=running.env,
            bot=running.bot,
            model=running.backend,  # the FakeBackend: what the model is told and replies
            guild=place.guild,
            channel=place.channel,
            admin=place.admin,
            player=place.alice,
        )


async def create_character(t, name: str = "Bram", text: str = PERSONA) -> simcord.InteractionResult:
    shown = await t.admin.slash(t.channel, "character create")
    assert shown.modal is not None
    return await t.admin.submit_modal(shown, {"persona_name": name, "persona_text": text})


async def session_of(t):
    return await t.bot.repo.get_active_session(channel_key(t.channel.id))


def revoke_roles(t, member) -> None:
    """Take every role from a member (no public SimCord verb does this; the backend is not public API)."""
    t.env.backend.edit_member(t.guild.id, member.id, {"role_ids": []})


# --- characters ------------------------------------------------------------------------------------


async def test_admin_creates_a_character_in_a_modal_and_members_list_and_show_it(db_url):
    async with tavern_bot(db_url) as t:
        done = await create_character(t)
        assert done.ephemeral
        assert done.response.content.startswith('Created the character "Bram"')
        stored = await t.bot.repo.get_persona(t.guild.id, "Bram")
        assert stored is not None and stored.text == PERSONA and stored.created_by == t.admin.id

        listed = await t.player.slash(t.channel, "character list")
        assert listed.ephemeral
        assert "**Bram**: Bram is a travelling bard. He speaks in rhyme" in listed.response.content

        shown = await t.player.slash(t.channel, "character show", name="Bram")
        assert shown.ephemeral
        [embed] = shown.response.embeds
        assert embed.title == "Bram" and embed.description == PERSONA
        assert f"{len(PERSONA.encode())} tokens" in embed.footer.text  # the fake model counts bytes
        bystander = t.guild.add_member(t.env.create_user("bystander"))
        assert t.channel.history(viewer=bystander) == []


async def test_edit_prefills_the_card_fields_and_saves_the_new_ones(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        shown = await t.admin.slash(t.channel, "character edit", name="Bram")
        assert shown.modal["title"] == "Edit Bram"
        inputs = [c for row in shown.modal["components"] for c in row["components"]]
        assert tuple(c["custom_id"] for c in inputs) == EDIT_FIELDS  # Discord's most: five inputs
        description, *others = inputs
        assert description["value"] == PERSONA and description["required"]
        assert all(not c["required"] and not c.get("value") for c in others)  # a written card has no more yet

        done = await t.admin.submit_modal(
            shown, {"persona_text": "Bram, now sober.", "character_scenario": "The inn at closing time."}
        )
        assert done.response.content.startswith('Saved "Bram"')
        stored = await t.bot.repo.get_persona(t.guild.id, "Bram")
        assert stored.text == "Bram, now sober."
        card = await characters.load_card(t.bot.repo, stored)
        assert card.description == "Bram, now sober." and card.scenario == "The inn at closing time."
        assert card.personality == ""


async def test_duplicate_and_unknown_names_get_friendly_answers(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        again = await create_character(t, text="Another Bram")
        assert again.ephemeral
        assert again.response.content.startswith('A character called "Bram" already exists here.')
        assert (await t.bot.repo.get_persona(t.guild.id, "Bram")).text == PERSONA
        simcord.assert_error(t.env, PersonaNameTaken)  # SimCord records errors of modals, handled or not

        for command in ("character show", "character edit", "character delete", "character use"):
            missing = await t.admin.slash(t.channel, command, name="Nobody")
            assert missing.ephemeral and missing.modal is None
            assert missing.response.content == (
                'There is no character called "Nobody" here; /character list shows them.'
            )


async def test_delete_removes_the_character(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        done = await t.admin.slash(t.channel, "character delete", name="Bram")
        assert done.ephemeral and done.response.content.startswith('Deleted the character "Bram".')
        assert await t.bot.repo.list_personas(t.guild.id) == []
        empty = await t.player.slash(t.channel, "character list")
        assert empty.response.content.startswith("No characters yet.")


async def test_character_too_large_for_the_context_is_refused_with_both_numbers(db_url):
    async with tavern_bot(db_url) as t:
        text = "A very long persona. " * 190  # < 4000 characters, more tokens than a 4096 context allows
        # The card is measured as the prompt's head holds it (its story string), not as bare text.
        with pytest.raises(PersonaTooLarge) as measured:
            await t.bot.service.check_card(Character(None, "Long", card_from_text("Long", text.strip())))
        tokens, allowed = measured.value.tokens, measured.value.allowed
        assert tokens >= await t.bot.service.count_tokens(text.strip()) > allowed
        refused = await create_character(t, "Long", text)
        assert refused.ephemeral
        assert f"{tokens} tokens" in refused.response.content and f"at most {allowed}" in refused.response.content
        assert await t.bot.repo.list_personas(t.guild.id) == []
        simcord.assert_error(t.env, PersonaTooLarge)


# --- sessions --------------------------------------------------------------------------------------


async def test_start_uses_an_autocompleted_character(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await create_character(t, "Ysolde", "Ysolde is a knight.")
        choices = await t.admin.autocomplete(t.channel, "session start", "character", "br")
        assert choices == [{"name": "Bram", "value": "Bram"}]

        started = await t.admin.slash(t.channel, "session start", character="Bram")
        assert started.ephemeral
        assert started.response.content == 'Roleplay started in this channel with "Bram".'
        session = await session_of(t)
        assert session.active and session.persona_name == "Bram" and session.guild_id == t.guild.id

        switched = await t.admin.slash(t.channel, "character use", name="Ysolde")
        assert switched.response.content == (
            'Roleplay resumed in this channel with "Ysolde" (0 turns of history).'
        )
        assert (await session_of(t)).persona_name == "Ysolde"


async def test_start_without_character_explains_what_to_do(db_url):
    async with tavern_bot(db_url) as t:
        first = await t.admin.slash(t.channel, "session start")
        assert first.ephemeral
        assert "no characters yet. Import a card with /character import" in first.response.content
        assert "/character create" in first.response.content
        await create_character(t)
        second = await t.admin.slash(t.channel, "session start")
        assert second.response.content.startswith("Choose a character for this channel")
        assert await session_of(t) is None


async def test_stop_pauses_and_start_resumes_with_the_same_character(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        await t.player.send(t.channel, "Hello, bard!")
        assert t.channel.last_message.content == "You said: Alice: Hello, bard!"

        stopped = await t.admin.slash(t.channel, "session stop")
        assert stopped.ephemeral and stopped.response.content.startswith("Roleplay paused")
        assert (await session_of(t)).active is False
        unanswered = await t.player.send(t.channel, "Are you there?")
        assert t.channel.last_message.id == unanswered.id  # no reply while paused
        assert await t.bot.repo.count_turns((await session_of(t)).id) == 2  # ...and nothing stored
        again = await t.admin.slash(t.channel, "session stop")
        assert again.response.content.startswith("The session is already paused")

        resumed = await t.admin.slash(t.channel, "session start")
        assert resumed.response.content == (
            'Roleplay resumed in this channel with "Bram" (2 turns of history).'
        )
        assert (await session_of(t)).active is True
        await t.player.send(t.channel, "Welcome back")
        assert t.channel.last_message.content == "You said: Alice: Welcome back"


async def test_stop_cancels_the_reply_being_written(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        session = await session_of(t)
        t.model.reply, t.model.token_delay = "la " * 200, 0.01  # about 6 s unless stopped
        await t.bot.service.add_user_turn(session, SimpleNamespace(id=t.player.id, name="player"), "Sing!")
        stream = await t.bot.service.reply(session)  # started by the test, so SimCord does not wait for it
        first = [chunk async for chunk in _until_text(stream)]
        assert first

        stopped = await t.admin.slash(t.channel, "session stop")
        assert stopped.response.content.endswith("The reply being written was stopped.")
        async for _chunk in stream:
            pass
        assert stream.stats.stop_reason == "cancelled"
        assert len(stream.raw) < len(t.model.reply)


async def _until_text(stream):
    async for chunk in stream:
        yield chunk
        if isinstance(chunk, Text):
            return


async def test_commands_needing_a_session_say_so(db_url):
    async with tavern_bot(db_url) as t:
        for command in ("session stop", "session reset", "session settings"):
            result = await t.admin.slash(t.channel, command)
            assert result.ephemeral
            assert result.response.content == (
                "There is no roleplay session in this channel; start one with /session start."
            )


async def test_settings_are_validated_stored_and_shown(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")

        shown = await t.admin.slash(t.channel, "session settings")
        assert shown.ephemeral
        assert "temperature: 0.8 (default)" in shown.response.content

        saved = await t.admin.slash(
            t.channel, "session settings", temperature=1.2, reply_mode="mention", max_reply_tokens=128
        )
        assert saved.ephemeral
        assert "temperature: 1.2 (this channel)" in saved.response.content
        assert "max\\_reply\\_tokens: 128 (this channel)" in saved.response.content
        session = await session_of(t)
        assert session.settings == {"temperature": 1.2, "reply_mode": "mention", "max_new_tokens": 128}
        assert t.bot.service.sampling_for(session).temperature == 1.2

        refused = await t.admin.slash(t.channel, "session settings", top_p=1.5, top_k=10)
        assert refused.ephemeral
        assert refused.response.content == "top_p must be a number above 0 and at most 1 (got 1.5)."
        too_long = await t.admin.slash(t.channel, "session settings", max_reply_tokens=100_000)
        assert too_long.response.content == "max_reply_tokens must be a whole number from 16 to 256 (got 100000)."
        assert (await session_of(t)).settings == session.settings

        cleared = await t.admin.slash(t.channel, "session settings", use_defaults=True, top_k=10)
        assert "top\\_k: 10 (this channel)" in cleared.response.content
        assert (await session_of(t)).settings == {"top_k": 10}


async def test_reset_asks_first_then_archives_the_history(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        old = await session_of(t)
        await t.player.send(t.channel, "Hello there")

        asked = await t.admin.slash(t.channel, "session reset")
        assert asked.ephemeral and "The 2 turns so far will be archived" in asked.response.content
        cancelled = await t.admin.click(asked.response, label="Cancel")
        assert cancelled.response.content == "Reset cancelled; nothing was changed."
        assert (await session_of(t)).id == old.id

        asked = await t.admin.slash(t.channel, "session reset")
        assert (await session_of(t)).id == old.id  # nothing happens before the click
        confirmed = await t.admin.click(asked.response, label="Reset")
        assert confirmed.response.content == 'History archived; the story starts over with "Bram".'

        fresh = await session_of(t)
        assert fresh.id != old.id and fresh.persona_name == "Bram" and fresh.active
        assert await t.bot.repo.count_turns(fresh.id) == 0
        kept = [turn.content for turn in await t.bot.repo.recent_turns(old.id, 10)]
        assert kept == ["Hello there", "You said: Alice: Hello there"]
        archived = await t.bot.repo.db.run(lambda s: s.get(ChannelSessionRow, old.id).archived_at)
        assert archived is not None

        await t.player.send(t.channel, "Who are you?")
        assert "Hello there" not in t.model.prompts[-1]  # the character forgot the archived story
        assert t.channel.last_message.content == "You said: Alice: Who are you?"


async def test_unanswered_reset_question_expires_without_changes(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        old = await session_of(t)
        await t.admin.slash(t.channel, "session reset")
        await t.env.advance_time(RESET_TIMEOUT + 1)
        [edit] = [r for r in t.env.http_requests if r.method == "PATCH" and r.path.endswith("/messages/@original")]
        assert edit.json["content"] == "Reset not confirmed; nothing was changed." and edit.json["components"] == []
        assert (await session_of(t)).id == old.id


# --- permissions -----------------------------------------------------------------------------------


ADMIN_COMMANDS = [
    ("session start", {}),
    ("session stop", {}),
    ("session reset", {}),
    ("session settings", {"temperature": 1.0}),
    ("character create", {}),
    ("character edit", {"name": "Bram"}),
    ("character delete", {"name": "Bram"}),
    ("character use", {"name": "Bram"}),
]


async def test_non_admin_is_refused_every_admin_command_server_side(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        assert "session start" not in t.player.available_commands(t.channel)  # hidden by default_permissions
        [session_command] = [c for c in await t.bot.tree.fetch_commands() if c.name == "session"]
        t.guild.set_command_permissions(session_command.id, {t.player: True})  # ...but a server may show it

        for command, options in ADMIN_COMMANDS:
            refused = await t.player.slash(t.channel, command, **options)
            assert refused.ephemeral and refused.modal is None, command
            assert refused.response.content == NOT_ALLOWED, command

        session = await session_of(t)
        assert session.active and session.settings == {}
        assert (await t.bot.repo.get_persona(t.guild.id, "Bram")) is not None


async def test_reset_button_and_modal_check_the_clicker_again(db_url):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        old = await session_of(t)
        asked = await t.admin.slash(t.channel, "session reset")
        opened = await t.admin.slash(t.channel, "character create")
        revoke_roles(t, t.admin)  # loses Manage Server between asking and answering
        await t.env.settle()

        clicked = await t.admin.click(asked.response, label="Reset")
        assert clicked.ephemeral and clicked.response.content == NOT_ALLOWED
        submitted = await t.admin.submit_modal(opened, {"persona_name": "Sneaky", "persona_text": "x"})
        assert submitted.ephemeral and submitted.response.content == NOT_ALLOWED
        assert (await session_of(t)).id == old.id
        assert await t.bot.repo.get_persona(t.guild.id, "Sneaky") is None
        assert [type(e) for e in t.env.errors] == [NotAllowed, NotAllowed]  # UI errors SimCord records


async def test_server_commands_are_absent_in_dms(db_url):
    async with tavern_bot(db_url) as t:
        user = t.player.user
        available = user.available_commands()
        assert "status" in available
        assert not any(name.startswith(("session", "character", "lore", "me ")) for name in available)
        with pytest.raises(simcord.SetupError):
            await user.slash("character list")
        status = await user.slash("status")
        assert "**This channel:** no roleplay session" in status.response.content


async def test_require_same_guild_refuses_channels_of_other_servers():
    here = SimpleNamespace(guild=SimpleNamespace(id=1))
    require_same_guild(here, SimpleNamespace(guild_id=1))
    require_same_guild(here, SimpleNamespace(guild=SimpleNamespace(id=1)))
    with pytest.raises(WrongGuild, match="not in this server"):
        require_same_guild(here, SimpleNamespace(guild_id=2))
    with pytest.raises(Exception, match=GUILD_ONLY_MESSAGE):
        require_same_guild(SimpleNamespace(guild=None), SimpleNamespace(guild_id=1))


# --- status and errors -----------------------------------------------------------------------------


async def test_status_shows_the_figures(db_url):
    async with tavern_bot(db_url) as t:
        before = await t.player.slash(t.channel, "status")
        assert before.ephemeral
        assert "**Model:** fake" in before.response.content
        assert "**Context:** 4096 tokens" in before.response.content
        assert "**Workers:** 1" in before.response.content
        assert "**Queue:** 0 waiting, 0 running" in before.response.content
        assert "**Last reply speed:** no reply yet" in before.response.content
        assert "**This channel:** no roleplay session" in before.response.content

        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        await t.player.send(t.channel, "Hi")
        t.bot.started_at = discord.utils.utcnow()  # the bot was built outside SimCord's virtual clock
        await t.env.advance_time(3725)

        after = await t.player.slash(t.channel, "status")
        stats = t.bot.engine.last_stats
        assert f"**Last reply speed:** {stats.tokens_per_second:.1f} tokens/s" in after.response.content
        assert '**This channel:** active session with "Bram", 2 turns' in after.response.content
        assert "**Uptime:** 1h 2m 5s" in after.response.content


async def test_unexpected_error_is_logged_with_context_and_the_user_gets_an_apology(db_url, caplog, monkeypatch):
    async with tavern_bot(db_url) as t:

        async def broken(guild_id):
            raise RuntimeError("database on fire")

        monkeypatch.setattr(t.bot.repo, "list_personas", broken)
        with caplog.at_level(logging.ERROR, logger="bot.discord_front.errors"):
            result = await t.player.slash(t.channel, "character list")
        assert result.ephemeral and result.response.content == GENERIC_MESSAGE
        [record] = [r for r in caplog.records if r.name == "bot.discord_front.errors"]
        assert "/character list" in record.getMessage()
        for figure in (t.player.id, t.guild.id, t.channel.id):
            assert str(figure) in record.getMessage()
        assert record.exc_info[1].args == ("database on fire",)
        assert t.env.errors == []  # our handler replaced the tree's: nothing reaches SimCord's capture


async def test_unexpected_error_in_a_button_is_logged_too(db_url, caplog, monkeypatch):
    async with tavern_bot(db_url) as t:
        await create_character(t)
        await t.admin.slash(t.channel, "session start", character="Bram")
        asked = await t.admin.slash(t.channel, "session reset")

        async def broken(session_id):
            raise RuntimeError("disk full")

        monkeypatch.setattr(t.bot.repo, "archive_session", broken)
        with caplog.at_level(logging.ERROR, logger="bot.discord_front.errors"):
            clicked = await t.admin.click(asked.response, label="Reset")
        assert clicked.ephemeral and clicked.response.content == GENERIC_MESSAGE
        [record] = [r for r in caplog.records if r.name == "bot.discord_front.errors"]
        assert "ConfirmReset Button 'Reset'" in record.getMessage()
        simcord.assert_error(t.env, RuntimeError)


async def test_unexpected_error_in_a_check_is_reported_not_lost(db_url, caplog, monkeypatch):
    async with tavern_bot(db_url) as t:

        async def broken(interaction):
            raise ConnectionError("member lookup failed")

        monkeypatch.setattr("bot.discord_front.permissions.require_admin", broken)
        with caplog.at_level(logging.ERROR, logger="bot.discord_front.errors"):
            result = await t.admin.slash(t.channel, "session stop")
        assert result.ephemeral and result.response.content == GENERIC_MESSAGE
        [record] = [r for r in caplog.records if r.name == "bot.discord_front.errors"]
        assert "/session stop" in record.getMessage()
        assert isinstance(record.exc_info[1], ConnectionError)


# --- structure -------------------------------------------------------------------------------------


def _cog_modules() -> list[str]:
    return sorted(f"cogs.{m.name}" for m in pkgutil.iter_modules(cogs.__path__) if not m.name.startswith("_"))


async def test_every_cog_loads_and_app_command_names_are_unique():
    names: list[str] = []
    for module_name in _cog_modules():
        bare = commands.Bot(command_prefix="!", intents=discord.Intents.none())  # one per module: no clashes yet
        await bare.load_extension(module_name)
        names.extend(command.qualified_name for command in bare.tree.walk_commands())
    assert {"session reset", "character create", "status"} <= set(names)
    assert sorted({name for name in names if names.count(name) > 1}) == []
    assert set(INITIAL_EXTENSIONS) == set(_cog_modules())  # no cog module is forgotten at start-up
