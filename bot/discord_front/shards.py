"""Which guilds this process answers when the bot runs as several shard processes.

Discord sends a guild's events to shard `(guild_id >> 22) % shard_count` only, and direct messages
to shard 0. Several processes share one database, so whatever a process does to channels it was not
told about (crash recovery, catch-up, the slash-command sync) must be limited to its own shards.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.config import DiscordSettings


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard Discord sends a guild's events to (0 for direct messages, `guild_id` None)."""
    return 0 if guild_id is None or shard_count <= 1 else (guild_id >> 22) % shard_count


@dataclass(frozen=True, slots=True)
class Shards:
    """The shards of the whole bot (`count`; 0: unsharded, -1: Discord's recommendation, known once
    connected) and those this process runs (`ids`; empty: all)."""

    count: int = 0
    ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, settings: DiscordSettings) -> Shards:
        return cls(settings.shard_count, frozenset(settings.shard_ids))

    @property
    def sharded(self) -> bool:
        """True when the bot connects through discord.py's AutoShardedBot."""
        return self.count != 0

    @property
    def runs_all(self) -> bool:
        """True when this process runs every shard (the only process of the bot)."""
        return not self.ids

    def owns(self, guild_id: int | None) -> bool:
        """True when Discord sends this process the events of `guild_id` (None: direct messages)."""
        return self.runs_all or shard_of(guild_id, self.count) in self.ids

    @property
    def syncs_commands(self) -> bool:
        """True for the one process that syncs slash commands: the one running shard 0."""
        return self.runs_all or 0 in self.ids

    def client_options(self) -> dict[str, object]:
        """AutoShardedBot's `shard_count` and `shard_ids` (None: ask Discord, run all)."""
        return {"shard_count": None if self.count < 0 else self.count, "shard_ids": sorted(self.ids) or None}
