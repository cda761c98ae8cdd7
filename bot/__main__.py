"""The one entry point: parse arguments, load config, build database, engine and front end; shut down cleanly."""

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

import aiohttp
import discord

from bot.config import ConfigError, Settings, check_model_file, discord_token, load_settings
from bot.core.sessions import ChatService
from bot.discord_front.client import TavernBot, create_bot
from bot.errors import TavernError
from bot.inference.engine import Engine, ModelLoadError
from bot.inference.local.demo_model import DemoModelError, resolve_model_path
from bot.inference.local.llama import llama_engine
from bot.terminal import run_chat
from persistence.backup import BackupError, backup_database
from persistence.database import Database
from persistence.repository import Repository

log = logging.getLogger("tavernkeep")

EXIT_CONFIG = 2
# Seconds running replies get to finish after SIGINT/SIGTERM before they are cut (and stored as interrupted).
SHUTDOWN_GRACE = 30.0
INTENTS_HELP = (
    "Discord refused the bot's privileged intent: enable \"Message Content Intent\" for this bot in the "
    "Discord developer portal (your application → Bot → Privileged Gateway Intents)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="tavernkeep", description="Self-hosted Discord roleplay bot.")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default: ./config.toml if it exists)")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="roleplay in the terminal (stdin may be a pipe)")
    chat.add_argument("--persona", help="persona text, or @FILE to read it from a file")
    chat.add_argument("--session", default="default", help="session name; history persists and resumes")
    chat.add_argument("--name", default=None, help="your speaker name (default: your login name)")
    run = sub.add_parser("run", help="run the Discord bot (the token is read from DISCORD_TOKEN)")
    # Also accepted after the subcommand (`tavernkeep run --config PATH`); SUPPRESS keeps the global one.
    run.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                     help="TOML config file (default: ./config.toml if it exists)")
    backup = sub.add_parser("backup", help="write a consistent copy of the live SQLite database")
    backup.add_argument("path", type=Path, help="the new backup file (must not exist)")
    return parser.parse_args(argv)


def read_persona(value: str | None) -> str | None:
    """Persona text from the option: literal text, or @path to read a file."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--persona: cannot read {path}: {exc.strerror}") from None


def settings_from(args: argparse.Namespace) -> Settings:
    """Load the config named on the command line, or ./config.toml when present, else defaults."""
    path = args.config
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


async def chat_main(settings: Settings, args: argparse.Namespace, model_path: str, persona: str | None) -> None:
    """Run the terminal chat."""
    user_name = args.name or getpass.getuser() or "User"
    async with services(settings, llama_engine(settings, model_path)) as service:
        await run_chat(service, service.engine, session_name=args.session, persona=persona,
                       user_name=user_name, stdin=sys.stdin, stdout=sys.stdout)


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
    async with services(settings, llama_engine(settings, model_path)) as service:
        await serve(create_bot(settings, engine=service.engine, database=service.repo.db), token)


def fail(message: str, code: int) -> int:
    """Print one line for the operator and return the exit code."""
    print(f"tavernkeep: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        logging.basicConfig(level=settings.logging.level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if args.command == "backup":
            size = asyncio.run(backup_database(settings.database.url, args.path))
            print(f"Backup written: {args.path} ({size:,} bytes)")
            return 0
        # Checked before the model is resolved (which may download it) so a missing token fails fast.
        token = discord_token() if args.command == "run" else ""
        model_path = model_path_for(settings)
        if args.command == "chat":
            persona = read_persona(args.persona)
            asyncio.run(chat_main(settings, args, model_path, persona))
        elif args.command == "run":
            asyncio.run(run_main(settings, model_path, token))
    except (ConfigError, BackupError) as exc:
        return fail(str(exc), EXIT_CONFIG if isinstance(exc, ConfigError) else 1)
    except discord.LoginFailure as exc:
        return fail(f"DISCORD_TOKEN: Discord rejected the token ({exc})", EXIT_CONFIG)
    except discord.PrivilegedIntentsRequired:
        return fail(INTENTS_HELP, EXIT_CONFIG)
    except (aiohttp.ClientError, discord.GatewayNotFound, discord.HTTPException) as exc:
        return fail(f"cannot reach Discord: {exc}", 1)
    except ModelLoadError as exc:
        return fail(f"model.path: cannot load the model: {exc}", EXIT_CONFIG)
    except TavernError as exc:
        return fail(exc.user_message, 1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
