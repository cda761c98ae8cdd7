"""Roleplay on Discord end to end: the real bot, real SQLite and the real engine, driven through SimCord."""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import discord
import pytest
import simcord
from hypothesis import given
from hypothesis import strategies as st

from bot.app import model_engine
from bot.config import Settings
from bot.discord_front.client import INITIAL_EXTENSIONS, TavernBot, command_tree_hash, create_bot
from bot.discord_front.replies import (
    CANNOT_TALK,
    CONTINUE_ID,
    EMPTY_NOTICE,
    FAILED_NOTICE,
    LOADING_NOTICE,
    NOT_IN_SESSION,
    QUEUE_NOTICE,
    REGENERATE_ID,
    split_message,
)
from bot.discord_front.replies.buttons import SWIPE_COUNT_ID, SWIPE_NEXT_ID, SWIPE_PREV_ID
from bot.errors import GenerationFailed
from bot.inference.api import WAIT_TOKEN
from persistence.database import Database
from persistence.records import Role, TurnStatus
from tests.discord_fixtures import (
    bot_env,
    close_signal,
    message_writes,
    replay,
    start_session,
    stored_turns,
    tavern_guild,
)
from tests.fake_backend import FakeBackend, fake_engine

SWIPE_ROW = [SWIPE_PREV_ID, SWIPE_COUNT_ID, SWIPE_NEXT_ID]


class Script:
    """FakeBackend replies read from a list (the last one repeats); counts the generations started."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.calls = 0
        self._called = threading.Condition()

    def __call__(self, _prompt: str) -> str:
        with self._called:
            reply = self.replies[min(self.calls, len(self.replies) - 1)]
            self.calls += 1
            self._called.notify_all()
        return reply

    async def started(self, calls: int) -> None:
        """Wait (in real time, off the loop, up to 10 s) until `calls` generations have started."""

        def wait() -> bool:
            with self._called:
                return self._called.wait_for(lambda: self.calls >= calls, 10.0)

        assert await asyncio.to_thread(wait), f"generation {calls} never started"


def bot_messages(channel: simcord.ChannelHandle) -> list[discord.Message]:
    return [m for m in channel.history() if m.author.bot]


def buttons(message: discord.Message) -> list[str]:
    return [child.custom_id for row in message.components for child in row.children]  # type: ignore[union-attr]


def rows(message: discord.Message) -> list[list[str]]:
    """The custom ids of the message's buttons, row by row."""
    return [[child.custom_id for child in row.children] for row in message.components]  # type: ignore[union-attr]


def swipe_row_state(message: discord.Message) -> tuple[str, list[bool]]:
    """The ◀ n/m ▶ row: the count's label and which of the three buttons are disabled."""
    row = message.components[1].children  # type: ignore[union-attr]
    return row[1].label, [child.disabled for child in row]  # type: ignore[union-attr]


def edits_of(env: simcord.Env, message_id: int) -> list[simcord.HttpLogEntry]:
    return [r for r in env.http_requests if r.method == "PATCH" and r.path.endswith(f"/messages/{message_id}")]


# --- split_message ---------------------------------------------------------------------------------


def test_split_prefers_paragraphs_then_sentences_then_words() -> None:
    paragraphs = "a" * 1500 + "\n\n" + "b" * 1500
    assert split_message(paragraphs) == ["a" * 1500, "b" * 1500]
    sentences = "Word. " * 300 + "x" * 400
    first, second = split_message(sentences)
    assert first.endswith("Word.") and len(first) <= 2000 and second.endswith("x" * 400)
    words = "word " * 500
    assert all(part.endswith("word") for part in split_message(words))
    assert split_message("x" * 4500) == ["x" * 2000, "x" * 2000, "x" * 500]
    assert split_message("short") == ["short"]
    assert split_message("  \n ") == []


def _rejoins(text: str, parts: list[str]) -> bool:
    """The parts are `text` in order, with only whitespace dropped, and only at the cuts and ends."""
    pattern = r"\s*" + r"\s*".join(re.escape(part) for part in parts) + r"\s*"
    return re.fullmatch(pattern, text) is not None


