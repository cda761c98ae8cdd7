"""Members' own data: /privacy export and /privacy forget, and the admins' /session export.

Driven through SimCord against the real bot, a real SQLite file and the fake model.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from datetime import datetime

import discord
import pytest

from bot.config import Settings
from bot.discord_front.exports import COOLDOWN_RATE
from bot.discord_front.keys import channel_key
from cogs import privacy
from cogs.privacy import FORGET_TIMEOUT, NotYourQuestion
from tests.discord_fixtures import bot_env, capture_interactions, start_session, stored_turns, tavern_guild
from tests.fake_backend import FakeBackend

QUIET = Settings.model_validate({"discord": {"cooldown_messages": 0}})
USER_KEYS = {"channel", "created_at", "name", "content", "message_ids", "status"}


async def attached_lines(result) -> tuple[discord.Attachment, list[dict]]:
    """The single file of an interaction's answer, parsed as JSON Lines."""
    [attachment] = result.response.message.attachments
    data = await attachment.read()
    assert data.endswith(b"\n")
    return attachment, [json.loads(line) for line in data.decode("utf-8").splitlines()]



# --- /privacy export -------------------------------------------------------------------------------


async def test_export_sends_only_my_messages_of_this_server_as_json_lines(db_url):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        await start_session(t, tavern)
        await start_session(t, tavern, channel=cellar)
        elsewhere = t.env.create_guild("Elsewhere")
        hall = elsewhere.create_text_channel("hall")
        alice_there = elsewhere.add_member(tavern.alice.user)
        await t.bot.repo.start_session(channel_key(hall.id), guild_id=elsewhere.id, persona_text="An innkeeper.")

        first = await tavern.alice.send(tavern.channel, "I order an ale.")
        await tavern.bob.send(tavern.channel, "I order mead.")
        second = await tavern.alice.send(cellar, "Down the stairs I go.")
        await alice_there.send(hall, "Another server, another story.")

        result = await tavern.alice.slash(tavern.channel, "privacy export")
        assert result.ephemeral and result.response.ephemeral
        assert result.response.content == "Your 2 stored roleplay messages in this server, one JSON object per line."
        attachment, lines = await attached_lines(result)
        assert attachment.filename == f"tavernkeep-{tavern.guild.id}-{tavern.alice.id}.jsonl"
        assert all(set(line) == USER_KEYS for line in lines)
        assert [(line["channel"], line["content"], line["message_ids"], line["status"]) for line in lines] == [
            (str(tavern.channel.id), "I order an ale.", [str(first.id)], "complete"),
            (str(cellar.id), "Down the stairs I go.", [str(second.id)], "complete"),
        ]
        assert {line["name"] for line in lines} == {"Alice"}
        stored = {turn.content: turn.created_at for turn in await stored_turns(t, tavern.channel)}
        when = datetime.fromisoformat(lines[0]["created_at"])
        assert when.tzinfo is not None and when == stored["I order an ale."]
        # Only Alice sees it.
        assert all(m.id != result.response.message.id for m in tavern.channel.history(viewer=tavern.bob))


async def test_export_with_nothing_stored_says_so_kindly(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        result = await tavern.bob.slash(tavern.channel, "privacy export")
        assert result.ephemeral
        assert result.response.content == (
            "I have no roleplay messages of yours stored in this server, so there is nothing to export."
        )
        assert result.response.message.attachments == []


async def test_an_export_too_large_for_the_server_is_compressed_or_refused(db_url, monkeypatch):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "A line I wrote. " * 40)
        plain, _ = await attached_lines(await tavern.alice.slash(tavern.channel, "privacy export"))
        assert plain.filename.endswith(".jsonl") and plain.size > 400

        monkeypatch.setattr(discord.Guild, "filesize_limit", property(lambda _guild: 400))
        packed = await tavern.alice.slash(tavern.channel, "privacy export")
        [attachment] = packed.response.message.attachments
        assert attachment.filename.endswith(".jsonl.gz")
        [line] = [json.loads(x) for x in gzip.decompress(await attachment.read()).decode().splitlines()]
        assert line["content"] == ("A line I wrote. " * 40).strip()

        monkeypatch.setattr(discord.Guild, "filesize_limit", property(lambda _guild: 50))
        refused = await tavern.alice.slash(tavern.channel, "privacy export")
        assert refused.ephemeral and refused.response.message.attachments == []
        assert refused.response.content == (
            "The export is larger than this server lets me upload (50 bytes), even compressed."
        )


# --- /privacy forget -------------------------------------------------------------------------------


def callbacks(t, since: int = 0) -> list[int]:
    """The interaction response types the bot sent (5: deferred message, 6: deferred update, 4 and 7: answers)."""
    return [r.json["type"] for r in t.env.http_requests[since:] if r.method == "POST" and r.path.endswith("/callback")]


