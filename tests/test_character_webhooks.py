"""Characters speaking through channel webhooks: the real bot in SimCord (with Discord's webhook
behaviour, `tests/simcord_webhooks.py`), and discord.py's real HTTP client against a loopback server."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import discord
import pytest
import simcord
from aiohttp import web

from bot.config import Settings
from bot.core import cards
from bot.core.scene import Character
from bot.core.sessions import Speaker, character_of
from bot.discord_front.client import TavernBot, create_bot
from bot.discord_front.keys import channel_key
from bot.discord_front.replies import CONTINUE_ID, REGENERATE_ID
from bot.discord_front.replies.render import BotPoster, ReplyMessages
from bot.discord_front.webhooks import LIMIT_NOTICE, PERMISSION_TIP, WebhookPoster, voice_name
from persistence.database import Database
from persistence.records import Persona, Role
from persistence.repository import Repository
from tests.card_files import image_bytes, json_file, v2_card
from tests.discord_fixtures import (
    BotEnv,
    Tavern,
    bot_env,
    message_writes,
    replay,
    start_session,
    stored_turns,
    tavern_guild,
)
from tests.fake_backend import FakeBackend, fake_engine
from tests.simcord_webhooks import MAX_WEBHOOKS_PER_CHANNEL, WebhookParity, discord_webhooks


@pytest.fixture(autouse=True)
def hooks() -> Iterator[WebhookParity]:
    """Discord's webhook behaviour (see `tests/simcord_webhooks.py`; conftest applies it to every test), here
    with the avatars uploaded kept for the tests to read."""
    with discord_webhooks() as parity:
        yield parity


REPLY = "Mira tilts her head. The bridge sways, but it holds; step where the planks are dark."
RED, BLUE = (200, 30, 30), (30, 60, 200)


def character_card(name: str, color: tuple[int, int, int] = RED) -> cards.CharacterCard:
    """A V2 card as a card site writes it, with a portrait; no greeting (a session start posts none) and
    never chiming in unasked (talkativeness 0), so each test decides who speaks."""
    raw = v2_card(name, first_mes="", alternate_greetings=[], extensions={"talkativeness": "0"})
    return cards.with_avatar(cards.read_card(json_file(raw)), image_bytes(color=color))


async def store_character(
    repo: Repository, guild_id: int, name: str = "Mira", color: tuple[int, int, int] = RED
) -> Persona:
    """Store a character as `/character import` does: the card's JSON and its avatar beside it."""
    card = character_card(name, color)
    return await repo.create_persona(guild_id, name, card.description, card=cards.stored_json(card),
                                     avatar=card.avatar)


async def start_with_mira(t: BotEnv, tavern: Tavern, channel: simcord.ChannelHandle | None = None) -> Persona:
    """Mira stored in the guild (once), then `/session start character:Mira` in `channel`."""
    mira = await t.bot.repo.get_persona(tavern.guild.id, "Mira")
    if mira is None:
        mira = await store_character(t.bot.repo, tavern.guild.id)
    await start_session(t, tavern, channel=channel)
    return mira


def requests(env: simcord.Env, method: str, prefix: str) -> list[simcord.HttpLogEntry]:
    return [r for r in env.http_requests if r.method == method and r.path.startswith(prefix)]


def buttons(message: discord.Message) -> list[str]:
    return [child.custom_id for row in message.components for child in row.children]  # type: ignore[union-attr]


def assert_no_mentions(env: simcord.Env, *, webhooks: bool = True) -> None:
    """Every message the bot wrote, through a webhook or as itself, pings nobody."""
    writes = [r for r in message_writes(env) if r.json and "content" in r.json]
    assert writes and all(r.json["allowed_mentions"]["parse"] == [] for r in writes)
    assert any(r.path.startswith("/webhooks/") for r in writes) is webhooks


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- names ------------------------------------------------------------------------------------------


def test_voice_names_are_what_discord_accepts() -> None:
    assert voice_name("Mira") == "Mira"
    assert voice_name("  Old   Clyde\nthe Discord bard ") == "Old Clydе the Discоrd bard"
    assert "clyde" not in voice_name("CLYDE").lower() and voice_name("CLYDE") == "CLYDЕ"
    assert len(voice_name("x" * 200)) == 80 and voice_name("   ") == "Character"


# --- through the webhook ----------------------------------------------------------------------------