@given(
    st.text(alphabet=st.sampled_from("ab .!?\n\t\u00a0é*\"'"), max_size=700),
    st.integers(min_value=1, max_value=120),
)
def test_split_message_properties(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(0 < len(part) <= limit for part in parts)
    assert all(part == part.strip() for part in parts)
    assert _rejoins(text, parts)


# --- conversation ----------------------------------------------------------------------------------


async def test_two_players_talk_and_replies_stream_and_persist(db_url: str) -> None:
    script = Script("Well met, traveller. The road is long.", "Bob! Sit, the stew is hot tonight.")
    async with bot_env(db_url, backend=FakeBackend(script, token_delay=0.004)) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello there, ranger!")
        first = tavern.channel.last_message
        assert first.author.bot and first.content == "Well met, traveller. The road is long."
        assert first.webhook_id is not None and first.author.name == "Mira"  # the character's webhook
        assert len(edits_of(t.env, first.id)) >= 3, "the reply should stream in several edits"
        await tavern.bob.send(tavern.channel, "Mind if I join?")
        second = tavern.channel.last_message
        assert second.content == "Bob! Sit, the stew is hot tonight."

        prompt = t.backend.prompts[-1]
        assert "Mira is a sharp-tongued elven ranger." in prompt
        assert "Alice: Hello there, ranger!" in prompt and "Bob: Mind if I join?" in prompt
        turns = await stored_turns(t, tavern.channel)
        # Model turns carry the stored character who spoke.
        assert [(turn.role, turn.author_name, turn.content) for turn in turns] == [
            (Role.USER, "Alice", "Hello there, ranger!"),
            (Role.MODEL, "Mira", first.content),
            (Role.USER, "Bob", "Mind if I join?"),
            (Role.MODEL, "Mira", second.content),
        ]
        assert turns[1].character_id == turns[3].character_id == session.persona_id
        assert turns[1].message_ids == (first.id,) and turns[3].message_ids == (second.id,)
        assert all(turn.status is TurnStatus.COMPLETE for turn in turns)
        # The typing indicator runs while the model writes; only the latest reply keeps its buttons.
        assert any(r.path == f"/channels/{tavern.channel.id}/typing" for r in t.env.http_requests)
        first_now, second_now = bot_messages(tavern.channel)
        assert buttons(first_now) == [] and buttons(second_now) == [REGENERATE_ID, CONTINUE_ID]


async def test_long_reply_is_split_over_messages_in_order(db_url: str) -> None:
    paragraph = "The old road winds past the mill. " * 24  # about 820 characters
    long_reply = "\n\n".join(f"{n}. {paragraph.strip()}" for n in range(1, 7))  # about 5,000 characters
    settings = Settings.model_validate({"model": {"max_new_tokens": 6000}})
    backend = FakeBackend(long_reply, n_ctx=16384)
    async with bot_env(db_url, backend=backend, settings=settings) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Tell me about the road.")
        parts = bot_messages(tavern.channel)
        assert len(parts) == 3
        assert all(len(m.content) <= 2000 for m in parts)
        assert [m.content for m in parts] == split_message(long_reply)
        assert "\n\n".join(m.content for m in parts) == long_reply
        assert [buttons(m) for m in parts] == [[], [], [REGENERATE_ID, CONTINUE_ID]]
        [_, reply] = await stored_turns(t, tavern.channel)
        assert reply.content == long_reply and reply.message_ids == tuple(m.id for m in parts)


# --- keeping history in sync -----------------------------------------------------------------------


async def test_user_edits_and_deletes_change_the_stored_turns(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        said = await tavern.alice.send(tavern.channel, "I draw my swrod.")
        await tavern.alice.edit(said, "I draw my sword.")
        turns = await stored_turns(t, tavern.channel)
        assert turns[0].content == "I draw my sword."
        assert turns[1].role is Role.MODEL  # the reply is left as it was

        await tavern.bob.send(tavern.channel, "I hide behind the barrel.")
        bob_said = next(m for m in tavern.channel.history() if m.author.id == tavern.bob.id)
        await tavern.bob.delete(bob_said)
        turns = await stored_turns(t, tavern.channel)
        assert [turn.author_name for turn in turns if turn.role is Role.USER] == ["Alice"]
        assert all(bob_said.id not in turn.message_ids for turn in turns)


async def test_deleting_any_part_of_a_reply_removes_the_model_turn(db_url: str) -> None:
    settings = Settings.model_validate({"model": {"max_new_tokens": 6000}})
    backend = FakeBackend(Script(("A long tale. " * 250).strip(), "Short."), n_ctx=16384)
    async with bot_env(db_url, backend=backend, settings=settings) as t:
        tavern = tavern_guild(t.env)
        moderator = tavern.guild.create_role("Mod", permissions=discord.Permissions(manage_messages=True))
        mod = tavern.guild.add_member(t.env.create_user("Moderator"), roles=[moderator])
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Tell me a tale.")
        first_part, _ = bot_messages(tavern.channel)
        await mod.delete(first_part)
        # The turn is gone from history, and so is the rest of the reply.
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.USER]
        assert bot_messages(tavern.channel) == []

        await tavern.alice.send(tavern.channel, "Shorter, please.")
        await mod.delete(tavern.channel.last_message)
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.USER, Role.USER]
        assert "Tell me a tale." in t.backend.prompts[-1] and "A long tale" not in t.backend.prompts[-1]


