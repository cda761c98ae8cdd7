"""The window read on a real SQLite file: turns too big for the room and pending turns hide nothing."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from persistence import Database, Repository, Role, TurnStatus
from persistence.records import WindowBudget

# 256 tokens of room; a turn's lower bound is 4 + len / 4 tokens, so one of more than 1008 characters
# can never fit.
BUDGET = WindowBudget(tokens=256, per_turn=4, chars_per_token=4)
LIMIT = 1000


async def test_a_turn_too_big_for_the_window_leaves_older_turns_readable(repo: Repository) -> None:
    session = await repo.start_session("discord:1", persona_text="A bard.")
    older = [
        await repo.append_turn(session.id, Role.USER if i % 2 == 0 else Role.MODEL, f"older turn {i}")
        for i in range(10)
    ]
    huge = await repo.append_turn(session.id, Role.USER, "x" * 10_000, author_name="Alice")
    newer = await repo.append_turn(session.id, Role.MODEL, "That is a long letter.")

    window = await repo.recent_turns(session.id, LIMIT, BUDGET)
    assert [t.id for t in window] == [t.id for t in [*older, huge, newer]]


async def test_a_pending_turn_is_never_in_the_window(repo: Repository) -> None:
    session = await repo.start_session("discord:1", persona_text="A bard.")
    said = await repo.append_turn(session.id, Role.USER, "Hello?", author_name="Alice")
    pending = await repo.append_turn(session.id, Role.MODEL, "", status=TurnStatus.PENDING)
    assert pending.status is TurnStatus.PENDING
    assert await repo.recent_turns(session.id, LIMIT, BUDGET) == [said]
    # Reads without a budget (recovery, the reply flow's checks) still see it.
    assert [t.id for t in await repo.recent_turns(session.id, LIMIT)] == [said.id, pending.id]


turn_kinds = st.one_of(
    st.tuples(st.just("small"), st.integers(1, 300)),
    st.tuples(st.just("huge"), st.integers(1_100, 12_000)),
    st.tuples(st.just("pending"), st.just(0)),
)


async def _windows(path: Path, history: list[tuple[str, int]]) -> tuple[list[str], list[str], set[str]]:
    """The window read of `history`, and of the same history without its huge and pending turns."""
    async with await Database.open(f"sqlite+aiosqlite:///{path}") as db:
        repo = Repository(db)
        full = await repo.start_session("discord:full", persona_text="A bard.")
        small = await repo.start_session("discord:small", persona_text="A bard.")
        huge: set[str] = set()
        for index, (kind, size) in enumerate(history):
            role = Role.USER if index % 2 == 0 else Role.MODEL
            text = f"{index}:" + "y" * size
            if kind == "pending":
                await repo.append_turn(full.id, Role.MODEL, "", status=TurnStatus.PENDING)
                continue
            await repo.append_turn(full.id, role, text)
            if kind == "small":
                await repo.append_turn(small.id, role, text)
            else:
                huge.add(text)
        with_all = [t.content for t in await repo.recent_turns(full.id, LIMIT, BUDGET)]
        without = [t.content for t in await repo.recent_turns(small.id, LIMIT, BUDGET)]
        return with_all, without, huge


@settings(max_examples=40, deadline=None)
@given(st.lists(turn_kinds, max_size=40))
def test_turns_that_cannot_fit_never_change_which_older_turns_are_read(history: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with_all, without, huge = asyncio.run(_windows(Path(tmp) / "store.db", history))
    assert "" not in with_all  # no pending turn
    assert [text for text in with_all if text not in huge] == without
