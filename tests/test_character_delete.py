"""A character a channel plays (as its main character or beside it) is never deleted from under it, and
no reply is ever written from an empty persona. Driven through SimCord against the real bot, a real
SQLite file and the fake model."""

from __future__ import annotations

from bot.config import Settings
from bot.discord_front.keys import channel_key
from bot.errors import PersonaMissing
from persistence.records import Role
from tests.discord_fixtures import bot_env, start_session, stored_turns, tavern_guild

QUIET = Settings.model_validate({"discord": {"cooldown_messages": 0}})
MIRA = "Mira is a sharp-tongued elven ranger."


async def test_deleting_a_character_in_play_is_refused_naming_its_channels(db_url):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        cellar = tavern.guild.create_text_channel("cellar")
        lobby = tavern.guild.create_text_channel("lobby")
        hall = tavern.guild.create_text_channel("hall")
        await start_session(t, tavern, persona=MIRA)
        await start_session(t, tavern, channel=cellar)
        await tavern.admin.slash(cellar, "session stop")  # paused still plays it
        await t.bot.repo.start_session(channel_key(lobby.id), guild_id=tavern.guild.id, persona_text="Bram.")
        await start_session(t, tavern, channel=hall, name="Bram", persona="Bram is a bard.")
        joined = await tavern.admin.slash(hall, "character add", name="Mira")  # beside Bram: plays it too
        assert joined.response.content == '"Mira" joins the scene here.'

        refused = await tavern.admin.slash(tavern.channel, "character delete", name="Mira")
        assert refused.ephemeral
        assert refused.response.content == (
            f'"Mira" plays in <#{tavern.channel.id}>, <#{cellar.id}>, <#{hall.id}>; take it out there '
            "(/character use, /character remove) or reset them before deleting it."
        )
        assert (await t.bot.repo.get_persona(tavern.guild.id, "Mira")).text == MIRA
        await tavern.alice.send(tavern.channel, "Still there?")
        assert MIRA in t.backend.prompts[-1]

        # Once no channel plays it, it goes: taken out of the hall's scene, replaced as main elsewhere.
        left = await tavern.admin.slash(hall, "character remove", name="Mira")
        assert left.response.content == '"Mira" left the scene.'
        for channel in (tavern.channel, cellar):
            await t.bot.repo.start_session(channel_key(channel.id), persona_text="Someone else.")
        done = await tavern.admin.slash(tavern.channel, "character delete", name="Mira")
        assert done.response.content == 'Deleted the character "Mira".'
        assert await t.bot.repo.get_persona(tavern.guild.id, "Mira") is None


async def test_a_session_without_persona_text_is_never_answered_from_an_empty_persona(db_url):
    async with bot_env(db_url, settings=QUIET) as t:
        tavern = tavern_guild(t.env)
        # What an older version left after deleting a persona in play: an open session with no persona.
        await t.bot.repo.start_session(channel_key(tavern.channel.id), guild_id=tavern.guild.id, persona_text="")
        await tavern.alice.send(tavern.channel, "Hello?")

        assert t.backend.prompts == []  # nothing generated
        [notice] = [m for m in tavern.channel.history() if m.author.bot]
        assert notice.content == PersonaMissing.user_message
        assert [turn.role for turn in await stored_turns(t, tavern.channel)] == [Role.USER]  # no reserved turn left
