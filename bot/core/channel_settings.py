"""Per-channel overrides of the reply settings, validated against the ranges of the config.

A session stores only the settings its channel overrides (`ChatService` reads the sampling keys and
`max_new_tokens`; the message handling reads `reply_mode` and `ignore_prefix`). The ranges come
from `bot.config`, so a channel can never be set to something the config file would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, MaxLen
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from bot.config import DiscordSettings, SamplingSettings, Settings
from bot.errors import TavernError

MIN_REPLY_TOKENS = 16

# The config fields whose type and range a channel override shares.
_SOURCES: dict[str, FieldInfo] = {
    "reply_mode": DiscordSettings.model_fields["reply_mode"],
    "ignore_prefix": DiscordSettings.model_fields["ignore_prefix"],
    **{name: SamplingSettings.model_fields[name] for name in SamplingSettings.model_fields},
}

# Names shown to users where the stored key differs from the command option.
LABELS = {"max_new_tokens": "max_reply_tokens"}


def _as_configured(name: str) -> Any:
    field = _SOURCES[name]
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


ReplyMode = _as_configured("reply_mode")
IgnorePrefix = _as_configured("ignore_prefix")
Temperature = _as_configured("temperature")
TopP = _as_configured("top_p")
TopK = _as_configured("top_k")
MinP = _as_configured("min_p")
RepeatPenalty = _as_configured("repeat_penalty")


class InvalidSetting(TavernError):
    """A channel setting is unknown or out of range."""


class ChannelSettings(BaseModel):
    """The overrides a channel may set; None means "use the configured default"."""

    model_config = ConfigDict(extra="forbid")

    reply_mode: ReplyMode | None = None
    ignore_prefix: IgnorePrefix | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    max_new_tokens: Annotated[int, Field(ge=MIN_REPLY_TOKENS)] | None = None

    @field_validator("max_new_tokens")
    @classmethod
    def _within_reply_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_reply_tokens")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"at most {limit}")
        return value


FIELDS: tuple[str, ...] = tuple(ChannelSettings.model_fields)


def label(name: str) -> str:
    """The name users see for a setting (the command option's name)."""
    return LABELS.get(name, name)


def _number(value: float) -> str:
    return f"{value:g}"


def allowed_values(name: str, *, max_reply_tokens: int | None = None) -> str:
    """Describe what a setting accepts, e.g. "a number from 0 to 2"."""
    if name == "max_new_tokens":
        if max_reply_tokens is None:
            return f"a whole number from {MIN_REPLY_TOKENS} up to the configured maximum"
        return f"a whole number from {min(MIN_REPLY_TOKENS, max_reply_tokens)} to {max_reply_tokens}"
    field = _SOURCES[name]
    if get_origin(field.annotation) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(field.annotation))
    low = high = ""
    for rule in field.metadata:
        if isinstance(rule, MaxLen):
            return f"at most {rule.max_length} characters"
        if isinstance(rule, Ge):
            low = f"from {_number(rule.ge)}"  # type: ignore[arg-type]
        elif isinstance(rule, Gt):
            low = f"above {_number(rule.gt)}"  # type: ignore[arg-type]
        elif isinstance(rule, Le):
            high = f"to {_number(rule.le)}" if low.startswith("from") else f"and at most {_number(rule.le)}"  # type: ignore[arg-type]
    kind = "a whole number" if field.annotation is int else "a number"
    return " ".join(part for part in (kind, low, high) if part)


def apply(current: Mapping[str, Any], changes: Mapping[str, Any], *, max_reply_tokens: int) -> dict[str, Any]:
    """Validate `changes` and return the new overrides; a None value drops that override.

    `max_reply_tokens` is the highest reply length a channel may choose (the configured one, so a
    persona that fits the config keeps fitting). Raise InvalidSetting naming the setting and its
    allowed values; keys of `current` that are not changed are kept as they are.
    """
    try:
        parsed = ChannelSettings.model_validate(dict(changes), context={"max_reply_tokens": max_reply_tokens})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "?"
        if error["type"] == "extra_forbidden":
            raise InvalidSetting(f"There is no setting called {name!r}.") from None
        got = error.get("input")
        shown = _number(got) if isinstance(got, int | float) and not isinstance(got, bool) else repr(got)
        raise InvalidSetting(
            f"{label(name)} must be {allowed_values(name, max_reply_tokens=max_reply_tokens)} (got {shown})."
        ) from None
    result = dict(current)
    for name, value in parsed.model_dump(exclude_unset=True).items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def defaults(settings: Settings) -> dict[str, Any]:
    """The configured value of every channel setting."""
    values = {
        "reply_mode": settings.discord.reply_mode,
        "ignore_prefix": settings.discord.ignore_prefix,
        **settings.sampling.model_dump(),
        "max_new_tokens": settings.model.max_new_tokens,
    }
    return {name: values[name] for name in FIELDS}


def effective(overrides: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """Every channel setting as it applies in a channel: its override, else the configured default."""
    values = defaults(settings)
    values.update({name: overrides[name] for name in FIELDS if name in overrides})
    return values


def describe(overrides: Mapping[str, Any], settings: Settings) -> str:
    """One line per setting: the effective value and whether the channel or the config sets it."""
    lines = []
    for name, value in effective(overrides, settings).items():
        shown = repr(value) if isinstance(value, str) and name == "ignore_prefix" else value
        if isinstance(value, float):
            shown = _number(value)
        source = "this channel" if name in overrides else "default"
        lines.append(f"{label(name)}: {shown} ({source})")
    return "\n".join(lines)
