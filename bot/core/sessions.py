"""Channel sessions: store turns, build the request from the stored window, stream and store replies.

This is the one path both front ends use: the terminal chat and the Discord cogs call it alike.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot.config import Settings
from bot.errors import PersonaMissing, PersonaTooLarge
from bot.inference.api import Chunk, Finished, GenerationRequest, GenerationStats, Sampling, Started, Text
from bot.inference.engine import Engine, Generation
from bot.prompt.builder import (
    Conversation,
    MessageTooLarge,
    Prompt,
    PromptTooLarge,
    PromptTurn,
    Tokenizer,
    build_prompt,
    count_tokens,
    longest_token_chars,
    speaker_label,
    system_budget,
)
from bot.prompt.stops import clean_reply, reply_stops
from persistence.records import PROMPT_ROLES, ChannelSession, Role, Turn, TurnStatus, WindowBudget
from persistence.repository import Repository

log = logging.getLogger(__name__)

SYSTEM_TEMPLATE = "Enter roleplay mode. You must act as {name}, whose persona follows:\n{persona}"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
# Every turn costs at least its role marker and one token, so more than n_ctx // 4 turns never fit.
MIN_TOKENS_PER_TURN = 4


@dataclass(frozen=True, slots=True)
class Speaker:
    """Who wrote a user turn."""

    id: int | None
    name: str


def system_prompt(session: ChannelSession) -> str:
    """The system block for a session: the SillyTavern Metharme preamble plus the persona."""
    name = session.persona_name or "the character"
    return SYSTEM_TEMPLATE.format(name=name, persona=session.persona_text.strip())


def conversation_for(session: ChannelSession, turns: list[Turn], *, continue_last: bool = False) -> Conversation:
    """Turn stored turns into the prompt builder's conversation."""
    prompt_turns = tuple(
        PromptTurn(role="user", text=turn.content, speaker=turn.author_name or "User")
        if turn.role is Role.USER
        else PromptTurn(role="model", text=turn.content)
        for turn in turns
        if turn.role in PROMPT_ROLES and turn.content
    )
    return Conversation(system=system_prompt(session), turns=prompt_turns, continue_last=continue_last,
                        character=session.persona_name or "")


def generation_request(
    tokenizer: Tokenizer,
    conversation: Conversation,
    *,
    key: str,
    n_ctx: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    speakers: Sequence[str] = (),
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
        stops=tuple(reply_stops(speakers)),
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
    ) -> None:
        self._service = service
        self.session = session
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
        echo = "" if self.continues else self.session.persona_name or ""
        return clean_reply(self.prefix + self.raw, self.speakers, echo, partial=self.stats is None)

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
            turn = await repo.edit_turn(target.id, text, status=status)
            new_ids = tuple(m for m in message_ids if turn is not None and m not in turn.message_ids)
            if turn is not None and new_ids:
                turn = await repo.add_turn_messages(turn.id, new_ids)
            return turn
        if not text:
            return None
        return await repo.append_turn(
            self.session.id, Role.MODEL, text, author_name="", message_ids=message_ids, status=status
        )


