"""The one definition of the session key of a Discord channel (both directions)."""

from __future__ import annotations

import discord

# Session keys of Discord channels start with this; other front ends (the terminal) use their own.
CHANNEL_KEY_PREFIX = "discord:"


def channel_key(channel_id: int) -> str:
    """The session key of a Discord channel or thread."""
    return f"{CHANNEL_KEY_PREFIX}{channel_id}"


def channel_id_of(key: str) -> int | None:
    """The Discord channel id of a session key (None for sessions of other front ends)."""
    if not key.startswith(CHANNEL_KEY_PREFIX):
        return None
    rest = key.removeprefix(CHANNEL_KEY_PREFIX)
    return int(rest) if rest.isascii() and rest.isdigit() else None


def interaction_channel_key(interaction: discord.Interaction) -> str:
    """The session key of the channel an interaction was used in."""
    if interaction.channel_id is None:
        raise ValueError(f"interaction {interaction.id} has no channel")
    return channel_key(interaction.channel_id)
