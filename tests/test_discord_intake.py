"""Which messages roleplay takes: invisible text, out-of-character edits, proxy webhooks, button presses.

Driven through SimCord with the real bot, real SQLite and the fake engine.
"""

from __future__ import annotations

import asyncio
import sys
import unicodedata
import uuid
from pathlib import Path

import discord
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.discord_front.replies import CONTINUE_ID, REGENERATE_ID
from bot.discord_front.replies.buttons import PRESSES, SLOW_DOWN
from bot.prompt.builder import INVISIBLE_CATEGORIES, INVISIBLE_CHARACTERS, has_visible_text
from persistence.records import Role
from tests.discord_fixtures import bot_env, start_session, stored_turns, tavern_guild

# Every code point that draws nothing on its own (the issue's five are among them).
INVISIBLE = sorted(
    {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in INVISIBLE_CATEGORIES - {"Cs"}}
    | INVISIBLE_CHARACTERS
)
invisible_texts = st.text(alphabet=st.sampled_from(INVISIBLE), min_size=1, max_size=40).filter(
    lambda text: text.strip()  # Discord refuses whitespace-only messages itself
)


def bot_messages(channel) -> list[discord.Message]:
    return [m for m in channel.history() if m.author.bot]


def test_the_issues_zero_width_characters_are_invisible() -> None:
    for char in "\u200b\u200c\u200d\u2060\ufeff\u3164\u2800\u115f\u034f":
        assert char in INVISIBLE and not has_visible_text(char * 3)
    assert has_visible_text("\u200ba\u200b") and has_visible_text("e\u0301") and has_visible_text("🙂")


@given(text=invisible_texts, visible=st.characters(exclude_characters=INVISIBLE, exclude_categories=["Cs"]))
def test_text_is_visible_exactly_when_it_has_a_visible_character(text: str, visible: str) -> None:
    assert not has_visible_text(text)
    assert has_visible_text(text + visible) and has_visible_text(visible + text)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=invisible_texts)
async def test_messages_with_no_visible_text_are_neither_stored_nor_answered(tmp_path: Path, text: str) -> None:
    async with bot_env(f"sqlite+aiosqlite:///{tmp_path / uuid.uuid4().hex}.db") as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, text)
        await tavern.alice.send(tavern.channel, f"{t.bot.user.mention} {text}")
        assert await stored_turns(t, tavern.channel) == []
        assert bot_messages(tavern.channel) == [] and t.backend.prompts == []

        # An edit that leaves no visible text takes the turn out, like an empty one.
        said = await tavern.alice.send(tavern.channel, "I light the lantern.")
        assert [turn.content for turn in await stored_turns(t, tavern.channel)] == [
            "I light the lantern.", "You said: Alice: I light the lantern."
        ]
        await tavern.alice.edit(said, text)
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.MODEL]


