"""Restarts answer only what a crash really cut off, recently, and one bad channel does not stop the scan."""

from __future__ import annotations

import logging

import pytest

from bot.config import DiscordSettings, Settings
from bot.discord_front.replies import EMPTY_NOTICE
from persistence.records import ChannelSession, Role, TurnStatus
from tests.discord_fixtures import BotEnv, Tavern, bot_env, start_session, stored_turns, tavern_guild
from tests.fake_backend import FakeBackend

FRESH = "Back again, where were we?"


def bot_texts(tavern: Tavern, channel=None) -> list[str]:
    return [m.content for m in (channel or tavern.channel).history() if m.author.bot]


async def cut_off(t: BotEnv, tavern: Tavern, session: ChannelSession, channel=None) -> int:
    """Store what a crash mid-reply leaves: the user's turn and a reserved reply with one message up."""
    channel = channel or tavern.channel
    said = t.env.backend.create_message(channel.id, tavern.alice.id, "Are you there?", broadcast=False)
    half = t.env.backend.create_message(channel.id, t.bot.user.id, "I was about to", broadcast=False)
    await t.bot.repo.append_turn(session.id, Role.USER, "Are you there?", author_id=tavern.alice.id,
                                 author_name="Alice", message_ids=[said.id])
    await t.bot.repo.append_turn(session.id, Role.MODEL, "", status=TurnStatus.PENDING, message_ids=[half.id])
    return half.id


@pytest.mark.parametrize("notice", [EMPTY_NOTICE, "This channel already has too many replies waiting."])
async def test_a_message_that_got_a_notice_is_not_answered_after_restarts(db_url: str, notice: str) -> None:
    async with bot_env(db_url, backend=FakeBackend(FRESH)) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern)
        # The newest turn is a user's whose reply was refused with a notice (no reply was reserved).
        said = t.env.backend.create_message(tavern.channel.id, tavern.alice.id, "Hello?", broadcast=False)
        t.env.backend.create_message(tavern.channel.id, t.bot.user.id, notice, broadcast=False)
        await t.bot.repo.append_turn(session.id, Role.USER, "Hello?", author_id=tavern.alice.id,
                                     author_name="Alice", message_ids=[said.id])
        for _ in range(2):
            await t.restart()
            await t.env.settle()
        assert bot_texts(tavern) == [notice] and t.backend.prompts == []


async def test_a_crash_longer_ago_than_the_bound_is_taken_down_but_not_answered(db_url: str) -> None:
    settings = Settings(discord=DiscordSettings(recovery_max_age_seconds=0))
    async with bot_env(db_url, backend=FakeBackend(FRESH), settings=settings) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern)
        await cut_off(t, tavern, session)
        await t.restart()
        await t.env.settle()
        assert bot_texts(tavern) == [] and t.backend.prompts == []  # the half-written reply is gone
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.USER]


async def test_a_recent_crash_is_answered_once(db_url: str) -> None:
    async with bot_env(db_url, backend=FakeBackend(FRESH)) as t:
        tavern = tavern_guild(t.env)
        session = await start_session(t, tavern)
        await cut_off(t, tavern, session)
        for _ in range(2):
            await t.restart()
            await t.env.settle()
        assert bot_texts(tavern) == [FRESH] and len(t.backend.prompts) == 1


async def test_a_channel_that_fails_to_scan_is_logged_and_the_others_are_recovered(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with bot_env(db_url, backend=FakeBackend(FRESH)) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        broken = await start_session(t, tavern)
        fine = await start_session(t, tavern, channel=cellar)
        await cut_off(t, tavern, broken)
        await cut_off(t, tavern, fine, cellar)

        bot = t.fresh_bot()
        recent_turns = bot.repo.recent_turns

        async def failing(session_id: int, limit: int, budget=None):
            if session_id == broken.id:
                raise OSError("disk read error")
            return await recent_turns(session_id, limit, budget)

        bot.repo.recent_turns = failing  # type: ignore[method-assign]
        t.bot = bot
        with caplog.at_level(logging.ERROR, logger="bot.discord_front.recovery"):
            await t.env.restart_bot(bot)
            await t.env.settle()
        [record] = [r for r in caplog.records if r.getMessage().startswith("cannot check channel")]
        assert str(tavern.channel.id) in record.getMessage() and "disk read error" in record.exc_text
        assert bot_texts(tavern, cellar) == [FRESH]
