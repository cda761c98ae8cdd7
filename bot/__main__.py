"""The one entry point: parse the command line, set up logging, call the composition root (`bot.app`),
and turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import aiohttp
import discord

from bot import app
from bot.config import ConfigError, discord_token
from bot.errors import TavernError
from bot.inference.engine import ModelLoadError
from persistence.backup import BackupError, backup_database

EXIT_CONFIG = 2
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
    chat.add_argument("--character", metavar="FILE", help="play a character card (PNG, JSON or CHARX)")
    chat.add_argument("--session", default="default", help="session name; history persists and resumes")
    chat.add_argument("--name", default=None, help="your speaker name (default: your login name)")
    run = sub.add_parser("run", help="run the Discord bot (the token is read from DISCORD_TOKEN)")
    # Also accepted after the subcommand (`tavernkeep run --config PATH`); SUPPRESS keeps the global one.
    run.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                     help="TOML config file (default: ./config.toml if it exists)")
    backup = sub.add_parser("backup", help="write a consistent copy of the live SQLite database "
                                           "(PostgreSQL: prints the pg_dump command instead)")
    backup.add_argument("path", type=Path, help="the new backup file (must not exist)")
    return parser.parse_args(argv)


def log_level(command: str, configured: str) -> str:
    """The root log level for a command: the terminal chat is the user's screen, so below DEBUG it
    shows warnings and errors only (no migration or start-up INFO lines between the chat lines)."""
    if command != "chat" or configured == "DEBUG":
        return configured
    return max(configured, "WARNING", key=logging.getLevelName)


def fail(message: str, code: int) -> int:
    """Print one line for the operator and return the exit code."""
    print(f"tavernkeep: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        settings = app.settings_from(args.config)
        logging.basicConfig(level=log_level(args.command, settings.logging.level),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if args.command == "backup":
            size = asyncio.run(backup_database(settings.database.url, args.path))
            print(f"Backup written: {args.path} ({size:,} bytes)")
            return 0
        # Checked before the model is resolved (which may download it) so a missing token fails fast.
        token = discord_token() if args.command == "run" else ""
        model_path = app.model_path_for(settings)
        if args.command == "chat":
            persona = app.read_persona(args.persona)
            card = app.read_character(args.character, settings.characters.max_card_bytes)
            asyncio.run(app.chat_main(settings, args, model_path, persona, card=card))
        elif args.command == "run":
            asyncio.run(app.run_main(settings, model_path, token))
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
