"""Characters on Discord, as members and admins use them: import a card, its greeting and swipes, two
characters in one channel, /character speak, member personas, the author's note and lorebooks.

Real discord.py through SimCord with Discord's webhook behaviour (tests/simcord_webhooks.py), the real
bot over a real SQLite file; the model is the fake backend unless a test says otherwise.
"""

from __future__ import annotations

import json

import discord
import pytest

from bot.core import cards
from bot.discord_front.keys import channel_key
from bot.discord_front.replies import REGENERATE_ID
from bot.discord_front.replies.buttons import SWIPE_NEXT_ID, SWIPE_PREV_ID
from persistence.records import Role
from tests import card_files
from tests.discord_fixtures import Tavern, bot_env, stored_turns, tavern_guild
from tests.fake_backend import FakeBackend


def simple_card(name: str, **fields: object) -> dict:
    """A V2 card with only a name, a description and the given fields."""
    data = {"name": name, "description": f"{name} is here.", **fields}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def card_png(name: str, **fields: object) -> bytes:
    """A PNG card (its picture becomes the avatar), as SillyTavern writes them: base64 JSON in `chara`."""
    return card_files.png_card([("tEXt", "chara", card_files.b64(simple_card(name, **fields)))])


def answer(result) -> discord.Message:
    """What a deferred command finally said (the first followup replaces the "thinking" message)."""
    assert result.followups or result.response, result
    return result.followups[-1] if result.followups else result.response


async def import_card(t, tavern: Tavern, data: bytes, filename: str = "card.png", **options: object) -> str:
    result = await tavern.admin.slash(tavern.channel, "character import", file=(filename, data), **options)
    return answer(result).content


def replies(channel) -> list[discord.Message]:
    """The characters' messages in the channel (posted through their webhooks)."""
    return [m for m in channel.history() if m.webhook_id is not None]


def buttons_of(message: discord.Message) -> list[str]:
    return [c.custom_id for row in message.components for c in row.children]  # type: ignore[union-attr]


async def test_an_imported_card_greets_through_its_webhook_with_name_and_avatar_and_swipes(db_url) -> None:
    greeting = "Welcome to the Gilded Tankard, {{user}}!"
    data = card_png("Mira", first_mes=greeting, alternate_greetings=["Oh, a new face.", "Close the door, {{user}}."])
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        said = await import_card(t, tavern, data)
        assert said.startswith('Imported "Mira" with 3 greeting(s)'), said
        persona = await t.bot.repo.get_persona(tavern.guild.id, "Mira")
        assert persona is not None and persona.avatar_sha
        started = await tavern.admin.slash(tavern.channel, "session start", character="Mira")
        assert started.response.content.startswith('Roleplay started in this channel with "Mira"')
        await t.env.settle()

        [shown] = replies(tavern.channel)
        assert shown.author.name == "Mira" and shown.content == "Welcome to the Gilded Tankard, Admin!"
        hook = await t.bot.repo.get_character_webhook(tavern.channel.id, persona.id)
        assert hook is not None and hook.webhook_id == shown.webhook_id
        create = next(r for r in t.env.http_requests if r.method == "POST" and r.path.endswith("/webhooks"))
        assert create.json["name"] == "Mira" and create.json["avatar"].startswith("data:image/png;base64,")
        assert SWIPE_NEXT_ID in buttons_of(shown) and REGENERATE_ID in buttons_of(shown)

        # ▶ shows the next greeting; the history holds the one shown.
        await tavern.alice.click(shown, custom_id=SWIPE_NEXT_ID)
        [shown] = replies(tavern.channel)
        assert shown.content == "Oh, a new face."
        [turn] = await stored_turns(t, tavern.channel)
        assert (turn.role, turn.content, turn.swipe, turn.swipe_count) == (Role.MODEL, "Oh, a new face.", 1, 3)
        await tavern.alice.click(shown, custom_id=SWIPE_PREV_ID)
        assert replies(tavern.channel)[0].content == "Welcome to the Gilded Tankard, Admin!"

        # Swipes survive a restart, and the story goes on from the version shown.
        await t.restart()
        await tavern.alice.click(replies(tavern.channel)[0], custom_id=SWIPE_NEXT_ID)
        await tavern.alice.send(tavern.channel, "Thank you!")
        assert "<|model|>Oh, a new face.<|user|>Alice: Thank you!<|model|>" in t.backend.prompts[-1]


