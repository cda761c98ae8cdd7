"""`tavernkeep run` as one shard process of a two-shard bot, over SimCord and a FakeBackend, for
tests/test_shard_processes.py.

    python -m tests.shard_child SHARD_ID DATABASE_URL [MISSED_TEXT ...]

The real entry point runs (`bot.__main__.main(["run"])`, config from the environment with
`discord.shard_count = 2` and `discord.shard_ids = [SHARD_ID]`); only the model and Discord are
stand-ins. The world has guild North on shard 0 and South on shard 1, each with #roleplay and
Alice; SimCord sends each guild's events to its shard only, as Discord does. The process opens a
session in its own guild unless one is open, and with MISSED_TEXT (a restart) Alice has said those
in its channel while the process was away. It reads JSON commands on stdin:

    {"say": "North" | "South", "text": ...}          Alice says it; the bot's work is settled
    {"say": ..., "text": ..., "settle": false}       ... not settled: "generating" once the reply is up

and prints JSON lines on stdout: "world", "ready", "settled" and "generating" (each with "shown",
the bot's messages per guild), "closed" after SIGTERM (with "command_syncs", its PUTs of commands).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import discord
import simcord

import bot.__main__ as entry
from bot import app
from bot.discord_front.client import TavernBot
from bot.discord_front.keys import channel_key
from tests.crash_child import emit, first_reply_message
from tests.discord_fixtures import bot_messages, close_signal
from tests.fake_backend import FakeBackend, fake_engine
from tests.simcord_webhooks import discord_webhooks

SHARDS = 2
GUILDS = ("North", "South")  # on shards 0 and 1
REPLY = "Mira nods slowly and points down the road."
TOKEN_DELAY = 0.03  # seconds per byte: a reply takes about 1.3 s to write
# Virtual time a restarted process moves on first, so its messages are newer than any stored.
AWAY_SECONDS = 3600.0


def build_world(env: simcord.Env) -> dict[str, tuple[simcord.GuildHandle, simcord.ChannelHandle, simcord.MemberActor]]:
    """The same guilds, channels and members, with the same snowflakes, in every process."""
    world = {}
    for shard, name in enumerate(GUILDS):
        guild = env.create_guild(name, shard_id=shard)
        world[name] = (guild, guild.create_text_channel("roleplay"), guild.add_member(env.create_user("Alice")))
    return world


async def start_in_simcord(bot: TavernBot, _token: str, *, missed: list[str]) -> None:
    """Stands in for `TavernBot.start`: build the world, connect to it and follow the commands."""
    closed = close_signal(bot)
    placeholder = discord.AutoShardedClient(intents=discord.Intents.default(), shard_count=SHARDS)
    with discord_webhooks():
        async with simcord.run(placeholder, settle_timeout=60) as env:
            world = build_world(env)
            emit("world", **{name: channel.id for name, (_, channel, _) in world.items()})
            own = GUILDS[bot.shard_ids[0]]
            guild, channel, alice = world[own]
            if missed:
                env.backend.advance_clock(AWAY_SECONDS)
                for text in missed:
                    env.backend.create_message(channel.id, alice.id, text)
            await env.restart_bot(bot)
            if await bot.repo.get_active_session(channel_key(channel.id)) is None:
                persona = await bot.repo.create_persona(guild.id, "Mira", "Mira is a well-travelled ranger.")
                await bot.repo.start_session(channel_key(channel.id), guild_id=guild.id, persona_id=persona.id)
            await env.settle()

            def shown() -> dict[str, list[str]]:
                return {name: [m.content for m in bot_messages(env, c)] for name, (_, c, _) in world.items()}

            emit("ready", shown=shown())
            commands = asyncio.create_task(follow(env, bot, world, shown))
            await closed.wait()  # SIGTERM: `serve` shuts the bot down gracefully
            commands.cancel()
            syncs = [r.path for r in env.http_requests if r.method == "PUT" and r.path.endswith("/commands")]
            emit("closed", shown=shown(), command_syncs=len(syncs))


async def follow(env: simcord.Env, bot: TavernBot, world: dict, shown) -> None:
    """Carry out the commands read from stdin, one at a time."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:  # a daemon thread: a pending read does not hold up the shutdown
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)

    threading.Thread(target=read, daemon=True).start()
    while True:
        command = json.loads(await lines.get())
        _, channel, alice = world[command["say"]]
        said = env.backend.create_message(channel.id, alice.id, command["text"])
        if command.get("settle", True):
            await env.settle()
            emit("settled", said=said.id, shown=shown())
            continue
        await first_reply_message(env, bot, channel, after=said.id)
        emit("generating", said=said.id, shown=shown())


def main(argv: list[str]) -> int:
    shard, url, missed = int(argv[0]), argv[1], argv[2:]
    os.environ.update({
        "DISCORD_TOKEN": "not-a-real-token",
        "TAVERNKEEP_DATABASE_URL": url,
        "TAVERNKEEP_DISCORD_SHARD_COUNT": str(SHARDS),
        "TAVERNKEEP_DISCORD_SHARD_IDS": str(shard),
        "TAVERNKEEP_DISCORD_REPLY_DELAY_SECONDS": "0",  # SimCord's clock stands still here
    })
    backend = FakeBackend(REPLY, token_delay=TOKEN_DELAY)
    app.model_path_for = lambda _settings: "model.gguf"
    app.model_engine = lambda _settings, _path: fake_engine(backend)

    async def start(bot: TavernBot, token: str) -> None:
        await start_in_simcord(bot, token, missed=missed)

    TavernBot.start = start  # type: ignore[method-assign]
    return entry.main(["run"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
