"""Domain errors that carry a short, user-facing message."""

from __future__ import annotations


class TavernError(Exception):
    """An expected failure; `user_message` is safe to show to the person who caused it."""

    user_message: str = "Something went wrong."

    def __init__(self, user_message: str | None = None) -> None:
        if user_message is not None:
            self.user_message = user_message
        super().__init__(self.user_message)


class QueueFull(TavernError):
    """Too many requests are waiting for the model."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"The model is busy ({waiting} replies waiting). Please try again in a moment.")


class ChannelQueueFull(TavernError):
    """Too many requests are waiting in one channel."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"This channel already has {waiting} replies waiting. Please wait for them first.")


class EngineClosed(TavernError):
    """The engine is shutting down and takes no new work."""

    user_message = "The bot is shutting down; please try again shortly."


class GenerationFailed(TavernError):
    """The model failed while writing a reply."""

    user_message = "The model failed while writing a reply. Please try again."


class NoSession(TavernError):
    """The channel has no roleplay session."""

    user_message = "There is no roleplay session in this channel."


class PersonaMissing(TavernError):
    """The session has no persona text to answer as (never answer from an empty persona)."""

    user_message = (
        "This channel has no character to play any more, so I won't answer. Someone with Manage Server "
        "can choose one with /character use."
    )


class PersonaTooLarge(TavernError):
    """A persona would leave too little room for the conversation."""

    def __init__(self, tokens: int, allowed: int) -> None:
        self.tokens = tokens
        self.allowed = allowed
        super().__init__(
            f"That character is {tokens} tokens long; at most {allowed} fit while leaving room for the "
            "conversation. Please shorten it."
        )
