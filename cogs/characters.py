"""/character: import, write, edit, list, show, export and cast the characters of a server.

list, show and export are open to every member; the rest changes something and needs Manage Server.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core import characters
from bot.core.downloads import fetch_file
from bot.discord_front.autocomplete import persona_autocomplete
from bot.discord_front.errors import TavernModal
from bot.discord_front.exports import COOLDOWN_RATE, COOLDOWN_SECONDS, per_member
from bot.discord_front.keys import channel_id_of, interaction_channel_key
from bot.discord_front.permissions import admin_only, require_admin, require_guild
from bot.errors import NoSession, TavernError
from persistence.records import ChannelSession, Persona

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot

MODAL_TIMEOUT = 900.0  # a long description takes a while to write
TITLE_MAX = 45  # Discord's limit for modal titles
LIST_MAX_CHARS = 1900
PREVIEW_CHARS = 80
FIELD_LABELS = {
    "description": "Description",
    "personality": "Personality",
    "scenario": "Scenario",
    "first_mes": "First message (greeting)",
    "mes_example": "Example dialogue (<START> blocks)",
}


async def read_upload(bot: TavernBot, file: discord.Attachment | None, url: str | None) -> bytes:
    """The bytes of an attached file or a fetched http(s) URL, within the configured size cap."""
    limit = bot.settings.characters.max_card_bytes
    if (file is None) == (url is None):
        raise TavernError("Attach a card file or give a URL (one of them).")
    if file is not None:
        if file.size > limit:
            raise TavernError(f"The file is {file.size:,} bytes; at most {limit:,} are accepted.")
        return await file.read()
    assert url is not None
    chars = bot.settings.characters
    return await fetch_file(url.strip(), max_bytes=limit, timeout=chars.fetch_timeout_seconds,
                            allow_private=chars.allow_private_urls)


class CharacterModal(TavernModal):
    """The form for a new character (name + description) or for editing one (five card fields, pre-filled)."""

    def __init__(self, bot: TavernBot, persona: Persona | None = None, fields: dict[str, str] | None = None) -> None:
        title = "New character" if persona is None else f"Edit {persona.name}"
        super().__init__(title=title[:TITLE_MAX], timeout=MODAL_TIMEOUT)
        self.bot = bot
        self.persona = persona
        self.name = discord.ui.TextInput(
            label="Name", custom_id="persona_name", min_length=1, max_length=characters.NAME_MAX,
            placeholder="Bram the bard",
        )
        self.inputs: dict[str, discord.ui.TextInput[CharacterModal]] = {}
        if persona is None:
            self.add_item(self.name)
            self._field("description", "", required=True)
        else:
            for key in characters.EDITABLE:
                self._field(key, (fields or {}).get(key, ""), required=key == "description")

    def _field(self, key: str, value: str, *, required: bool) -> None:
        item: discord.ui.TextInput[CharacterModal] = discord.ui.TextInput(
            label=FIELD_LABELS[key],
            custom_id="persona_text" if key == "description" else f"character_{key}",
            style=discord.TextStyle.paragraph,
            required=required,
            min_length=1 if required else 0,
            max_length=characters.TEXT_MAX,
            placeholder="Who the character is, how they talk, what they want…" if key == "description" else None,
            default=value[: characters.TEXT_MAX] or None,
        )
        self.inputs[key] = item
        self.add_item(item)

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """Only members with Manage Server may save a character."""
        await require_admin(interaction)
        return True

    async def on_submit(self, interaction: discord.Interaction, /) -> None:
        """Check and store the character."""
        guild = require_guild(interaction)
        service = self.bot.service
        if self.persona is None:
            saved = await characters.create_persona(
                service, guild.id, self.name.value, self.inputs["description"].value, created_by=interaction.user.id
            )
            answer = f'Created the character "{saved.name}". Use it here with /character use or /session start.'
        else:
            changes = {key: item.value for key, item in self.inputs.items()}
            saved = await characters.edit_character(service, guild.id, self.persona.name, changes)
            answer = f'Saved "{saved.name}"; channels with it play the new card from their next reply.'
        await interaction.response.send_message(answer, ephemeral=True)


def _preview(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 1] + "…"


def _channels(keys: tuple[str, ...]) -> str:
    return ", ".join(f"<#{cid}>" if (cid := channel_id_of(key)) is not None else key for key in keys)


@app_commands.guild_only()
class Characters(commands.GroupCog, group_name="character", group_description="The characters the bot plays here"):
    """The character commands."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @app_commands.command(name="import", description="Import a character card (PNG, JSON or CHARX)")
    @app_commands.describe(
        file="The card file", url="Or an http(s) link to it", replace="Replace a character of the same name"
    )
    @admin_only()
    async def import_(
        self, interaction: discord.Interaction, file: discord.Attachment | None = None, url: str | None = None,
        replace: bool = False,
    ) -> None:
        """Read the card and store the character, its greetings, lorebook and avatar."""
        guild = require_guild(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await read_upload(self.bot, file, url)
        saved = await characters.import_card(self.bot.service, guild.id, data, created_by=interaction.user.id,
                                             replace=replace)
        card = await characters.load_card(self.bot.repo, saved)
        extras = []
        if card.first_mes.strip():
            extras.append(f"{1 + len(card.alternate_greetings)} greeting(s)")
        if card.character_book and card.character_book.get("entries"):
            extras.append(f"a lorebook of {len(card.character_book['entries'])} entries")
        if card.avatar:
            extras.append("an avatar")
        detail = f" with {', '.join(extras)}" if extras else ""
        await interaction.followup.send(
            f'Imported "{discord.utils.escape_markdown(saved.name)}"{detail}. Play it here with /character use.',
            ephemeral=True,
        )

    @app_commands.command(name="create", description="Write a new character (opens a form)")
    @admin_only()
    async def create(self, interaction: discord.Interaction) -> None:
        """Open the form for a new character."""
        await interaction.response.send_modal(CharacterModal(self.bot))

    @app_commands.command(name="edit", description="Edit a character's card (opens a form)")
    @app_commands.describe(name="The character to edit")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def edit(self, interaction: discord.Interaction, name: str) -> None:
        """Open the form pre-filled with the card's fields."""
        guild = require_guild(interaction)
        persona = await characters.find_persona(self.bot.repo, guild.id, name)
        card = await characters.load_card(self.bot.repo, persona)
        fields = {key: str(getattr(card, key)) for key in characters.EDITABLE}
        await interaction.response.send_modal(CharacterModal(self.bot, persona, fields))

    @app_commands.command(name="delete", description="Delete a character")
    @app_commands.describe(name="The character to delete")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete a character of this server (refused while a channel plays it)."""
        guild = require_guild(interaction)
        try:
            await characters.delete_persona(self.bot.repo, guild.id, name)
        except characters.PersonaInUse as exc:
            raise TavernError(
                f'"{discord.utils.escape_markdown(name)}" plays in {_channels(exc.channel_keys)}; take it out there '
                "(/character use, /character remove) or reset them before deleting it."
            ) from exc
        await interaction.response.send_message(f'Deleted the character "{name}".', ephemeral=True)

    @app_commands.command(name="list", description="List this server's characters")
    async def list_personas(self, interaction: discord.Interaction) -> None:
        """Names and first words of every character here."""
        guild = require_guild(interaction)
        found = await self.bot.repo.list_personas(guild.id)
        if not found:
            await interaction.response.send_message(
                "No characters yet. Someone with Manage Server can import a card with /character import.",
                ephemeral=True,
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
        await interaction.response.send_message(f"Characters ({len(found)}):\n" + "\n".join(lines), ephemeral=True)

    @app_commands.command(name="show", description="Show a character's card")
    @app_commands.describe(name="The character to show")
    @app_commands.autocomplete(name=persona_autocomplete)
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        """The card's main fields and avatar, only to the asker."""
        guild = require_guild(interaction)
        persona = await characters.find_persona(self.bot.repo, guild.id, name)
        card = await characters.load_card(self.bot.repo, persona)
        tokens = await self.bot.service.count_tokens(card.description)
        embed = discord.Embed(title=persona.name, description=card.description[:4000])
        for key in ("personality", "scenario", "first_mes"):
            value = str(getattr(card, key)).strip()
            if value:
                embed.add_field(name=FIELD_LABELS[key], value=value[:1000], inline=False)
        embed.set_footer(text=f"{tokens} tokens · updated {persona.updated_at:%Y-%m-%d %H:%M} UTC")
        if card.avatar:
            embed.set_thumbnail(url="attachment://avatar.png")
            file = discord.File(io.BytesIO(card.avatar), filename="avatar.png")
            await interaction.response.send_message(embed=embed, file=file, ephemeral=True)
            return
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="export", description="Download a character as a card file")
    @app_commands.describe(name="The character to export", format="PNG card (default) or JSON")
    @app_commands.autocomplete(name=persona_autocomplete)
    @app_commands.checks.cooldown(COOLDOWN_RATE, COOLDOWN_SECONDS, key=per_member)
    async def export(
        self, interaction: discord.Interaction, name: str, format: Literal["png", "json"] = "png"
    ) -> None:
        """Send the card (PNG with `chara` and `ccv3`, or JSON) as a private file."""
        guild = require_guild(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        filename, data = await characters.export_card(self.bot.repo, guild.id, name, format)
        if len(data) > guild.filesize_limit:
            raise TavernError("The card is larger than this server lets me upload.")
        await interaction.followup.send(f'The card of "{discord.utils.escape_markdown(name)}".',
                                        file=discord.File(io.BytesIO(data), filename=filename), ephemeral=True)

    @app_commands.command(name="use", description="Make this the channel's main character")
    @app_commands.describe(name="The character to play here")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def use(self, interaction: discord.Interaction, name: str) -> None:
        """Same as /session start with this character."""
        guild = require_guild(interaction)
        result = await characters.start_session(self.bot.service, interaction_channel_key(interaction), guild.id,
                                                name, user=interaction.user.display_name)
        await interaction.response.send_message(result.message(), ephemeral=True)
        await self.bot.replies.after_start(interaction.channel, result)

    @app_commands.command(name="add", description="Add a character to this channel's scene")
    @app_commands.describe(name="The character to add")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def add(self, interaction: discord.Interaction, name: str) -> None:
        """Several characters share a channel: the one named (or replied to) answers."""
        guild = require_guild(interaction)
        session = await self._session(interaction)
        added = await characters.add_to_cast(self.bot.service, session, guild.id, name)
        await interaction.response.send_message(
            f'"{discord.utils.escape_markdown(added.name)}" joins the scene here.', ephemeral=True)

    @app_commands.command(name="remove", description="Take a character out of this channel's scene")
    @app_commands.describe(name="The character to remove")
    @app_commands.autocomplete(name=persona_autocomplete)
    @admin_only()
    async def remove(self, interaction: discord.Interaction, name: str) -> None:
        """The character's earlier lines stay in the history."""
        guild = require_guild(interaction)
        session = await self._session(interaction)
        removed = await characters.remove_from_cast(self.bot.service, session, guild.id, name)
        text = f'"{discord.utils.escape_markdown(name)}" left the scene.' if removed else (
            f'"{discord.utils.escape_markdown(name)}" is not in this scene.')
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="speak", description="Make a character of this scene talk now")
    @app_commands.describe(name="The character who speaks")
    @app_commands.autocomplete(name=persona_autocomplete)
    async def speak(self, interaction: discord.Interaction, name: str) -> None:
        """Queue a reply by that character (it counts against the member's button presses)."""
        session = await self._session(interaction)
        cast = await self.bot.service.cast(session)
        wanted = " ".join(name.split()).casefold()
        character = next((c for c in cast if c.name.casefold() == wanted), None)
        if character is None:
            raise TavernError(f'"{discord.utils.escape_markdown(name)}" is not in this scene; /character add it first.')
        await self.bot.replies.on_speak(interaction, character)

    async def _session(self, interaction: discord.Interaction) -> ChannelSession:
        session = await self.bot.repo.get_active_session(interaction_channel_key(interaction))
        if session is None or not session.active:
            raise NoSession("There is no running roleplay session in this channel; start one with /session start.")
        return session


async def setup(bot: TavernBot) -> None:
    """Load the character commands."""
    await bot.add_cog(Characters(bot))