async def test_regenerate_keeps_the_earlier_versions_as_swipes_across_a_restart(db_url) -> None:
    versions = iter(["First try.", "Second try.", "Third try."])
    async with bot_env(db_url, backend=FakeBackend(lambda _prompt: next(versions))) as t:
        tavern = tavern_guild(t.env)
        await import_card(t, tavern, card_png("Mira"))
        await tavern.admin.slash(tavern.channel, "session start", character="Mira")
        await tavern.alice.send(tavern.channel, "Hello")
        reply = replies(tavern.channel)[-1]
        await tavern.bob.click(reply, custom_id=REGENERATE_ID)
        await tavern.bob.click(replies(tavern.channel)[-1], custom_id=REGENERATE_ID)
        shown = replies(tavern.channel)[-1]
        assert shown.content == "Third try."
        labels = [c.label for row in shown.components for c in row.children]  # type: ignore[union-attr]
        assert "3/3" in labels
        model = (await stored_turns(t, tavern.channel))[-1]
        assert await t.bot.repo.swipes(model.id) == ["First try.", "Second try.", "Third try."]
        await t.restart()
        await tavern.alice.click(replies(tavern.channel)[-1], custom_id=SWIPE_PREV_ID)
        assert replies(tavern.channel)[-1].content == "Second try."
        assert (await stored_turns(t, tavern.channel))[-1].content == "Second try."


async def two_characters(t, tavern: Tavern) -> None:
    # Talkativeness 0: nobody speaks up unasked, so who answers is decided by names and replies alone.
    quiet = {"talkativeness": "0"}
    await import_card(t, tavern, card_png("Mira", description="Mira runs the inn.", extensions=quiet))
    await import_card(t, tavern, card_files.json_file(simple_card("Grim", description="Grim brews ale.",
                                                                  extensions=quiet)), "grim.json")
    await tavern.admin.slash(tavern.channel, "session start", character="Mira")
    added = await tavern.admin.slash(tavern.channel, "character add", name="Grim")
    assert added.response.content == '"Grim" joins the scene here.'


async def test_two_characters_answer_by_name_and_by_reply_under_their_own_names(db_url) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await two_characters(t, tavern)
        await tavern.alice.send(tavern.channel, "Grim, a pint please.")
        grim = replies(tavern.channel)[-1]
        assert grim.author.name == "Grim"
        prompt = t.backend.prompts[-1]
        assert "Grim brews ale." in prompt and "Mira runs the inn." not in prompt, "only the speaker's card"
        assert prompt.endswith("<|model|>Grim:"), "the reply starts with the speaker's name"

        await tavern.bob.send(tavern.channel, "Nice weather today.")
        assert replies(tavern.channel)[-1].author.name == "Mira", "nobody named: the main character"

        await tavern.bob.send(tavern.channel, "And then?", reply_to=grim)
        assert replies(tavern.channel)[-1].author.name == "Grim", "a reply to Grim's message is Grim's to answer"
        turns = await stored_turns(t, tavern.channel)
        model = [(turn.author_name, turn.character_id is not None) for turn in turns if turn.role is Role.MODEL]
        assert model == [("Grim", True), ("Mira", True), ("Grim", True)]
        # Shared history with the speakers' names; another character's line would end a reply.
        assert "<|model|>Grim: You said:" in t.backend.prompts[-1]
        assert len(replies(tavern.channel)) == 3, "characters never answer each other"


async def test_a_character_does_not_speak_for_another(db_url) -> None:
    backend = FakeBackend("Aye, here you go.\nMira: Don't drink it all!")
    async with bot_env(db_url, backend=backend) as t:
        tavern = tavern_guild(t.env)
        await two_characters(t, tavern)
        await tavern.alice.send(tavern.channel, "Grim, a pint please.")
        assert replies(tavern.channel)[-1].content == "Aye, here you go."


