"""The prompt window read from the store: only the turns that can fit, never one fewer."""

from __future__ import annotations

import random

import pytest

from bot.core.sessions import MIN_TOKENS_PER_TURN, conversation_for
from bot.prompt.builder import MessageTooLarge, Prompt, PromptTooLarge, Tokenizer, build_prompt, longest_token_chars
from persistence.records import ChannelSession, Role, Turn, TurnStatus, WindowBudget
from persistence.repository import Repository
from tests.fake_backend import ByteTokenizer

PIECES = (
    "hello", " there", "................", "________________", "🧙‍♀️", "שלום", "e\u0301", "<|model|>", "</s>",
    "\u200b", "  ", "\n", "addEventListener", "x" * 40, "ok",
)


# Pieces that are one token of 16 characters in the Llama-2 vocabulary: text that needs the fewest tokens.
DENSE = ("................", "________________", "addEventListener")


def random_text(rng: random.Random) -> str:
    pieces = DENSE if rng.random() < 0.4 else PIECES
    return "".join(rng.choice(pieces) for _ in range(rng.choice((0, 1, 2, 5, 20, 60))))


async def random_history(repo: Repository, rng: random.Random, name: str) -> ChannelSession:
    session = await repo.start_session(name, persona_text=random_text(rng)[:120])
    for _ in range(rng.randrange(1, 90)):
        kind = rng.random()
        if kind < 0.05:  # a reply being written: reserved, still empty
            await repo.append_turn(session.id, Role.MODEL, "", status=TurnStatus.INTERRUPTED)
        elif kind < 0.08:
            await repo.append_turn(session.id, Role.SYSTEM, random_text(rng))
        else:
            role = Role.USER if kind < 0.6 else Role.MODEL
            text = random_text(rng) or "hi"
            await repo.append_turn(session.id, role, text, author_name=rng.choice(("Al", "Bea", "Chandrasekhar")))
    return session


def prompt_of(
    tokenizer: Tokenizer, session: ChannelSession, turns: list[Turn], n_ctx: int, max_new: int
) -> Prompt | str:
    try:
        return build_prompt(tokenizer, conversation_for(session, turns), n_ctx=n_ctx, max_new_tokens=max_new)
    except (MessageTooLarge, PromptTooLarge) as exc:
        return type(exc).__name__


@pytest.mark.parametrize("vocabulary", ["bytes", "spm"])
async def test_the_window_read_holds_every_turn_the_prompt_uses(repo: Repository, vocabulary: str, request) -> None:
    tokenizer: Tokenizer = ByteTokenizer() if vocabulary == "bytes" else request.getfixturevalue("spm_vocab")
    chars_per_token = longest_token_chars(tokenizer)
    rng = random.Random(7)
    fewer = built = 0
    for case in range(25):
        session = await random_history(repo, rng, f"w:{vocabulary}:{case}")
        n_ctx, max_new = rng.choice((128, 256, 512)), rng.choice((8, 32))
        limit = n_ctx // MIN_TOKENS_PER_TURN
        everything = await repo.recent_turns(session.id, 10_000)
        window = await repo.recent_turns(
            session.id, limit, WindowBudget(n_ctx - max_new, MIN_TOKENS_PER_TURN, chars_per_token)
        )
        assert window == everything[len(everything) - len(window) :]  # the newest, in order
        expected = prompt_of(tokenizer, session, everything, n_ctx, max_new)
        assert prompt_of(tokenizer, session, window, n_ctx, max_new) == expected, case
        fewer += len(window) < min(limit, len(everything))
        built += isinstance(expected, Prompt) and expected.turns_used < len(everything)
    assert fewer >= 5 and built >= 5, (fewer, built)  # windows that slid, read with fewer rows


async def test_the_bound_holds_for_text_of_the_longest_tokens(repo: Repository, spm_vocab) -> None:
    # Replies of 16-character single tokens: each costs hardly more tokens than its lower bound.
    rng = random.Random(3)
    for case in range(8):
        session = await repo.start_session(f"w:dense:{case}")
        for _ in range(120):
            text = "".join(rng.choice(DENSE) for _ in range(rng.randrange(1, 12)))
            await repo.append_turn(session.id, Role.MODEL, text)
        everything = await repo.recent_turns(session.id, 10_000)
        budget = WindowBudget(256 - 16, MIN_TOKENS_PER_TURN, longest_token_chars(spm_vocab))
        window = await repo.recent_turns(session.id, 256 // MIN_TOKENS_PER_TURN, budget)
        expected = prompt_of(spm_vocab, session, everything, 256, 16)
        assert isinstance(expected, Prompt) and len(window) < 2 * expected.turns_used  # a tight bound
        assert prompt_of(spm_vocab, session, window, 256, 16) == expected


async def test_a_window_of_long_turns_reads_far_fewer_rows(repo: Repository) -> None:
    session = await repo.start_session("w:long")
    for i in range(300):
        await repo.append_turn(session.id, Role.USER if i % 2 else Role.MODEL, f"{i} " + "word " * 40, author_name="Al")
    budget = WindowBudget(2048 - 256, MIN_TOKENS_PER_TURN, chars_per_token=17)
    window = await repo.recent_turns(session.id, 2048 // MIN_TOKENS_PER_TURN, budget)
    # About 200 characters a turn: at most 17 characters a token, each turn needs at least 4 + 12 tokens.
    assert 100 <= len(window) <= 115
    assert window[-1].content.startswith("299 ")
    assert [t.id for t in window] == sorted(t.id for t in window)


async def test_the_vocabulary_bounds_characters_per_token(spm_vocab) -> None:
    assert longest_token_chars(ByteTokenizer()) == 2
    assert longest_token_chars(spm_vocab) == 17  # 16-character tokens such as "................"