async def test_bulk_delete_removes_every_turn_it_touches(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "One.")
        await tavern.alice.send(tavern.channel, "Two.")
        ids = [m.id for m in tavern.channel.history()][:2]
        t.env.backend.emit(
            "MESSAGE_DELETE_BULK",
            {"ids": [str(i) for i in ids], "channel_id": str(tavern.channel.id), "guild_id": str(tavern.guild.id)},
        )
        await t.env.settle()
        assert [turn.content for turn in await stored_turns(t, tavern.channel)] == [
            "Two.", "You said: Alice: Two."
        ]


# --- regenerate and continue -----------------------------------------------------------------------


async def test_regenerate_and_continue_rework_the_latest_reply(db_url: str) -> None:
    script = Script("The door is locked.", "The door creaks open.", " Beyond it, darkness.")
    async with bot_env(db_url, backend=FakeBackend(script, token_delay=0.002)) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "I try the door.")
        reply = tavern.channel.last_message
        [old_turn] = [turn for turn in await stored_turns(t, tavern.channel) if turn.role is Role.MODEL]

        assert buttons(reply) == [REGENERATE_ID, CONTINUE_ID]  # one version: no swipe row yet

        # Anyone who can talk here may regenerate: new text in the same message, shown in place of the
        # old text, which is kept as an earlier version (a swipe) of the same turn.
        result = await tavern.bob.click(reply, custom_id=REGENERATE_ID)
        assert result.acknowledged and result.followups == []
        assert [m.id for m in bot_messages(tavern.channel)] == [reply.id]
        assert tavern.channel.last_message.content == "The door creaks open."
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.content) for turn in turns] == [
            (Role.USER, "I try the door."), (Role.MODEL, "The door creaks open.")
        ]
        assert turns[1].id == old_turn.id and turns[1].message_ids == (reply.id,)  # replaced in place
        assert await t.bot.repo.swipes(old_turn.id) == ["The door is locked.", "The door creaks open."]
        assert (turns[1].swipe, turns[1].swipe_count) == (1, 2)
        assert "The door is locked." not in t.backend.prompts[-1]
        assert rows(tavern.channel.last_message) == [[REGENERATE_ID, CONTINUE_ID], SWIPE_ROW]
        assert swipe_row_state(tavern.channel.last_message) == ("2/2", [False, True, True])

        await tavern.alice.click(tavern.channel.last_message, custom_id=CONTINUE_ID)
        assert tavern.channel.last_message.content == "The door creaks open. Beyond it, darkness."
        assert t.backend.prompts[-1].endswith("<|model|>The door creaks open.")
        [_, continued] = await stored_turns(t, tavern.channel)
        assert continued.id == turns[1].id and continued.content == "The door creaks open. Beyond it, darkness."
        assert rows(tavern.channel.last_message) == [[REGENERATE_ID, CONTINUE_ID], SWIPE_ROW]
        # Continue lengthens the version shown; the earlier one is kept as it was.
        assert await t.bot.repo.swipes(old_turn.id) == [
            "The door is locked.", "The door creaks open. Beyond it, darkness."
        ]
        # The one view registered at start answers every click: discord.py keeps none per message.
        assert [key for key in t.bot._connection._view_store._views if key is not None] == []


