"""The Regenerate and Continue buttons under the latest reply, with a per-member press limit."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord.ext import commands

from bot.discord_front.errors import TavernView

if TYPE_CHECKING:
    from bot.discord_front.replies.jobs import ChannelReplies

log = logging.getLogger(__name__)

JobKind = Literal["reply", "regenerate", "continue", "swipe_prev", "swipe_next", "speak", "greeting"]

REGENERATE_ID = "tavernkeep:regenerate"
CONTINUE_ID = "tavernkeep:continue"
SWIPE_PREV_ID = "tavernkeep:swipe_prev"
SWIPE_NEXT_ID = "tavernkeep:swipe_next"
SWIPE_COUNT_ID = "tavernkeep:swipe_count"

# Presses of Regenerate/Continue one member may make per window in one server; each costs a generation.
PRESSES = 3
PRESS_SECONDS = 30.0
SLOW_DOWN = "Slow down: you can press these buttons again in {wait:.0f} s."


def _member_key(interaction: discord.Interaction) -> tuple[int | None, int]:
    return interaction.guild_id, interaction.user.id


class PressCooldown:
    """discord.py's `CooldownMapping` keyed by server and member, told once per window.

    Time is the event loop's clock (monotonic, and the clock a test harness moves).
    """

    def __init__(self, presses: int = PRESSES, seconds: float = PRESS_SECONDS) -> None:
        self._mapping: commands.CooldownMapping[discord.Interaction] = commands.CooldownMapping(
            commands.Cooldown(presses, seconds), _member_key
        )
        self._told: dict[tuple[int | None, int], float] = {}

    def check(self, interaction: discord.Interaction) -> tuple[float, bool] | None:
        """None if the press may go ahead; else (seconds to wait, whether to tell the member now)."""
        # discord.py takes a `current` of 0.0 for "none given" and reads the wall clock instead.
        now = asyncio.get_running_loop().time() or 1e-9
        retry_after = self._mapping.update_rate_limit(interaction, now)
        key = _member_key(interaction)
        if retry_after is None:
            self._told.pop(key, None)
            return None
        notify = self._told.get(key, -1.0) < now
        if notify:
            self._told[key] = now + retry_after
        for stale in [k for k, until in self._told.items() if until < now]:
            del self._told[stale]
        return retry_after, notify


class SwipeButton(discord.ui.Button["ReplyButtons"]):
    """◀ or ▶: show the previous or next version of the latest reply."""

    def __init__(self, kind: JobKind, *, disabled: bool) -> None:
        label, custom_id = ("◀", SWIPE_PREV_ID) if kind == "swipe_prev" else ("▶", SWIPE_NEXT_ID)
        super().__init__(label=label, custom_id=custom_id, style=discord.ButtonStyle.secondary, disabled=disabled,
                         row=1)
        self.kind = kind

    async def callback(self, interaction: discord.Interaction) -> None:
        """Hand the press to the view's press limit and the channel's queue."""
        assert self.view is not None
        await self.view._press(interaction, self.kind)


class ReplyButtons(TavernView):
    """Regenerate and Continue under the latest reply, and ◀ n/m ▶ when it has several versions (swipes);
    persistent: the message says which reply, the store which version it shows."""

    def __init__(self, replies: ChannelReplies, swipe: tuple[int, int] | None = None) -> None:
        super().__init__(timeout=None)
        self.replies = replies
        if swipe is not None:
            shown, count = swipe
            self.add_item(SwipeButton("swipe_prev", disabled=shown <= 0))
            self.add_item(discord.ui.Button(label=f"{shown + 1}/{count}", custom_id=SWIPE_COUNT_ID, disabled=True,
                                            row=1))
            self.add_item(SwipeButton("swipe_next", disabled=shown >= count - 1))

    async def _press(self, interaction: discord.Interaction, kind: JobKind) -> None:
        """Apply the per-member press limit (swipes cost no generation: only the channel's queue bounds
        them), then queue the press behind the channel's replies."""
        limited = None if kind in ("swipe_prev", "swipe_next") else self.replies.presses.check(interaction)
        if limited is None:
            await self.replies.on_button(interaction, kind)
            return
        retry_after, notify = limited
        log.info("%s press of user %s in guild %s over the limit", kind, interaction.user.id, interaction.guild_id)
        if notify:
            await interaction.response.send_message(SLOW_DOWN.format(wait=max(1.0, retry_after)), ephemeral=True)
        else:
            await interaction.response.defer()  # told already: acknowledge, change nothing

    @discord.ui.button(label="Regenerate", emoji="🔄", style=discord.ButtonStyle.secondary, custom_id=REGENERATE_ID,
                       row=0)
    async def regenerate(self, interaction: discord.Interaction, _button: discord.ui.Button[ReplyButtons]) -> None:
        """Write the latest reply again."""
        await self._press(interaction, "regenerate")

    @discord.ui.button(label="Continue", emoji="➡️", style=discord.ButtonStyle.secondary, custom_id=CONTINUE_ID,
                       row=0)
    async def continue_(self, interaction: discord.Interaction, _button: discord.ui.Button[ReplyButtons]) -> None:
        """Make the latest reply longer."""
        await self._press(interaction, "continue")