class ChatService:
    """Roleplay conversations over the repository and the engine."""

    def __init__(self, repo: Repository, engine: Engine, settings: Settings) -> None:
        self.repo = repo
        self.engine = engine
        self.settings = settings
        self._chars_per_token: int | None = None  # see `longest_token_chars`
        self._regenerations: dict[int, int] = {}  # turn id -> regenerations since start

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

    async def persona_budget(self) -> int:
        """The most tokens a persona may have (after the fixed preamble) with room left to talk."""
        preamble = SYSTEM_TEMPLATE.format(name="the character", persona="")
        max_new = self.settings.model.max_new_tokens
        reserve = self.conversation_reserve

        def budget(tokenizer: Tokenizer) -> int:
            allowed = system_budget(tokenizer, n_ctx=self.engine.n_ctx, max_new_tokens=max_new, reserve=reserve)
            return max(0, allowed - count_tokens(tokenizer, preamble))

        return await self.engine.with_tokenizer(budget)

    async def count_tokens(self, text: str) -> int:
        """Count the tokens of user-supplied text as the prompt builder counts them."""
        return await self.engine.with_tokenizer(lambda tokenizer: count_tokens(tokenizer, text))

    async def check_persona(self, text: str) -> int:
        """Return the persona's token count; raise PersonaTooLarge (with both numbers) if it does not fit."""
        tokens = await self.count_tokens(text)
        allowed = await self.persona_budget()
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

    async def reply(self, session: ChannelSession, *, reserve: bool = False) -> ReplyStream:
        """Start a reply to the session's stored history (queued fairly with other channels).

        With `reserve`, the reply's model turn is stored right after the history is read (empty,
        pending) and `save()` fills it in, so messages stored while the reply is being written
        come after it, as they do in a channel.
        """
        turns = await self._window(session)
        if not reserve:
            return await self._stream(session, turns, continue_last=False)
        reserved = await self.repo.append_turn(session.id, Role.MODEL, "", status=TurnStatus.PENDING)
        try:
            return await self._stream(session, turns, continue_last=False, into=reserved)
        except Exception:
            await self.repo.delete_turn(reserved.id)  # the engine refused it (queue full, closing)
            raise

    async def continue_reply(self, session: ChannelSession, turn: Turn) -> ReplyStream:
        """Extend the model turn `turn` (the latest one) with more text."""
        turns = await self._window(session)
        return await self._stream(session, turns, continue_last=True, continues=turn)

    async def regenerate(self, session: ChannelSession, turn: Turn) -> ReplyStream:
        """Start a new reply in place of the model turn `turn`; `save()` overwrites `turn` where it stands."""
        # Not `_window`: its bound counts `turn`, which the new reply replaces, and could leave out an
        # older turn that fits without it.
        turns = await self.repo.recent_turns(session.id, self.window_turns)
        kept = [t for t in turns if t.id != turn.id]
        sampling = self.sampling_for(session)
        if sampling.seed is not None:
            attempt = self._regenerations.get(turn.id, 0) + 1
            self._regenerations[turn.id] = attempt
            sampling = replace(sampling, seed=regeneration_seed(sampling.seed, turn, attempt))
        return await self._stream(session, kept, continue_last=False, into=turn, sampling=sampling)

    async def _stream(
        self,
        session: ChannelSession,
        turns: list[Turn],
        *,
        continue_last: bool,
        continues: Turn | None = None,
        into: Turn | None = None,
        sampling: Sampling | None = None,
    ) -> ReplyStream:
        if not session.persona_text.strip():
            raise PersonaMissing()
        character = session.persona_name or ""
        # As the prompt shows them, so the stops name no member by the character's own name.
        speakers = tuple(dict.fromkeys(
            speaker_label(t.author_name, character) for t in turns if t.role is Role.USER and t.author_name))
        conversation = conversation_for(session, turns, continue_last=continue_last)
        max_new = self.max_new_tokens_for(session)
        chosen = sampling or self.sampling_for(session)

        def build(tokenizer: Tokenizer) -> tuple[GenerationRequest, Prompt]:
            return generation_request(
                tokenizer, conversation, key=session.channel_key, n_ctx=self.engine.n_ctx, max_new_tokens=max_new,
                sampling=chosen, speakers=speakers, timeout=self.settings.engine.timeout_seconds,
            )

        prefix = continues.content if continues else ""
        try:
            request, prompt = await self.engine.with_tokenizer(build)
        except (PromptTooLarge, MessageTooLarge) as exc:
            # Raised where the stream is read, as every other reason a reply cannot be written.
            return ReplyStream(self, session, None, None, conversation=conversation, speakers=speakers,
                               failure=exc, prefix=prefix, continues=continues, into=into)
        return ReplyStream(self, session, request, prompt, conversation=conversation, speakers=speakers,
                           prefix=prefix, continues=continues, into=into)
