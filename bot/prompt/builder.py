"""Metharme prompt building: token-level assembly, marker neutralisation, sliding window.

The prompt is assembled as a list of token ids rather than a string, because a string prompt is
tokenized with special-token parsing on and a typed ``</s>`` would become a real EOS. Every piece of
user-supplied text is neutralised first and tokenized with ``special=False``: in the Llama-2 SPM
vocabulary the role markers are ordinary text, so a typed ``<|user|>`` would otherwise produce the
very same tokens as the template's own marker.

Layout (no separators between turns)::

    BOS <|system|>persona <|user|>Alice: hi\\nBob: hello <|model|>reply <|user|>Alice: ... <|model|>

A character card adds example dialogue after the persona (while it fits beside the whole history),
injected blocks among the turns (`<|system|>note`, by depth), post-history text before the closing
marker and a reply prefix after it (see `Conversation`); `bot.prompt.story` lays the card's fields out.
"""

from __future__ import annotations

import contextlib
import functools
import re
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from bot.vocabulary import Tokenizer

__all__ = [
    "MEMBER_SUFFIX",
    "MODEL",
    "ROLE_MARKERS",
    "SYSTEM",
    "USER",
    "Conversation",
    "Injection",
    "InjectionsTooLarge",
    "MessageTooLarge",
    "Prompt",
    "PromptTooLarge",
    "PromptTurn",
    "Tokenizer",
    "build_prompt",
    "character_label",
    "character_names",
    "count_tokens",
    "find_marker",
    "fold_text",
    "longest_token_chars",
    "neutralise",
    "speaker_label",
    "story_tokens",
    "system_budget",
]


SYSTEM, USER, MODEL = "<|system|>", "<|user|>", "<|model|>"
ROLE_MARKERS = (SYSTEM, USER, MODEL)

# --------------------------------------------------------------------------- neutralisation

