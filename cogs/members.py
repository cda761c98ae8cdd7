"""/me: how the characters should know a member (their user persona), per server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_front.permissions import require_guild

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot

PERSONA_MAX = 1000


@app_commands.guild_only()
class Members(commands.GroupCog, group_name="me", group_description="How the characters know you here"):
    """The member's own settings."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @app_commands.command(name="persona", description="Show or set how the characters should know you")
    @app_commands.describe(text="Who you are in the story (empty shows the current one)", clear="Remove it")
    async def persona(self, interaction: discord.Interaction,
                      text: app_commands.Range[str, 1, PERSONA_MAX] | None = None, clear: bool = False) -> None:
        """Placed in the prompt as SillyTavern places the user persona, when a character answers you."""
        guild = require_guild(interaction)
        repo = self.bot.repo
        if clear:
            await repo.set_user_persona(guild.id, interaction.user.id, None)
            await interaction.response.send_message("Your persona here is removed.", ephemeral=True)
            return
        if text is not None and text.strip():
            await repo.set_user_persona(guild.id, interaction.user.id, text.strip())
            await interaction.response.send_message("Saved: the characters here will know you by it.",
                                                    ephemeral=True)
            return
        current = await repo.get_user_persona(guild.id, interaction.user.id)
        answer = (f"Your persona here:\n{discord.utils.escape_markdown(current)}" if current
                  else "You have no persona here; /me persona text:… sets one.")
        await interaction.response.send_message(answer, ephemeral=True)


async def setup(bot: TavernBot) -> None:
    """Load the member commands."""
    await bot.add_cog(Members(bot))
