"""Discord replies: the per-channel job queue and reply flow (`jobs`), showing text in messages
(`render`), and the Regenerate/Continue buttons (`buttons`)."""

from bot.discord_front.replies.buttons import CONTINUE_ID, REGENERATE_ID, ReplyButtons
from bot.discord_front.replies.jobs import (
    CANCELLED_NOTICE,
    CANNOT_TALK,
    CHANNEL_BUSY,
    DISCORD_TROUBLE_NOTICE,
    EMPTY_NOTICE,
    FAILED_NOTICE,
    NOT_IN_SESSION,
    NOT_LATEST,
    NOTHING_NEW_NOTICE,
    NOTHING_TO_ADD_NOTICE,
    PAUSED_NOTICE,
    SAVE_FAILED_NOTICE,
    TIMEOUT_NOTICE,
    ChannelReplies,
)
from bot.discord_front.replies.render import (
    LOADING_NOTICE,
    MESSAGE_LIMIT,
    QUEUE_NOTICE,
    ReplyChannel,
    context_of,
    split_message,
)

__all__ = [
    "CANCELLED_NOTICE",
    "CANNOT_TALK",
    "CHANNEL_BUSY",
    "CONTINUE_ID",
    "DISCORD_TROUBLE_NOTICE",
    "EMPTY_NOTICE",
    "FAILED_NOTICE",
    "LOADING_NOTICE",
    "MESSAGE_LIMIT",
    "NOTHING_NEW_NOTICE",
    "NOTHING_TO_ADD_NOTICE",
    "NOT_IN_SESSION",
    "NOT_LATEST",
    "PAUSED_NOTICE",
    "QUEUE_NOTICE",
    "REGENERATE_ID",
    "SAVE_FAILED_NOTICE",
    "TIMEOUT_NOTICE",
    "ChannelReplies",
    "ReplyButtons",
    "ReplyChannel",
    "context_of",
    "split_message",
]
