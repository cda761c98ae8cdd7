"""Keys that tie Discord objects to stored conversations."""

from __future__ import annotations

import discord


def channel_key(channel_id: int) -> str:
    """The session key of a Discord channel or thread."""
    return f"discord:{channel_id}"


def channel_id(key: str) -> int:
    """The Discord channel or thread id of a session key made by `channel_key`."""
    return int(key.removeprefix("discord:"))


def interaction_channel_key(interaction: discord.Interaction) -> str:
    """The session key of the channel an interaction was used in."""
    if interaction.channel_id is None:
        raise ValueError(f"interaction {interaction.id} has no channel")
    return channel_key(interaction.channel_id)
