"""Discord's documented webhook behaviour where SimCord 3.2 models less of it, for character webhooks.

    with discord_webhooks() as hooks:        # or the `webhook_parity` fixture
        ...
        hooks.avatars[webhook_id]            # the data URI the webhook was created (or last edited) with

The patches swap SimCord's route handlers (and its webhook serializer) for the duration, and put
them back after. Each closes one gap:

- Interactive components. SimCord refuses buttons on every incoming webhook. Discord accepts them,
  with `with_components=true`, on webhooks owned by an application (created by the bot); they are
  dispatched to that application like its own messages' components. Here a webhook created by the
  bot user counts as application-owned.
- `thread_id`. SimCord ignores it, so a webhook of a channel could never post or edit in its threads.
  Discord posts into (and edits, deletes, reads in) the thread given, after checking it is a thread
  of the webhook's channel (else 400 / 10003 Unknown Channel).
- `application_id` and the avatar. SimCord answers `application_id: null` for every webhook and
  discards the `avatar` given on create and edit. Discord returns the owning application's id and an
  avatar hash; here the uploaded data is kept in `avatars` so tests can check what was uploaded.
- The limit of 15 webhooks per channel (30007 Maximum number of webhooks reached), which SimCord does
  not enforce.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from simcord.backend import errors, serializers
from simcord.backend.errors import BackendError
from simcord.backend.models import Webhook
from simcord.components import walk_components
from simcord.http import router
from simcord.http._helpers import bot_message, message_edit_changes, message_response
from simcord.http.router import RequestContext
from simcord.http.routes import channels, interactions

MAX_WEBHOOKS_PER_CHANNEL = 15
_INTERACTIVE = {2, 3, 5, 6, 7, 8}


@dataclass
class WebhookParity:
    """What the patched routes keep: the avatar data each webhook was given."""

    avatars: dict[int, str] = field(default_factory=dict)


def _application_owned(ctx: RequestContext, webhook: Webhook) -> bool:
    return webhook.creator_id == ctx.backend.bot_user.id


def _body(ctx: RequestContext, webhook: Webhook) -> tuple[dict[str, Any], bool]:
    """The execute/edit body as Discord reads it: components only with `with_components`, interactive
    ones only for an application-owned webhook."""
    body = dict(ctx.body())
    with_components = str(ctx.params.get("with_components", "")).lower() in {"1", "true"}
    if not with_components:
        body.pop("components", None)
    elif not _application_owned(ctx, webhook) and any(
        c.get("type") in _INTERACTIVE for c in walk_components(body.get("components", []))
    ):
        raise errors.invalid_form_body("non-application webhooks cannot send interactive components")
    return body, with_components


def _where(ctx: RequestContext, webhook: Webhook) -> int:
    """The channel the request acts in: the webhook's, or the thread of it named by `thread_id`."""
    raw = ctx.params.get("thread_id")
    if raw is None:
        return webhook.channel_id
    thread = ctx.backend.channels.get(int(raw))
    if thread is None:
        raise errors.unknown_channel()
    if not thread.is_thread or thread.parent_id != webhook.channel_id:
        raise errors.invalid_form_body("thread_id: the thread does not belong to this webhook's channel")
    return thread.id


def _webhook_message(ctx: RequestContext) -> tuple[Webhook, Any]:
    webhook = interactions._incoming_webhook(ctx)
    message = ctx.backend.get_message(_where(ctx, webhook), ctx.int_arg("message_id"))
    if message.webhook_id != webhook.id:
        raise errors.unknown_message()
    return webhook, message


