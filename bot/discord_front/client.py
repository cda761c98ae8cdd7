"""The Discord client: intents, cogs, persistent views, command sync and a graceful shutdown.

`create_bot` builds everything; nothing is created at import time. The bot reuses the one service
path (`ChatService`) and writes replies through `ChannelReplies`; cogs only parse events.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import discord
from discord.ext import commands

from bot.config import Settings
from bot.core.sessions import ChatService
from bot.discord_front.cooldowns import MessageCooldown
from bot.discord_front.errors import install_error_handler
from bot.discord_front.intake import Intake
from bot.discord_front.recovery import Recovery
from bot.discord_front.replies import ChannelReplies, ReplyButtons
from bot.discord_front.shards import Shards, shard_of
from bot.discord_front.webhooks import CharacterVoices, RepositoryWebhooks
from bot.inference.engine import Engine
from persistence.database import Database
from persistence.repository import Repository

log = logging.getLogger(__name__)

# Loaded in this order by `setup_hook`; a module that fails to load is logged and skipped.
INITIAL_EXTENSIONS = [
    "cogs.roleplay", "cogs.sessions", "cogs.characters", "cogs.lore", "cogs.members", "cogs.status", "cogs.privacy",
]

# Meta key (per application) of the hash of the last globally synced command tree.
COMMAND_HASH_KEY = "discord.command_tree_sha256.{application_id}"

# After the engine's grace period, how long reply tasks get for their last edits and saves.
REPLY_DRAIN_SECONDS = 15.0
# discord.py waits out rate limits up to this long inside a call (30 s is its smallest allowed value);
# a longer one raises `discord.RateLimited`, and a streaming edit that meets it is skipped.
MAX_RATELIMIT_WAIT = 30.0


def command_tree_hash(tree: discord.app_commands.CommandTree[Any]) -> str:
    """SHA-256 of the global command definitions as Discord receives them (order-independent)."""
    payload = sorted(
        (command.to_dict(tree) for command in tree.get_commands()), key=lambda c: (c.get("type", 1), c["name"])
    )
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TavernBot(commands.Bot):
    """Tavernkeep on Discord: roleplay replies in channels with an active session, plus slash commands."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        database: Database,
        edit_interval: float = 1.0,
        reply_delay: float | None = None,
    ) -> None:
        # Message Content is the only privileged intent: message authors and interaction users come
        # with their member data and permissions, so no member list is fetched or cached.
        self.sharding = Shards.of(settings.discord)
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(
            # No prefix commands: everything is a slash command, and `on_message` below is a no-op.
            command_prefix=commands.when_mentioned,
            help_command=None,
            intents=intents,
            # Generated text may contain @everyone or role mentions: never let any of them ping.
            allowed_mentions=discord.AllowedMentions.none(),
            max_ratelimit_timeout=MAX_RATELIMIT_WAIT,
            **(self.sharding.client_options() if isinstance(self, discord.AutoShardedClient) else {}),
        )
        self.settings = settings
        self.engine = engine
        self.database = database
        self.repo = Repository(database)
        self.service = ChatService(self.repo, engine, settings)
        self.replies = ChannelReplies(
            self.service,
            edit_interval=edit_interval,
            queue_limit=settings.engine.per_channel_queue,
            reply_delay=settings.discord.reply_delay_seconds if reply_delay is None else reply_delay,
        )
        self.cooldown = MessageCooldown(settings.discord.cooldown_messages, settings.discord.cooldown_seconds)
        # Which messages roleplay takes, live and when catching up.
        self.intake = Intake(self, settings.discord)
        # Characters speak through channel webhooks under their own name and avatar.
        self.voices = CharacterVoices(self, RepositoryWebhooks(self.repo), self.repo.get_avatar,
                                      self.intake.own_webhook_ids)
        self.replies.voices = self.voices
        # Answers what a crash or an outage left unanswered (see `cogs.roleplay.Roleplay.on_ready`).
        self.recovery = Recovery(self.service, self.replies, self.intake, settings.discord,
                                 owns=self.sharding.owns)
        self.started_at = discord.utils.utcnow()
        self._shutting_down = False

    async def setup_hook(self) -> None:
        """Note what the last run left unanswered; load cogs, register views and the error handler, sync.

        Safe to run again on the same object (a reconnecting test harness does).
        """
        try:
            # Before any event is handled, so no reply of this process is taken for a crashed one.
            await self.recovery.scan()
        except Exception:
            log.exception("cannot check for replies cut short by the last run")
        try:
            await self.voices.load()  # the bot's own webhooks: their messages are never answered
        except Exception:
            log.exception("cannot read the character webhooks")
        for extension in INITIAL_EXTENSIONS:
            if extension in self.extensions:
                continue
            try:
                await self.load_extension(extension)
            except Exception:
                log.exception("failed to load extension %s", extension)
        # Buttons of replies posted before a restart keep working: the view answers by custom_id.
        # Registered with every button a reply may carry (the swipe arrows too).
        self.add_view(ReplyButtons(self.replies, swipe=(0, 2)))
        install_error_handler(self)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Sync slash commands: to `discord.command_guilds` at once, else globally when they changed.

        With several shard processes only the one running shard 0 syncs.
        """
        if not self.sharding.syncs_commands:
            log.info("slash commands are synced by the process running shard 0")
            return
        guild_ids = self.settings.discord.command_guilds
        for guild_id in guild_ids:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            try:
                synced = await self.tree.sync(guild=guild)
            except discord.HTTPException:
                log.exception("cannot sync commands to guild %s", guild_id)
            else:
                log.info("synced %d commands to guild %s", len(synced), guild_id)
        if guild_ids:
            return
        digest = command_tree_hash(self.tree)
        key = COMMAND_HASH_KEY.format(application_id=self.application_id)
        if await self.repo.get_meta(key) == digest:
            log.info("slash commands unchanged; global sync skipped")
            return
        try:
            synced = await self.tree.sync()
        except discord.HTTPException:
            log.exception("cannot sync commands globally")
            return
        await self.repo.set_meta(key, digest)
        log.info("synced %d global commands (global changes can take a while to show)", len(synced))

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands; the roleplay cog listens to messages."""

    async def on_ready(self) -> None:
        """Log where the bot is."""
        assert self.user is not None
        shards = ""
        if self.sharding.sharded:
            ids = self.shard_ids or range(self.shard_count or 1)
            shards = f", shards {','.join(map(str, ids))} of {self.shard_count}"
        log.info("logged in as %s (%s) in %d guilds%s", self.user, self.user.id, len(self.guilds), shards)

    def shard_guilds(self, shard_id: int) -> Callable[[int | None], bool]:
        """Whether a guild (None: direct messages) is on shard `shard_id` of the connected bot."""
        count = self.shard_count or 1
        return lambda guild_id: shard_of(guild_id, count) == shard_id

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun: new messages and clicks are not taken."""
        return not self._shutting_down

    async def shutdown(self, grace: float) -> None:
        """Stop taking messages, let running replies finish for up to `grace` seconds, store them, close.

        Replies cut at the deadline are stored as interrupted. The engine is closed here; closing it
        again afterwards is harmless.
        """
        if self._shutting_down:
            return
        self._shutting_down = True
        log.info("shutting down: letting running replies finish for up to %.0fs", grace)
        await self.replies.stop_accepting()
        await self.engine.close(grace)
        await self.replies.drain(REPLY_DRAIN_SECONDS)
        await self.close()


class ShardedTavernBot(TavernBot, commands.AutoShardedBot):
    """Tavernkeep over discord.py's AutoShardedBot: the shards of `discord.shard_ids` in one process."""


def create_bot(
    settings: Settings,
    *,
    engine: Engine,
    database: Database,
    edit_interval: float = 1.0,
    reply_delay: float | None = None,
) -> TavernBot:
    """Build the bot over a started engine and an open database.

    `edit_interval` is the pause between streaming edits of a reply, in seconds; `reply_delay`, if
    given, replaces `discord.reply_delay_seconds`. With `discord.shard_count` set the bot is an
    AutoShardedBot running the shards of `discord.shard_ids`.
    If `discord.api_base_url` is set, REST calls go there (e.g. a rate-limit proxy). discord.py keeps
    that base in the class attribute `discord.http.Route.BASE`, so it applies to the whole process.
    """
    if settings.discord.api_base_url:
        discord.http.Route.BASE = settings.discord.api_base_url.rstrip("/")
        log.info("Discord REST calls go to %s", discord.http.Route.BASE)
    kind = ShardedTavernBot if settings.discord.shard_count else TavernBot
    return kind(settings, engine=engine, database=database, edit_interval=edit_interval, reply_delay=reply_delay)
