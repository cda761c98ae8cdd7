"""`tavernkeep chat`: a roleplay session in the terminal over the same path as the Discord bot."""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO

from bot.core import cards
from bot.core.sessions import ChatService, Speaker, character_of, main_character
from bot.errors import TavernError
from bot.inference.engine import Engine, Queued, Text
from bot.prompt.builder import MessageTooLarge, PromptTooLarge
from persistence.records import ChannelSession, Persona, Role

log = logging.getLogger(__name__)

DEFAULT_PERSONA = (
    "Tavernkeep is the warm, quick-witted keeper of the Gilded Tankard, a busy inn at a crossroads. "
    "She knows every traveller's rumour and loves a good story."
)
HELP = "Commands: /reset (start over, old history is archived), /quit (leave). Anything else is said in character."
HISTORY_SHOWN = 6


def channel_key(session_name: str) -> str:
    """The channel key of a terminal session."""
    return f"local:{session_name}"


class TerminalChat:
    """Reads lines from `stdin`, streams replies to `stdout`; never blocks the event loop on input."""

    def __init__(self, service: ChatService, stdin: TextIO, stdout: TextIO, *, user_name: str) -> None:
        self.service = service
        self.stdin = stdin
        self.stdout = stdout
        self.user = Speaker(None, user_name)
        self.interactive = stdin.isatty()
        self.character = "Character"  # the name replies are shown under

    def say(self, text: str = "", end: str = "\n") -> None:
        """Write to the terminal and flush."""
        self.stdout.write(text + end)
        self.stdout.flush()

    async def open(
        self, session_name: str, persona: str | None, card: cards.CharacterCard | None = None
    ) -> ChannelSession:
        """Resume the named session (switching to the persona or card if one is given) or start it.

        A card is stored as a character of no server (by its name) and played; a new story opens with
        its greeting.
        """
        repo = self.service.repo
        key = channel_key(session_name)
        session = await repo.get_active_session(key)
        if card is not None:
            session = await repo.start_session(key, persona_id=(await self._store(card)).id)
        elif session is None or persona is not None:
            session = await repo.start_session(key, persona_text=persona or (
                session.persona_text if session else DEFAULT_PERSONA))
            await self.service.check_card(main_character(session))
        self.character = main_character(session).name if session.persona_id is not None else "Character"
        history = await repo.recent_turns(session.id, HISTORY_SHOWN)
        if history:
            total = await repo.count_turns(session.id)
            self.say(f"Resuming session '{session_name}' ({total} turns). Last turns:")
            for turn in history:
                who = turn.author_name if turn.role is Role.USER else (turn.author_name or self.character)
                self.say(f"  {who}: {turn.content}")
        else:
            self.say(f"New session '{session_name}'.")
            greeting = await self.service.greet(session, self.user.name)
            if greeting is not None:
                self.say(f"{self.character}: {greeting.content}")
        return session

    async def _store(self, card: cards.CharacterCard) -> Persona:
        """Store (or refresh) the card as a character of no server and check it fits the context."""
        repo = self.service.repo
        name = " ".join(card.name.split()) or "Character"
        stored = cards.stored_json(card)
        if await repo.get_persona(None, name) is None:
            await repo.create_persona(None, name, card.description, card=stored, avatar=card.avatar)
        else:
            await repo.update_persona(None, name, card.description, card=stored, avatar=card.avatar)
        persona = await repo.get_persona(None, name)
        assert persona is not None
        await self.service.check_card(character_of(persona))
        return persona

    async def run(self, session: ChannelSession) -> None:
        """Chat until /quit or end of input."""
        self.say(HELP)
        while True:
            if self.interactive:
                self.say(f"{self.user.name}> ", end="")
            line = await asyncio.to_thread(self.stdin.readline)
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text == "/quit":
                break
            if text == "/reset":
                session = await self.service.repo.archive_session(session.id)
                self.say("History archived; the story starts over.")
                continue
            if text.startswith("/"):
                self.say(f"Unknown command {text.split()[0]}. {HELP}")
                continue
            await self.turn(session, text)

    async def turn(self, session: ChannelSession, text: str) -> None:
        """Store one user message and stream the reply."""
        await self.service.add_user_turn(session, self.user, text)
        try:
            stream = await self.service.reply(session)
            shown = ""
            async for chunk in stream:
                if isinstance(chunk, Queued):
                    self.say(f"(waiting for the model, position {chunk.position})")
                elif isinstance(chunk, Text):
                    if not shown:
                        self.say(f"{self.character}: ", end="")
                    # Print the cleaned prefix only, so stop strings never reach the screen.
                    current = stream.text
                    if current.startswith(shown) and len(current) > len(shown):
                        self.say(current[len(shown):], end="")
                        shown = current
            final = stream.text
            if final != shown:
                self.say(final[len(shown):] if final.startswith(shown) else "\n" + final, end="")
            self.say()
            if not final:
                self.say("(the character has nothing to say; try again or rephrase)")
            await stream.save()
        except (PromptTooLarge, MessageTooLarge) as exc:
            self.say(f"Cannot reply: {exc}")
        except TavernError as exc:
            self.say(exc.user_message)


async def run_chat(
    service: ChatService, engine: Engine, *, session_name: str, persona: str | None, user_name: str,
    stdin: TextIO, stdout: TextIO, card: cards.CharacterCard | None = None,
) -> None:
    """Run one terminal chat session over an already started engine and repository."""
    chat = TerminalChat(service, stdin, stdout, user_name=user_name)
    session = await chat.open(session_name, persona, card)
    await chat.run(session)
