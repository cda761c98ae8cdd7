"""Channel sessions: store turns, build the request from the stored window, stream and store replies.

This is the one path both front ends use: the terminal chat and the Discord cogs call it alike.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot.config import Settings
from bot.core import cards, lore
from bot.core.scene import Character, HistoryTurn, Note, Scene, compose
from bot.errors import PersonaMissing, PersonaTooLarge
from bot.inference.api import Chunk, Finished, GenerationRequest, GenerationStats, Sampling, Started, Text
from bot.inference.engine import Engine, Generation
from bot.prompt import macros, story
from bot.prompt.builder import (
    Conversation,
    MessageTooLarge,
    Prompt,
    PromptTooLarge,
    Tokenizer,
    build_prompt,
    count_tokens,
    longest_token_chars,
    speaker_label,
    system_budget,
)
from bot.prompt.stops import clean_reply, reply_stops
from persistence.records import PROMPT_ROLES, ChannelSession, Persona, Role, Turn, TurnStatus, WindowBudget
from persistence.repository import Repository

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
# Every turn costs at least its role marker and one token, so more than n_ctx // 4 turns never fit.
MIN_TOKENS_PER_TURN = 4


@dataclass(frozen=True, slots=True)
class Speaker:
    """Who wrote a user turn."""

    id: int | None
    name: str


@functools.lru_cache(maxsize=64)
def _character(id_: int | None, name: str, card_json: str | None, text: str, avatar_sha: str | None) -> Character:
    """A character from its stored card (or a card made from plain persona text). Cached by what is stored:
    every reply reads the channel's cast, and a card with a large lorebook is costly to parse each time."""
    card = cards.from_stored(card_json, None) if card_json else cards.card_from_text(name, text)
    return Character(id_, name, card, avatar_sha)


def main_character(session: ChannelSession) -> Character:
    """The session's main character: its stored card, or a card made from the plain persona text."""
    return _character(session.persona_id, session.persona_name or "the character", session.persona_card,
                      session.persona_text, session.persona_avatar_sha)


def character_of(persona: Persona) -> Character:
    """A stored character (persona) as the scene uses it."""
    return _character(persona.id, persona.name, persona.card, persona.text, persona.avatar_sha)


def history_of(turns: Sequence[Turn], main: str) -> list[HistoryTurn]:
    """Stored turns as the scene reads them; a model turn without a name is the main character's."""
    return [
        HistoryTurn("user", t.content, t.author_name or "User") if t.role is Role.USER
        else HistoryTurn("model", t.content, t.author_name or main)
        for t in turns
        if t.role in PROMPT_ROLES and t.content
    ]


def conversation_for(session: ChannelSession, turns: Sequence[Turn], *, continue_last: bool = False) -> Conversation:
    """The main character's conversation over `turns` alone (no lore, note or member persona)."""
    main = main_character(session)
    answered = next((t.author_name for t in reversed(turns) if t.role is Role.USER and t.author_name), "User")
    return compose(Scene(speaker=main, cast=(main,), user=answered), history_of(turns, main.name),
                   count_tokens=len, continue_last=continue_last)


def generation_request(
    tokenizer: Tokenizer,
    conversation: Conversation,
    *,
    key: str,
    n_ctx: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    speakers: Sequence[str] = (),
    characters: Sequence[str] = (),
    timeout: float | None = None,
) -> tuple[GenerationRequest, Prompt]:
    """Build the Metharme prompt for `conversation` and the engine request that carries it.

    The request holds the widest window that fits `n_ctx`, the persona as its fixed head, and the
    block starts as the cuts the engine may trim at. Blocking (tokenizes): run it off the event loop.
    Raises PromptTooLarge or MessageTooLarge as `build_prompt` does.
    """
    prompt = build_prompt(tokenizer, conversation, n_ctx=n_ctx, max_new_tokens=max_new_tokens)
    request = GenerationRequest(
        key=key,
        tokens=tuple(prompt.tokens),
        max_new_tokens=max_new_tokens,
        head=prompt.system_tokens,
        cuts=prompt.cuts,
        sampling=sampling or Sampling(),
        stops=tuple(reply_stops(speakers, characters=characters)),
        timeout=timeout,
    )
    return request, prompt