@contextmanager
def discord_webhooks() -> Iterator[WebhookParity]:
    """Patch SimCord's webhook routes to Discord's behaviour (see the module docstring) while inside."""
    parity = WebhookParity()
    original_payload = serializers.webhook_payload

    def webhook_payload(backend: Any, webhook: Webhook, *, include_token: bool = True) -> dict[str, Any]:
        payload = original_payload(backend, webhook, include_token=include_token)
        if webhook.creator_id == backend.bot_user.id:
            payload["application_id"] = str(backend.application_id)
        avatar = parity.avatars.get(webhook.id)
        payload["avatar"] = hashlib.md5(avatar.encode()).hexdigest() if avatar else None
        return payload

    def create_webhook(ctx: RequestContext) -> Any:
        backend = ctx.backend
        channel = ctx.require_channel_permissions(ctx.int_arg("channel_id"), "manage_webhooks")
        body = ctx.fields("name", "avatar")
        if sum(1 for w in backend.webhooks.values() if w.channel_id == channel.id) >= MAX_WEBHOOKS_PER_CHANNEL:
            raise BackendError(400, 30007, "Maximum number of webhooks reached (15)")
        webhook = backend.create_webhook(channel.id, body.get("name") or "Webhook", backend.bot_user.id)
        if body.get("avatar"):
            parity.avatars[webhook.id] = body["avatar"]
        return serializers.webhook_payload(backend, webhook)

    def _edit_avatar(ctx: RequestContext) -> None:
        body = ctx.body()
        if "avatar" in body:
            webhook_id = ctx.int_arg("webhook_id")
            if body["avatar"]:
                parity.avatars[webhook_id] = body["avatar"]
            else:
                parity.avatars.pop(webhook_id, None)
            ctx.json = {k: v for k, v in body.items() if k != "avatar"}

    def edit_webhook(ctx: RequestContext) -> Any:
        ctx.backend.get_webhook(ctx.int_arg("webhook_id"))
        _edit_avatar(ctx)
        return channels.edit_webhook(ctx)

    def edit_webhook_with_token(ctx: RequestContext) -> Any:
        ctx.backend.get_webhook(ctx.int_arg("webhook_id"))
        _edit_avatar(ctx)
        return channels.edit_webhook_with_token(ctx)

    def execute_webhook(ctx: RequestContext) -> Any:
        if ctx.args["token"] in ctx.backend.interaction_tokens:
            return interactions.execute_webhook(ctx)
        webhook = interactions._incoming_webhook(ctx)
        body, _ = _body(ctx, webhook)
        message = bot_message(ctx, _where(ctx, webhook), author_id=webhook.webhook_user_id, webhook_id=webhook.id,
                              body=body, webhook_execute=True)
        return message_response(ctx, message, exempt_root=True)

    def get_followup(ctx: RequestContext) -> Any:
        if ctx.args["token"] in ctx.backend.interaction_tokens:
            return interactions.get_followup(ctx)
        return message_response(ctx, _webhook_message(ctx)[1], exempt_root=True)

    def edit_followup(ctx: RequestContext) -> Any:
        if ctx.args["token"] in ctx.backend.interaction_tokens:
            return interactions.edit_followup(ctx)
        webhook, message = _webhook_message(ctx)
        body, with_components = _body(ctx, webhook)
        changes = message_edit_changes(ctx, message, body=body)
        message = ctx.backend.edit_message(message.channel_id, message.id, changes)
        response = message_response(ctx, message, exempt_root=True)
        if not with_components:
            response.pop("components", None)
        return response

    def delete_followup(ctx: RequestContext) -> Any:
        if ctx.args["token"] in ctx.backend.interaction_tokens:
            return interactions.delete_followup(ctx)
        _, message = _webhook_message(ctx)
        ctx.backend.delete_message(message.channel_id, message.id)

    replacements = {
        ("POST", "/channels/{channel_id}/webhooks"): create_webhook,
        ("PATCH", "/webhooks/{webhook_id}"): edit_webhook,
        ("PATCH", "/webhooks/{webhook_id}/{token}"): edit_webhook_with_token,
        ("POST", "/webhooks/{webhook_id}/{token}"): execute_webhook,
        ("GET", "/webhooks/{webhook_id}/{token}/messages/{message_id}"): get_followup,
        ("PATCH", "/webhooks/{webhook_id}/{token}/messages/{message_id}"): edit_followup,
        ("DELETE", "/webhooks/{webhook_id}/{token}/messages/{message_id}"): delete_followup,
    }
    saved: list[tuple[list[tuple[list[str], Any]], int, tuple[list[str], Any]]] = []
    for (method, template), handler in replacements.items():
        segments = template.strip("/").split("/")
        table = router._ROUTES[method]
        [index] = [i for i, (t, _) in enumerate(table) if t == segments]
        saved.append((table, index, table[index]))
        table[index] = (segments, handler)
    serializers.webhook_payload = webhook_payload
    try:
        yield parity
    finally:
        serializers.webhook_payload = original_payload
        for table, index, entry in saved:
            table[index] = entry


@pytest.fixture
def webhook_parity() -> Iterator[WebhookParity]:
    """SimCord with Discord's webhook behaviour (see `discord_webhooks`)."""
    with discord_webhooks() as parity:
        yield parity
