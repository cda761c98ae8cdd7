"""/session: start, pause, reset and tune the roleplay session of a channel (Manage Server only)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import channel_settings, personas
from bot.discord_errors import TavernView
from bot.discord_keys import interaction_channel_key
from bot.errors import NoSession
from bot.permissions import check_admin, require_admin, require_guild
from cogs.personas import persona_autocomplete
from persistence.records import ChannelSession

if TYPE_CHECKING:
    from bot.discord_bot import TavernBot

log = logging.getLogger(__name__)

RESET_TIMEOUT = 120.0


def _range(name: str) -> str:
    return channel_settings.allowed_values(name).removeprefix("a ")


async def current_session(bot: TavernBot, interaction: discord.Interaction) -> ChannelSession:
    """The channel's open session; NoSession (telling how to start one) if there is none."""
    session = await bot.repo.get_active_session(interaction_channel_key(interaction))
    if session is None:
        raise NoSession("There is no roleplay session in this channel; start one with /session start.")
    return session


class ConfirmReset(TavernView):
    """Confirm/Cancel buttons for /session reset; the clicker's Manage Server is checked again."""

    def __init__(self, bot: TavernBot, asked: discord.Interaction) -> None:
        super().__init__(timeout=RESET_TIMEOUT)
        self.bot = bot
        self.asked = asked

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """Only members with Manage Server may answer."""
        await require_admin(interaction)
        return True

    @discord.ui.button(label="Reset", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _button: discord.ui.Button[ConfirmReset]) -> None:
        """Archive the history and start the story over."""
        self.stop()
        session = await current_session(self.bot, interaction)
        self.bot.engine.cancel_key(session.channel_key)
        fresh = await self.bot.repo.archive_session(session.id)
        name = fresh.persona_name or "the character"
        await interaction.response.edit_message(
            content=f'History archived; the story starts over with "{name}".', view=None
        )

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _button: discord.ui.Button[ConfirmReset]) -> None:
        """Leave everything as it is."""
        self.stop()
        await interaction.response.edit_message(content="Reset cancelled; nothing was changed.", view=None)

    async def on_timeout(self) -> None:
        """Take the buttons away once they can no longer be used."""
        try:
            await self.asked.edit_original_response(content="Reset not confirmed; nothing was changed.", view=None)
        except discord.HTTPException:
            log.info("could not remove the reset buttons in channel %s (message gone?)", self.asked.channel_id)


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Sessions(commands.GroupCog, group_name="session", group_description="Run this channel's roleplay session"):
    """The session commands; every one of them needs Manage Server."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """Server-side Manage Server check for every command here (default_permissions can be overridden)."""
        return await check_admin(interaction)

    @app_commands.command(name="start", description="Start or resume roleplay in this channel")
    @app_commands.describe(persona="Persona the character plays (default: keep the current one)")
    @app_commands.autocomplete(persona=persona_autocomplete)
    async def start(self, interaction: discord.Interaction, persona: str | None = None) -> None:
        """Start or resume the channel's session."""
        guild = require_guild(interaction)
        result = await personas.start_session(
            self.bot.service, interaction_channel_key(interaction), guild.id, persona
        )
        await interaction.response.send_message(result.message(), ephemeral=True)

    @app_commands.command(name="stop", description="Pause roleplay here (history is kept)")
    async def stop(self, interaction: discord.Interaction) -> None:
        """Pause the session and stop any reply being written."""
        session = await current_session(self.bot, interaction)
        if not session.active:
            await interaction.response.send_message(
                "The session is already paused; /session start resumes it.", ephemeral=True
            )
            return
        await self.bot.repo.set_session_active(session.id, False)
        stopped = self.bot.engine.cancel_key(session.channel_key)
        note = " The reply being written was stopped." if stopped else ""
        await interaction.response.send_message(
            f"Roleplay paused: I won't answer here until /session start.{note}", ephemeral=True
        )

    @app_commands.command(name="reset", description="Start the story over (the old history is archived)")
    async def reset(self, interaction: discord.Interaction) -> None:
        """Ask for confirmation before archiving the history."""
        session = await current_session(self.bot, interaction)
        turns = await self.bot.repo.count_turns(session.id)
        view = ConfirmReset(self.bot, interaction)
        await interaction.response.send_message(
            f"Start the story over? The {turns} turns so far will be archived and the character forgets them.",
            view=view,
            ephemeral=True,
        )

    @app_commands.command(name="settings", description="Show or change this channel's reply settings")
    @app_commands.describe(
        reply_mode="Answer every message, or only those that mention me",
        ignore_prefix=f"Messages starting with this are not answered ({_range('ignore_prefix')})",
        temperature=f"Randomness ({_range('temperature')})",
        top_p=f"Nucleus sampling ({_range('top_p')})",
        top_k=f"Sample from the k likeliest tokens, 0 = all ({_range('top_k')})",
        min_p=f"Drop tokens less likely than this share of the top one ({_range('min_p')})",
        repeat_penalty=f"Penalty for repeating tokens ({_range('repeat_penalty')})",
        max_reply_tokens=f"Longest reply in tokens ({_range('max_new_tokens')})",
        use_defaults="Forget this channel's settings first and use the configured ones",
    )
    async def settings(
        self,
        interaction: discord.Interaction,
        reply_mode: Literal["all", "mention"] | None = None,
        ignore_prefix: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        max_reply_tokens: int | None = None,
        use_defaults: bool = False,
    ) -> None:
        """Validate and store the given settings; with none given, show the effective ones."""
        session = await current_session(self.bot, interaction)
        given = {
            "reply_mode": reply_mode,
            "ignore_prefix": ignore_prefix,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repeat_penalty": repeat_penalty,
            "max_new_tokens": max_reply_tokens,
        }
        changes = {name: value for name, value in given.items() if value is not None}
        config = self.bot.settings
        if not changes and not use_defaults:
            shown = channel_settings.describe(session.settings, config)
            await interaction.response.send_message(
                f"Settings of this channel:\n{discord.utils.escape_markdown(shown)}", ephemeral=True
            )
            return
        if use_defaults:
            changes = {name: None for name in channel_settings.FIELDS} | changes
        new = channel_settings.apply(session.settings, changes, max_reply_tokens=config.model.max_new_tokens)
        if new != session.settings:
            await self.bot.repo.update_session_settings(session.id, new)
        shown = channel_settings.describe(new, config)
        await interaction.response.send_message(
            f"Settings saved:\n{discord.utils.escape_markdown(shown)}", ephemeral=True
        )


async def setup(bot: TavernBot) -> None:
    """Load the session commands."""
    await bot.add_cog(Sessions(bot))
