"""Exports as private files: JSON Lines written page by page to a temporary file, off the event loop.

A page of records is read from the store, encoded and written on a thread, then the next page is read:
no export is ever held in memory whole. Once the plain file passes the server's upload limit, what was
written is compressed and the rest goes through gzip; the export stops as soon as even the compressed
file is over the limit.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import discord

from bot.discord_front.permissions import require_guild

T = TypeVar("T")

PAGE = 500  # turns read per query while exporting
COOLDOWN_RATE, COOLDOWN_SECONDS = 3, 60.0  # exports (and forget questions) per member per minute
EXPORT_TOO_LARGE = "The export is larger than this server lets me upload ({limit:,} bytes), even compressed."


def per_member(interaction: discord.Interaction) -> tuple[int | None, int]:
    """The cooldown key of the export and privacy commands: one member of one server."""
    return interaction.guild_id, interaction.user.id


def jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    """UTF-8 JSON Lines, one compact object per line; text is kept as written (no \\u escapes)."""
    return b"".join(
        json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for record in records
    )


class ExportFile:
    """A JSON Lines file in the temporary directory, written a page at a time (blocking: use a thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        fd, name = tempfile.mkstemp(prefix="tavernkeep-export-", suffix=".jsonl")
        self.path = Path(name)
        self._out: IO[bytes] = os.fdopen(fd, "wb")
        self._gzip: gzip.GzipFile | None = None

    @property
    def compressed(self) -> bool:
        """True once the file is gzip-compressed."""
        return self._gzip is not None

    def add(self, records: Sequence[Mapping[str, Any]]) -> bool:
        """Append records; False once the file is over the limit even compressed (then stop adding)."""
        data = jsonl(records)
        self.count += len(records)
        if self._gzip is None:
            self._out.write(data)
            if self._out.tell() <= self.limit:
                return True
            self._compress()
        else:
            self._gzip.write(data)
        # A sync flush per page (a few bytes each) makes the file's size the compressed size so far.
        self._gzip.flush(zlib.Z_SYNC_FLUSH)
        return self._out.tell() <= self.limit

    def _compress(self) -> None:
        self._out.close()
        plain = self.path
        fd, name = tempfile.mkstemp(prefix="tavernkeep-export-", suffix=".jsonl.gz")
        self.path, self._out = Path(name), os.fdopen(fd, "wb")
        self._gzip = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=self._out, mtime=0)
        try:
            with plain.open("rb") as source:
                shutil.copyfileobj(source, self._gzip)
        finally:
            plain.unlink()

    def finish(self) -> int:
        """Close the file and return its size in bytes."""
        if self._gzip is not None:
            self._gzip.close()
        self._out.close()
        return self.path.stat().st_size

    def discard(self) -> None:
        """Close and delete the file."""
        if self._gzip is not None:
            self._gzip.close()
        self._out.close()
        self.path.unlink(missing_ok=True)


async def send_export(
    interaction: discord.Interaction,
    pages: AsyncIterator[Sequence[T]],
    record: Callable[[T], Mapping[str, Any]],
    filename: str,
    describe: Callable[[int], str],
    *,
    nothing: str | None = None,
) -> None:
    """Follow up a deferred interaction with every page's records as a private file (or say why not).

    `describe(count)` is the message sent with the file; with `nothing`, an export without records
    sends that instead of an empty file.
    """
    limit = require_guild(interaction).filesize_limit
    export = await asyncio.to_thread(ExportFile, limit)
    try:
        async for page in pages:
            if not await asyncio.to_thread(lambda page=page: export.add([record(item) for item in page])):
                await interaction.followup.send(EXPORT_TOO_LARGE.format(limit=limit), ephemeral=True)
                return
        size = await asyncio.to_thread(export.finish)
        if size > limit:
            await interaction.followup.send(EXPORT_TOO_LARGE.format(limit=limit), ephemeral=True)
            return
        if export.count == 0 and nothing is not None:
            await interaction.followup.send(nothing, ephemeral=True)
            return
        name = filename + (".gz" if export.compressed else "")
        # discord.py opens the path and closes the file once the upload is done.
        file = discord.File(str(export.path), filename=name)
        await interaction.followup.send(describe(export.count), file=file, ephemeral=True)
    finally:
        await asyncio.to_thread(export.discard)
