"""The import rules of README "How it works", checked on the source; and every cog loads.

Each wing may import only what its room allows: discord only in the front end, the cogs and the entry
point; the prompt and inference wings import neither discord nor persistence; persistence imports
nothing of the bot; no cog imports another; product code never imports the tests.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from discord import app_commands
from discord.ext import commands

from bot.discord_front.client import INITIAL_EXTENSIONS

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("bot", "cogs", "persistence")


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. bot.prompt.builder
    path: Path
    imports: frozenset[str]  # dotted names imported, relative imports resolved


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):  # also imports inside functions and `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base)
                source = f"{prefix}.{node.module}" if node.module else prefix
            else:
                source = node.module or ""
            yield source
            # `from bot.core import sessions` imports the module bot.core.sessions.
            yield from (f"{source}.{alias.name}" for alias in node.names)


def product_modules() -> list[Module]:
    modules = []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            modules.append(Module(name, path, frozenset(_imports(tree, name, is_package))))
    return modules


MODULES = product_modules()


def within(name: str, *prefixes: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def violations(importers: tuple[str, ...], forbidden: tuple[str, ...], *, allowed: tuple[str, ...] = ()) -> list[str]:
    """`module imports name` for every import of `forbidden` by a module under `importers`."""
    return sorted(
        f"{module.name} imports {name}"
        for module in MODULES
        if within(module.name, *importers) and not within(module.name, *allowed)
        for name in module.imports
        if within(name, *forbidden)
    )


def test_the_modules_are_found() -> None:
    names = {module.name for module in MODULES}
    assert {"bot.prompt.builder", "bot.inference.engine", "bot.core.sessions", "cogs.roleplay",
            "persistence.repository", "bot.app", "bot.__main__"} <= names


def test_discord_only_in_the_front_end_the_cogs_and_the_entry_point() -> None:
    assert violations(PRODUCT, ("discord",), allowed=("bot.discord_front", "cogs", "bot.app", "bot.__main__")) == []


def test_the_prompt_wing_is_pure() -> None:
    forbidden = ("discord", "persistence", "bot.core", "bot.inference", "bot.discord_front", "aiohttp",
                 "llama_cpp", "sqlalchemy")
    assert violations(("bot.prompt",), forbidden) == []


def test_the_inference_wing_knows_no_discord_persistence_prompt_or_core() -> None:
    forbidden = ("discord", "persistence", "bot.prompt", "bot.core", "bot.discord_front")
    assert violations(("bot.inference",), forbidden) == []


def test_the_core_knows_no_discord() -> None:
    assert violations(("bot.core",), ("discord", "bot.discord_front", "cogs")) == []


def test_persistence_imports_nothing_of_the_bot() -> None:
    assert violations(("persistence",), ("bot", "cogs", "discord")) == []


def test_no_cog_imports_another_cog() -> None:
    found = sorted(
        f"{module.name} imports {name}"
        for module in MODULES
        if within(module.name, "cogs")
        for name in module.imports
        if within(name, "cogs") and not within(name, module.name) and name != "cogs"
    )
    assert found == []


def test_the_product_never_imports_the_tests() -> None:
    assert violations(PRODUCT, ("tests",)) == []


def test_the_rules_catch_a_forbidden_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a relative import out of the prompt wing and a type-only one are both seen."""
    source = "from ..core import sessions\nif TYPE_CHECKING:\n    import discord\n"
    imports = frozenset(_imports(ast.parse(source), "bot.prompt.builder", False))
    assert {"bot.core", "bot.core.sessions", "discord"} <= imports
    monkeypatch.setattr("tests.test_layout.MODULES", [Module("bot.prompt.builder", Path("x.py"), imports)])
    assert violations(("bot.prompt",), ("bot.core", "discord")) == [
        "bot.prompt.builder imports bot.core", "bot.prompt.builder imports bot.core.sessions",
        "bot.prompt.builder imports discord"]


# --------------------------------------------------------------------------- cogs


def cog_modules() -> list[str]:
    return sorted(f"cogs.{path.stem}" for path in (ROOT / "cogs").glob("*.py") if path.stem != "__init__")


def test_every_cog_module_is_loaded_at_start() -> None:
    assert sorted(INITIAL_EXTENSIONS) == cog_modules()


@pytest.mark.parametrize("name", cog_modules())
def test_every_cog_imports_and_has_setup(name: str) -> None:
    module = importlib.import_module(name)
    assert callable(getattr(module, "setup", None)), f"{name} has no setup()"
    assert any(isinstance(value, type) and issubclass(value, commands.Cog) and value.__module__ == name
               for value in vars(module).values()), f"{name} defines no Cog"


def _qualified_names(command: app_commands.Command | app_commands.Group) -> Iterator[str]:
    yield command.qualified_name
    if isinstance(command, app_commands.Group):
        for child in command.commands:
            yield from _qualified_names(child)


def test_slash_command_names_are_unique() -> None:
    top: list[str] = []
    everything: list[str] = []
    for name in cog_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, commands.Cog) and value.__module__ == name:
                if value.__cog_is_app_commands_group__:  # a GroupCog: its commands are `/group name`
                    group = value.__cog_group_name__
                    top.append(group)
                    everything.extend(f"{group} {qualified}" for command in value.__cog_app_commands__
                                      for qualified in _qualified_names(command))
                else:
                    for command in value.__cog_app_commands__:
                        top.append(command.name)
                        everything.extend(_qualified_names(command))
    assert top, "no slash commands found"
    assert len(top) == len(set(top)), sorted(top)
    assert len(everything) == len(set(everything)), sorted(everything)
