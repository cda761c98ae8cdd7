"""/privacy: members export or delete what the bot stored of them in this server.

Open to every member, and only about themselves, each at most `COOLDOWN_RATE` times a minute.
`/privacy export` sends the member's own stored messages as a JSON Lines file that only they see.
`/privacy forget` deletes them after a confirmation only the same member can give. Nothing else is
changed: other members' messages are theirs, and the character's replies stay as written, names
included (a name is also an ordinary word, "Will" or "Rose", and no rule can tell which is meant).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_front.errors import TavernView
from bot.discord_front.exports import COOLDOWN_RATE, COOLDOWN_SECONDS, PAGE, per_member, send_export
from bot.discord_front.keys import CHANNEL_KEY_PREFIX
from bot.discord_front.permissions import require_guild
from bot.errors import TavernError
from persistence.records import Turn

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot
    from persistence.repository import Repository

log = logging.getLogger(__name__)

FORGET_TIMEOUT = 120.0

NOTHING_STORED = "I have no roleplay messages of yours stored in this server, so there is nothing to {verb}."
FORGET_QUESTION = (
    "Delete the {count} roleplay messages of yours I have stored in this server? Other members' messages "
    "and the character's replies stay as they are. This cannot be undone; your messages on Discord itself "
    "are not touched."
)


class NotYourQuestion(TavernError):
    """Someone other than the asker answered a personal confirmation."""

    user_message = "Only the member who asked can answer this."


# --- JSON Lines files ------------------------------------------------------------------------------


def channel_of(channel_key: str) -> str:
    """The channel id a session key names (as a string, like Discord's API), or the key itself."""
    return channel_key.removeprefix(CHANNEL_KEY_PREFIX)


def user_turn_record(item: tuple[str, Turn]) -> dict[str, Any]:
    """One line of a member's export: where and when, what they wrote, and the messages carrying it."""
    channel_key, turn = item
    return {
        "channel": channel_of(channel_key),
        "created_at": turn.created_at.isoformat(),
        "name": turn.author_name,
        "content": turn.content,
        "message_ids": [str(m) for m in turn.message_ids],
        "status": turn.status.value,
    }


def persona_record(text: str) -> dict[str, Any]:
    """The export line of a member's `/me persona`."""
    return {"persona": text}


async def user_turn_pages(repo: Repository, user_id: int, guild_id: int) -> AsyncIterator[list[tuple[str, Turn]]]:
    """A member's turns in one server, a page at a time, oldest first."""
    after = 0
    while page := await repo.user_turns(user_id, guild_id, after_id=after, limit=PAGE):
        yield page
        after = page[-1][1].id


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
        """Delete the member's turns in this server (on a database thread, after answering Discord)."""
        self.stop()
        await interaction.response.defer()
        deleted = await self.bot.repo.forget_user(self.user_id, self.guild_id)
        await interaction.edit_original_response(
            content=f"Done: deleted {deleted} stored messages of yours.", view=None
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
    @app_commands.checks.cooldown(COOLDOWN_RATE, COOLDOWN_SECONDS, key=per_member)
    async def export(self, interaction: discord.Interaction) -> None:
        """Send the member their own turns of this server as JSON Lines, privately."""
        guild = require_guild(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        persona = await self.bot.repo.get_user_persona(guild.id, interaction.user.id)

        async def pages() -> AsyncIterator[list[dict[str, Any]]]:
            if persona:
                yield [persona_record(persona)]
            async for page in user_turn_pages(self.bot.repo, interaction.user.id, guild.id):
                yield [user_turn_record(item) for item in page]

        await send_export(
            interaction,
            pages(),
            lambda record: record,
            f"tavernkeep-{guild.id}-{interaction.user.id}.jsonl",
            lambda count: f"Your {count} stored roleplay messages in this server, one JSON object per line.",
            nothing=NOTHING_STORED.format(verb="export"),
        )

    @app_commands.command(
        name="forget", description="Delete your stored roleplay messages here (others' words and replies stay)"
    )
    @app_commands.checks.cooldown(COOLDOWN_RATE, COOLDOWN_SECONDS, key=per_member)
    async def forget(self, interaction: discord.Interaction) -> None:
        """Ask for confirmation, then delete the member's turns in this server."""
        guild = require_guild(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        count = await self.bot.repo.count_user_turns(interaction.user.id, guild.id)
        if await self.bot.repo.get_user_persona(guild.id, interaction.user.id):
            count += 1  # the member's /me persona is theirs too
        if not count:
            await interaction.edit_original_response(content=NOTHING_STORED.format(verb="delete"))
            return
        await interaction.edit_original_response(
            content=FORGET_QUESTION.format(count=count), view=ConfirmForget(self.bot, interaction, guild.id)
        )


async def setup(bot: TavernBot) -> None:
    """Load the privacy commands."""
    await bot.add_cog(Privacy(bot))
