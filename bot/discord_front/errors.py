"""One place that turns errors of commands, buttons and modals into words for the user.

Expected failures (`TavernError`, failed checks) become a short ephemeral reply. Anything else is
logged with its context and the user gets a generic apology, never silence.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_front.permissions import GUILD_ONLY_MESSAGE
from bot.errors import TavernError
from bot.prompt.builder import MessageTooLarge, PromptTooLarge

log = logging.getLogger(__name__)

GENERIC_MESSAGE = "Something went wrong; it has been logged."


def _permission_names(names: list[str]) -> str:
    return ", ".join(name.replace("_", " ").replace("guild", "server").title() for name in names)


def explain(error: BaseException) -> str | None:
    """The user-facing message for an expected error; None for an unexpected one."""
    if isinstance(error, TavernError):
        return error.user_message
    if isinstance(error, PromptTooLarge | MessageTooLarge):
        return str(error)
    if isinstance(error, app_commands.NoPrivateMessage):
        return GUILD_ONLY_MESSAGE
    if isinstance(error, app_commands.MissingPermissions):
        return f"You need the {_permission_names(error.missing_permissions)} permission to do that."
    if isinstance(error, app_commands.BotMissingPermissions):
        return f"I need the {_permission_names(error.missing_permissions)} permission here to do that."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: try again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.TransformerError):
        return f"I could not understand {error.value!r} for this option."
    if isinstance(error, app_commands.CheckFailure):
        return "You can't use this command here."
    return None


def _source(interaction: discord.Interaction) -> str:
    if interaction.command is not None:
        return f"/{interaction.command.qualified_name}"
    data = interaction.data or {}
    return f"{interaction.type.name} {data.get('custom_id', '?')}"


async def send_error(interaction: discord.Interaction, message: str) -> None:
    """Send `message` to the user alone: as the response, or as a followup once responded."""
    if interaction.response.is_done():
        await interaction.followup.send(message, ephemeral=True)
    else:
        await interaction.response.send_message(message, ephemeral=True)


async def handle_error(interaction: discord.Interaction, error: BaseException, *, source: str | None = None) -> None:
    """Tell the user what went wrong; log unexpected errors with command, user, guild and channel."""
    if isinstance(error, app_commands.CommandInvokeError | commands.CommandInvokeError):
        error = error.original
    where = source or _source(interaction)
    message = explain(error)
    if message is None:
        log.error(
            "Unexpected error in %s (user %s, guild %s, channel %s)",
            where, interaction.user.id, interaction.guild_id, interaction.channel_id,
            exc_info=(type(error), error, error.__traceback__),
        )
        message = GENERIC_MESSAGE
    else:
        log.debug("%s refused for user %s: %s", where, interaction.user.id, message)
    try:
        await send_error(interaction, message)
    except discord.HTTPException:
        # The interaction expired or was deleted; the user cannot be told, so the log must say it.
        log.warning("Could not send the error message for %s to user %s", where, interaction.user.id, exc_info=True)


def install_error_handler(bot: commands.Bot) -> None:
    """Route every app-command error of `bot` through `handle_error`."""

    async def on_app_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await handle_error(interaction, error)

    bot.tree.on_error = on_app_command_error  # type: ignore[method-assign]


class TavernView(discord.ui.View):
    """A View whose callback errors are reported like command errors."""

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item, /) -> None:
        """Report the error to the user (and the log when unexpected)."""
        name = getattr(item, "label", None) or getattr(item, "custom_id", None) or type(item).__name__
        await handle_error(interaction, error, source=f"{type(self).__name__} {type(item).__name__} {name!r}")


class TavernModal(discord.ui.Modal):
    """A Modal whose submit errors are reported like command errors."""

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:
        """Report the error to the user (and the log when unexpected)."""
        await handle_error(interaction, error, source=f"{type(self).__name__} submit")