async def test_character_speak_makes_one_talk_now(db_url) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await two_characters(t, tavern)
        await tavern.alice.send(tavern.channel, "Hello")
        told = await tavern.bob.slash(tavern.channel, "character speak", name="Grim")
        assert told.response.content == "Grim will speak." and told.ephemeral
        await t.env.settle()
        assert [m.author.name for m in replies(tavern.channel)] == ["Mira", "Grim"]
        missing = await tavern.bob.slash(tavern.channel, "character speak", name="Nobody")
        assert "is not in this scene" in missing.response.content


async def test_the_member_persona_note_and_lorebook_reach_the_prompt(db_url) -> None:
    book = {"entries": {"0": {"uid": 0, "key": ["dragon"], "content": "Dragons sleep under the mountain.",
                              "position": 4, "depth": 1, "role": 0}}}
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await import_card(t, tavern, card_png("Mira"))
        await tavern.admin.slash(tavern.channel, "session start", character="Mira")
        saved = await tavern.alice.slash(tavern.channel, "me persona", text="Alice is a wandering bard.")
        assert saved.ephemeral and saved.response.content.startswith("Saved")
        await tavern.admin.slash(tavern.channel, "session note", text="Keep replies short.", depth=0)
        imported = await tavern.admin.slash(tavern.channel, "lore import",
                                            file=("world.json", json.dumps(book).encode()), name="World")
        assert "1 entries" in answer(imported).content
        await tavern.admin.slash(tavern.channel, "lore attach", name="World")

        await tavern.alice.send(tavern.channel, "Tell me about the dragon.")
        prompt = t.backend.prompts[-1]
        head = prompt.split("<|user|>", 1)[0]
        assert "Alice is a wandering bard." in head
        assert "<|system|>Dragons sleep under the mountain." in prompt
        assert prompt.endswith("<|system|>Keep replies short.<|model|>")
        await tavern.bob.send(tavern.channel, "Nice weather.")
        assert "Alice is a wandering bard." not in t.backend.prompts[-1], "Bob is answered, with his own persona"


async def test_bad_card_files_are_refused_clearly_and_store_nothing(db_url) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        plain = card_files.image_bytes()
        for data, expected in (
            (plain, "card"),
            (b"\x00garbage" * 10, "card"),
            (card_files.json_file({"spec": "chara_card_v9", "data": {"name": "X"}}), "chara_card_v9"),
        ):
            said = await import_card(t, tavern, data, "bad.png")
            assert expected in said.lower() or expected in said, said
        too_big = await tavern.admin.slash(tavern.channel, "character import",
                                           file=("big.png", b"\x89PNG" + b"\0" * (17 * 2**20)))
        assert "at most" in answer(too_big).content
        assert await t.bot.repo.list_personas(tavern.guild.id) == []
        refused = await tavern.alice.slash(tavern.channel, "character import", file=("x.png", card_png("Sneak")))
        assert "Manage Server" in refused.response.content
        assert await t.bot.repo.list_personas(tavern.guild.id) == []


async def test_export_round_trips_the_card(db_url) -> None:
    raw = card_files.v3_card("Mira", description="Mira runs the inn.")
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        await import_card(t, tavern, card_files.json_file(raw), "mira.json")
        for kind in ("png", "json"):
            result = await tavern.alice.slash(tavern.channel, "character export", name="Mira", format=kind)
            [attachment] = answer(result).attachments
            data = await attachment.read()
            card = cards.read_card(data)
            assert card.name == "Mira" and card.description == "Mira runs the inn."
            exported = json.loads(cards.stored_json(card))
            assert exported["data"]["extensions"] == raw["data"]["extensions"]
            assert exported["data"]["x_nested"] == raw["data"]["x_nested"], "unknown fields are kept"


