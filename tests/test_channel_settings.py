"""Per-channel setting overrides: ranges shared with the config, friendly refusals, display."""

from __future__ import annotations

import pytest

from bot.config import SamplingSettings, Settings
from bot.core import channel_settings
from bot.core.channel_settings import FIELDS, InvalidSetting, apply, describe, effective

LIMIT = 256


def refusal(changes: dict) -> str:
    with pytest.raises(InvalidSetting) as caught:
        apply({}, changes, max_reply_tokens=LIMIT)
    return caught.value.user_message


def test_valid_changes_are_merged_into_the_current_overrides():
    current = {"top_k": 20, "future_key": "kept"}
    new = apply(current, {"temperature": 1.5, "reply_mode": "mention", "max_new_tokens": 64}, max_reply_tokens=LIMIT)
    assert new == {"top_k": 20, "future_key": "kept", "temperature": 1.5, "reply_mode": "mention", "max_new_tokens": 64}
    assert current == {"top_k": 20, "future_key": "kept"}  # not modified in place


def test_none_drops_an_override():
    assert apply({"top_k": 20, "min_p": 0.1}, {"top_k": None}, max_reply_tokens=LIMIT) == {"min_p": 0.1}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": 2.5}, "temperature must be a number from 0 to 2 (got 2.5)."),
        ({"temperature": -0.1}, "temperature must be a number from 0 to 2 (got -0.1)."),
        ({"top_p": 0}, "top_p must be a number above 0 and at most 1 (got 0)."),
        ({"top_k": 1001}, "top_k must be a whole number from 0 to 1000 (got 1001)."),
        ({"top_k": 2.5}, "top_k must be a whole number from 0 to 1000 (got 2.5)."),
        ({"min_p": 1.5}, "min_p must be a number from 0 to 1 (got 1.5)."),
        ({"repeat_penalty": 0.9}, "repeat_penalty must be a number from 1 to 2 (got 0.9)."),
        ({"reply_mode": "never"}, "reply_mode must be one of all, mention (got 'never')."),
        ({"ignore_prefix": "!" * 17}, f"ignore_prefix must be at most 16 characters (got {'!' * 17!r})."),
        ({"max_new_tokens": 15}, "max_reply_tokens must be a whole number from 16 to 256 (got 15)."),
        ({"max_new_tokens": 257}, "max_reply_tokens must be a whole number from 16 to 256 (got 257)."),
        ({"temperature": "hot"}, "temperature must be a number from 0 to 2 (got 'hot')."),
        ({"seed": 1}, "There is no setting called 'seed'."),
    ],
)
def test_out_of_range_values_name_the_setting_and_the_range(changes, message):
    assert refusal(changes) == message


def test_one_bad_value_stores_nothing():
    with pytest.raises(InvalidSetting):
        apply({"top_k": 20}, {"temperature": 1.0, "top_p": 5}, max_reply_tokens=LIMIT)


def test_boundaries_are_allowed():
    new = apply(
        {},
        {"temperature": 0, "top_p": 1, "top_k": 0, "min_p": 1, "repeat_penalty": 2, "max_new_tokens": 16},
        max_reply_tokens=LIMIT,
    )
    assert new["max_new_tokens"] == 16 and new["repeat_penalty"] == 2
    assert apply({}, {"max_new_tokens": LIMIT}, max_reply_tokens=LIMIT) == {"max_new_tokens": LIMIT}
    assert apply({}, {"ignore_prefix": "x" * 16}, max_reply_tokens=LIMIT) == {"ignore_prefix": "x" * 16}


@pytest.mark.parametrize("name", list(SamplingSettings.model_fields))
def test_sampling_ranges_are_the_configs(name):
    """Whatever the config file accepts a channel accepts, and the reverse."""
    field = SamplingSettings.model_fields[name]
    for value in (-1, 0, 0.5, 1, 1.5, 2, 999, 1000, 1001):
        if field.annotation is int and isinstance(value, float):
            continue
        try:
            SamplingSettings(**{name: value})
        except ValueError:
            config_ok = False
        else:
            config_ok = True
        try:
            apply({}, {name: value}, max_reply_tokens=LIMIT)
        except InvalidSetting:
            channel_ok = False
        else:
            channel_ok = True
        assert channel_ok == config_ok, (name, value)


def test_effective_values_and_description():
    config = Settings()
    overrides = {"temperature": 1.25, "reply_mode": "mention", "unrelated": 1}
    values = effective(overrides, config)
    assert list(values) == list(FIELDS)
    assert values["temperature"] == 1.25 and values["top_p"] == config.sampling.top_p
    assert values["max_new_tokens"] == config.model.max_new_tokens
    assert describe(overrides, config).splitlines() == [
        "reply_mode: mention (this channel)",
        "ignore_prefix: '//' (default)",
        "temperature: 1.25 (this channel)",
        "top_p: 0.9 (default)",
        "top_k: 40 (default)",
        "min_p: 0.05 (default)",
        "repeat_penalty: 1.1 (default)",
        "max_reply_tokens: 256 (default)",
    ]


def test_allowed_values_without_a_limit_for_option_descriptions():
    assert channel_settings.allowed_values("max_new_tokens") == "a whole number from 16 up to the configured maximum"
    assert channel_settings.allowed_values("temperature") == "a number from 0 to 2"