async def test_a_reply_speaks_through_the_characters_webhook_with_its_name_and_avatar(
    db_url: str, hooks: WebhookParity
) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY, token_delay=0.004)) as t:
        tavern = tavern_guild(t.env)
        mira = await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "Is the bridge safe?")
        reply = tavern.channel.last_message
        assert reply.content == REPLY and reply.webhook_id is not None
        assert reply.author.display_name == "Mira" and reply.author.bot

        [create] = requests(t.env, "POST", f"/channels/{tavern.channel.id}/webhooks")
        assert create.json["name"] == "Mira"
        uploaded = create.json["avatar"]
        assert uploaded == data_uri(await t.bot.repo.get_avatar(mira.id) or b"")  # the card's portrait
        assert hooks.avatars[reply.webhook_id] == uploaded
        record = await t.bot.repo.get_character_webhook(tavern.channel.id, mira.id)
        assert record is not None
        assert (record.channel_id, record.persona_id, record.webhook_id) == (tavern.channel.id, mira.id,
                                                                             reply.webhook_id)
        assert await t.bot.repo.character_webhook_ids() == {reply.webhook_id}
        assert reply.webhook_id in t.bot.intake.own_webhook_ids

        # Streaming edits go through the webhook's message; nothing is posted or edited as the bot.
        edits = requests(t.env, "PATCH", f"/webhooks/{reply.webhook_id}/")
        assert len(edits) >= 3 and all(r.path.endswith(f"/messages/{reply.id}") for r in edits)
        assert not requests(t.env, "PATCH", f"/channels/{tavern.channel.id}/messages")
        assert [m for m in tavern.channel.history() if m.author.bot and m.webhook_id is None] == []
        [_, turn] = await stored_turns(t, tavern.channel)
        assert (turn.content, turn.author_name, turn.character_id) == (REPLY, "Mira", mira.id)
        assert turn.message_ids == (reply.id,)
        assert buttons(reply) == [REGENERATE_ID, CONTINUE_ID]
        assert_no_mentions(t.env)

        # The next reply reuses the webhook and takes the buttons off the previous one through it.
        await tavern.bob.send(tavern.channel, "And the river?")
        second = tavern.channel.last_message
        assert second.webhook_id == reply.webhook_id and second.id != reply.id
        assert len(requests(t.env, "POST", f"/channels/{tavern.channel.id}/webhooks")) == 1
        first_now = next(m for m in tavern.channel.history() if m.id == reply.id)
        assert buttons(first_now) == [] and buttons(second) == [REGENERATE_ID, CONTINUE_ID]
        assert_no_mentions(t.env)


async def test_the_buttons_on_a_webhook_reply_reach_the_bot(db_url: str) -> None:
    backend = FakeBackend(iter_replies("First words.", "Second thoughts.", " And more."))
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "Speak.")
        reply = tavern.channel.last_message
        assert reply.webhook_id is not None and buttons(reply) == [REGENERATE_ID, CONTINUE_ID]

        await tavern.bob.click(reply, custom_id=REGENERATE_ID)
        again = next(m for m in tavern.channel.history() if m.id == reply.id)
        # Regenerate keeps the first version as a swipe: ◀ 2/2 ▶ comes under the buttons.
        assert again.content == "Second thoughts." and buttons(again) == [REGENERATE_ID, CONTINUE_ID, *SWIPE_IDS]
        assert again.webhook_id == reply.webhook_id
        await tavern.alice.click(again, custom_id=CONTINUE_ID)
        longer = next(m for m in tavern.channel.history() if m.id == reply.id)
        assert longer.content == "Second thoughts. And more."
        assert buttons(longer) == [REGENERATE_ID, CONTINUE_ID, *SWIPE_IDS]
        [_, turn] = await stored_turns(t, tavern.channel)
        assert turn.content == "Second thoughts. And more." and turn.message_ids == (reply.id,)
        assert len([m for m in tavern.channel.history() if m.author.bot]) == 1
        # Every edit went through the webhook, which alone can edit its message.
        assert not requests(t.env, "PATCH", f"/channels/{tavern.channel.id}/messages")
        assert_no_mentions(t.env)


SWIPE_IDS = ("tavernkeep:swipe_prev", "tavernkeep:swipe_count", "tavernkeep:swipe_next")