@pytest.mark.parametrize("mode", ["speaker", "all"])
async def test_cards_in_prompt_mode(db_url, mode: str) -> None:
    from bot.config import CharacterSettings, Settings

    settings = Settings(characters=CharacterSettings(cards_in_prompt=mode))
    async with bot_env(db_url, settings=settings) as t:
        tavern = tavern_guild(t.env)
        await two_characters(t, tavern)
        await tavern.alice.send(tavern.channel, "Grim?")
        await tavern.alice.send(tavern.channel, "Mira?")
        heads = [p.split("<|user|>", 1)[0] for p in t.backend.prompts[-2:]]
        assert (heads[0] == heads[1]) is (mode == "all")
        session = await t.bot.repo.get_active_session(channel_key(tavern.channel.id))
        assert session is not None


async def test_the_cards_own_lorebook_examples_and_post_history_shape_the_prompt(db_url) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        # A complete V2 card: system prompt, examples, post-history instructions, a lorebook keyed "tower0".
        await import_card(t, tavern, card_files.png_card([("tEXt", "chara", card_files.b64(card_files.v2_card()))]))
        await tavern.admin.slash(tavern.channel, "session start", character="Aria")
        await t.env.settle()
        assert replies(tavern.channel)[0].content == "Halt, Admin!"
        await tavern.alice.send(tavern.channel, "What is tower0?")
        prompt = t.backend.prompts[-1]
        assert prompt.startswith("<|system|>Write as Aria.\nAria is a knight.\nAria's personality: brave\n"
                                 "Scenario: A tower.<|user|>Alice: Hi<|model|>Halt!")
        # The entry is placed before the character on the card; by default (`lore_in_head = "constant"`) a
        # triggered entry goes in at a depth instead, so the head the cache holds stays the same.
        assert "<|model|>Halt!<|system|>The tower is old.<|user|>Stay in character.<|model|>Halt, Admin!" in prompt, (
            "depth 4 reaches past this short history: the entry follows the examples; the card's depth prompt "
            "(depth 2, as a user turn) goes two messages from the end")
        assert prompt.endswith("<|user|>Alice: What is tower0?<|system|>Stay terse.<|model|>")
        await tavern.alice.send(tavern.channel, "Nothing about that.")
        assert "The tower is old." not in t.backend.prompts[-1].split("What is tower0?")[-1]


@pytest.mark.model
async def test_a_whole_scene_on_the_demo_model(db_url, demo_model_path) -> None:
    """Import, greeting, two characters answering by name, a regenerate kept as a swipe, lore in the prompt."""
    from bot.app import model_engine
    from bot.config import Settings

    settings = Settings.model_validate({"model": {"n_ctx": 1024, "threads": 2, "max_new_tokens": 24, "seed": 7}})
    engine = model_engine(settings, str(demo_model_path))
    book = {"entries": [{"keys": ["moon"], "content": "The moon is made of glass.", "enabled": True,
                         "insertion_order": 1, "extensions": {"position": 4, "depth": 1, "role": 0}}]}
    async with bot_env(db_url, engine=engine, settings=settings, settle_timeout=120) as t:
        tavern = tavern_guild(t.env)
        quiet = {"talkativeness": "0"}
        await import_card(t, tavern, card_png("Mira", description="Mira is a cheerful innkeeper.",
                                              first_mes="Welcome in, {{user}}!", extensions=quiet,
                                              character_book=book))
        await import_card(t, tavern, card_files.json_file(simple_card("Grim", description="Grim is a gruff dwarf.",
                                                                      extensions=quiet)), "grim.json")
        await tavern.admin.slash(tavern.channel, "session start", character="Mira")
        await tavern.admin.slash(tavern.channel, "character add", name="Grim")
        await t.env.settle()
        assert replies(tavern.channel)[0].content == "Welcome in, Admin!"

        await tavern.alice.send(tavern.channel, "Grim, what do you think of the moon?")
        await tavern.bob.send(tavern.channel, "Mira, another round please.")
        turns = await stored_turns(t, tavern.channel)
        speakers = [turn.author_name for turn in turns if turn.role is Role.MODEL and turn.content]
        assert speakers[0] == "Mira" and set(speakers[1:]) <= {"Grim", "Mira"}
        named = [m for m in replies(tavern.channel)[1:] if m.content.strip()]
        assert named, "the demo model wrote something"
        for message in named:
            assert not any(marker in message.content for marker in ("<|user|>", "<|model|>", "<|system|>"))
            assert "\nGrim:" not in message.content and "\nMira:" not in message.content
        last = replies(tavern.channel)[-1]
        before = (await stored_turns(t, tavern.channel))[-1]
        await tavern.alice.click(last, custom_id=REGENERATE_ID)
        after = (await stored_turns(t, tavern.channel))[-1]
        if after.swipe_count:
            assert (await t.bot.repo.swipes(after.id))[0] == before.content