# Everything below is matched on a folded view of the text (see `_fold_char`). The role markers
# plus the control strings of the formats these models were trained or merged on: Llama (`<s>`,
# `</s>`, `[INST]`), ChatML (`<|im_start|>`, `<|im_end|>`) and GPT-style `<|endoftext|>`.
_PIPE_MARKERS = ("<|system|>", "<|user|>", "<|model|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
_ANGLE_MARKERS = ("</s>", "<s>")
_BRACKET_MARKERS = ("[inst]", "[/inst]")
_FORBIDDEN_RE = re.compile(
    "|".join(re.escape(m) for m in sorted((*_PIPE_MARKERS, *_ANGLE_MARKERS, *_BRACKET_MARKERS), key=len, reverse=True))
)

# How a matched marker is defused. Pipe markers lose their pipes and read `<user>`; `<s>`/`</s>`
# get single angle quotation marks (`‹/s›`), `[INST]` gets parentheses (`(INST)`). The substitutes
# fold to nothing that can start a marker, and every edit removes at least one of `|<>[]` from the
# folded text, so repeating the scan until it comes back clean always terminates.
_ANGLE_SWAP = {"<": "\u2039", ">": "\u203a"}
_BRACKET_SWAP = {"[": "(", "]": ")"}

# Control, format, surrogate, lone combining marks and separators draw nothing on their own.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Mn", "Me", "Zs", "Zl", "Zp"})
# Letters and symbols that render as blank space: Hangul fillers, the braille blank, and the Khmer
# inherent vowels and the combining grapheme joiner (marks, listed for clarity).
INVISIBLE_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5\u034f")


def is_invisible(char: str) -> bool:
    """True if the character draws nothing on its own."""
    return char in INVISIBLE_CHARACTERS or unicodedata.category(char) in INVISIBLE_CATEGORIES


def has_visible_text(text: str) -> bool:
    """True if any character of `text` draws something (a message without one reads as empty)."""
    return not all(is_invisible(char) for char in text)


def _visible(ch: str) -> bool:
    """Whether marker folding keeps `ch`: inside a marker, unassigned code points are dropped too, and
    U+2581 ("▁"), which SPM vocabularies turn into a real space."""
    return not (ch.isspace() or ch == "\u2581" or is_invisible(ch) or unicodedata.category(ch) == "Cn")


@functools.lru_cache(maxsize=8192)
def _fold_char(ch: str) -> str:
    """Fold one character for marker detection: compatibility decomposition, case folding, invisibles dropped.

    NFKD rather than NFKC, applied per character: composition would let a combining mark glue onto a
    neighbouring `<` or `>` (`>` + U+0338 composes to `≯`) and so hide a marker from the scan, while
    decomposing and dropping the marks finds everything NFKC would, and more.
    """
    if ch.isascii():
        return "" if (ch.isspace() or not ch.isprintable()) else ch.lower()
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", ch).casefold())
    return "".join(c for c in decomposed if _visible(c))


def _scan(chars: Sequence[str], pattern: re.Pattern[str]) -> list[tuple[int, int, str]]:
    """Return (start, end, folded match) spans of `pattern` in the folded view of `chars`."""
    folded: list[str] = []
    origin: list[int] = []
    for index, ch in enumerate(chars):
        piece = _fold_char(ch)
        folded.append(piece)
        origin.extend([index] * len(piece))
    return [(origin[m.start()], origin[m.end() - 1] + 1, m.group()) for m in pattern.finditer("".join(folded))]


def _may_contain_marker(text: str) -> bool:
    # Fast path for the common case: plain ASCII without an opening bracket cannot hold a marker.
    return not text.isascii() or "<" in text or "[" in text


def _defuse(chars: list[str], start: int, end: int, marker: str) -> None:
    for index in range(start, end):
        folded = _fold_char(chars[index])
        if marker.startswith("<|"):
            if "|" in folded:
                chars[index] = ""
        elif marker.startswith("["):
            if "[" in folded or "]" in folded:
                chars[index] = _BRACKET_SWAP["[" if "[" in folded else "]"]
        elif "<" in folded or ">" in folded:
            chars[index] = _ANGLE_SWAP["<" if "<" in folded else ">"]


def _neutralise_parts(parts: Sequence[str], sep: str = "\n") -> list[str]:
    """Neutralise `sep.join(parts)` as one text (markers may span parts) and return it split again."""
    if not any(_may_contain_marker(part) for part in parts):
        return list(parts)
    chars: list[str] = []
    owner: list[int] = []  # index of the part each character belongs to; -1 for separators
    for number, part in enumerate(parts):
        if number:
            chars.extend(sep)
            owner.extend([-1] * len(sep))
        chars.extend(part)
        owner.extend([number] * len(part))
    while spans := _scan(chars, _FORBIDDEN_RE):
        for start, end, marker in spans:
            _defuse(chars, start, end, marker)
        # Deleted characters leave "" behind; drop them so the next scan sees the new adjacency.
        kept = [i for i, ch in enumerate(chars) if ch]
        chars = [chars[i] for i in kept]
        owner = [owner[i] for i in kept]
    out: list[list[str]] = [[] for _ in parts]
    for ch, number in zip(chars, owner, strict=True):
        if number >= 0:
            out[number].append(ch)
    return ["".join(piece) for piece in out]


def neutralise(text: str) -> str:
    """Defuse role markers and control strings in user-supplied text so they cannot act as template.

    Detection ignores case, whitespace, zero-width and other invisible characters and compatibility
    look-alikes (fullwidth `＜｜ｍｏｄｅｌ｜＞`). A found marker is rewritten visibly but readably:
    `<|user|>` becomes `<user>` (its pipes removed, other characters kept), `</s>` becomes `‹/s›`
    and `[INST]` becomes `(INST)`. Text without markers is returned unchanged.
    """
    return _neutralise_parts([text])[0]


def fold_text(text: str) -> str:
    """The view `neutralise` matches on: compatibility-decomposed, case-folded, blanks and invisibles dropped."""
    return "".join(_fold_char(ch) for ch in text)


def find_marker(text: str) -> int | None:
    """Return the index where the first marker (any variant `neutralise` detects) starts, or None."""
    if not _may_contain_marker(text):
        return None
    spans = _scan(text, _FORBIDDEN_RE)
    return spans[0][0] if spans else None


# --------------------------------------------------------------------------- conversation model


@dataclass(frozen=True)
class PromptTurn:
    """One turn of the conversation; user turns name their speaker.

    A model turn with a speaker (one of several characters sharing a channel) is shown `Name: text`.
    """

    role: Literal["user", "model"]
    text: str
    speaker: str | None = None


@dataclass(frozen=True)
class Injection:
    """Text inserted `depth` turns from the end of the history: an author's note, a lorebook entry.

    Depth counts turns as given (before user turns are merged): 0 is after the newest turn. Several
    at the same depth are joined by `order` (lower first, ties as given) into one block per role;
    the blocks follow SillyTavern's order, `<|model|>`, then `<|user|>`, then `<|system|>` nearest
    the end. The text is untrusted: it is neutralised like a member's message.
    """

    text: str
    depth: int
    role: Literal["system", "user", "model"]
    order: int = 0


@dataclass(frozen=True)
class Conversation:
    """The persona and the turns to fit, oldest first.

    With `continue_last` the last turn must be a model turn: the prompt ends with its text so that
    generation continues it instead of starting a new reply. `character` is the name the model
    plays, or the names of every character present: a member whose name reads the same as any of
    them is shown disambiguated (see `speaker_label`).

    `examples` are example dialogue blocks, placed after the system block while they fit beside the
    whole history; `history_truncated` says `turns` leaves out older stored turns, so the history is
    not whole and examples are not kept. `injections` are always kept (see `Injection`); `tail`
    (post-history instructions) is a `<|system|>` block after the newest turn, and `reply_prefix`
    follows the closing `<|model|>` (`Mira:`, so the model speaks as Mira). With `continue_last`,
    depth 0 counts as depth 1 and the tail comes before the continued turn (as in SillyTavern), and
    `reply_prefix` is not used: the continued turn already starts the reply.
    """

    system: str
    turns: tuple[PromptTurn, ...]
    continue_last: bool = False
    character: str | frozenset[str] | tuple[str, ...] = ""
    examples: tuple[tuple[PromptTurn, ...], ...] = ()
    injections: tuple[Injection, ...] = ()
    tail: str = ""
    reply_prefix: str = ""
    history_truncated: bool = False

    @property
    def characters(self) -> tuple[str, ...]:
        """The names of the characters present, `character` as a tuple."""
        return character_names(self.character)


def character_names(character: str | Iterable[str]) -> tuple[str, ...]:
    """One character's name or several as a tuple of names, empty ones left out."""
    names = (character,) if isinstance(character, str) else tuple(character)
    return tuple(name for name in names if name)


@dataclass(frozen=True)
class Prompt:
    """A built prompt.

    `turns_used` counts the newest input turns the window reaches back over (before user turns are
    merged), from the oldest kept one on; turns skipped inside it because they alone can never fit
    count too. `system_tokens` is the length of the fixed prefix: BOS, `<|system|>` and the persona,
    and the example dialogue when it was kept (`examples_kept`). `cuts` are where kept blocks start
    (the oldest excepted, and only blocks older than every injection): `tokens[:system_tokens] +
    tokens[cut:]` is exactly the prompt a smaller window starting at that block would give (the
    same conversation from that block on, examples given only if they were kept here), and
    `cut_turns` says how many turns that window reaches back over.
    """

    tokens: list[int]
    turns_used: int
    system_tokens: int
    cuts: tuple[int, ...] = ()
    cut_turns: tuple[int, ...] = ()
    examples_kept: bool = False

    def turns_from(self, start: int) -> int:
        """`turns_used` of the window that starts at `start` (`system_tokens` or one of `cuts`)."""
        if start <= self.system_tokens:
            return self.turns_used
        return self.cut_turns[self.cuts.index(start)]


class PromptTooLarge(ValueError):
    """The persona alone leaves no room in the context (opening, closing and reply budget included)."""

    def __init__(self, tokens: int, allowed: int) -> None:
        self.tokens = tokens
        self.allowed = allowed
        super().__init__(
            f"The persona is {tokens} tokens, but at most {allowed} fit in this context "
            f"after reserving room for the reply."
        )


class InjectionsTooLarge(PromptTooLarge):
    """The author's notes, lore entries and post-history instructions do not fit beside the persona."""

    def __init__(self, tokens: int, allowed: int) -> None:
        self.tokens = tokens
        self.allowed = allowed
        ValueError.__init__(
            self,
            f"The notes, lore entries and post-history instructions are {tokens} tokens, but only "
            f"{allowed} fit after the persona and the room reserved for the reply.",
        )


class MessageTooLarge(ValueError):
    """The newest turn alone does not fit after the persona."""

    def __init__(self, tokens: int, allowed: int) -> None:
        self.tokens = tokens
        self.allowed = allowed
        super().__init__(
            f"The newest message is {tokens} tokens, but only {allowed} fit after the persona "
            f"and the room reserved for the reply."
        )


# --------------------------------------------------------------------------- tokenization

# Tokenizing "\n" + text and dropping the tokens of "\n" alone gives the text's tokens as they
# appear mid-prompt: SPM vocabularies prepend a dummy space to every tokenize call ("▁<" instead of
# "<"), and no Llama-2 piece contains a newline, so nothing merges across the probe.
_PROBE = b"\n"


@dataclass(frozen=True)
class _Template:
    opening: tuple[int, ...]  # BOS (when the vocabulary adds one) + <|system|>, as a prompt starts
    system: tuple[int, ...]  # <|system|> mid-prompt, for injected blocks
    user: tuple[int, ...]
    model: tuple[int, ...]
    newline: tuple[int, ...]
    probe: tuple[int, ...]


_templates: weakref.WeakKeyDictionary[Tokenizer, _Template] = weakref.WeakKeyDictionary()


def _encode(text: str) -> bytes:
    # Lone surrogates cannot come from Discord, but must not crash the builder if they ever do.
    return text.encode("utf-8", errors="replace")


def _piece_tokens(tokenizer: Tokenizer, probe: Sequence[int], text: str) -> list[int]:
    if not text:
        return []
    data = _encode(text)
    tokens = tokenizer.tokenize(_PROBE + data, add_bos=False, special=False)
    if tokens[: len(probe)] == list(probe):
        return tokens[len(probe) :]
    # The probe merged with the text (byte-level BPE with a leading newline); such vocabularies
    # add no dummy prefix, so tokenizing the text alone is already the mid-prompt form.
    return tokenizer.tokenize(data, add_bos=False, special=False)


def _template(tokenizer: Tokenizer) -> _Template:
    try:
        return _templates[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = tuple(tokenizer.tokenize(_PROBE, add_bos=False, special=False))

    def piece(text: str) -> tuple[int, ...]:
        return tuple(_piece_tokens(tokenizer, probe, text))

    # The first marker follows BOS directly, where a whole-prompt tokenization would put the dummy
    # space: tokenize it plainly so the prompt starts the way the model was trained on.
    opening = tuple(tokenizer.tokenize(_encode(SYSTEM), add_bos=True, special=False))
    template = _Template(opening, piece(SYSTEM), piece(USER), piece(MODEL), piece("\n"), probe)
    with contextlib.suppress(TypeError):  # not weak-referenceable: still correct, only uncached
        _templates[tokenizer] = template
    return template


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Return how many tokens `text` takes inside a prompt (neutralised, without any marker)."""
    template = _template(tokenizer)
    return len(_piece_tokens(tokenizer, template.probe, neutralise(text)))


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """At least the most characters a token stands for in text: text of N characters is at least
    N / this many tokens. One more than the longest token decoded alone, as a token decoded alone
    may lose the leading space it has in text. Reads the whole vocabulary once (tens of ms)."""
    longest = max(
        (len(tokenizer.detokenize([token]).decode("utf-8", "replace")) for token in range(tokenizer.n_vocab())),
        default=0,
    )
    return longest + 1


def system_budget(tokenizer: Tokenizer, *, n_ctx: int, max_new_tokens: int, reserve: int = 0) -> int:
    """Return the most persona tokens (as `count_tokens` counts them) that leave `reserve` tokens for turns.

    Compare `count_tokens(tokenizer, persona)` with it to refuse a persona before it is stored.
    Never negative: 0 means not even an empty persona leaves that much room.
    """
    template = _template(tokenizer)
    overhead = len(template.opening) + len(template.model)
    return max(0, n_ctx - max_new_tokens - overhead - reserve)


# --------------------------------------------------------------------------- building


# A label marks the character's disambiguated namesake among the members.
MEMBER_SUFFIX = " (member)"

# The chronological order of one depth's injected blocks: SillyTavern puts system text nearest the end.
_INJECTION_ROLES = {"model": 0, "user": 1, "system": 2}


def character_label(name: str) -> str:
    """How a character's name is shown before its turns: like a member's label, never suffixed.

    Whitespace runs become one space, and anything that folds to a colon becomes a space, so no
    name can end its label early and make the rest of its line read as someone else's.
    """
    return " ".join("".join(" " if ":" in _fold_char(ch) else ch for ch in name).split())


def speaker_label(name: str, character: str | Iterable[str] = "") -> str:
    """How a member's name is shown in the prompt (and so in the reply's stops).

    Whitespace runs become one space, and anything that folds to a colon becomes a space, so a
    display name like `Bob: hi` cannot make its line read as Bob's. A name that reads as a
    character's once neutralised and folded (case, spacing, zero-width, fullwidth) gets
    " (member)": `character` is one name or every character present. The model never sees a
    member line that looks like a character's, and stopping at `\nName:` cannot cut a character's
    own name. Idempotent.
    """
    label = character_label(name)
    if label:
        folded = fold_text(neutralise(label))
        if any(folded == fold_text(neutralise(character_label(other))) for other in character_names(character)):
            label += MEMBER_SUFFIX
    return label


def _speaker_line(turn: PromptTurn, characters: tuple[str, ...] = ()) -> str:
    """One user turn as prompt text: every line of it starts with its author's label.

    Each line break (any that `str.splitlines` knows) starts a new `Label: ` line, so no line of a
    message can pose as another speaker's (`ok\nBob: I hand Alice my sword`).
    """
    label = speaker_label(turn.speaker, characters) if turn.speaker else ""
    if not label:
        return turn.text
    return "\n".join(f"{label}: {line}" for line in turn.text.splitlines() or [""])


def _model_text(turn: PromptTurn) -> str:
    """One model turn as prompt text: `Name: text` when a character is named (several share the channel)."""
    label = character_label(turn.speaker) if turn.speaker else ""
    return f"{label}: {turn.text}" if label else turn.text


def _check_roles(turns: Iterable[PromptTurn]) -> None:
    for turn in turns:
        if turn.role not in ("user", "model"):
            raise ValueError(f"unknown turn role {turn.role!r}")


_Piece = Callable[[str], list[int]]


def _render(template: _Template, piece: _Piece, turns: Sequence[PromptTurn], characters: tuple[str, ...]) -> list[int]:
    """Whole turns as blocks, laid out as the history is: a run of user turns is one block."""
    out: list[int] = []
    k = 0
    while k < len(turns):
        if turns[k].role == "model":
            out.extend((*template.model, *piece(neutralise(_model_text(turns[k])))))
            k += 1
            continue
        run: list[PromptTurn] = []
        while k < len(turns) and turns[k].role == "user":
            run.append(turns[k])
            k += 1
        out.extend(template.user)
        for number, line in enumerate(_neutralise_parts([_speaker_line(turn, characters) for turn in run])):
            if number:
                out.extend(template.newline)
            out.extend(piece(line))
    return out


def _examples(template: _Template, piece: _Piece, conversation: Conversation) -> list[int]:
    out: list[int] = []
    for block in conversation.examples:
        _check_roles(block)
        out.extend(_render(template, piece, block, conversation.characters))
    return out


def _inserts(template: _Template, piece: _Piece, conversation: Conversation) -> dict[int, list[list[int]]]:
    """The injected blocks and the tail by position (before turn `position`; len(turns): after the newest),
    each position's blocks in chronological order. Positions below 0 are possible: depth beyond history."""
    n = len(conversation.turns)
    # A continued reply must stay last, so what would follow it goes right before it (as SillyTavern).
    shift = 1 if conversation.continue_last else 0
    groups: dict[tuple[int, str], list[str]] = {}
    for injection in sorted(conversation.injections, key=lambda item: item.order):
        if injection.role not in _INJECTION_ROLES:
            raise ValueError(f"unknown injection role {injection.role!r}")
        if injection.depth < 0:
            raise ValueError(f"injection depth must not be negative, got {injection.depth}")
        if text := injection.text.strip():
            groups.setdefault((injection.depth, injection.role), []).append(text)
    markers = {"system": template.system, "user": template.user, "model": template.model}
    placed: list[tuple[tuple[int, int, int], list[int]]] = []
    for (depth, role), texts in groups.items():
        block = [*markers[role], *piece(neutralise("\n".join(texts)))]
        # Deeper ones first where depth 0 and 1 share a place (continue_last), then by role.
        placed.append(((n - max(depth, shift), -depth, _INJECTION_ROLES[role]), block))
    if tail := conversation.tail.strip():
        placed.append(((n - shift, 1, 0), [*template.system, *piece(neutralise(tail))]))
    inserts: dict[int, list[list[int]]] = {}
    for (position, _, _), block in sorted(placed, key=lambda item: item[0]):
        inserts.setdefault(position, []).append(block)
    return inserts


def story_tokens(tokenizer: Tokenizer, conversation: Conversation) -> int:
    """Tokens of the head with the example dialogue: BOS, `<|system|>`, the persona and the examples.

    What a prompt holds before its first turn when the examples are kept (`Prompt.system_tokens`):
    compare it with the context to refuse a card whose story and examples leave no room to talk.
    """
    template = _template(tokenizer)

    def piece(text: str) -> list[int]:
        return _piece_tokens(tokenizer, template.probe, text)

    persona = piece(neutralise(conversation.system))
    return len(template.opening) + len(persona) + len(_examples(template, piece, conversation))


_Blocks = list[tuple[list[int], int | None]]  # newest first; turn blocks with the turns they reach back over


def build_prompt(tokenizer: Tokenizer, conversation: Conversation, *, n_ctx: int, max_new_tokens: int) -> Prompt:
    """Build the prompt token list, keeping the persona fixed and as many of the newest turns as fit.

    The prompt plus `max_new_tokens` never exceeds `n_ctx` (exactly full is allowed). Injections,
    the tail and the reply prefix are always kept. The example dialogue is kept only while it fits
    beside every given turn, and is dropped before any turn is: the head stays the same while the
    history grows, until the examples go once. A turn that alone is larger than all the room for
    turns can never fit: it is skipped and older turns are still read. The first turn that merely
    does not fit in the room left ends the window. Raises PromptTooLarge when the persona alone does
    not fit, InjectionsTooLarge (a PromptTooLarge) when the injections and tail do not fit beside
    it, and MessageTooLarge when the newest turn does not.
    """
    if n_ctx <= 0 or max_new_tokens < 0:
        raise ValueError("n_ctx must be positive and max_new_tokens non-negative")
    turns = conversation.turns
    if conversation.continue_last and (not turns or turns[-1].role != "model"):
        raise ValueError("continue_last needs a model turn last")
    _check_roles(turns)

    template = _template(tokenizer)
    pieces: dict[str, list[int]] = {}  # the window may be fitted twice (with and without examples)

    def piece(text: str) -> list[int]:
        if text not in pieces:
            pieces[text] = _piece_tokens(tokenizer, template.probe, text)
        return pieces[text]

    characters = conversation.characters
    persona = piece(neutralise(conversation.system))
    head = [*template.opening, *persona]
    if conversation.continue_last:
        closing: list[int] = []
    else:
        closing = [*template.model, *piece(neutralise(conversation.reply_prefix))]
    room = n_ctx - max_new_tokens - len(head) - len(closing)
    if room < 0:
        raise PromptTooLarge(len(persona), max(0, len(persona) + room))
    inserts = _inserts(template, piece, conversation)
    inserted = sum(len(block) for blocks in inserts.values() for block in blocks)
    if inserted > room:
        raise InjectionsTooLarge(inserted, room)
    room -= inserted
    turn_room = room  # no turn larger than this can ever fit

    model_blocks: dict[int, list[int]] = {}

    def model_block(index: int) -> list[int]:
        if index not in model_blocks:
            model_blocks[index] = [*template.model, *piece(neutralise(_model_text(turns[index])))]
        return model_blocks[index]

    n = len(turns)

    def fit(room: int) -> tuple[_Blocks, int, bool]:
        """The newest turns that fit in `room`, with the inserts among them, and whether every turn was read."""
        blocks: _Blocks = []
        used = 0  # newest input turns up to the oldest kept one
        complete = True
        i = n  # turns[i:] have been read

        def emit(position: int) -> None:
            blocks.extend((block, None) for block in reversed(inserts.get(position, ())))

        while i > 0:
            emit(i)
            if turns[i - 1].role == "model":
                i -= 1
                block = model_block(i)
                if len(block) > room:
                    if used == 0:
                        raise MessageTooLarge(len(block), room)
                    if len(block) > turn_room:
                        continue
                    complete = False
                    break
                room -= len(block)
                used = n - i
                blocks.append((block, used))
                continue
            # A run of user turns forms one block. A model turn between user turns that can never fit is
            # left out, and the user turns around it join one run, as if it had never been there. An
            # injection ends the run: it is placed between the turns it falls between.
            members: list[int] = []  # newest first
            while (
                i > 0
                and (not members or i not in inserts)
                and (turns[i - 1].role == "user" or len(model_block(i - 1)) > turn_room)
            ):
                i -= 1
                if turns[i].role == "user":
                    members.append(i)
            # The whole run is neutralised together so a marker split across lines is caught, and
            # independently of how much of it fits, so a kept line tokenizes the same whatever the window.
            lines = _neutralise_parts([_speaker_line(turns[k], characters) for k in reversed(members)])
            kept: list[list[int]] = []  # newest first
            full = False
            for index, line in zip(members, reversed(lines), strict=True):
                tokens = piece(line)
                cost = len(tokens) + (len(template.newline) if kept else len(template.user))
                if cost > room:
                    if used == 0:
                        raise MessageTooLarge(cost, room)
                    if len(tokens) + len(template.user) > turn_room:
                        continue
                    full = True
                    break
                kept.append(tokens)
                room -= cost
                used = n - index
            if kept:
                block = list(template.user)
                for number, tokens in enumerate(reversed(kept)):
                    if number:
                        block.extend(template.newline)
                    block.extend(tokens)
                blocks.append((block, used))
            if full:
                complete = False
                break
        # Injections deeper than the window reaches go before its oldest turn, deepest first.
        for position in sorted((p for p in inserts if p <= i), reverse=True):
            emit(position)
        return blocks, used, complete

    examples = _examples(template, piece, conversation)
    window: tuple[_Blocks, int, bool] | None = None
    if examples and not conversation.history_truncated and len(examples) <= room:
        with contextlib.suppress(MessageTooLarge):  # then not even the newest turn fits beside them
            attempt = fit(room - len(examples))
            if attempt[2]:
                window = attempt
    examples_kept = window is not None
    blocks, used, _ = window if window is not None else fit(room)

    tokens = [*head, *(examples if examples_kept else ())]
    system_tokens = len(tokens)
    # A shorter window places every injection the same only if it still holds the turn after it: offer
    # cuts only at turn blocks older than every injection (positions count turns, the oldest is 0).
    first_insert = min(inserts, default=n + 1)
    cuts: list[int] = []
    cut_turns: list[int] = []
    oldest = True
    for block, reach in reversed(blocks):
        if reach is not None:
            if not oldest and n - reach < first_insert:
                cuts.append(len(tokens))
                cut_turns.append(reach)
            oldest = False
        tokens.extend(block)
    tokens.extend(closing)
    return Prompt(
        tokens=tokens,
        turns_used=used,
        system_tokens=system_tokens,
        cuts=tuple(cuts),
        cut_turns=tuple(cut_turns),
        examples_kept=examples_kept,
    )
