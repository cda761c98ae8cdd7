"""/session: start, pause, reset, tune and export the roleplay session of a channel (Manage Server only).

A thread or forum post is a channel of its own here: it has its own session, started inside it, and
a session of its parent channel does not answer in it. Stories in threads stay apart that way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core import channel_settings, characters
from bot.discord_front.autocomplete import persona_autocomplete
from bot.discord_front.errors import TavernView
from bot.discord_front.exports import COOLDOWN_RATE, COOLDOWN_SECONDS, PAGE, per_member, send_export
from bot.discord_front.keys import channel_key, interaction_channel_key
from bot.discord_front.permissions import (
    WrongGuild,
    check_admin,
    interaction_member,
    require_admin,
    require_guild,
    require_same_guild,
)
from bot.discord_front.replies import ReplyChannel
from bot.errors import NoSession, TavernError
from persistence.records import ChannelSession, Turn

if TYPE_CHECKING:
    from bot.discord_front.client import TavernBot
    from persistence.repository import Repository

log = logging.getLogger(__name__)

RESET_TIMEOUT = 120.0


class CannotRead(TavernError):
    """The member may not read the channel they asked about."""

    user_message = "You can't read that channel's history, so you can't export it."


def _range(name: str) -> str:
    return channel_settings.allowed_values(name).removeprefix("a ")


async def current_session(bot: TavernBot, interaction: discord.Interaction) -> ChannelSession:
    """The channel's open session; NoSession (telling how to start one) if there is none."""
    session = await bot.repo.get_active_session(interaction_channel_key(interaction))
    if session is None:
        raise NoSession("There is no roleplay session in this channel; start one with /session start.")
    return session


def session_turn_record(turn: Turn) -> dict[str, Any]:
    """One line of a session log: who wrote what, when, and the messages carrying it."""
    return {
        "id": turn.id,
        "role": turn.role.value,
        "author_id": None if turn.author_id is None else str(turn.author_id),
        "name": turn.author_name,
        "content": turn.content,
        "created_at": turn.created_at.isoformat(),
        "status": turn.status.value,
        "message_ids": [str(m) for m in turn.message_ids],
    }


async def session_turn_pages(repo: Repository, session_id: int) -> AsyncIterator[list[Turn]]:
    """Every turn of a session, a page at a time, oldest first."""
    after = 0
    while page := await repo.session_turns(session_id, after_id=after, limit=PAGE):
        yield page
        after = page[-1].id


async def export_target(
    bot: TavernBot,
    interaction: discord.Interaction,
    channel: app_commands.AppCommandChannel | app_commands.AppCommandThread | None,
) -> ReplyChannel:
    """The channel `/session export` is about: this one, or the option's, which must be of this server.

    discord.py gives a channel option the interaction's guild id whatever the channel's real server,
    so the option is looked up in the client's cache (or fetched: archived threads are not cached),
    which knows the server each channel belongs to.
    """
    found: Any = interaction.channel
    if channel is not None:
        found = bot.get_channel(channel.id)
        if found is None:
            try:
                found = await bot.fetch_channel(channel.id)
            except (discord.NotFound, discord.Forbidden):
                raise WrongGuild() from None
    require_same_guild(interaction, found)
    if not isinstance(found, ReplyChannel):
        raise NoSession("Roleplay sessions only exist in text channels and threads.")
    return found


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
        greeting = await self.bot.service.greet(fresh, interaction.user.display_name)
        await interaction.response.edit_message(
            content=f'History archived; the story starts over with "{name}".', view=None
        )
        if greeting is not None and isinstance(interaction.channel, ReplyChannel):
            self.bot.replies.post_greeting(interaction.channel, greeting.id)

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
    @app_commands.describe(character="The main character here (default: keep the current one)")
    @app_commands.autocomplete(character=persona_autocomplete)
    async def start(self, interaction: discord.Interaction, character: str | None = None) -> None:
        """Start or resume the channel's session; a new story opens with the character's greeting."""
        guild = require_guild(interaction)
        result = await characters.start_session(
            self.bot.service, interaction_channel_key(interaction), guild.id, character,
            user=interaction.user.display_name,
        )
        await interaction.response.send_message(result.message(), ephemeral=True)
        await self.bot.replies.after_start(interaction.channel, result)

    @app_commands.command(name="note", description="Show or set this channel's author's note")
    @app_commands.describe(
        text="Guidance placed in the story (empty shows the current note)",
        depth="How many messages from the end it goes (default 4)",
        role="Who it is written as (default system)",
        clear="Remove the note",
    )
    async def note(
        self, interaction: discord.Interaction, text: app_commands.Range[str, 1, 1000] | None = None,
        depth: app_commands.Range[int, 0, 100] | None = None, role: Literal["system", "user", "model"] | None = None,
        clear: bool = False,
    ) -> None:
        """The author's note is stored with the session and goes into every prompt at its depth."""
        session = await current_session(self.bot, interaction)
        settings = dict(session.settings)
        if clear:
            for key in ("note", "note_depth", "note_role"):
                settings.pop(key, None)
        else:
            if text is not None:
                settings["note"] = text.strip()
            if depth is not None:
                settings["note_depth"] = depth
            if role is not None:
                settings["note_role"] = role
        if settings != session.settings:
            await self.bot.repo.update_session_settings(session.id, settings)
        current = settings.get("note", "")
        if not current:
            answer = "This channel has no author's note." if not clear else "Author's note removed."
        else:
            answer = (f"Author's note (depth {settings.get('note_depth', 4)}, {settings.get('note_role', 'system')}):"
                      f"\n{discord.utils.escape_markdown(current)}")
        await interaction.response.send_message(answer, ephemeral=True)

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

    @app_commands.command(name="export", description="Download a channel's current session log (JSON Lines)")
    @app_commands.describe(channel="The channel or thread to export (default: this one)")
    @app_commands.checks.cooldown(COOLDOWN_RATE, COOLDOWN_SECONDS, key=per_member)
    async def export(
        self,
        interaction: discord.Interaction,
        channel: app_commands.AppCommandChannel | app_commands.AppCommandThread | None = None,
    ) -> None:
        """Send the channel's open session (running or paused), every turn, as a private file."""
        target = await export_target(self.bot, interaction, channel)
        member = await interaction_member(interaction)
        readable = target.permissions_for(member)
        if not (readable.view_channel and readable.read_message_history):
            raise CannotRead()
        session = await self.bot.repo.get_active_session(channel_key(target.id))
        if session is None:
            raise NoSession(f"There is no roleplay session in #{discord.utils.escape_markdown(target.name)}.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        name = session.persona_name or "the character"
        await send_export(
            interaction,
            session_turn_pages(self.bot.repo, session.id),
            session_turn_record,
            f"tavernkeep-session-{target.id}-{session.id}.jsonl",
            lambda count: f'The session log of #{discord.utils.escape_markdown(target.name)} with "{name}": '
            f"{count} turns, one JSON object per line.",
        )


async def setup(bot: TavernBot) -> None:
    """Load the session commands."""
    await bot.add_cog(Sessions(bot))
