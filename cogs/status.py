"""/status: what the bot runs on, how busy it is, and this channel's session."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_front.keys import interaction_channel_key
from bot.discord_front.shards import shard_of

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot


def format_duration(seconds: float) -> str:
    """A short duration such as "2d 3h 4m", "5m 6s" or "7s"."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")] + ([(secs, "s")] if not days else [])
    shown = [f"{value}{unit}" for value, unit in parts if value]
    return " ".join(shown[:3]) or "0s"


class Status(commands.Cog):
    """The /status command."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @app_commands.command(name="status", description="Show the model, the queue and this channel's session")
    async def status(self, interaction: discord.Interaction) -> None:
        """Model, context, workers, queue, last reply speed, uptime and this channel's session."""
        engine = self.bot.engine
        stats = engine.last_stats
        if stats is None or not stats.generated_tokens:
            speed = "no reply yet"
        else:
            speed = f"{stats.tokens_per_second:.1f} tokens/s ({stats.generated_tokens} tokens in {stats.seconds:.1f} s)"
        uptime = format_duration((discord.utils.utcnow() - self.bot.started_at).total_seconds())
        session = await self.bot.repo.get_active_session(interaction_channel_key(interaction))
        if session is None:
            here = "no roleplay session"
        else:
            state = "active" if session.active else "paused"
            persona = f'"{session.persona_name}"' if session.persona_name else "no character"
            turns = await self.bot.repo.count_turns(session.id)
            here = f"{state} session with {persona}, {turns} turns"
        lines = [
            f"**Model:** {discord.utils.escape_markdown(engine.model_name)}",
            f"**Context:** {engine.n_ctx} tokens",
            f"**Workers:** {engine.workers}",
            f"**Queue:** {engine.queue_depth} waiting, {engine.running} running",
            f"**Last reply speed:** {speed}",
            f"**Uptime:** {uptime}",
            f"**This channel:** {here}",
        ]
        if self.bot.sharding.sharded and self.bot.shard_count:
            shard = shard_of(interaction.guild_id, self.bot.shard_count)
            lines.insert(-1, f"**Shard:** {shard} of {self.bot.shard_count}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)


async def setup(bot: TavernBot) -> None:
    """Load the status command."""
    await bot.add_cog(Status(bot))
