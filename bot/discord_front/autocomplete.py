"""Autocomplete of command options, shared by the cogs that take the same option."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot.core import characters

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot


async def persona_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete character names of the interaction's server."""
    if interaction.guild_id is None:
        return []
    bot: TavernBot = interaction.client  # type: ignore[assignment]
    names = await characters.matching_names(bot.repo, interaction.guild_id, current)
    return [app_commands.Choice(name=name, value=name) for name in names]


async def lorebook_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete lorebook names of the interaction's server."""
    if interaction.guild_id is None:
        return []
    bot: TavernBot = interaction.client  # type: ignore[assignment]
    needle = current.casefold().strip()
    names = [b.name for b in await bot.repo.list_lorebooks(interaction.guild_id) if needle in b.name.casefold()]
    return [app_commands.Choice(name=name, value=name) for name in names[: characters.CHOICES_MAX]]
