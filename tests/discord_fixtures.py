"""Shared set-up for Discord tests: the real bot on a real SQLite database and engine, inside SimCord.

    async with bot_env(db_url) as t:              # FakeBackend engine, edit_interval 0.05
        tavern = tavern_guild(t.env)              # guild, #roleplay, Admin (Manage Server), Alice, Bob
        await start_session(t, tavern)            # persona "Mira" stored, then /session start
        await tavern.alice.send(tavern.channel, "Hello!")
        assert tavern.channel.last_message.content == "You said: Alice: Hello!"
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import discord
import simcord

from bot.config import Settings
from bot.discord_front.client import TavernBot, create_bot
from bot.discord_front.keys import channel_key
from bot.inference.engine import Engine
from persistence.database import Database
from persistence.records import ChannelSession, Turn
from tests.fake_backend import FakeBackend, fake_engine

__all__ = [
    "BotEnv",
    "Tavern",
    "bot_env",
    "bot_messages",
    "message_writes",
    "replay",
    "start_session",
    "stored_turns",
    "tavern_guild",
]


@dataclass
class BotEnv:
    """A running SimCord environment around a TavernBot, with what it was built from."""

    env: simcord.Env
    bot: TavernBot
    engine: Engine
    backend: FakeBackend | None
    database: Database
    settings: Settings
    edit_interval: float
    reply_delay: float | None = 0.0

    def fresh_bot(self) -> TavernBot:
        """A new bot over the same settings, engine and database (what a process restart builds)."""
        return create_bot(self.settings, engine=self.engine, database=self.database,
                          edit_interval=self.edit_interval, reply_delay=self.reply_delay)

    async def restart(self) -> TavernBot:
        """Restart with a fresh bot object: new READY, guilds replayed, `setup_hook` run again."""
        self.bot = self.fresh_bot()
        await self.env.restart_bot(self.bot)
        return self.bot


@asynccontextmanager
async def bot_env(
    db_url: str,
    *,
    backend: FakeBackend | None = None,
    engine: Engine | None = None,
    settings: Settings | None = None,
    edit_interval: float = 0.05,
    reply_delay: float | None = 0.0,
    **simcord_options: Any,
) -> AsyncIterator[BotEnv]:
    """Open the database, start the engine (a FakeBackend one unless `engine` is given), run the bot.

    Replies start at once (`reply_delay` 0) unless a test passes a delay, or None for the configured one:
    SimCord's clock only moves when a test advances it.

    `simcord_options` go to `simcord.run` (e.g. `settle_timeout=30`). Everything is closed on exit.
    """
    settings = settings or Settings()
    database = await Database.open(db_url)
    try:
        if engine is None:
            backend = backend or FakeBackend()
            engine = fake_engine(backend, per_key_queue=settings.engine.per_channel_queue,
                                 queue_size=settings.engine.queue_size)
        await engine.start()
        try:
            bot = create_bot(settings, engine=engine, database=database, edit_interval=edit_interval,
                             reply_delay=reply_delay)
            async with simcord.run(bot, **simcord_options) as env:
                yield BotEnv(env, bot, engine, backend, database, settings, edit_interval, reply_delay)
        finally:
            await engine.close(grace=0)
    finally:
        await database.close()


@dataclass
class Tavern:
    """A guild with a roleplay channel, an admin (Manage Server) and two members."""

    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    admin: simcord.MemberActor
    alice: simcord.MemberActor
    bob: simcord.MemberActor


def tavern_guild(env: simcord.Env, name: str = "Tavern", *, shard_id: int | None = None) -> Tavern:
    """Build a guild with #roleplay, Admin (GM role with Manage Server), Alice and Bob (on shard
    `shard_id` of a sharded bot, when given)."""
    guild = env.create_guild(name, shard_id=shard_id)
    channel = guild.create_text_channel("roleplay")
    gm = guild.create_role("GM", permissions=discord.Permissions(manage_guild=True))
    admin = guild.add_member(env.create_user("Admin"), roles=[gm])
    alice = guild.add_member(env.create_user("Alice"))
    bob = guild.add_member(env.create_user("Bob"))
    return Tavern(guild, channel, admin, alice, bob)


async def start_session(
    t: BotEnv,
    tavern: Tavern,
    *,
    persona: str = "Mira is a sharp-tongued elven ranger.",
    name: str = "Mira",
    channel: simcord.ChannelHandle | None = None,
) -> ChannelSession:
    """Store persona `name` (unless the guild has it) and have the admin `/session start` with it."""
    channel = channel or tavern.channel
    if await t.bot.repo.get_persona(tavern.guild.id, name) is None:
        await t.bot.repo.create_persona(tavern.guild.id, name, persona)
    result = await tavern.admin.slash(channel, "session start", character=name)
    assert result.response is not None and "Roleplay" in result.response.content, result.response
    session = await t.bot.repo.get_active_session(channel_key(channel.id))
    assert session is not None and session.active
    return session


async def stored_turns(t: BotEnv, channel: simcord.ChannelHandle, limit: int = 100) -> list[Turn]:
    """The turns of the channel's open session, oldest first."""
    session = await t.bot.repo.get_active_session(channel_key(channel.id))
    assert session is not None, "no session in this channel"
    return await t.bot.repo.recent_turns(session.id, limit)


