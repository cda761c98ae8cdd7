"""The one entry point: parse arguments, load config, build database, engine and front end; shut down cleanly."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bot.chat import run_chat
from bot.config import ConfigError, Settings, check_model_file, load_settings
from bot.demo_model import DemoModelError, resolve_model_path
from bot.engine import Engine, ModelLoadError
from bot.errors import TavernError
from bot.llama_backend import llama_engine
from bot.sessions import ChatService
from persistence.database import Database
from persistence.repository import Repository

log = logging.getLogger("tavernkeep")

EXIT_CONFIG = 2


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


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        logging.basicConfig(level=settings.logging.level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        model_path = model_path_for(settings)
        if args.command == "chat":
            persona = read_persona(args.persona)
            asyncio.run(chat_main(settings, args, model_path, persona))
    except ConfigError as exc:
        print(f"tavernkeep: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as exc:
        print(f"tavernkeep: model.path: cannot load the model: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TavernError as exc:
        print(f"tavernkeep: {exc.user_message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