def iter_replies(*replies: str) -> Callable[[str], str]:
    """Replies in order (the last one repeats)."""
    calls = itertools.count()

    def reply(_prompt: str) -> str:
        return replies[min(next(calls), len(replies) - 1)]

    return reply


async def test_deleting_one_part_of_a_webhook_reply_removes_the_rest_through_the_webhook(db_url: str) -> None:
    settings = Settings.model_validate({"model": {"max_new_tokens": 6000}})
    async with bot_env(db_url, backend=FakeBackend(("A long tale. " * 250).strip(), n_ctx=16384),
                       settings=settings) as t:
        tavern = tavern_guild(t.env)
        moderator = tavern.guild.create_role("Mod", permissions=discord.Permissions(manage_messages=True))
        mod = tavern.guild.add_member(t.env.create_user("Moderator"), roles=[moderator])
        await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "Tell me a tale.")
        first, second = [m for m in tavern.channel.history() if m.webhook_id is not None]
        await mod.delete(first)
        assert [m.id for m in tavern.channel.history() if m.author.bot] == []
        assert requests(t.env, "DELETE", f"/webhooks/{second.webhook_id}/")[-1].path.endswith(f"/messages/{second.id}")
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.USER]


async def test_in_a_thread_the_parents_webhook_posts_into_the_thread(db_url: str) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY, token_delay=0.002)) as t:
        tavern = tavern_guild(t.env)
        thread = simcord.ChannelHandle(
            t.env, tavern.guild, t.env.backend.create_thread(tavern.channel.id, "Side scene", tavern.alice.id)
        )
        forum = tavern.guild.create_forum_channel("stories")
        post = simcord.ChannelHandle(t.env, tavern.guild, t.env.backend.create_thread(forum.id, "Quest", tavern.bob.id))
        await t.env.settle()
        mira = await start_with_mira(t, tavern, channel=thread)
        await start_with_mira(t, tavern, channel=post)
        for place, parent in ((thread, tavern.channel), (post, forum)):
            await tavern.alice.send(place, "Psst.")
            reply = place.last_message
            assert reply.content == REPLY and reply.webhook_id is not None
            assert reply.author.display_name == "Mira" and buttons(reply) == [REGENERATE_ID, CONTINUE_ID]
            [create] = requests(t.env, "POST", f"/channels/{parent.id}/webhooks")
            assert create.json["name"] == "Mira"
            sends = requests(t.env, "POST", f"/webhooks/{reply.webhook_id}/")
            edits = requests(t.env, "PATCH", f"/webhooks/{reply.webhook_id}/")
            assert sends and edits and all(int(r.params["thread_id"]) == place.id for r in sends + edits)
            assert not [m for m in parent.history() if m.webhook_id == reply.webhook_id]
            # The webhook belongs to the parent channel, the thread has none of its own.
            record = await t.bot.repo.get_character_webhook(parent.id, mira.id)
            assert record is not None and record.webhook_id == reply.webhook_id
            assert await t.bot.repo.get_character_webhook(place.id, mira.id) is None
        assert not requests(t.env, "POST", f"/channels/{thread.id}/webhooks")
        assert_no_mentions(t.env)


async def test_a_webhook_deleted_by_a_moderator_is_created_again_once(db_url: str) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY)) as t:
        tavern = tavern_guild(t.env)
        mira = await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "One.")
        first = tavern.channel.last_message
        t.env.backend.delete_webhook(first.webhook_id)  # a moderator removes it in the channel settings
        await t.env.settle()

        await tavern.alice.send(tavern.channel, "Two.")
        second = tavern.channel.last_message
        assert second.content == REPLY and second.webhook_id not in (None, first.webhook_id)
        assert second.author.display_name == "Mira"
        assert len(requests(t.env, "POST", f"/channels/{tavern.channel.id}/webhooks")) == 2
        assert len(requests(t.env, "POST", f"/webhooks/{first.webhook_id}/")) == 2  # 1st reply, then the 404
        assert await t.bot.repo.character_webhook_ids() == {second.webhook_id}
        record = await t.bot.repo.get_character_webhook(tavern.channel.id, mira.id)
        assert record is not None and record.webhook_id == second.webhook_id
        [*_, turn] = await stored_turns(t, tavern.channel)
        assert turn.content == REPLY and turn.message_ids == (second.id,)
        assert buttons(second) == [REGENERATE_ID, CONTINUE_ID]


