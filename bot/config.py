"""Typed, validated settings from a TOML file plus environment variables.

Secrets (the Discord token) come only from the environment. Any other key can be overridden by an
environment variable named ``TAVERNKEEP_<SECTION>_<KEY>`` (e.g. ``TAVERNKEEP_DATABASE_URL``); a
``TAVERNKEEP_`` variable that names no setting stops the start (``TAVERNKEEP_TEST_`` ones belong to the
test suite and are ignored).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GGUF_MAGIC = b"GGUF"
ENV_PREFIX = "TAVERNKEEP_"
# Variables of the test suite (e.g. TAVERNKEEP_TEST_DATABASE_URL), not settings: left alone.
TEST_ENV_PREFIX = "TAVERNKEEP_TEST_"


class ConfigError(Exception):
    """A setting is wrong; the message is one line naming the file, the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """The GGUF model and how llama.cpp runs it."""

    path: str = Field("", description="GGUF file; empty uses the demo model")
    n_ctx: int = Field(2048, ge=256, le=131072, description="context size in tokens")
    threads: int = Field(0, ge=0, le=256, description="CPU threads the model computes with; 0 = all cores")
    workers: int = Field(4, ge=1, le=64, description="replies generated at once")
    batched: bool = Field(True, description="one context decodes all replies together; false = a context per worker")
    gpu_layers: int = Field(0, ge=-1, le=1000, description="layers offloaded to a GPU; -1 = all")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="reply length limit in tokens")
    seed: int = Field(-1, ge=-1, description="sampling seed; -1 = random")
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV cache element type (K and V)")
    flash_attn: bool = Field(False, description="flash attention; needed by a quantized KV cache")

    @field_validator("path")
    @classmethod
    def _model_file(cls, value: str) -> str:
        if value:
            check_model_file(Path(value).expanduser())
        return value

    @model_validator(mode="after")
    def _kv_type_needs_flash_attn(self) -> ModelSettings:
        # llama.cpp stores a quantized V cache only with flash attention; without it the context
        # fails to load with an opaque message, so say it here.
        if self.kv_type != "f16" and not self.flash_attn:
            raise ValueError(f"kv_type = {self.kv_type!r} needs flash_attn = true (a quantized V cache needs it)")
        return self


class SamplingSettings(_Section):
    """Default sampling; channels may override within these ranges."""

    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0)


class EngineSettings(_Section):
    """Generation queue limits."""

    queue_size: int = Field(32, ge=1, le=10000, description="requests waiting across all channels")
    per_channel_queue: int = Field(4, ge=1, le=100, description="requests waiting in one channel")
    timeout_seconds: float = Field(300.0, gt=0, le=3600, description="time limit for one reply")


class CacheSettings(_Section):
    """KV-cache reuse: saved channel states and the sliding window."""

    ram_bytes: int = Field(
        -1, ge=-1, description="saved channel states kept in RAM, in bytes; -1 = a quarter of the RAM, 0 = none"
    )
    disk_dir: str = Field(
        "", description="directory for states that leave RAM, shared by processes (each uses a subdirectory); "
        "empty = $XDG_CACHE_HOME (or ~/.cache)/tavernkeep/states"
    )
    disk_bytes: int = Field(
        -1, ge=-1, description="saved channel states kept on disk, in bytes; "
        "-1 = half the free space at start (at most 32 GiB), 0 = no disk tier"
    )
    context_shift: bool = Field(True, description="shift old turns out of the KV cache instead of re-evaluating")
    trim_fraction: float = Field(0.5, ge=0.05, le=0.9, description="share of the turn room dropped per trim")


class DatabaseSettings(_Section):
    """Where conversations are stored."""

    url: str = Field("sqlite+aiosqlite:///tavernkeep.db", min_length=1)