async def test_a_card_is_imported_from_a_link_and_private_addresses_are_refused(db_url) -> None:
    from aiohttp import web

    data = card_png("Linked", description="Linked came from a link.")

    async def card(_request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="image/png")

    app = web.Application()
    app.router.add_get("/linked.png", card)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/linked.png"
    try:
        async with bot_env(db_url) as t:
            tavern = tavern_guild(t.env)
            refused = await tavern.admin.slash(tavern.channel, "character import", url=url)
            assert "private address" in answer(refused).content
            assert await t.bot.repo.list_personas(tavern.guild.id) == []
            t.bot.settings.characters.allow_private_urls = True  # an operator's own card server
            said = answer(await tavern.admin.slash(tavern.channel, "character import", url=url)).content
            assert said.startswith('Imported "Linked"'), said
            both = await tavern.admin.slash(tavern.channel, "character import", url=url, file=("x.png", data))
            assert answer(both).content == "Attach a card file or give a URL (one of them)."
    finally:
        await runner.cleanup()


async def test_a_channel_holds_at_most_fifteen_characters(db_url) -> None:
    async with bot_env(db_url) as t:
        tavern = tavern_guild(t.env)
        for number in range(16):
            card = cards.card_from_text(f"C{number}", f"C{number} is here.")
            await t.bot.repo.create_persona(tavern.guild.id, f"C{number}", card.description,
                                            card=cards.stored_json(card))
        await tavern.admin.slash(tavern.channel, "session start", character="C0")
        for number in range(1, 15):
            added = await tavern.admin.slash(tavern.channel, "character add", name=f"C{number}")
            assert added.response.content == f'"C{number}" joins the scene here.'
        again = await tavern.admin.slash(tavern.channel, "character add", name="C3")
        assert again.response.content == '"C3" joins the scene here.', "adding one already there changes nothing"
        full = await tavern.admin.slash(tavern.channel, "character add", name="C15")
        assert full.response.content == "This channel already has 15 characters, the most it may have."
        session = await t.bot.repo.get_active_session(channel_key(tavern.channel.id))
        assert session is not None and len(await t.bot.service.cast(session)) == 15
        main = await tavern.admin.slash(tavern.channel, "character remove", name="C0")
        assert "main character" in main.response.content


async def test_a_reply_whose_webhook_is_gone_is_still_taken_down_with_its_turn(db_url) -> None:
    """A moderator deletes the character's webhook, then a member deletes one part of a long reply: the
    turn goes, and the bot deletes the other part as itself (it has Manage Messages here)."""
    from bot.config import Settings

    settings = Settings.model_validate({"model": {"max_new_tokens": 2400}})  # one byte a token here
    async with bot_env(db_url, backend=FakeBackend("The road is long. " * 125), settings=settings) as t:
        tavern = tavern_guild(t.env)
        await import_card(t, tavern, card_png("Mira"))
        await tavern.admin.slash(tavern.channel, "session start", character="Mira")
        await tavern.alice.send(tavern.channel, "Tell me about the road.")
        first, _second = replies(tavern.channel)
        t.env.backend.delete_webhook(first.webhook_id)
        await t.restart()  # a fresh process knows no webhook object, only the stored mapping
        moderators = tavern.guild.create_role("Mods", permissions=discord.Permissions(manage_messages=True))
        moderator = tavern.guild.add_member(t.env.create_user("Moderator"), roles=[moderators])
        await moderator.delete(first)
        await t.env.settle()
        assert replies(tavern.channel) == []
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.USER]