async def test_a_webhook_deleted_while_a_reply_streams_gets_the_reply_posted_anew(db_url: str) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        mira = character_of(await store_character(t.bot.repo, tavern.guild.id))
        channel = t.bot.get_channel(tavern.channel.id)
        assert isinstance(channel, discord.TextChannel)
        poster = await t.bot.replies.poster_for(channel, mira)
        assert isinstance(poster, WebhookPoster)
        target = ReplyMessages(poster, set())
        await target.show("The first")
        [old] = target.ids
        t.env.backend.delete_webhook(poster.webhook.id)
        await target.show("The first words")
        await target.finish("The first words, all of them.", None)
        [new] = target.ids
        assert new != old
        assert t.env.backend.get_message(tavern.channel.id, new).content == "The first words, all of them."
        assert len(requests(t.env, "POST", f"/channels/{tavern.channel.id}/webhooks")) == 2
        assert await t.bot.repo.character_webhook_ids() == {poster.webhook.id}


async def test_without_manage_webhooks_the_bot_speaks_with_the_name_in_bold_and_tips_admins_once(
    db_url: str,
) -> None:
    settings = Settings.model_validate({"model": {"max_new_tokens": 6000}})
    async with bot_env(db_url, backend=FakeBackend("x" * 1995, n_ctx=16384), settings=settings) as t:
        tavern = tavern_guild(t.env)
        me = tavern.guild.me
        assert me is not None
        channel = tavern.guild.create_text_channel(
            "no-hooks", overwrites={me: discord.PermissionOverwrite(manage_webhooks=False)}
        )
        await t.env.settle()
        await start_with_mira(t, tavern, channel=channel)
        for said in ("One.", "Two.", "Three."):
            await tavern.alice.send(channel, said)
        bot_posts = [m for m in channel.history() if m.author.bot]
        assert [m.content for m in bot_posts].count(PERMISSION_TIP) == 1
        replies = [m for m in bot_posts if m.content != PERMISSION_TIP]
        # The name counts against the limit: 1995 characters do not fit after "**Mira**\n".
        assert len(replies) == 6 and all(len(m.content) <= 2000 for m in replies)
        assert replies[0].content.startswith("**Mira**\n") and not replies[1].content.startswith("**")
        assert all(m.webhook_id is None for m in replies)
        assert buttons(replies[-1]) == [REGENERATE_ID, CONTINUE_ID] and buttons(replies[1]) == []
        model_turns = [turn for turn in await stored_turns(t, channel) if turn.role is Role.MODEL]
        assert len(model_turns) == 3
        assert all(turn.content == "x" * 1995 and "Mira" not in turn.content for turn in model_turns)
        assert not requests(t.env, "POST", f"/channels/{channel.id}/webhooks")
        assert await t.bot.repo.character_webhook_ids() == set()
        assert_no_mentions(t.env, webhooks=False)


async def test_at_the_webhook_limit_the_bot_speaks_and_says_why_once(db_url: str, caplog) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY)) as t:
        tavern = tavern_guild(t.env)
        for n in range(MAX_WEBHOOKS_PER_CHANNEL):
            t.env.backend.create_webhook(tavern.channel.id, f"Other {n}", tavern.admin.id)
        await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "One.")
        await tavern.alice.send(tavern.channel, "Two.")
        bot_posts = [m for m in tavern.channel.history() if m.author.bot]
        assert [m.content for m in bot_posts] == [LIMIT_NOTICE, "**Mira**\n" + REPLY, "**Mira**\n" + REPLY]
        assert sum("webhook limit" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 1
        assert await t.bot.repo.character_webhook_ids() == set()


async def test_a_renamed_character_with_a_new_avatar_edits_its_webhook(
    db_url: str, hooks: WebhookParity
) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY)) as t:
        tavern = tavern_guild(t.env)
        await start_with_mira(t, tavern)
        bram = await store_character(t.bot.repo, tavern.guild.id, "Bram", RED)
        await tavern.admin.slash(tavern.channel, "character add", name="Bram")
        await tavern.alice.slash(tavern.channel, "character speak", name="Bram")
        reply = tavern.channel.last_message
        hook_id = reply.webhook_id
        assert reply.author.display_name == "Bram" and hook_id is not None
        record = await t.bot.repo.get_character_webhook(tavern.channel.id, bram.id)
        assert record is not None and (record.webhook_id, record.avatar_sha) == (hook_id, bram.avatar_sha)

        # A new look, then a new process (nothing cached): the stored webhook is edited, not replaced.
        card = character_card("Bram the Discord Bard", BLUE)
        renamed = await t.bot.repo.update_persona(tavern.guild.id, "Bram", card.description,
                                                  card=cards.stored_json(card), avatar=card.avatar,
                                                  new_name="Bram the Discord Bard")
        assert renamed is not None and renamed.avatar_sha not in (None, bram.avatar_sha)
        await t.restart()
        await tavern.alice.slash(tavern.channel, "character speak", name="Bram the Discord Bard")
        reply = tavern.channel.last_message
        assert reply.webhook_id == hook_id and reply.author.display_name == "Bram the Discоrd Bard"
        [edit] = [r for r in t.env.http_requests if r.method == "PATCH" and r.path == f"/webhooks/{hook_id}"]
        assert edit.json["name"] == "Bram the Discоrd Bard"
        assert edit.json["avatar"] == data_uri(card.avatar or b"") and hooks.avatars[hook_id] == edit.json["avatar"]
        record = await t.bot.repo.get_character_webhook(tavern.channel.id, bram.id)
        assert record is not None and (record.webhook_id, record.avatar_sha) == (hook_id, renamed.avatar_sha)
        assert t.env.backend.webhooks[hook_id].name == "Bram the Discоrd Bard"
        assert len(requests(t.env, "POST", f"/channels/{tavern.channel.id}/webhooks")) == 1
        assert hook_id in t.bot.intake.own_webhook_ids  # the fresh bot knows it from the database


