"""A sharded bot (`discord.shard_count`, `discord.shard_ids`): each process answers, recovers and catches
up only the guilds of its own shards, and only the process running shard 0 syncs slash commands.

SimCord routes each gateway event to the shard Discord would send it to, so a guild of another shard
is simply never seen here; what these tests check is what the bot does to that guild's rows in the
shared database when it starts (crash leftovers, messages missed while away).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.config import DiscordSettings, Settings, load_settings
from bot.discord_front.client import ShardedTavernBot, TavernBot
from bot.discord_front.keys import channel_key
from bot.discord_front.shards import Shards, shard_of
from persistence.records import ChannelSession, Role, TurnStatus
from tests.discord_fixtures import BotEnv, Tavern, bot_env, bot_messages, stored_turns, tavern_guild
from tests.fake_backend import FakeBackend
from tests.test_discord_recovery import cut_off

FRESH = "The fire crackles; Mira looks up."
SHARDED = Settings(discord=DiscordSettings(shard_count=2, shard_ids=[0]))


def test_shard_settings_are_checked() -> None:
    for bad in ({"shard_ids": [0]}, {"shard_count": 2, "shard_ids": [2]}, {"shard_count": 2, "shard_ids": [1, 1]},
                {"shard_count": -1, "shard_ids": [0]}):
        with pytest.raises(ValidationError):
            DiscordSettings.model_validate(bad)
    settings = load_settings(None, env={"TAVERNKEEP_DISCORD_SHARD_COUNT": "4", "TAVERNKEEP_DISCORD_SHARD_IDS": "1,3"})
    assert Shards.of(settings.discord) == Shards(4, frozenset({1, 3}))


def test_which_process_owns_a_guild() -> None:
    guild = (123 << 22) | 77  # shard 123 % n
    assert shard_of(guild, 2) == 1 and shard_of(guild, 4) == 3 and shard_of(None, 4) == 0 and shard_of(guild, 0) == 0
    mine = Shards(4, frozenset({1, 3}))
    assert mine.owns(guild) and not mine.owns(guild + (1 << 22)) and not mine.owns(None)  # DMs come on shard 0
    assert not mine.syncs_commands and Shards(4, frozenset({0})).syncs_commands
    assert Shards().owns(guild) and Shards().syncs_commands and not Shards().sharded
    assert Shards(-1).client_options() == {"shard_count": None, "shard_ids": None}


async def open_with_leftover(t: BotEnv, tavern: Tavern) -> ChannelSession:
    """A session in the tavern's channel (stored directly: its guild may be on another process's shard)
    holding what a crash mid-reply leaves, and a message sent after it, while the bot was away."""
    persona = await t.bot.repo.create_persona(tavern.guild.id, "Mira", "Mira is an elven ranger.")
    session = await t.bot.repo.start_session(channel_key(tavern.channel.id), guild_id=tavern.guild.id,
                                             persona_id=persona.id)
    await cut_off(t, tavern, session)
    t.env.backend.create_message(tavern.channel.id, tavern.bob.id, "Hello? Anyone?", broadcast=False)
    return session


async def test_a_shard_process_recovers_and_catches_up_only_its_own_guilds(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with bot_env(db_url, backend=FakeBackend(FRESH), settings=SHARDED) as t:
        assert isinstance(t.bot, ShardedTavernBot) and t.bot.shard_ids == [0] and t.bot.shard_count == 2
        ours, theirs = tavern_guild(t.env, "Ours", shard_id=0), tavern_guild(t.env, "Theirs", shard_id=1)
        for tavern in (ours, theirs):
            await open_with_leftover(t, tavern)
        before = len(t.env.http_requests)
        await t.restart()
        await t.env.settle()

        # Our guild: the half-written reply is taken down, both messages are answered by one reply.
        assert [m.content for m in bot_messages(t.env, ours.channel)] == [FRESH]
        turns = await stored_turns(t, ours.channel)
        assert [(x.role, x.status) for x in turns] == [
            (Role.USER, TurnStatus.COMPLETE), (Role.USER, TurnStatus.COMPLETE), (Role.MODEL, TurnStatus.COMPLETE)
        ]
        # Theirs: its rows and messages are exactly as its own process left them.
        assert [m.content for m in bot_messages(t.env, theirs.channel)] == ["I was about to"]
        turns = await stored_turns(t, theirs.channel)
        assert [(x.role, x.status) for x in turns] == [
            (Role.USER, TurnStatus.COMPLETE), (Role.MODEL, TurnStatus.PENDING)
        ]
        touched = [r.path for r in t.env.http_requests[before:] if str(theirs.channel.id) in r.path]
        assert touched == []
        assert [r.message for r in caplog.records if str(theirs.channel.id) in r.getMessage()] == []
        assert len(t.backend.prompts) == 1


@pytest.mark.parametrize(("shard_ids", "syncs"), [([0], True), ([1], False), ([0, 1], True)])
async def test_only_the_process_running_shard_0_syncs_commands(
    db_url: str, shard_ids: list[int], syncs: bool
) -> None:
    settings = Settings(discord=DiscordSettings(shard_count=2, shard_ids=shard_ids))
    async with bot_env(db_url, settings=settings, strict_sync=False) as t:
        synced = [r for r in t.env.http_requests if r.method == "PUT" and r.path.endswith("/commands")]
        assert bool(synced) is syncs


async def test_a_shard_that_reconnects_catches_up_its_guilds(db_url: str) -> None:
    settings = Settings(discord=DiscordSettings(shard_count=2))  # both shards in this process
    async with bot_env(db_url, backend=FakeBackend(FRESH), settings=settings) as t:
        assert t.bot.shard_ids is None
        taverns = [tavern_guild(t.env, f"Tavern {shard}", shard_id=shard) for shard in (0, 1)]
        for tavern in taverns:
            persona = await t.bot.repo.create_persona(tavern.guild.id, "Mira", "Mira is an elven ranger.")
            await t.bot.repo.start_session(channel_key(tavern.channel.id), guild_id=tavern.guild.id,
                                           persona_id=persona.id)
            await tavern.alice.send(tavern.channel, "Hello!")
        assert [len(bot_messages(t.env, x.channel)) for x in taverns] == [1, 1]

        shard = t.bot.get_shard(1)
        assert shard is not None
        await shard.disconnect()
        t.env.backend.create_message(taverns[1].channel.id, taverns[1].bob.id, "Sent while shard 1 was away")
        await t.env.settle()
        assert len(bot_messages(t.env, taverns[1].channel)) == 1  # never delivered
        # A new gateway session for shard 1 (READY again), as bot-owned work so that SimCord settles
        # what it starts; SimCord has no public call for it (`_bot_scope` is not public API).
        with t.env._bot_scope():
            await shard.reconnect()
        await t.env.settle()
        assert [len(bot_messages(t.env, x.channel)) for x in taverns] == [1, 2]
        said = [x.content for x in await stored_turns(t, taverns[1].channel) if x.role is Role.USER]
        assert said == ["Hello!", "Sent while shard 1 was away"]
        assert len(t.backend.prompts) == 3


async def test_an_unsharded_bot_is_a_plain_bot(db_url: str) -> None:
    async with bot_env(db_url) as t:
        assert type(t.bot) is TavernBot
