"""`tavernkeep run` in a child process, over SimCord and a slow FakeBackend, for tests/test_crash.py.

    python -m tests.crash_child DB_FILE GRACE_SECONDS

The real entry point runs (`bot.__main__.main(["run"])` through the composition root `bot.app`: config,
database, engine, signal handlers, graceful shutdown); only the model and Discord are stand-ins. The
child builds the world of `build_world`, starts a session, has Alice say something and prints JSON lines on stdout:

    {"event": "world", "guild": ..., "channel": ..., "alice": ...}   snowflakes of the world
    {"event": "generating", "said": ID, "reply": ID, "webhook": ID}
                                                       the reply's first message is up and mapped to its
                                                       turn; posted through the character's webhook
    {"event": "closed", "shown": [...]}                after a graceful shutdown: the bot's messages
                                                       (its own and its webhooks')

The test then kills it (SIGKILL) or asks it to stop (SIGTERM).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from dataclasses import dataclass

import discord
import simcord

import bot.__main__ as entry
from bot import app
from bot.discord_front.client import TavernBot
from bot.discord_front.keys import channel_key
from tests.discord_fixtures import bot_messages, close_signal
from tests.fake_backend import FakeBackend, fake_engine
from tests.simcord_webhooks import discord_webhooks

STORY = (
    "The old road winds north past the mill, where the river bends twice before the bridge. "
    "Beyond it the forest begins."
)
TOKEN_DELAY = 0.02  # seconds per byte: the story takes about 2.4 s to write
SAID = "Tell me about the road."


@dataclass
class World:
    """The guild, channel and member both processes build, in the same order."""

    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    alice: simcord.MemberActor

    def ids(self) -> dict[str, int]:
        """The snowflakes, to compare across processes."""
        return {"guild": self.guild.id, "channel": self.channel.id, "alice": self.alice.id}


def build_world(env: simcord.Env) -> World:
    """A guild with #roleplay and Alice. SimCord allocates snowflakes deterministically, so the same
    calls in the same order, with no other bot traffic before them, give the same ids in any process."""
    guild = env.create_guild("Tavern")
    channel = guild.create_text_channel("roleplay")
    alice = guild.add_member(env.create_user("Alice"))
    return World(guild, channel, alice)


def placeholder_bot() -> discord.Client:
    """A bot that does nothing: SimCord runs it while the world is built, before the real one starts."""
    return discord.Client(intents=discord.Intents.default())


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def first_reply_message(
    env: simcord.Env, bot: TavernBot, channel: simcord.ChannelHandle, after: int = 0
) -> discord.Message:
    """Wait (real time, up to 20 s) until a reply's first message newer than `after` is posted and
    mapped to its turn."""
    for _ in range(1000):
        for message in bot_messages(env, channel):
            if message.id > after and await bot.repo.turn_by_message(message.id):
                return message
        await asyncio.sleep(0.02)
    raise TimeoutError("the reply never started")


async def start_in_simcord(bot: TavernBot, _token: str) -> None:
    """Stands in for `TavernBot.start`: connect to SimCord instead of Discord and play the scene."""
    closed = close_signal(bot)
    with discord_webhooks():
        async with simcord.run(placeholder_bot(), settle_timeout=60) as env:
            world = build_world(env)
            emit("world", **world.ids())
            await env.restart_bot(bot)
            persona = await bot.repo.create_persona(world.guild.id, "Mira", "Mira is a well-travelled ranger.")
            await bot.repo.start_session(channel_key(world.channel.id), guild_id=world.guild.id, persona_id=persona.id)
            # Not settled: the bot answers in the background while this process waits to be signalled.
            said = env.backend.create_message(world.channel.id, world.alice.id, SAID)
            reply = await first_reply_message(env, bot, world.channel)
            emit("generating", said=said.id, reply=reply.id, webhook=reply.webhook_id)
            await closed.wait()  # SIGTERM: `serve` shuts the bot down gracefully
            emit("closed", shown=[m.content for m in bot_messages(env, world.channel)])


def main(argv: list[str]) -> int:
    db_file, grace = argv[0], float(argv[1])
    os.environ["DISCORD_TOKEN"] = "not-a-real-token"
    os.environ["TAVERNKEEP_DATABASE_URL"] = f"sqlite+aiosqlite:///{db_file}"
    os.environ["TAVERNKEEP_DISCORD_REPLY_DELAY_SECONDS"] = "0"  # SimCord's clock stands still here
    backend = FakeBackend(STORY, token_delay=TOKEN_DELAY)
    app.model_path_for = lambda _settings: "model.gguf"
    app.model_engine = lambda _settings, _path: fake_engine(backend)
    app.serve = functools.partial(app.serve, grace=grace)
    TavernBot.start = start_in_simcord  # type: ignore[method-assign]
    return entry.main(["run"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