async def test_forgetting_will_changes_no_one_elses_words(db_url):
    """Will's own turns go; Alice's "what will you do?" and the character's "I will keep my blade close."
    stay word for word, and so does every other stored turn."""
    replies = iter(["I will keep my blade close.", "Will is brave."])
    async with bot_env(db_url, settings=QUIET, backend=FakeBackend(lambda _prompt: next(replies))) as t:
        tavern = tavern_guild(t.env)
        will = tavern.guild.add_member(t.env.create_user("Will"))
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "what will you do?")
        mine = await will.send(tavern.channel, "Will draws his sword.")
        before = await stored_turns(t, tavern.channel)
        assert [turn.content for turn in before] == [
            "what will you do?", "I will keep my blade close.", "Will draws his sword.", "Will is brave."
        ]

        since = len(t.env.http_requests)
        asked = await will.slash(tavern.channel, "privacy forget")
        assert callbacks(t, since) == [5]  # deferred first: the count is read after Discord has its answer
        assert asked.ephemeral and asked.response.content.startswith("Delete the 1 roleplay messages of yours")
        assert "Other members' messages and the character's replies stay as they are." in asked.response.content

        since = len(t.env.http_requests)
        done = await will.click(asked.response, label="Delete my messages")
        assert callbacks(t, since) == [6]  # the click is acknowledged before the delete runs
        assert done.response.content == "Done: deleted 1 stored messages of yours."

        after = await stored_turns(t, tavern.channel)
        assert after == [turn for turn in before if turn.author_id != will.id]
        assert [turn.content for turn in after] == [
            "what will you do?", "I will keep my blade close.", "Will is brave."
        ]
        assert await t.bot.repo.turn_by_message(mine.id) is None
        assert await t.bot.repo.count_user_turns(will.id, tavern.guild.id) == 0

        nothing = await will.slash(tavern.channel, "privacy forget")
        assert nothing.response.content.endswith("so there is nothing to delete.")
        assert nothing.response.components == []


async def test_forget_can_be_cancelled(db_url):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "I am Alice.")
        asked = await tavern.alice.slash(tavern.channel, "privacy forget")
        cancelled = await tavern.alice.click(asked.response, label="Cancel")
        assert cancelled.response.content == "Cancelled; nothing was deleted."
        assert await t.bot.repo.count_user_turns(tavern.alice.id, tavern.guild.id) == 1


@pytest.mark.parametrize("command", ["privacy export", "privacy forget", "session export"])
async def test_exports_and_forget_have_a_per_member_cooldown(db_url, command):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.admin.send(tavern.channel, "Hello.")
        for _ in range(COOLDOWN_RATE):
            used = await tavern.admin.slash(tavern.channel, command)
            assert not used.response.content.startswith("Slow down")
        since = len(t.env.http_requests)
        refused = await tavern.admin.slash(tavern.channel, command)
        assert refused.ephemeral and re.fullmatch(r"Slow down: try again in \d+ s\.", refused.response.content)
        assert callbacks(t, since) == [4]  # answered at once, nothing deferred, no work done
        # Per member: someone else is not held up by it.
        other = await tavern.alice.slash(tavern.channel, "privacy export")
        assert not other.response.content.startswith("Slow down")