async def test_a_new_avatar_of_the_main_character_reaches_its_webhook(db_url: str, hooks: WebhookParity) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY)) as t:
        tavern = tavern_guild(t.env)
        mira = await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "Hi.")
        hook_id = tavern.channel.last_message.webhook_id
        record = await t.bot.repo.get_character_webhook(tavern.channel.id, mira.id)
        assert record is not None and record.avatar_sha == mira.avatar_sha
        card = character_card("Mira", BLUE)
        await t.bot.repo.update_persona(tavern.guild.id, "Mira", card.description, avatar=card.avatar)
        await tavern.alice.send(tavern.channel, "Hi again.")
        [edit] = [r for r in t.env.http_requests if r.method == "PATCH" and r.path == f"/webhooks/{hook_id}"]
        assert edit.json["avatar"] == data_uri(card.avatar or b"") == hooks.avatars[hook_id]


async def test_the_bot_ignores_its_own_webhooks_but_answers_proxies(db_url: str) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY)) as t:
        tavern = tavern_guild(t.env)
        await start_with_mira(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello.")
        own = tavern.channel.last_message
        assert own.webhook_id in t.bot.intake.own_webhook_ids
        assert own.webhook_id in await t.bot.repo.character_webhook_ids()
        replay(t.env, own, id=str(own.id + 1000))  # the webhook's MESSAGE_CREATE again, as a new message
        await t.env.settle()
        assert len(await stored_turns(t, tavern.channel)) == 2

        # A PluralKit webhook (made by PluralKit, not by the bot) still speaks for a person.
        pluralkit = t.env.create_user("PluralKit", bot=True)
        hook = simcord.WebhookHandle(t.env, t.env.backend.create_webhook(tavern.channel.id, "PluralKit", pluralkit.id))
        await hook.send("Hi, Mira!", username="Lyra (Alice)")
        turns = await stored_turns(t, tavern.channel)
        assert [(turn.role, turn.author_name, turn.content) for turn in turns[2:]] == [
            (Role.USER, "Lyra (Alice)", "Hi, Mira!"), (Role.MODEL, "Mira", REPLY)]
        answer = tavern.channel.last_message
        assert answer.content == REPLY and answer.webhook_id == own.webhook_id
        assert hook.id not in t.bot.intake.own_webhook_ids


async def test_posting_as_the_bot_stays_the_default_without_a_character(db_url: str) -> None:
    async with bot_env(db_url, backend=FakeBackend(REPLY)) as t:
        tavern = tavern_guild(t.env)
        # A session of plain persona text, no stored character (as sessions from before characters are).
        await t.bot.repo.start_session(channel_key(tavern.channel.id), guild_id=tavern.guild.id,
                                       persona_text="Mira is a ranger.")
        await tavern.alice.send(tavern.channel, "Hello.")
        reply = tavern.channel.last_message
        assert reply.content == REPLY and reply.webhook_id is None
        assert not requests(t.env, "POST", f"/channels/{tavern.channel.id}/webhooks")
        channel = t.bot.get_channel(tavern.channel.id)
        assert isinstance(channel, discord.TextChannel)
        assert isinstance(await t.bot.replies.poster_for(channel, None), BotPoster)
        plain = Character(None, "Mira", cards.card_from_text("Mira", "Mira is a ranger."))
        poster = await t.bot.replies.poster_for(channel, plain)
        assert isinstance(poster, BotPoster) and poster.prefix == ""
        assert_no_mentions(t.env, webhooks=False)


# --- discord.py's HTTP client -----------------------------------------------------------------------

CHANNEL, THREAD, GUILD, BOT_ID = 4242, 4343, 4141, 1000


@dataclass
class LoopbackDiscord:
    """A channel with a thread, the bot's channel webhooks, and one webhook deleted behind its back."""

    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    webhooks: dict[int, str] = field(default_factory=dict)
    avatars: dict[int, str | None] = field(default_factory=dict)
    writes: list[tuple[str, dict]] = field(default_factory=list)  # (method, body) of webhook messages
    deleted: set[int] = field(default_factory=set)
    messages: dict[int, str] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(9000))

    def message(self, message_id: int, content: str, webhook_id: int | None) -> dict:
        author = {"id": str(webhook_id or BOT_ID), "username": "Mira" if webhook_id else "Tavernkeep",
                  "discriminator": "0000", "avatar": None, "bot": True}
        payload = {
            "id": str(message_id), "channel_id": str(THREAD), "content": content, "type": 0, "author": author,
            "timestamp": "2026-01-01T00:00:00+00:00", "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "components": [],
        }
        return payload | ({"webhook_id": str(webhook_id)} if webhook_id else {})

    def webhook(self, webhook_id: int) -> dict:
        return {"id": str(webhook_id), "type": 1, "channel_id": str(CHANNEL), "guild_id": str(GUILD),
                "name": "Mira", "avatar": None, "token": self.webhooks[webhook_id], "application_id": str(BOT_ID)}

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.removeprefix("/api/v10")
        self.calls.append((request.method, path, dict(request.query)))
        body = json.loads(await request.text() or "{}")
        if path == "/users/@me":
            return as_json({"id": str(BOT_ID), "username": "Tavernkeep", "discriminator": "0", "avatar": None,
                            "bot": True})
        if path.endswith("/typing"):
            return web.Response(status=204)
        if request.method == "POST" and path == f"/channels/{CHANNEL}/webhooks":
            webhook_id = next(self._ids)
            self.webhooks[webhook_id] = f"token-{webhook_id}"
            self.avatars[webhook_id] = body.get("avatar")
            return as_json(self.webhook(webhook_id))
        parts = path.strip("/").split("/")
        if parts[0] == "webhooks":
            webhook_id = int(parts[1])
            if webhook_id in self.deleted or webhook_id not in self.webhooks:
                return as_json({"message": "Unknown Webhook", "code": 10015}, status=404)
            if request.method == "GET" and len(parts) == 2:
                return as_json(self.webhook(webhook_id))
            message_id = next(self._ids) if request.method == "POST" else int(parts[-1])
            if request.method == "DELETE":
                return web.Response(status=204)
            if "content" in body:
                self.messages[message_id] = body["content"]
                self.writes.append((request.method, body))
            return as_json(self.message(message_id, self.messages.get(message_id, ""), webhook_id))
        message_id = next(self._ids) if request.method == "POST" else int(parts[-1])
        self.messages[message_id] = body.get("content", "")
        return as_json(self.message(message_id, self.messages[message_id], None))


