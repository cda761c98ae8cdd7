"""/privacy: members export or delete what the bot stored of them in this server.

Open to every member, and only about themselves. `/privacy export` sends the member's own stored
messages as a JSON Lines file that only they see. `/privacy forget` deletes them after a
confirmation only the same member can give: the character's replies stay in the story, but every
name the member wrote under is replaced by "[removed]" in what remains.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_front.errors import TavernView
from bot.discord_front.keys import CHANNEL_KEY_PREFIX
from bot.discord_front.permissions import require_guild
from bot.errors import TavernError
from persistence.records import Turn

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot

log = logging.getLogger(__name__)

FORGET_TIMEOUT = 120.0

NOTHING_STORED = "I have no roleplay messages of yours stored in this server, so there is nothing to {verb}."
EXPORT_TOO_LARGE = "The export is {size:,} bytes even compressed, more than this server lets me upload ({limit:,})."
FORGET_QUESTION = (
    "Delete the {count} roleplay messages of yours I have stored in this server? The character's replies "
    'stay in the story, but every name you wrote under is replaced by "[removed]" in them. '
    "This cannot be undone; your messages on Discord itself are not touched."
)


class NotYourQuestion(TavernError):
    """Someone other than the asker answered a personal confirmation."""

    user_message = "Only the member who asked can answer this."


# --- JSON Lines files ------------------------------------------------------------------------------


def channel_of(channel_key: str) -> str:
    """The channel id a session key names (as a string, like Discord's API), or the key itself."""
    return channel_key.removeprefix(CHANNEL_KEY_PREFIX)


def jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    """UTF-8 JSON Lines, one compact object per line; text is kept as written (no \\u escapes)."""
    return b"".join(
        json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for record in records
    )


async def jsonl_file(records: list[dict[str, Any]], filename: str, limit: int) -> discord.File | int:
    """The records as an attachment, gzip-compressed if too large for `limit` bytes.

    Encoding and compression run off the event loop. Returns the compressed size instead of a file
    when even that is over the limit.
    """
    data = await asyncio.to_thread(jsonl, records)
    if len(data) <= limit:
        return discord.File(io.BytesIO(data), filename=filename)
    packed = await asyncio.to_thread(gzip.compress, data, 6, mtime=0)
    if len(packed) <= limit:
        return discord.File(io.BytesIO(packed), filename=filename + ".gz")
    return len(packed)


def user_turn_record(channel_key: str, turn: Turn) -> dict[str, Any]:
    """One line of a member's export: where and when, what they wrote, and the messages carrying it."""
    return {
        "channel": channel_of(channel_key),
        "created_at": turn.created_at.isoformat(),
        "name": turn.author_name,
        "content": turn.content,
        "message_ids": [str(m) for m in turn.message_ids],
        "status": turn.status.value,
    }


async def send_export(
    interaction: discord.Interaction, records: list[dict[str, Any]], filename: str, content: str
) -> None:
    """Follow up a deferred interaction with the records as a private file (or say why not)."""
    guild = require_guild(interaction)
    made = await jsonl_file(records, filename, guild.filesize_limit)
    if isinstance(made, int):
        await interaction.followup.send(
            EXPORT_TOO_LARGE.format(size=made, limit=guild.filesize_limit), ephemeral=True
        )
        return
    await interaction.followup.send(content, file=made, ephemeral=True)


# --- forget ----------------------------------------------------------------------------------------


class ConfirmForget(TavernView):
    """Delete/Cancel buttons for /privacy forget; only the member who asked may press them."""

    def __init__(self, bot: TavernBot, asked: discord.Interaction, guild_id: int) -> None:
        super().__init__(timeout=FORGET_TIMEOUT)
        self.bot = bot
        self.asked = asked
        self.user_id = asked.user.id
        self.guild_id = guild_id

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """Checked on every click: the message is private, but the answer is about one person's data."""
        if interaction.user.id != self.user_id or interaction.guild_id != self.guild_id:
            raise NotYourQuestion()
        return True

    @discord.ui.button(label="Delete my messages", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _button: discord.ui.Button[ConfirmForget]) -> None:
        """Delete the member's turns in this server and scrub their names from the rest."""
        self.stop()
        deleted = await self.bot.repo.forget_user(self.user_id, self.guild_id)
        await interaction.response.edit_message(
            content=f'Done: deleted {deleted} stored messages of yours; your names in the replies read "[removed]".',
            view=None,
        )

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _button: discord.ui.Button[ConfirmForget]) -> None:
        """Keep everything."""
        self.stop()
        await interaction.response.edit_message(content="Cancelled; nothing was deleted.", view=None)

    async def on_timeout(self) -> None:
        """Take the buttons away once they can no longer be used."""
        try:
            await self.asked.edit_original_response(content="Not confirmed; nothing was deleted.", view=None)
        except discord.HTTPException:
            log.info("could not remove the forget buttons for user %s (message gone?)", self.user_id)


# --- the commands ----------------------------------------------------------------------------------


@app_commands.guild_only()
class Privacy(commands.GroupCog, group_name="privacy", group_description="Your data stored by the bot here"):
    """Export or delete your own stored roleplay messages."""

    def __init__(self, bot: TavernBot) -> None:
        self.bot = bot

    @app_commands.command(name="export", description="Get a file of your stored roleplay messages in this server")
    async def export(self, interaction: discord.Interaction) -> None:
        """Send the member their own turns of this server as JSON Lines, privately."""
        guild = require_guild(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        turns = await self.bot.repo.user_turns(interaction.user.id, guild.id)
        if not turns:
            await interaction.followup.send(NOTHING_STORED.format(verb="export"), ephemeral=True)
            return
        records = [user_turn_record(key, turn) for key, turn in turns]
        await send_export(
            interaction,
            records,
            f"tavernkeep-{guild.id}-{interaction.user.id}.jsonl",
            f"Your {len(records)} stored roleplay messages in this server, one JSON object per line.",
        )

    @app_commands.command(
        name="forget", description="Delete your stored roleplay messages here (replies stay, your names removed)"
    )
    async def forget(self, interaction: discord.Interaction) -> None:
        """Ask for confirmation, then delete the member's turns in this server."""
        guild = require_guild(interaction)
        count = len(await self.bot.repo.user_turns(interaction.user.id, guild.id))
        if not count:
            await interaction.response.send_message(NOTHING_STORED.format(verb="delete"), ephemeral=True)
            return
        await interaction.response.send_message(
            FORGET_QUESTION.format(count=count), view=ConfirmForget(self.bot, interaction, guild.id), ephemeral=True
        )


async def setup(bot: TavernBot) -> None:
    """Load the privacy commands."""
    await bot.add_cog(Privacy(bot))