async def test_only_the_asker_can_confirm_forgetting(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello.")
        seen = capture_interactions(t.bot)
        asked = await tavern.alice.slash(tavern.channel, "privacy forget")
        # The question is private: Discord does not show it, so nobody else can press its buttons...
        with pytest.raises(Exception, match="not visible to this user"):
            await tavern.bob.click(asked.response, label="Delete my messages")
        # ...and the view checks the clicker again on the server side anyway.
        await tavern.bob.slash(tavern.channel, "status")
        alice_asks, bob_acts = seen
        view = privacy.ConfirmForget(t.bot, alice_asks, tavern.guild.id)
        with pytest.raises(NotYourQuestion):
            await view.interaction_check(bob_acts)
        assert await view.interaction_check(alice_asks)
        assert await t.bot.repo.count_user_turns(tavern.alice.id, tavern.guild.id) == 1


async def test_an_unanswered_forget_question_expires_and_deletes_nothing(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello.")
        await tavern.alice.slash(tavern.channel, "privacy forget")
        await t.env.advance_time(FORGET_TIMEOUT + 1)
        # The question itself fills in the deferred answer; the last edit takes the buttons away.
        edits = [r for r in t.env.http_requests if r.method == "PATCH" and r.path.endswith("/messages/@original")]
        asked, edit = edits
        assert asked.json["components"]
        assert edit.json["content"] == "Not confirmed; nothing was deleted." and edit.json["components"] == []
        assert await t.bot.repo.count_user_turns(tavern.alice.id, tavern.guild.id) == 1


async def test_privacy_commands_are_server_only(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        assert {"privacy export", "privacy forget"} <= set(tavern.alice.available_commands(tavern.channel))
        assert not any(name.startswith("privacy") for name in tavern.alice.user.available_commands())


# --- /session export -------------------------------------------------------------------------------


def count_pages(t, monkeypatch) -> list[int]:
    """Record the size of every page of turns the session export reads."""
    pages: list[int] = []
    real = t.bot.repo.session_turns

    async def counted(session_id, *, after_id=0, limit=1000):
        found = await real(session_id, after_id=after_id, limit=limit)
        pages.append(len(found))
        return found

    monkeypatch.setattr(t.bot.repo, "session_turns", counted)
    return pages


async def test_session_export_pages_through_the_whole_log(db_url, monkeypatch):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern)
        for text in ("One.", "Two.", "Three.", "Four."):
            await tavern.alice.send(tavern.channel, text)
        await tavern.bob.send(tavern.channel, "Five.")
        pages = count_pages(t, monkeypatch)
        # The extension module the bot loaded (discord.py imports its own copy of it).
        monkeypatch.setattr(sys.modules[type(t.bot.get_cog("Sessions")).__module__], "PAGE", 3)
        result = await tavern.admin.slash(tavern.channel, "session export")
        assert result.ephemeral
        assert result.response.content == (
            'The session log of #roleplay with "Mira": 10 turns, one JSON object per line.'
        )
        attachment, lines = await attached_lines(result)
        assert attachment.filename == f"tavernkeep-session-{tavern.channel.id}-{session.id}.jsonl"
        assert pages == [3, 3, 3, 1, 0]
        turns = await stored_turns(t, tavern.channel)
        assert [line["id"] for line in lines] == [turn.id for turn in turns]
        assert [(line["role"], line["name"], line["content"]) for line in lines] == [
            (turn.role.value, turn.author_name, turn.content) for turn in turns
        ]
        assert lines[0]["author_id"] == str(tavern.alice.id) and lines[1]["author_id"] is None
        assert lines[1]["message_ids"] == [str(m) for m in turns[1].message_ids]


async def test_session_export_of_another_channel_and_of_none(db_url):
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        lobby = tavern.guild.create_text_channel("lobby")
        await start_session(t, tavern, channel=cellar)
        await tavern.bob.send(cellar, "Down here!")
        await tavern.admin.slash(cellar, "session stop")  # a paused session is still exported

        result = await tavern.admin.slash(tavern.channel, "session export", channel=cellar)
        _, lines = await attached_lines(result)
        assert [line["content"] for line in lines] == ["Down here!", "You said: Bob: Down here!"]

        none = await tavern.admin.slash(tavern.channel, "session export", channel=lobby)
        assert none.ephemeral and none.response.content == "There is no roleplay session in #lobby."
        empty = await tavern.admin.slash(tavern.channel, "session export")
        assert empty.response.content == "There is no roleplay session in #roleplay."
        assert await t.bot.repo.get_active_session(channel_key(lobby.id)) is None


async def test_an_export_over_the_limit_stops_reading_pages(db_url, monkeypatch):
    """The size is checked as pages are written: once even the compressed file is over the limit, no
    further page is read from the store."""
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        for i in range(12):
            await tavern.alice.send(tavern.channel, f"Line {i}: " + "".join(chr(0x4E00 + (i * 97 + k) % 5000)
                                                                            for k in range(60)))
        pages = count_pages(t, monkeypatch)
        monkeypatch.setattr(sys.modules[type(t.bot.get_cog("Sessions")).__module__], "PAGE", 2)
        monkeypatch.setattr(discord.Guild, "filesize_limit", property(lambda _guild: 600))
        refused = await tavern.admin.slash(tavern.channel, "session export")
        assert refused.response.content.startswith("The export is larger than this server lets me upload")
        assert 0 < len(pages) < 12 and 0 not in pages  # stopped before the end of the log


async def test_a_members_persona_is_exported_and_forgotten_with_their_messages(db_url):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.slash(tavern.channel, "me persona", text="Alice is a bard from the north.")
        await tavern.bob.slash(tavern.channel, "me persona", text="Bob is a smith.")
        _, lines = await attached_lines(await tavern.alice.slash(tavern.channel, "privacy export"))
        assert lines == [{"persona": "Alice is a bard from the north."}]

        asked = await tavern.alice.slash(tavern.channel, "privacy forget")
        assert asked.response.content.startswith("Delete the 1 roleplay messages of yours")
        await tavern.alice.click(asked.response, label="Delete my messages")
        assert await t.bot.repo.get_user_persona(tavern.guild.id, tavern.alice.id) is None
        assert await t.bot.repo.get_user_persona(tavern.guild.id, tavern.bob.id) == "Bob is a smith."
        shown = await tavern.alice.slash(tavern.channel, "me persona")
        assert shown.response.content.startswith("You have no persona here")