def as_json(body: object, *, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


@asynccontextmanager
async def loopback(db_url: str, monkeypatch: pytest.MonkeyPatch, server: LoopbackDiscord) -> AsyncIterator[TavernBot]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    settings = Settings.model_validate({"discord": {"api_base_url": f"http://127.0.0.1:{port}/api/v10"}})
    database = await Database.open(db_url)
    engine = fake_engine(FakeBackend(REPLY))
    await engine.start()
    bot = create_bot(settings, engine=engine, database=database, edit_interval=0.0, reply_delay=0)
    try:
        await bot._async_setup_hook()
        await bot.http.static_login("not-a-real-token")
        mira = await store_character(bot.repo, GUILD)
        session = await bot.repo.start_session(channel_key(THREAD), guild_id=GUILD, persona_id=mira.id)
        await bot.service.add_user_turn(session, Speaker(7, "Alice"), "Is the bridge safe?", message_id=77)
        yield bot
    finally:
        await bot.http.close()
        await engine.close(grace=0)
        await database.close()
        await runner.cleanup()


def thread_in_guild(bot: TavernBot) -> discord.Thread:
    """A guild with #roleplay and a thread under it, in the client's cache, the bot with all permissions."""
    state = bot._connection
    bot_user = {"id": str(BOT_ID), "username": "Tavernkeep", "discriminator": "0", "avatar": None, "bot": True}
    state.user = discord.ClientUser(state=state, data=bot_user)  # what `Client.login` sets
    everyone = {"id": str(GUILD), "name": "@everyone", "permissions": str(discord.Permissions.all().value),
                "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False}
    guild = discord.Guild(data={"id": str(GUILD), "name": "Tavern", "roles": [everyone], "emojis": [],
                                "stickers": [], "features": [], "owner_id": "1"}, state=state)
    channel = discord.TextChannel(state=state, guild=guild, data={
        "id": str(CHANNEL), "type": 0, "name": "roleplay", "position": 0, "permission_overwrites": []})
    guild._add_channel(channel)
    me = discord.Member(data={"user": bot_user, "roles": [], "joined_at": None, "deaf": False, "mute": False,
                              "flags": 0}, guild=guild, state=state)
    guild._add_member(me)
    thread = discord.Thread(guild=guild, state=state, data={
        "id": str(THREAD), "type": 11, "name": "Side scene", "parent_id": str(CHANNEL), "owner_id": "7",
        "message_count": 0, "member_count": 1,
        "thread_metadata": {"archived": False, "auto_archive_duration": 60, "archive_timestamp":
                            "2026-01-01T00:00:00+00:00", "locked": False}})
    guild._add_thread(thread)
    state._add_guild(guild)
    return thread


async def test_webhook_sends_carry_thread_and_wait_and_a_dead_webhook_is_recreated_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = LoopbackDiscord()
    async with loopback(db_url, monkeypatch, server) as bot:
        thread = thread_in_guild(bot)
        mira = await bot.repo.get_persona(GUILD, "Mira")
        assert mira is not None
        # The first reply creates the webhook (with the card's portrait); then a moderator deletes it.
        bot.replies.request_reply(thread, None)
        await bot.replies.drain(30)
        [dead] = server.webhooks
        server.deleted.add(dead)
        await bot.service.add_user_turn(
            await bot.repo.get_active_session(channel_key(THREAD)), Speaker(7, "Alice"), "Well?", message_id=78)
        bot.replies.request_reply(thread, None)
        await bot.replies.drain(30)

        creates = [c for c in server.calls if c[:2] == ("POST", f"/channels/{CHANNEL}/webhooks")]
        assert len(creates) == 2  # the first reply's, and exactly one re-create
        sends = [(path, query) for method, path, query in server.calls
                 if method == "POST" and path.startswith("/webhooks/")]
        [alive] = [w for w in server.webhooks if w != dead]
        # The first reply, the send refused with 404/10015, and exactly one retry through the new webhook.
        assert [int(path.split("/")[2]) for path, _ in sends] == [dead, dead, alive]
        assert all(query["thread_id"] == str(THREAD) and query["wait"] in ("1", "true") for _, query in sends)
        portrait = data_uri(await bot.repo.get_avatar(mira.id) or b"")
        assert server.avatars == {dead: portrait, alive: portrait}
        # Every message written through a webhook is Mira's, and pings nobody.
        assert server.writes and all(body["username"] == "Mira" for method, body in server.writes if method == "POST")
        assert all(body["allowed_mentions"] == {"parse": []} for _, body in server.writes)
        assert await bot.repo.character_webhook_ids() == {alive}
        record = await bot.repo.get_character_webhook(CHANNEL, mira.id)
        assert record is not None and record.webhook_id == alive
        session = await bot.repo.get_active_session(channel_key(THREAD))
        turns = await bot.repo.recent_turns(session.id, 10)
        assert [turn.content for turn in turns if turn.role is Role.MODEL] == [REPLY, REPLY]
        assert server.messages[turns[-1].message_ids[0]] == REPLY