def message_writes(env: simcord.Env) -> list[simcord.HttpLogEntry]:
    """Every message the bot created or edited: channel posts/edits, interaction replies, followups."""
    out = []
    for request in env.http_requests:
        body = request.json or {}
        if (
            (request.method == "POST" and request.path.endswith("/messages"))
            or (request.method == "PATCH" and "/messages/" in request.path)
            or (request.method == "POST" and request.path.endswith("/callback") and body.get("type") in (4, 7))
            or (request.method == "POST" and request.path.startswith("/webhooks/"))
        ):
            out.append(request)
    return out


def bot_messages(env: simcord.Env, channel: simcord.ChannelHandle) -> list[discord.Message]:
    """The bot's messages in `channel`, oldest first: its own and those its characters posted through
    webhooks the bot created (their author is the webhook, not the bot). Reads SimCord's backend."""
    bot_id = env.backend.bot_user.id
    hooks = {w.id for w in env.backend.webhooks.values() if w.creator_id == bot_id}
    return [m for m in channel.history() if m.author.id == bot_id or m.webhook_id in hooks]


def replay(env: simcord.Env, message: discord.Message, **changes: str) -> None:
    """Emit the MESSAGE_CREATE of `message` again, as a gateway replay does, with `changes` applied.

    Not settled: call `await env.settle()` (or let the reply run on). With a new `id` it stands in for
    a message arriving while the bot is busy, which actors cannot do since each waits for the bot.
    Uses SimCord's backend, which is not public API (see the SimCord notes on replays).
    """
    payload = next(
        p for kind, event, p in env.backend.transcript
        if kind == "GATEWAY" and event == "MESSAGE_CREATE" and p["id"] == str(message.id)
    )
    env.backend.emit("MESSAGE_CREATE", copy.deepcopy(payload) | changes)


def capture_interactions(bot) -> list[discord.Interaction]:
    """Every interaction the bot receives from now on (the real objects discord.py builds)."""
    seen: list[discord.Interaction] = []

    async def grab(interaction: discord.Interaction) -> None:
        seen.append(interaction)

    bot.add_listener(grab, "on_interaction")
    return seen


def close_signal(bot: TavernBot) -> asyncio.Event:
    """An event set once `bot.close()` has run to the end (for tests that stand in for `bot.start`)."""
    closed = asyncio.Event()
    close = bot.close

    async def close_and_tell() -> None:
        await close()
        closed.set()

    bot.close = close_and_tell  # type: ignore[method-assign]
    return closed