async def test_buttons_refuse_politely_when_the_reply_is_not_the_latest(db_url: str) -> None:
    backend = FakeBackend("The wind howls.")
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        mute = tavern.guild.add_member(t.env.create_user("Mute"))
        channel = tavern.guild.create_text_channel(
            "story", overwrites={mute: discord.PermissionOverwrite(send_messages=False)}
        )
        await start_session(t, tavern, channel=channel)
        await tavern.alice.send(channel, "I listen.")
        reply = channel.last_message

        refused = await mute.click(reply, custom_id=REGENERATE_ID)
        assert refused.ephemeral and refused.response.content == CANNOT_TALK

        # The next reply fails, so the old one keeps its buttons without being the latest turn.
        backend.fail_after = 0
        await tavern.bob.send(channel, "I shout.")
        assert channel.last_message.content == GenerationFailed.user_message
        refused = await tavern.bob.click(reply, custom_id=CONTINUE_ID)
        assert refused.ephemeral
        assert refused.response.content == "Only the latest reply of this channel's session can be continued."

        backend.fail_after = None
        await tavern.admin.slash(channel, "session stop")
        refused = await tavern.alice.click(reply, custom_id=REGENERATE_ID)
        assert refused.ephemeral and refused.response.content == NOT_IN_SESSION
        assert [m.content for m in bot_messages(channel)] == ["The wind howls.", GenerationFailed.user_message]


# --- what is not answered --------------------------------------------------------------------------