class DiscordSettings(_Section):
    """Discord connection; the token is read from DISCORD_TOKEN only."""

    api_base_url: str = Field("", description="REST base URL, e.g. a rate-limit proxy; empty = Discord")
    command_guilds: list[int] = Field(default_factory=list, description="guilds to sync commands to now")
    ignore_prefix: str = Field("//", max_length=16, description="messages starting with it are not answered")
    reply_mode: Literal["all", "mention"] = "all"
    catch_up: Literal["answer", "skip"] = Field(
        "answer", description="messages sent while the bot was away: answer them, or skip them"
    )
    catch_up_limit: int = Field(50, ge=1, le=100, description="most missed messages read back per channel")
    after_crash: Literal["reply", "notice"] = Field(
        "reply", description="a reply cut off by a crash: write it again, or post a short notice"
    )
    recovery_max_age_seconds: float = Field(
        3600.0, ge=0, le=7 * 86400, description="a reply cut off by a crash longer ago than this is not answered"
    )
    reply_delay_seconds: float = Field(
        1.5, ge=0, le=10, description="wait before answering, so a proxy's webhook repost is answered once"
    )
    cooldown_messages: int = Field(5, ge=0, le=1000, description="messages one user may send per window; 0 = off")
    cooldown_seconds: float = Field(30.0, gt=0, le=3600, description="the per-user rate window")
    shard_count: int = Field(
        0, ge=-1, le=65536, description="shards of the whole bot: 0 = unsharded, -1 = Discord's recommendation"
    )
    shard_ids: list[int] = Field(
        default_factory=list, description="the shards this process runs; empty = all of them"
    )

    @model_validator(mode="after")
    def _shards(self) -> DiscordSettings:
        if not self.shard_ids:
            return self
        if self.shard_count <= 0:
            raise ValueError("shard_ids needs shard_count set to the number of shards of the whole bot")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("shard_ids lists a shard twice")
        if not all(0 <= shard < self.shard_count for shard in self.shard_ids):
            raise ValueError(f"shard_ids must be between 0 and {self.shard_count - 1} (shard_count - 1)")
        return self


class CharacterSettings(_Section):
    """Character cards, several characters per channel, and lorebooks."""

    max_card_bytes: int = Field(16 * 2**20, ge=1024, le=64 * 2**20, description="largest card or lorebook file")
    fetch_timeout_seconds: float = Field(20.0, gt=0, le=120, description="time limit for fetching a card URL")
    allow_private_urls: bool = Field(False, description="let /character import fetch loopback and private addresses")
    max_per_channel: int = Field(15, ge=1, le=15, description="characters one channel may have")
    max_speakers: int = Field(1, ge=1, le=15, description="characters that answer one message")
    cards_in_prompt: Literal["speaker", "all"] = Field(
        "speaker", description="with several characters: only the speaker's card, or all cards joined"
    )
    prefill_name: bool = Field(True, description="with several characters: start the reply with 'Name:'")
    lore_budget: float = Field(0.25, gt=0, le=1, description="share of the context lorebook entries may fill")
    lore_scan_depth: int = Field(2, ge=0, le=100, description="newest messages scanned for lorebook keys")
    lore_in_head: Literal["constant", "all"] = Field(
        "constant",
        description="lore placed before/after the character: only constant entries stay there, or all of them",
    )
    lore_depth: int = Field(4, ge=0, le=100, description="depth that other before/after-character lore moves to")