async def test_an_edit_that_adds_the_out_of_character_prefix_removes_the_turn(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        first = await tavern.alice.send(tavern.channel, "I draw my sword.")
        second = await tavern.bob.send(tavern.channel, "I raise my shield.")
        await tavern.alice.edit(first, "// sorry, wrong channel")
        await tavern.bob.edit(second, "   // afk")
        turns = await stored_turns(t, tavern.channel)
        assert [turn.role for turn in turns] == [Role.MODEL, Role.MODEL]
        # A channel's own prefix counts the same way.
        await tavern.admin.slash(tavern.channel, "session settings", ignore_prefix="((")
        third = await tavern.alice.send(tavern.channel, "I sheathe it again.")
        await tavern.alice.edit(third, "(( brb")
        assert all(turn.role is Role.MODEL for turn in await stored_turns(t, tavern.channel))
        # Taking the prefix away again does not bring a turn back (nothing answers it).
        await tavern.alice.edit(third, "I sheathe it again.")
        assert all(turn.role is Role.MODEL for turn in await stored_turns(t, tavern.channel))


# --- PluralKit, Tupperbox and other proxies --------------------------------------------------------


async def test_a_proxied_message_is_stored_once_as_the_character_and_answered_once(db_url: str) -> None:
    async with bot_env(db_url, reply_delay=None) as t:  # the configured delay, as in production
        assert t.bot.replies.reply_delay == t.settings.discord.reply_delay_seconds > 0
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        hook = tavern.guild.create_webhook(tavern.channel, "PluralKit")
        backend = t.env.backend

        for said, character in (("Kira: I step out of the shadows.", "Kira"), ("Jun: Me too!", "Jun")):
            # The member posts; a moment later the proxy reposts it through its webhook under the
            # character's name and deletes the original (SimCord's backend, so the bot runs meanwhile).
            original = backend.create_message(tavern.channel.id, tavern.alice.id, said)
            await asyncio.sleep(0.3)
            backend.create_message(tavern.channel.id, hook.id, said.split(": ", 1)[1],
                                   webhook_id=hook.id, author_name=f"{character} (Alice)")
            backend.delete_message(tavern.channel.id, original.id)
            await t.env.settle()

        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.author_name, turn.content) for turn in turns] == [
            (Role.USER, "Kira (Alice)", "I step out of the shadows."),
            (Role.MODEL, "Mira", "You said: Kira (Alice): I step out of the shadows."),
            (Role.USER, "Jun (Alice)", "Me too!"),
            (Role.MODEL, "Mira", "You said: Jun (Alice): Me too!"),
        ]
        # The replies speak through Mira's webhook (the bot's own); the proxy's reposts are the users'.
        own = t.bot.intake.own_webhook_ids
        assert [m.content for m in bot_messages(tavern.channel) if m.webhook_id in own] == [
            "You said: Kira (Alice): I step out of the shadows.", "You said: Jun (Alice): Me too!"
        ]
        assert hook.id not in own and [m for m in bot_messages(tavern.channel) if m.webhook_id is None] == []
        assert len(t.backend.prompts) == 2


async def test_each_message_of_one_proxy_webhook_is_taken_under_its_own_name(db_url: str) -> None:
    # One Tupperbox webhook posts for several characters; each message carries the name it was sent under.
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        hook = tavern.guild.create_webhook(tavern.channel, "Tupperbox")
        await hook.send("I hum a tune.", username="Bard")
        await hook.send("So do I.", username="Minstrel")
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.author_name, turn.content) for turn in turns if turn.role is Role.USER] == [
            ("Bard", "I hum a tune."), ("Minstrel", "So do I.")
        ]
        assert t.backend.prompts[-1].endswith("<|user|>Minstrel: So do I.<|model|>")


async def test_other_bots_and_the_bots_own_webhooks_stay_ignored(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        helper = tavern.guild.add_member(t.env.create_user("Helper", bot=True))
        own = tavern.guild.create_webhook(tavern.channel, "Mira")
        t.bot.intake.own_webhook_ids.add(own.id)
        await helper.send(tavern.channel, "Beep.")
        await own.send("I am the character speaking through a webhook.")
        assert await stored_turns(t, tavern.channel) == [] and t.backend.prompts == []


# --- Regenerate / Continue presses -----------------------------------------------------------------


@pytest.mark.parametrize("button", [REGENERATE_ID, CONTINUE_ID])
async def test_pressing_twenty_times_is_told_once_to_slow_down_and_nothing_else_happens(
    db_url: str, button: str
) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await start_session(t, tavern)
        await tavern.alice.send(tavern.channel, "Tell me a story.")
        reply = tavern.channel.last_message
        answers = []
        for _ in range(20):
            result = await tavern.bob.click(reply, custom_id=button)
            answers.append(result.response.content if result.response is not None else None)
        told = [a for a in answers if a is not None and a.startswith(SLOW_DOWN.split("{")[0])]
        assert len(told) == 1, answers
        assert len(t.backend.prompts) == 1 + PRESSES
        # Another member is not held back by Bob's presses.
        await tavern.alice.click(tavern.channel.last_message, custom_id=button)
        assert len(t.backend.prompts) == 2 + PRESSES
        # After the window Bob may press again.
        await t.env.advance_time(31)
        await tavern.bob.click(tavern.channel.last_message, custom_id=button)
        assert len(t.backend.prompts) == 3 + PRESSES