async def test_out_of_character_bots_own_webhooks_dms_and_other_channels_are_ignored(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        lobby = tavern.guild.create_text_channel("lobby")
        other_bot = tavern.guild.add_member(t.env.create_user("Helper", bot=True))
        hook = tavern.guild.create_webhook(tavern.channel, "Announcer")
        t.bot.intake.own_webhook_ids.add(hook.id)  # the bot's own (character) webhook

        await tavern.alice.send(tavern.channel, "// brb, pizza")
        await tavern.alice.send(tavern.channel, "   // still out of character")
        await other_bot.send(tavern.channel, "Beep, I am a bot.")
        await hook.send("Server news!")
        await tavern.alice.send(lobby, "No session here.")
        await tavern.alice.send_dm("Psst, are you there?")

        ours = t.bot.user.id
        for channel in (tavern.channel, lobby, tavern.alice.user.dm_channel):
            assert [m.content for m in channel.history() if m.author.id == ours] == []
        assert await stored_turns(t, tavern.channel) == []
        assert t.backend.prompts == []


async def test_reply_mode_mention_answers_only_when_mentioned(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.admin.slash(tavern.channel, "session settings", reply_mode="mention", ignore_prefix="((")
        await tavern.alice.send(tavern.channel, "Talking among ourselves.")
        await tavern.alice.send(tavern.channel, f"(( {t.bot.user.mention} ooc question")
        assert bot_messages(tavern.channel) == []
        await tavern.alice.send(tavern.channel, f"{t.bot.user.mention} Mira, what do you see?")
        assert tavern.channel.last_message.content == "You said: Alice: Mira, what do you see?"
        [turn, _] = await stored_turns(t, tavern.channel)
        assert turn.content == "Mira, what do you see?"


async def test_messages_sent_during_a_reply_are_answered_together_in_channel_order(db_url: str) -> None:
    slow = "I will answer the first question slowly."
    script = Script("Welcome.", slow, "Two and three, answered together.")
    async with bot_env(db_url, backend=FakeBackend(script, token_delay=0.01)) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        first = await tavern.alice.send(tavern.channel, "Hi")
        # Replays with new ids stand in for messages arriving while the bot writes (actors wait for it).
        replay(t.env, first, id=str(first.id + 1_000_000), content="One")
        await script.started(2)  # the reply to "One" is being written now
        replay(t.env, first, id=str(first.id + 2_000_000), content="Two")
        replay(t.env, first, id=str(first.id + 3_000_000), content="Three")
        await t.env.settle()
        assert len(t.backend.prompts) == 3
        assert t.backend.prompts[-1].endswith(
            f"<|user|>Alice: One<|model|>{slow}<|user|>Alice: Two\nAlice: Three<|model|>"
        )
        turns = await stored_turns(t, tavern.channel)
        assert [turn.content for turn in turns] == [
            "Hi", "Welcome.", "One", slow, "Two", "Three", "Two and three, answered together."
        ]
        assert [m.content for m in bot_messages(tavern.channel)] == ["Welcome.", slow, turns[-1].content]


async def test_replayed_message_create_is_stored_and_answered_once(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        said = await tavern.alice.send(tavern.channel, "Just once.")
        replay(t.env, said)
        await t.env.settle()
        assert len(await stored_turns(t, tavern.channel)) == 2
        assert len(bot_messages(tavern.channel)) == 1
        assert len(t.backend.prompts) == 1


# --- mentions, restarts, faults --------------------------------------------------------------------


async def test_generated_mentions_never_ping(db_url: str) -> None:
    backend = FakeBackend()
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        role = tavern.guild.create_role("Adventurers")
        backend.reply = f"@everyone @here <@&{role.id}> <@{tavern.alice.id}> to arms!"
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "What now?")
        await tavern.alice.click(tavern.channel.last_message, custom_id=REGENERATE_ID)
        backend.fail_after = 0
        await tavern.bob.send(tavern.channel, "Hm?")  # an error notice is a write too
        assert tavern.channel.last_message.content == GenerationFailed.user_message
        writes = message_writes(t.env)
        assert len(writes) >= 5
        for write in writes:
            body = write.json.get("data", write.json) if write.path.endswith("/callback") else write.json
            assert body["allowed_mentions"] == {"parse": []}, write


async def test_restart_keeps_history_personas_and_working_buttons(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        await start_session(t, tavern)
        await start_session(t, tavern, channel=cellar, name="Grim", persona="Grim is a grumpy dwarf brewer.")
        await tavern.alice.send(tavern.channel, "Hi Mira.")
        await tavern.bob.send(cellar, "Hi Grim.")
        cellar_reply = cellar.last_message

        await t.restart()

        await tavern.alice.send(tavern.channel, "Remember me?")
        prompt = t.backend.prompts[-1]
        assert "Mira is a sharp-tongued" in prompt and "Alice: Hi Mira." in prompt and "Grim" not in prompt
        result = await tavern.bob.click(cellar_reply, custom_id=CONTINUE_ID)
        assert result.acknowledged
        prompt = t.backend.prompts[-1]
        assert "Grim is a grumpy dwarf brewer." in prompt and "Bob: Hi Grim." in prompt and "Mira" not in prompt
        assert cellar.last_message.id == cellar_reply.id
        assert cellar.last_message.content.startswith("You said: Bob: Hi Grim.")
        assert len(await stored_turns(t, tavern.channel)) == 4
        assert len(await stored_turns(t, cellar)) == 2


async def test_a_streaming_edit_discord_refuses_is_skipped_and_the_reply_ends_exact(db_url: str) -> None:
    # Rate limits and retried server errors are discord.py's own (tested against a loopback server in
    # tests/test_discord_http.py); a 503 reaches the bot at once, as it does in production.
    script = Script("Keep to the shore, where the reeds grow thick.")
    async with bot_env(db_url, backend=FakeBackend(script, token_delay=0.005)) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        messages = f"/channels/{tavern.channel.id}/messages/*"
        t.bot.replies.edit_interval = 0.02
        t.env.inject_error("PATCH", messages, status=503, times=1)
        await tavern.bob.send(tavern.channel, "Which way?")
        reply = tavern.channel.last_message
        assert reply.content == "Keep to the shore, where the reeds grow thick."
        assert buttons(reply) == [REGENERATE_ID, CONTINUE_ID]
        assert len(edits_of(t.env, reply.id)) >= 3
        turns = await stored_turns(t, tavern.channel)
        assert [turn.content for turn in turns if turn.role is Role.MODEL] == [
            "Keep to the shore, where the reeds grow thick."
        ]


async def test_failures_become_short_notices_and_are_logged(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend("Half a sentence and then", fail_after=8)
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Go on.")
        partial, notice = bot_messages(tavern.channel)
        assert notice.content == GenerationFailed.user_message
        [_, turn] = await stored_turns(t, tavern.channel)
        assert turn.status is TurnStatus.INTERRUPTED and turn.content == partial.content
        assert turn.message_ids == (partial.id,)

        backend.fail_after, backend.reply = None, "   "
        await tavern.alice.send(tavern.channel, "Anything?")
        assert tavern.channel.last_message.content == EMPTY_NOTICE

        async def broken(_session: object, **_options: object) -> None:
            raise RuntimeError("disk on fire")

        t.bot.service.reply = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR):
            await tavern.bob.send(tavern.channel, "Hello?")
        assert tavern.channel.last_message.content == FAILED_NOTICE
        [record] = [r for r in caplog.records if r.name == "bot.discord_front.replies.jobs"]
        assert f"channel={tavern.channel.id}" in record.getMessage() and f"user={tavern.bob.id}" in record.getMessage()
        assert "disk on fire" in record.exc_text


async def test_queue_position_is_shown_while_waiting(db_url: str) -> None:
    backend = FakeBackend("Patience is a virtue, traveller.", token_delay=0.005)
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        await start_session(t, tavern)
        await start_session(t, tavern, channel=cellar)
        first = await tavern.alice.send(tavern.channel, "First!")
        second = await tavern.bob.send(cellar, "Second!")
        # Both channels ask at once: the one worker takes one, the other waits at position 1.
        # Replays with new ids stand in for two messages arriving at once (actors wait for each reply).
        replay(t.env, first, id=str(first.id + 1_000_000), content="Again, first!")
        replay(t.env, second, id=str(second.id + 1_000_000), content="Again, second!")
        await t.env.settle()
        waiting = [r for r in t.env.http_requests
                   if r.method == "POST" and (r.json or {}).get("content") == QUEUE_NOTICE.format(position=1)]
        assert len(waiting) == 1
        assert [m.content for m in bot_messages(tavern.channel)][-1] == "Patience is a virtue, traveller."
        assert [m.content for m in bot_messages(cellar)] == ["Patience is a virtue, traveller."] * 2


class LoadingBackend(FakeBackend):
    """A model that is not ready at first (an inference server loading it): WAIT_TOKEN, then the reply."""

    def tokens(self, prompt, sampling, stop=lambda: False):
        yield WAIT_TOKEN
        time.sleep(0.2)
        yield from super().tokens(prompt, sampling, stop)


async def test_a_model_still_loading_is_shown_and_the_notice_goes_when_the_reply_comes(db_url: str) -> None:
    async with bot_env(db_url, backend=LoadingBackend("Ready at last.")) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello?")
        shown = [r for r in t.env.http_requests
                 if r.method == "POST" and (r.json or {}).get("content") == LOADING_NOTICE]
        assert len(shown) == 1
        assert [m.content for m in bot_messages(tavern.channel)] == ["Ready at last."]  # the notice is gone
        [_, turn] = await stored_turns(t, tavern.channel)
        assert (turn.status, turn.content) == (TurnStatus.COMPLETE, "Ready at last.")


async def test_shutdown_lets_the_running_reply_finish_as_interrupted(db_url: str) -> None:
    script = Script("Hello.", "Once upon a time " * 40)
    backend = FakeBackend(script, token_delay=0.005)
    settings = Settings.model_validate({"model": {"max_new_tokens": 2000}})
    async with bot_env(db_url, backend=backend, settings=settings) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        message = await tavern.alice.send(tavern.channel, "A story, please.")
        replay(t.env, message, id=str(message.id + 1_000_000), content="More!")  # not settled: runs on
        await script.started(2)
        await asyncio.sleep(0.1)  # real time: let some of it reach the channel
        await t.bot.shutdown(grace=0.1)
        assert t.bot.is_closed() and not t.bot.accepting
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.status) for turn in turns[-2:]] == [
            (Role.USER, TurnStatus.COMPLETE), (Role.MODEL, TurnStatus.INTERRUPTED)
        ]
        assert 0 < len(turns[-1].content) < len(("Once upon a time " * 40).strip())
        assert tavern.channel.last_message.content == turns[-1].content


# --- start-up --------------------------------------------------------------------------------------


def test_every_initial_extension_exists_and_has_setup() -> None:
    for name in INITIAL_EXTENSIONS:
        assert callable(importlib.import_module(name).setup), name


async def test_setup_loads_every_extension_and_syncs_commands_only_when_changed(db_url: str) -> None:
    async with bot_env(db_url) as t:
        assert sorted(t.bot.extensions) == sorted(INITIAL_EXTENSIONS)
        syncs = [r for r in t.env.http_requests if r.method == "PUT" and r.path.endswith("/commands")]
        assert len(syncs) == 1 and "/guilds/" not in syncs[0].path
        key = f"discord.command_tree_sha256.{t.bot.application_id}"
        assert await t.bot.repo.get_meta(key) == command_tree_hash(t.bot.tree)

        await t.restart()  # same commands: no global sync
        await t.env.restart_bot()  # the same object again: setup_hook runs twice without complaint
        assert [r for r in t.env.http_requests if r.method == "PUT" and r.path.endswith("/commands")] == syncs
        assert sorted(t.bot.extensions) == sorted(INITIAL_EXTENSIONS)

        guild = t.env.create_guild("Dev")
        t.settings = Settings.model_validate({"discord": {"command_guilds": [guild.id]}})
        await t.restart()
        synced = [r.path for r in t.env.http_requests if r.method == "PUT" and r.path.endswith("/commands")]
        assert synced[-1].endswith(f"/guilds/{guild.id}/commands")


async def test_api_base_url_points_rest_calls_elsewhere(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    settings = Settings.model_validate({"discord": {"api_base_url": "http://proxy.local:8080/api/v10/"}})
    database = await Database.open(db_url)
    try:
        create_bot(settings, engine=fake_engine(), database=database)
    finally:
        await database.close()
    assert discord.http.Route("GET", "/gateway/bot").url == "http://proxy.local:8080/api/v10/gateway/bot"


# --- the real model --------------------------------------------------------------------------------


@pytest.mark.model
async def test_real_model_reply_streams_and_is_stored(db_url: str, demo_model_path: Path) -> None:
    settings = Settings.model_validate({"model": {"n_ctx": 1024, "threads": 2, "max_new_tokens": 32, "seed": 7}})
    engine = model_engine(settings, str(demo_model_path))
    async with bot_env(db_url, engine=engine, settings=settings, settle_timeout=60) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern, persona="Mira is a cheerful innkeeper who loves to talk.")
        await tavern.alice.send(tavern.channel, "Good evening! What is on the menu tonight?")
        [reply] = bot_messages(tavern.channel)
        assert reply.content.strip() and buttons(reply) == [REGENERATE_ID, CONTINUE_ID]
        assert [r.method for r in message_writes(t.env) if r.path.endswith(str(reply.id))] != []
        [said, turn] = await stored_turns(t, tavern.channel)
        assert said.message_ids and turn.role is Role.MODEL
        assert turn.content == reply.content and turn.message_ids == (reply.id,)


# --- `tavernkeep run` ------------------------------------------------------------------------------


@pytest.fixture
def runner(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeBackend:
    """`tavernkeep run` over a FakeBackend engine and a temporary database, with a token set."""
    from bot import app

    backend = FakeBackend()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token")
    monkeypatch.setenv("TAVERNKEEP_DATABASE_URL", db_url)
    monkeypatch.setattr(app, "model_path_for", lambda _settings: "model.gguf")
    monkeypatch.setattr(app, "model_engine", lambda _settings, _path: fake_engine(backend))
    return backend


def _run_with(monkeypatch: pytest.MonkeyPatch, start: Callable[..., object]) -> int:
    import bot.__main__ as entry

    monkeypatch.setattr(TavernBot, "start", start)
    return entry.main(["run"])


def test_run_without_token_says_so_in_one_line(
    runner: FakeBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.__main__ import main

    monkeypatch.delenv("DISCORD_TOKEN")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DISCORD_TOKEN" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (discord.LoginFailure("Improper token has been passed."), "Discord rejected the token"),
        (discord.PrivilegedIntentsRequired(None), "Message Content Intent"),
    ],
)
def test_run_explains_login_and_intent_refusals(
    runner: FakeBackend,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    expected: str,
) -> None:
    async def refused(_bot: object, _token: str) -> None:
        raise error

    assert _run_with(monkeypatch, refused) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("tavernkeep:")]) == 1
    assert expected in err[-1] and not any("Traceback" in line for line in err)


def test_run_shuts_down_cleanly_on_sigterm(runner: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    seen: dict[str, object] = {}

    async def until_closed(bot: TavernBot, token: str) -> None:
        closed = close_signal(bot)
        seen["token"] = token
        os.kill(os.getpid(), signal.SIGTERM)
        await closed.wait()
        seen["accepting"] = bot.accepting

    assert _run_with(monkeypatch, until_closed) == 0
    assert seen == {"token": "not-a-real-token", "accepting": False}
    assert runner.closed