class InferenceSettings(_Section):
    """Where replies are generated: in this process, or on inference servers."""

    backend: Literal["local", "llama-server", "openai"] = Field(
        "local", description="local llama.cpp, llama.cpp's llama-server, or an OpenAI-compatible /v1/completions"
    )
    servers: list[str] = Field(default_factory=list, description="base URLs of the inference servers")
    slots_per_server: int = Field(
        0, ge=0, le=256, description="replies each server generates at once; 0 = its slot count (/props), else 1"
    )
    n_ctx: int = Field(0, ge=0, le=1048576, description="context per reply when a server reports none; 0 = ask it")
    connect_timeout_seconds: float = Field(10.0, gt=0, le=300, description="time limit for reaching a server")
    read_timeout_seconds: float = Field(
        300.0, gt=0, le=3600, description="longest silence on a reply stream (prompt evaluation included)"
    )
    health_interval_seconds: float = Field(10.0, gt=0, le=3600, description="pause between health checks")
    load_wait_seconds: float = Field(300.0, ge=0, le=3600, description="how long to wait for a server still loading")
    slot_ids: list[int] = Field(
        default_factory=list,
        description="llama-server slots this process uses on each server; empty = all (give each process sharing "
        "a server slots of its own)",
    )

    @field_validator("servers")
    @classmethod
    def _base_urls(cls, value: list[str]) -> list[str]:
        urls = [url.strip().rstrip("/") for url in value]
        for url in urls:
            if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
                raise ValueError(f"{url!r} is not an http:// or https:// base URL")
        if len(set(urls)) != len(urls):
            raise ValueError("the same server is listed twice")
        return urls

    @model_validator(mode="after")
    def _servers_for_remote(self) -> InferenceSettings:
        if self.backend != "local" and not self.servers:
            raise ValueError(f"backend = {self.backend!r} needs at least one URL in servers")
        if self.slot_ids and self.slots_per_server:
            raise ValueError("set slot_ids or slots_per_server, not both (slot_ids gives the slots themselves)")
        if len(set(self.slot_ids)) != len(self.slot_ids) or any(i < 0 for i in self.slot_ids):
            raise ValueError("slot_ids must be distinct slot numbers from 0")
        return self


class LoggingSettings(_Section):
    """Log output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(_Section):
    """All settings."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    characters: CharacterSettings = Field(default_factory=CharacterSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)


def check_model_file(path: Path) -> None:
    """Raise ValueError unless `path` is a readable GGUF file."""
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF model file: {path}")


def _env_overrides(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Collect TAVERNKEEP_<SECTION>_<KEY> variables into a nested dict of raw strings.

    Every variable with the prefix must name a setting: a typo (`TAVERNKEEP_MODEL_NCTX`) would
    otherwise leave the setting at its default without a word.
    """
    known = {
        f"{ENV_PREFIX}{section}_{key}".upper(): (section, key)
        for section, field in Settings.model_fields.items()
        for key in field.annotation.model_fields  # type: ignore[union-attr]
    }
    out: dict[str, dict[str, Any]] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name.startswith(TEST_ENV_PREFIX):
            continue
        if name not in known:
            # Compared without the shared prefix, which would make every name look close.
            rest = {full[len(ENV_PREFIX):]: full for full in known}
            close = difflib.get_close_matches(name[len(ENV_PREFIX):].upper(), rest, n=1, cutoff=0.75)
            hint = f" (did you mean {rest[close[0]]}, {'.'.join(known[rest[close[0]]])}?)" if close else ""
            raise ConfigError(f"environment ({name}): no such setting{hint}")
        section, key = known[name]
        raw: Any = value
        section_model = Settings.model_fields[section].annotation
        if get_origin(section_model.model_fields[key].annotation) is list:  # type: ignore[union-attr]
            raw = [part.strip() for part in value.split(",") if part.strip()]
        out.setdefault(section, {})[key] = raw
    return out


def _merge(base: dict[str, Any], over: dict[str, dict[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        target = merged.setdefault(section, {})
        if isinstance(target, dict):
            target.update(values)
    return merged


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    elif error["type"] != "value_error" and "input" in error and not isinstance(error["input"], dict):
        message = f"{message} (got {error['input']!r})"
    return key, message


def load_settings(path: Path | None, env: dict[str, str] | None = None) -> Settings:
    """Load settings from `path` (optional) and the environment; raise ConfigError on any problem."""
    env = dict(os.environ) if env is None else env
    source = str(path) if path else "environment"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    overrides = _env_overrides(env)
    try:
        return Settings.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        key, message = _describe(exc.errors()[0])
        section = key.split(".")[0]
        where = source
        if section in overrides and key.split(".")[-1] in overrides[section]:
            where = f"environment ({ENV_PREFIX}{key.replace('.', '_').upper()})"
        raise ConfigError(f"{where}: {key}: {message}") from None


def discord_token(env: dict[str, str] | None = None) -> str:
    """Return DISCORD_TOKEN from the environment or raise ConfigError."""
    env = dict(os.environ) if env is None else env
    token = env.get("DISCORD_TOKEN", "").strip()
    if not token:
        raise ConfigError("DISCORD_TOKEN: environment variable is not set (the token is never read from a file)")
    return token
