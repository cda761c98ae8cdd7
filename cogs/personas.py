"""/persona: write, edit, list and choose the personas of a server.

list and show are open to every member; create, edit, delete and use need Manage Server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core import personas
from bot.discord_front.autocomplete import persona_autocomplete
from bot.discord_front.errors import TavernModal
from bot.discord_front.keys import channel_id_of, interaction_channel_key
from bot.discord_front.permissions import admin_only, require_admin, require_guild
from bot.errors import TavernError
from persistence.records import Persona

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot

MODAL_TIMEOUT = 900.0  # a long persona takes a while to write
TITLE_MAX = 45  # Discord's limit for modal titles
LIST_MAX_CHARS = 1900
PREVIEW_CHARS = 80


class PersonaModal(TavernModal):
    """The form for a new persona (name + text) or for editing one (text, pre-filled)."""

    def __init__(self, bot: TavernBot, persona: Persona | None = None) -> None:
        title = "New persona" if persona is None else f"Edit {persona.name}"
        super().__init__(title=title[:TITLE_MAX], timeout=MODAL_TIMEOUT)
        self.bot = bot
        self.persona = persona
        self.name = discord.ui.TextInput(
            label="Name", custom_id="persona_name", min_length=1, max_length=personas.NAME_MAX,
            placeholder="Bram the bard",
        )
        self.text = discord.ui.TextInput(
            label="Persona",
            custom_id="persona_text",
            style=discord.TextStyle.paragraph,
            min_length=1,
            max_length=personas.TEXT_MAX,
            placeholder="Who the character is, how they talk, what they want…",
            default=persona.text[: personas.TEXT_MAX] if persona is not None else None,
        )
        if persona is None:
            self.add_item(self.name)
        self.add_item(self.text)

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """Only members with Manage Server may save a persona."""
        await require_admin(interaction)
        return True

    async def on_submit(self, interaction: discord.Interaction, /) -> None:
        """Check and store the persona."""
        guild = require_guild(interaction)
        service = self.bot.service
        if self.persona is None:
            saved = await personas.create_persona(
                service, guild.id, self.name.value, self.text.value, created_by=interaction.user.id
            )
            answer = f'Created the persona "{saved.name}". Use it here with /persona use or /session start.'
        else:
            saved = await personas.update_persona(service, guild.id, self.persona.name, self.text.value)
            answer = f'Saved the persona "{saved.name}"; channels using it play the new text from their next reply.'
        await interaction.response.send_message(answer, ephemeral=True)


def _preview(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 1] + "…"


@app_commands.guild_only()
class Personas(commands.GroupCog, group_name="persona", group_description="The characters the bot can play here"):
    """The persona commands."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @app_commands.command(name="create", description="Write a new persona (opens a form)")
    @admin_only()
    async def create(self, interaction: discord.Interaction) -> None:
        """Open the form for a new persona."""
        await interaction.response.send_modal(PersonaModal(self.bot))

    @app_commands.command(name="edit", description="Rewrite a persona (opens a form)")
    @app_commands.describe(name="The persona to edit")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def edit(self, interaction: discord.Interaction, name: str) -> None:
        """Open the form pre-filled with the persona's text."""
        guild = require_guild(interaction)
        persona = await personas.find_persona(self.bot.repo, guild.id, name)
        await interaction.response.send_modal(PersonaModal(self.bot, persona))

    @app_commands.command(name="delete", description="Delete a persona")
    @app_commands.describe(name="The persona to delete")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete a persona of this server."""
        guild = require_guild(interaction)
        try:
            await personas.delete_persona(self.bot.repo, guild.id, name)
        except personas.PersonaInUse as exc:
            channels = ", ".join(
                f"<#{cid}>" if (cid := channel_id_of(key)) is not None else key for key in exc.channel_keys
            )
            raise TavernError(
                f'"{discord.utils.escape_markdown(name)}" is the persona of {channels}; give those channels '
                "another one (/persona use) or reset them before deleting it."
            ) from exc
        await interaction.response.send_message(f'Deleted the persona "{name}".', ephemeral=True)

    @app_commands.command(name="list", description="List this server's personas")
    async def list_personas(self, interaction: discord.Interaction) -> None:
        """Names and first words of every persona here."""
        guild = require_guild(interaction)
        found = await self.bot.repo.list_personas(guild.id)
        if not found:
            await interaction.response.send_message(
                "No personas yet. Someone with Manage Server can write one with /persona create.", ephemeral=True
            )
            return
        lines: list[str] = []
        size = 0
        for index, persona in enumerate(found):
            name, preview = (discord.utils.escape_markdown(part) for part in (persona.name, _preview(persona.text)))
            line = f"• **{name}**: {preview}"
            if size + len(line) > LIST_MAX_CHARS:
                lines.append(f"…and {len(found) - index} more.")
                break
            lines.append(line)
            size += len(line) + 1
        await interaction.response.send_message(f"Personas ({len(found)}):\n" + "\n".join(lines), ephemeral=True)

    @app_commands.command(name="show", description="Show a persona's full text")
    @app_commands.describe(name="The persona to show")
    @app_commands.autocomplete(name=persona_autocomplete)
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        """The whole persona, only to the asker."""
        guild = require_guild(interaction)
        persona = await personas.find_persona(self.bot.repo, guild.id, name)
        tokens = await self.bot.service.count_tokens(persona.text)
        embed = discord.Embed(title=persona.name, description=persona.text)
        embed.set_footer(text=f"{tokens} tokens · updated {persona.updated_at:%Y-%m-%d %H:%M} UTC")
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="use", description="Play this persona in this channel")
    @app_commands.describe(name="The persona to play here")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def use(self, interaction: discord.Interaction, name: str) -> None:
        """Same as /session start with this persona."""
        guild = require_guild(interaction)
        result = await personas.start_session(self.bot.service, interaction_channel_key(interaction), guild.id, name)
        await interaction.response.send_message(result.message(), ephemeral=True)


async def setup(bot: TavernBot) -> None:
    """Load the persona commands."""
    await bot.add_cog(Personas(bot))
