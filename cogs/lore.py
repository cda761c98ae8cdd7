"""/lore: import SillyTavern world files and attach them to channels (Manage Server), list them (everyone)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core import characters
from bot.discord_front.autocomplete import lorebook_autocomplete
from bot.discord_front.keys import interaction_channel_key
from bot.discord_front.permissions import admin_only, require_guild
from bot.errors import TavernError

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot
    from persistence.records import Lorebook


async def _book(bot: TavernBot, guild_id: int, name: str) -> Lorebook:
    book = await bot.repo.get_lorebook(guild_id, name)
    if book is None:
        raise characters.UnknownLorebook(name)
    return book


@app_commands.guild_only()
class Lore(commands.GroupCog, group_name="lore", group_description="Lorebooks (world info) of this server"):
    """The lorebook commands."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @app_commands.command(name="import", description="Import a SillyTavern world file (JSON)")
    @app_commands.describe(file="The world file", name="Its name here (default: the file name)",
                           replace="Replace a lorebook of the same name")
    @admin_only()
    async def import_(self, interaction: discord.Interaction, file: discord.Attachment, name: str | None = None,
                      replace: bool = False) -> None:
        """Check and store the lorebook; attach it to channels with /lore attach."""
        guild = require_guild(interaction)
        limit = self.bot.settings.characters.max_card_bytes
        if file.size > limit:
            raise TavernError(f"The file is {file.size:,} bytes; at most {limit:,} are accepted.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await file.read()
        title = name or file.filename.rsplit(".", 1)[0]
        book = await characters.import_lorebook(self.bot.service, guild.id, title, data,
                                                created_by=interaction.user.id, replace=replace)
        await interaction.followup.send(
            f'Imported the lorebook "{discord.utils.escape_markdown(book.name)}" ({len(book.entries)} entries). '
            "Attach it to a channel with /lore attach.", ephemeral=True)

    @app_commands.command(name="attach", description="Use a lorebook in this channel")
    @app_commands.autocomplete(name=lorebook_autocomplete)
    @admin_only()
    async def attach(self, interaction: discord.Interaction, name: str) -> None:
        """Several books may be attached to one channel."""
        guild = require_guild(interaction)
        book = await _book(self.bot, guild.id, name)
        added = await self.bot.repo.attach_lorebook(interaction_channel_key(interaction), book.id)
        text = "is now used in this channel" if added else "was already used in this channel"
        await interaction.response.send_message(f'"{discord.utils.escape_markdown(book.name)}" {text}.',
                                                ephemeral=True)

    @app_commands.command(name="detach", description="Stop using a lorebook in this channel")
    @app_commands.autocomplete(name=lorebook_autocomplete)
    @admin_only()
    async def detach(self, interaction: discord.Interaction, name: str) -> None:
        """The book stays in the server."""
        guild = require_guild(interaction)
        book = await _book(self.bot, guild.id, name)
        removed = await self.bot.repo.detach_lorebook(interaction_channel_key(interaction), book.id)
        text = "is no longer used here" if removed else "was not used in this channel"
        await interaction.response.send_message(f'"{discord.utils.escape_markdown(book.name)}" {text}.',
                                                ephemeral=True)

    @app_commands.command(name="delete", description="Delete a lorebook (it leaves every channel)")
    @app_commands.autocomplete(name=lorebook_autocomplete)
    @admin_only()
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete a lorebook of this server."""
        guild = require_guild(interaction)
        if not await self.bot.repo.delete_lorebook(guild.id, name):
            raise characters.UnknownLorebook(name)
        await interaction.response.send_message(f'Deleted the lorebook "{discord.utils.escape_markdown(name)}".',
                                                ephemeral=True)

    @app_commands.command(name="list", description="List this server's lorebooks and those used here")
    async def list_books(self, interaction: discord.Interaction) -> None:
        """Every book of the server; those attached to this channel are marked."""
        guild = require_guild(interaction)
        books = await self.bot.repo.list_lorebooks(guild.id)
        if not books:
            await interaction.response.send_message("No lorebooks yet; /lore import adds one.", ephemeral=True)
            return
        here = {b.id for b in await self.bot.repo.channel_lorebooks(interaction_channel_key(interaction))}
        lines = [f"• **{discord.utils.escape_markdown(b.name)}**{' (used here)' if b.id in here else ''}"
                 for b in books[:50]]
        await interaction.response.send_message(f"Lorebooks ({len(books)}):\n" + "\n".join(lines), ephemeral=True)


async def setup(bot: TavernBot) -> None:
    """Load the lorebook commands."""
    await bot.add_cog(Lore(bot))
