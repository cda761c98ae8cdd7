"""Per-member message limits in roleplay channels.

A member may have at most `messages` roleplay messages taken per `seconds` in one server (a sliding
window). Messages beyond that are neither stored nor answered, and the member is told once per
window with a short reply that deletes itself. Time is read from the event loop's clock: it is
monotonic, and it is the clock a test harness moves.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import discord

log = logging.getLogger(__name__)

NOTICE = "Slow down a little: at most {messages} messages every {seconds} here. Try again in {wait}."
NOTICE_SECONDS = 10.0  # the notice deletes itself after this long


def _seconds(value: float) -> str:
    return f"{math.ceil(value)} s"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message over the limit: when the member may talk again, and whether to tell them now."""

    retry_after: float
    notify: bool


class MessageCooldown:
    """Counts each member's roleplay messages per server; `messages == 0` turns the limit off."""

    def __init__(self, messages: int, seconds: float, *, clock: Callable[[], float] | None = None) -> None:
        if messages < 0 or seconds <= 0:
            raise ValueError("messages must be >= 0 and seconds > 0")
        self.messages = messages
        self.seconds = seconds
        self._clock = clock
        self._taken: dict[tuple[int, int], deque[float]] = {}
        self._told: set[tuple[int, int]] = set()
        self._sweep_size = 256
        self._sweep_time = -math.inf

    @property
    def enabled(self) -> bool:
        """False when the configuration turns the limit off."""
        return self.messages > 0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def take(self, guild_id: int, user_id: int) -> Refusal | None:
        """Count one message of the member; None if it is within the limit, else why not."""
        if not self.enabled:
            return None
        now = self._now()
        key = (guild_id, user_id)
        taken = self._taken.setdefault(key, deque())
        while taken and taken[0] <= now - self.seconds:
            taken.popleft()
        if len(taken) < self.messages:
            taken.append(now)
            self._told.discard(key)
            self._sweep(now)
            return None
        notify = key not in self._told
        self._told.add(key)
        return Refusal(retry_after=taken[0] + self.seconds - now, notify=notify)

    def _sweep(self, now: float) -> None:
        """Forget members whose window has passed, so the table stays as small as the active crowd.

        Runs once per window, or sooner when the table doubled: linear work spread over as many calls.
        """
        if len(self._taken) < self._sweep_size and now < self._sweep_time:
            return
        for key in [k for k, taken in self._taken.items() if not taken or taken[-1] <= now - self.seconds]:
            del self._taken[key]
            self._told.discard(key)
        self._sweep_size = max(256, 2 * len(self._taken))
        self._sweep_time = now + self.seconds

    async def admit(self, message: discord.Message) -> bool:
        """True if the message may be stored and answered; otherwise tell its author (once per window)."""
        if message.guild is None:
            return True
        refusal = self.take(message.guild.id, message.author.id)
        if refusal is None:
            return True
        log.info(
            "message %s of user %s in guild %s over the limit (%d per %gs)",
            message.id, message.author.id, message.guild.id, self.messages, self.seconds,
        )
        if refusal.notify:
            text = NOTICE.format(
                messages=self.messages, seconds=_seconds(self.seconds), wait=_seconds(refusal.retry_after)
            )
            try:
                await message.reply(
                    text,
                    delete_after=NOTICE_SECONDS,
                    mention_author=False,
                    allowed_mentions=discord.AllowedMentions.none(),
                )
            except discord.HTTPException as exc:
                log.warning("cannot post the slow-down notice in channel %s: %s", message.channel.id, exc)
        return False
