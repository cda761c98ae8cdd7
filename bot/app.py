"""The composition root: settings -> database -> engine -> front end.

`bot.__main__` parses the command line and calls these; tests build through them too. Nothing here
runs at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TextIO

from bot.config import ConfigError, Settings, check_model_file, load_settings
from bot.core.cards import CardError, CharacterCard, read_card
from bot.core.sessions import ChatService
from bot.discord_front.client import TavernBot, create_bot
from bot.inference.engine import Engine
from bot.inference.local.batched import batched_engine
from bot.inference.local.demo_model import DemoModelError, resolve_model_path
from bot.inference.local.llama import llama_engine
from bot.inference.remote.backend import remote_engine
from bot.terminal import run_chat
from persistence.database import Database
from persistence.repository import Repository

log = logging.getLogger("tavernkeep")

# Seconds running replies get to finish after SIGINT/SIGTERM before they are cut (and stored as interrupted).
SHUTDOWN_GRACE = 30.0


def read_persona(value: str | None) -> str | None:
    """Persona text from the option: literal text, or @path to read a file."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--persona: cannot read {path}: {exc.strerror}") from None


def read_character(value: str | None, max_bytes: int) -> CharacterCard | None:
    """The card of `--character FILE` (PNG, JSON or CHARX); ConfigError naming the file if it is unreadable."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.stat().st_size > max_bytes:
            raise ConfigError(f"--character: {path} is larger than characters.max_card_bytes ({max_bytes:,} bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--character: cannot read {path}: {exc.strerror}") from None
    try:
        return read_card(data, max_bytes=max_bytes)
    except CardError as exc:
        raise ConfigError(f"--character: {path}: {exc.user_message}") from None


def settings_from(config: Path | None) -> Settings:
    """Load the config file given, or ./config.toml when present, else defaults (plus the environment)."""
    path = config
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    return load_settings(path)


def model_path_for(settings: Settings) -> str:
    """Resolve and check the model file before anything else starts."""
    try:
        path = resolve_model_path(settings.model.path, report=lambda msg: print(msg, file=sys.stderr))
    except DemoModelError as exc:
        raise ConfigError(f"model.path: not set, and the demo model is unavailable: {exc}") from None
    try:
        check_model_file(path)
    except ValueError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    return str(path)


def model_engine(settings: Settings, model_path: str) -> Engine:
    """The unstarted engine `inference.backend` chooses: llama.cpp in this process, or inference servers.

    Locally the model is batched in one context (or, with `model.batched = false`, a context per
    worker). With servers, `model_path` is read for its vocabulary only: prompts are tokenized here.
    """
    if settings.inference.backend != "local":
        return remote_engine(settings, model_path)
    return (batched_engine if settings.model.batched else llama_engine)(settings, model_path)


@asynccontextmanager
async def services(settings: Settings, engine: Engine) -> AsyncIterator[ChatService]:
    """Open the database and start the engine; close both on the way out."""
    database = await Database.open(settings.database.url)
    try:
        await engine.start()
        try:
            yield ChatService(Repository(database), engine, settings)
        finally:
            await engine.close()
    finally:
        await database.close()


def discord_bot(settings: Settings, service: ChatService, *, edit_interval: float = 1.0) -> TavernBot:
    """The Discord front end over the service's started engine and open database."""
    return create_bot(settings, engine=service.engine, database=service.repo.db, edit_interval=edit_interval)


async def chat_main(
    settings: Settings, args: argparse.Namespace, model_path: str, persona: str | None,
    *, stdin: TextIO | None = None, stdout: TextIO | None = None, card: CharacterCard | None = None,
) -> None:
    """Run the terminal chat (playing `card` when given)."""
    user_name = args.name or getpass.getuser() or "User"
    async with services(settings, model_engine(settings, model_path)) as service:
        await run_chat(service, service.engine, session_name=args.session, persona=persona, user_name=user_name,
                       stdin=stdin or sys.stdin, stdout=stdout or sys.stdout, card=card)


async def serve(bot: TavernBot, token: str, *, grace: float = SHUTDOWN_GRACE) -> None:
    """Run `bot` until Discord closes it or SIGINT/SIGTERM asks to stop; then shut down gracefully.

    Login and intent errors from Discord propagate. After the first signal the handlers are removed,
    so a second Ctrl-C stops at once.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises KeyboardInterrupt instead
            loop.add_signal_handler(sig, stop.set)
    async with bot:
        running = asyncio.create_task(bot.start(token), name="discord")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            for sig in signals:
                with contextlib.suppress(NotImplementedError):
                    loop.remove_signal_handler(sig)
        if stop.is_set():
            log.info("stop requested: shutting down")
            await bot.shutdown(grace)
        await running


async def run_main(settings: Settings, model_path: str, token: str) -> None:
    """Run the Discord bot over the llama engine and the configured database."""
    async with services(settings, model_engine(settings, model_path)) as service:
        await serve(discord_bot(settings, service), token)