def regeneration_seed(seed: int, turn: Turn, attempt: int) -> int:
    """A seed for regenerating `turn`, other than `seed` and other for each attempt and each text replaced.

    A fixed `model.seed` makes a first reply reproducible; a regeneration must still give a new text,
    also after a restart (the replaced text is part of the mix, not only the in-memory attempt count).
    """
    material = f"{seed}:{turn.id}:{attempt}:{turn.content}".encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=4).digest(), "little") & 0x7FFFFFFF


class ReplyStream:
    """A reply being generated: iterate for chunks, then `save()` what it produced.

    A prompt that could not be built (PromptTooLarge, MessageTooLarge) is raised by the iteration,
    where engine errors are raised too.
    """

    def __init__(
        self,
        service: ChatService,
        session: ChannelSession,
        request: GenerationRequest | None,
        prompt: Prompt | None,
        *,
        conversation: Conversation,
        speakers: Sequence[str] = (),
        failure: Exception | None = None,
        prefix: str = "",
        continues: Turn | None = None,
        into: Turn | None = None,
        character: Character | None = None,
        swipe: bool = False,
        others: Sequence[str] = (),
    ) -> None:
        self._service = service
        self.session = session
        # Who speaks: the model turn is stored under this character's name and id.
        self.character = character or main_character(session)
        # A regeneration: `save()` keeps the replaced text as an earlier swipe of the same turn.
        self.swipe = swipe
        self.others = tuple(others)  # the other characters present: a line of theirs ends the reply
        self.request = request
        self.prompt = prompt
        self.conversation = conversation  # what the prompt was built from
        self.speakers = tuple(speakers)
        self._failure = failure
        self.window_start: int | None = None
        self.prefix = prefix
        self.continues = continues
        # The stored model turn `save()` overwrites in place: reserved when the reply started, or the
        # reply being regenerated. Turns stored while this one is written stay after it.
        self.into = into
        self.raw = ""
        self.stats: GenerationStats | None = None
        self._generation: Generation | None = None
        if request is not None and failure is None:
            self._generation = service.engine.generate(request)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._failure is not None:
            raise self._failure
        assert self._generation is not None
        async for chunk in self._generation:
            if isinstance(chunk, Text):
                self.raw += chunk.text
            elif isinstance(chunk, Started):
                self.window_start = chunk.window_start
            elif isinstance(chunk, Finished):
                self.stats = chunk.stats
            yield chunk

    @property
    def turns_used(self) -> int | None:
        """How many of the newest stored turns the prompt reached back over (once generation started)."""
        if self.prompt is None or self.window_start is None:
            return None
        return self.prompt.turns_from(self.window_start)

    @property
    def text(self) -> str:
        """The reply so far (whole reply for a continuation), cut at stops and trimmed."""
        # A continuation does not start a reply, so it has no echoed name to remove.
        echo = "" if self.continues else self.character.name
        return clean_reply(self.prefix + self.raw, self.speakers, echo, partial=self.stats is None,
                           characters=self.others)

    @property
    def interrupted(self) -> bool:
        """True when the reply was cut short by cancellation or the time limit."""
        return self.stats is None or self.stats.stop_reason in ("cancelled", "timeout")

    def cancel(self) -> None:
        """Stop generating (also during the prompt's evaluation)."""
        if self._generation is not None:
            self._generation.cancel()

    async def save(self, message_ids: tuple[int, ...] = ()) -> Turn | None:
        """Store the reply as a model turn (or extend the continued one); None when it is empty.

        `message_ids` are all the messages showing the reply; ids the turn already has are kept. An
        empty reply stored `into` a turn removes that turn.
        """
        text = self.text
        status = TurnStatus.INTERRUPTED if self.interrupted else TurnStatus.COMPLETE
        repo = self._service.repo
        target = self.continues or self.into
        if target is not None:
            if not text and self.into is not None:
                await repo.delete_turn(target.id)
                return None
            if self.swipe and self.continues is None:
                turn = await repo.add_swipe(target.id, text)
                turn = await repo.edit_turn(target.id, text, status=status)
            else:
                turn = await repo.edit_turn(target.id, text, status=status)
            new_ids = tuple(m for m in message_ids if turn is not None and m not in turn.message_ids)
            if turn is not None and new_ids:
                turn = await repo.add_turn_messages(turn.id, new_ids)
            return turn
        if not text:
            return None
        return await repo.append_turn(
            self.session.id, Role.MODEL, text, author_name=self.character.stored_name, message_ids=message_ids,
            status=status, character_id=self.character.id,
        )


