"""Server-side permission checks for Discord commands, buttons and modals.

Discord's `default_permissions` only hides commands in the client and server admins can override
it, so every admin action is checked again here against the member's Manage Server permission.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import discord
from discord import app_commands

from bot.errors import TavernError

T = TypeVar("T")

GUILD_ONLY_MESSAGE = "This command only works in a server."


class NotAllowed(TavernError, app_commands.CheckFailure):
    """The member lacks the permission an action needs."""

    user_message = "You need the Manage Server permission to do that."


class GuildOnly(TavernError, app_commands.NoPrivateMessage):
    """A server-only action was used in a DM."""

    user_message = GUILD_ONLY_MESSAGE


class WrongGuild(TavernError, app_commands.CheckFailure):
    """An option named a channel of another server."""

    user_message = "That channel is not in this server."


def is_admin(member: discord.Member) -> bool:
    """True when the member may manage the bot here (Manage Server; owners and administrators too)."""
    return member.guild_permissions.manage_guild


def require_guild(interaction: discord.Interaction) -> discord.Guild:
    """The interaction's guild; raise GuildOnly in DMs."""
    if interaction.guild is None:
        raise GuildOnly()
    return interaction.guild


async def interaction_member(interaction: discord.Interaction) -> discord.Member:
    """The member behind the interaction, fetched when Discord sent only the user."""
    guild = require_guild(interaction)
    user = interaction.user
    if isinstance(user, discord.Member):
        return user
    return guild.get_member(user.id) or await guild.fetch_member(user.id)


async def require_admin(interaction: discord.Interaction) -> discord.Member:
    """The member, if they have Manage Server; raise NotAllowed (or GuildOnly in DMs) otherwise."""
    member = await interaction_member(interaction)
    if not is_admin(member):
        raise NotAllowed()
    return member


def require_same_guild(interaction: discord.Interaction, channel: Any) -> None:
    """Refuse a channel option that names a channel of another server (or any channel in a DM)."""
    guild = require_guild(interaction)
    channel_guild = getattr(channel, "guild_id", None)
    if channel_guild is None and getattr(channel, "guild", None) is not None:
        channel_guild = channel.guild.id
    if channel_guild != guild.id:
        raise WrongGuild()


async def check_admin(interaction: discord.Interaction) -> bool:
    """An app-command check: `require_admin`, with unexpected failures reported as command errors."""
    try:
        await require_admin(interaction)
    except app_commands.AppCommandError:
        raise
    except Exception as exc:
        # discord.py lets anything but AppCommandError escape a check unreported.
        raise app_commands.CommandInvokeError(interaction.command, exc) from exc  # type: ignore[arg-type]
    return True


def admin_only() -> Callable[[T], T]:
    """Decorator: the command runs only for members with Manage Server (checked on every use)."""
    return app_commands.check(check_admin)