class ChatService:
    """Roleplay conversations over the repository and the engine."""

    def __init__(self, repo: Repository, engine: Engine, settings: Settings) -> None:
        self.repo = repo
        self.engine = engine
        self.settings = settings
        self._chars_per_token: int | None = None  # see `longest_token_chars`
        self._regenerations: dict[int, int] = {}  # turn id -> regenerations since start
        self._book_cache: dict[tuple[int, Any], lore.Lorebook] = {}  # (lorebook id, updated_at) -> parsed

    @property
    def window_turns(self) -> int:
        """How many stored turns are read to build a prompt (more can never fit)."""
        return max(8, self.engine.n_ctx // MIN_TOKENS_PER_TURN)

    async def _window(self, session: ChannelSession) -> list[Turn]:
        """The stored turns a prompt for `session` can use: the newest, as many as can fit."""
        if self._chars_per_token is None:
            self._chars_per_token = await self.engine.with_tokenizer(longest_token_chars)
        room = self.engine.n_ctx - self.max_new_tokens_for(session)
        budget = WindowBudget(room, MIN_TOKENS_PER_TURN, self._chars_per_token)
        return await self.repo.recent_turns(session.id, self.window_turns, budget)

    @property
    def conversation_reserve(self) -> int:
        """Context tokens a persona must leave free for conversation turns."""
        return max(64, self.engine.n_ctx // 4)

    async def count_tokens(self, text: str) -> int:
        """Count the tokens of user-supplied text as the prompt builder counts them."""
        return await self.engine.with_tokenizer(lambda tokenizer: count_tokens(tokenizer, text))

    async def check_card(self, character: Character) -> int:
        """Return the tokens of a character's card as the prompt's head holds it (story string, no lore,
        no examples: those are dropped when space runs short); PersonaTooLarge if it leaves no room."""
        card = character.card
        text = story.story_string(
            system_prompt=card.system_prompt, description=card.description, personality=card.personality,
            scenario=card.scenario, lore_before="", lore_after="", user_persona="", char=character.name, user="User",
        )
        max_new = self.settings.model.max_new_tokens
        reserve = self.conversation_reserve

        def measure(tokenizer: Tokenizer) -> tuple[int, int]:
            allowed = system_budget(tokenizer, n_ctx=self.engine.n_ctx, max_new_tokens=max_new, reserve=reserve)
            return count_tokens(tokenizer, text), allowed

        tokens, allowed = await self.engine.with_tokenizer(measure)
        if tokens > allowed:
            raise PersonaTooLarge(tokens, allowed)
        return tokens

    def sampling_for(self, session: ChannelSession) -> Sampling:
        """Config defaults with the channel's overrides applied."""
        values: dict[str, Any] = self.settings.sampling.model_dump()
        values.update({k: v for k, v in session.settings.items() if k in SAMPLING_KEYS})
        seed = self.settings.model.seed
        return Sampling(**values, seed=seed if seed >= 0 else None)

    def max_new_tokens_for(self, session: ChannelSession) -> int:
        """Reply length limit for the channel."""
        return int(session.settings.get("max_new_tokens", self.settings.model.max_new_tokens))

    async def add_user_turn(
        self, session: ChannelSession, speaker: Speaker, text: str, *, message_id: int | None = None
    ) -> Turn:
        """Store a user's message as a turn (before any generation starts)."""
        ids = (message_id,) if message_id is not None else ()
        return await self.repo.append_turn(
            session.id, Role.USER, text, author_id=speaker.id, author_name=speaker.name, message_ids=ids
        )

    # --- the scene ---------------------------------------------------------------------------------

    async def _truncated(self, session: ChannelSession, turns: Sequence[Turn]) -> bool:
        """Whether the session holds older turns than `turns` reaches back to. Example dialogue stays in
        the prompt only while the whole history fits beside it, which keeps the prompt's head stable."""
        return await self.repo.count_turns(session.id) > len(turns)

    async def cast(self, session: ChannelSession) -> tuple[Character, ...]:
        """Every character of the channel, the main one first."""
        others = await self.repo.channel_characters(session.id) if session.persona_id is not None else []
        return (main_character(session), *(character_of(p) for p in others if p.id != session.persona_id))

    async def _books(self, session: ChannelSession) -> tuple[lore.Lorebook, ...]:
        """The lorebooks attached to the channel, parsed off the event loop (cached by update time)."""
        books = []
        for record in await self.repo.channel_lorebooks(session.channel_key):
            key = (record.id, record.updated_at)
            book = self._book_cache.get(key)
            if book is None:
                try:
                    book = await asyncio.to_thread(lore.read_world, record.data.encode(), name=record.name)
                except lore.LoreError:
                    log.warning("lorebook %s (%s) no longer reads; left out", record.id, record.name)
                    continue
                self._book_cache[key] = book
            books.append(book)
        return tuple(books)

    async def scene(
        self, session: ChannelSession, speaker: Character | None, turns: Sequence[Turn],
        cast: tuple[Character, ...] | None = None,
    ) -> Scene:
        """The scene for `speaker`'s reply (None: the main character) after `turns`; `cast` if already read."""
        cast = cast or await self.cast(session)
        if speaker is None:
            speaker = cast[0]
        answered = next((t for t in reversed(turns) if t.role is Role.USER), None)
        user = answered.author_name if answered is not None and answered.author_name else "User"
        persona = ""
        if answered is not None and answered.author_id is not None:
            persona = await self.repo.get_user_persona(session.guild_id or 0, answered.author_id) or ""
        chars = self.settings.characters
        settings = session.settings
        return Scene(
            speaker=speaker,
            cast=cast,
            user=user,
            user_persona=persona,
            books=await self._books(session),
            note=Note(str(settings.get("note", "")), int(settings.get("note_depth", 4)),
                      settings.get("note_role", "system")),
            cards_in_prompt=chars.cards_in_prompt,
            prefill_name=chars.prefill_name,
            lore_budget=int(self.engine.n_ctx * chars.lore_budget),
            lore_scan_depth=chars.lore_scan_depth,
            lore_in_head=chars.lore_in_head,
            lore_depth=chars.lore_depth,
        )

    def speaker_of(self, cast: Sequence[Character], turn: Turn) -> Character:
        """The character who wrote a model turn (the main one when it is gone or unknown)."""
        return next((c for c in cast if turn.character_id is not None and c.id == turn.character_id), cast[0])

    # --- replies -------------------------------------------------------------------------------------

    async def reply(
        self, session: ChannelSession, *, reserve: bool = False, speaker: Character | None = None
    ) -> ReplyStream:
        """Start a reply to the session's stored history (queued fairly with other channels).

        `speaker` is the character who answers (default: the main one). With `reserve`, the reply's
        model turn is stored right after the history is read (empty, pending) and `save()` fills it
        in, so messages stored while the reply is being written come after it, as they do in a channel.
        """
        turns = await self._window(session)
        scene = await self.scene(session, speaker, turns)
        truncated = await self._truncated(session, turns)
        if not reserve:
            return await self._stream(session, turns, scene, continue_last=False, truncated=truncated)
        reserved = await self.repo.append_turn(
            session.id, Role.MODEL, "", status=TurnStatus.PENDING, author_name=scene.speaker.stored_name,
            character_id=scene.speaker.id,
        )
        try:
            return await self._stream(session, turns, scene, continue_last=False, into=reserved, truncated=truncated)
        except Exception:
            await self.repo.delete_turn(reserved.id)  # the engine refused it (queue full, closing)
            raise

    async def continue_reply(self, session: ChannelSession, turn: Turn) -> ReplyStream:
        """Extend the model turn `turn` (the latest one) with more text."""
        turns = await self._window(session)
        cast = await self.cast(session)
        scene = await self.scene(session, self.speaker_of(cast, turn), turns, cast)
        return await self._stream(session, turns, scene, continue_last=True, continues=turn,
                                  truncated=await self._truncated(session, turns))

    async def regenerate(self, session: ChannelSession, turn: Turn) -> ReplyStream:
        """Start a new reply in place of the model turn `turn`; `save()` keeps the old text as a swipe."""
        # Not `_window`: its bound counts `turn`, which the new reply replaces, and could leave out an
        # older turn that fits without it.
        turns = await self.repo.recent_turns(session.id, self.window_turns)
        kept = [t for t in turns if t.id != turn.id]
        sampling = self.sampling_for(session)
        if sampling.seed is not None:
            attempt = self._regenerations.get(turn.id, 0) + 1
            self._regenerations[turn.id] = attempt
            sampling = replace(sampling, seed=regeneration_seed(sampling.seed, turn, attempt))
        cast = await self.cast(session)
        scene = await self.scene(session, self.speaker_of(cast, turn), kept, cast)
        return await self._stream(session, kept, scene, continue_last=False, into=turn, sampling=sampling,
                                  swipe=True, truncated=await self._truncated(session, turns))

    async def _stream(
        self,
        session: ChannelSession,
        turns: list[Turn],
        scene: Scene,
        *,
        continue_last: bool,
        continues: Turn | None = None,
        into: Turn | None = None,
        sampling: Sampling | None = None,
        swipe: bool = False,
        truncated: bool = False,
    ) -> ReplyStream:
        """Build the prompt off the loop and start generating; `truncated`: older stored turns than `turns` exist."""
        speaker = scene.speaker
        if speaker.id is None and not session.persona_text.strip() and not session.persona_card:
            raise PersonaMissing()
        # As the prompt shows them, so the stops name no member by a character's own name; the other
        # characters stop a reply too (it must not speak for them).
        names = tuple(c.name for c in scene.cast)
        speakers = tuple(dict.fromkeys(
            speaker_label(t.author_name, names) for t in turns if t.role is Role.USER and t.author_name))
        others = tuple(name for name in names if name != speaker.name)
        history = history_of(turns, scene.cast[0].name)
        max_new = self.max_new_tokens_for(session)
        chosen = sampling or self.sampling_for(session)
        rng = random.Random(chosen.seed) if chosen.seed is not None else random.Random()

        def build(tokenizer: Tokenizer) -> tuple[Conversation, GenerationRequest, Prompt]:
            conversation = compose(scene, history, count_tokens=lambda text: count_tokens(tokenizer, text),
                                   continue_last=continue_last, rng=rng, history_truncated=truncated)
            request, prompt = generation_request(
                tokenizer, conversation, key=session.channel_key, n_ctx=self.engine.n_ctx, max_new_tokens=max_new,
                sampling=chosen, speakers=speakers, characters=others, timeout=self.settings.engine.timeout_seconds,
            )
            return conversation, request, prompt

        prefix = continues.content if continues else ""
        common = dict(speakers=speakers, prefix=prefix, continues=continues, into=into, character=speaker,
                      swipe=swipe, others=others)
        try:
            conversation, request, prompt = await self.engine.with_tokenizer(build)
        except (PromptTooLarge, MessageTooLarge) as exc:
            # Raised where the stream is read, as every other reason a reply cannot be written.
            empty = Conversation(system="", turns=())
            return ReplyStream(self, session, None, None, conversation=empty, failure=exc, **common)
        return ReplyStream(self, session, request, prompt, conversation=conversation, **common)

    # --- greetings -----------------------------------------------------------------------------------

    async def greet(self, session: ChannelSession, user: str) -> Turn | None:
        """Store the main character's greeting (`first_mes`, alternate greetings as swipes) as the session's
        first model turn; None when the card has none or the session already has turns."""
        character = main_character(session)
        card = character.card
        greetings = [g for g in (card.first_mes, *card.alternate_greetings) if g.strip()]
        if not greetings or await self.repo.count_turns(session.id):
            return None
        texts = [macros.expand(g, char=character.name, user=user).strip() for g in greetings]
        turn = await self.repo.append_turn(session.id, Role.MODEL, texts[0], author_name=character.stored_name,
                                           character_id=character.id)
        if len(texts) > 1:
            turn = await self.repo.set_swipes(turn.id, texts, 0)
        return turn
