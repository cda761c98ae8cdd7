"""Character cards as SillyTavern and chub.ai write them: reading, editing, storing and exporting.

Reads Character Card V1 (flat JSON), V2 (`chara_card_v2`) and V3 (`chara_card_v3`), also the hybrids that
carry V1 fields beside a `data` object, from a JSON file, a PNG image (text chunk `ccv3`, else `chara`) or a
CHARX archive (a zip with `card.json`). The format is told by the bytes, never by a file name.

Everything here is pure and blocking (Pillow, zlib): callers run it on a thread. Cards come from the
internet, so every way a file can be wrong ends in `CardError` with a short message for the uploader, and
every size is bounded before it is decoded: the file, a decompressed PNG text chunk, what a CHARX
archive unpacks to, the pixels of an image.

PNG chunks are walked with Pillow's `ChunkStream` (framing and checksums) and the card's text chunk is
decoded here: Pillow's own text handling caps a decompressed chunk at `MAX_TEXT_CHUNK` (1 MiB), a
module-wide setting other threads share, and cards with big lorebooks carry several MiB.
"""

from __future__ import annotations

import base64
import binascii
import colorsys
import functools
import hashlib
import io
import json
import logging
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from bot.errors import TavernError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
AVATAR_MAX_SIDE = 512  # avatars are shown at 128 px at most; 512 keeps them sharp and small
PLACEHOLDER_SIDE = 256
# Decoding allocates about 4 bytes a pixel: 25 M pixels (5000 x 5000) is ~100 MB, far above real card art.
IMAGE_MAX_PIXELS = 25_000_000
MAX_NESTING = 100  # real cards nest about 8 deep; this stays far below Python's recursion limit

V1 = "chara_card_v1"
V2 = "chara_card_v2"
V3 = "chara_card_v3"
_SPEC_MAJOR = {V2: 2, V3: 3}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_CARD_KEYWORDS = ("ccv3", "chara")  # in order of preference, as SillyTavern reads them
_OTHER_IMAGES = ((b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"))
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif", ".bmp")
# Untrusted images reach only the web formats' decoders, never libtiff, Ghostscript (EPS) and the like.
_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "AVIF")
_SURROGATE = re.compile("[\ud800-\udfff]")

_TEXT_FIELDS = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "creator",
    "character_version",
)
EDITABLE_FIELDS = frozenset(
    (
        "name",
        "description",
        "personality",
        "scenario",
        "first_mes",
        "mes_example",
        "system_prompt",
        "post_history_instructions",
        "alternate_greetings",
    )
)
_DEPTH_ROLES = ("system", "user", "assistant")
DEFAULT_TALKATIVENESS = 0.5
DEFAULT_DEPTH = 4  # SillyTavern's default for a depth prompt

# What Pillow raises on malformed image data is not a closed set; these are the ones it does raise.
_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    Image.DecompressionBombError,
)


class CardError(TavernError):
    """A file is not a character card this bot can read, or a card edit breaks the rules."""

    user_message = "That is not a character card I can read."


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, tuple | list):
        return "a list"
    if value is None:
        return "null"
    return "a number" if isinstance(value, int | float) else "something else"


@dataclass(frozen=True)
class CharacterCard:
    """A card as read: the whole object (`raw`, deeply read-only) and its image.

    The properties read the effective data: the `data` object, falling back to the top-level V1 fields.
    Inside `raw`, objects are read-only mappings and lists are tuples; `stored_json` turns them back.
    """

    spec: str
    raw: Mapping[str, Any] = field(repr=False)
    avatar: bytes | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        size = "none" if self.avatar is None else f"{len(self.avatar)} bytes"
        return f"CharacterCard(spec={self.spec!r}, name={self.name!r}, avatar={size})"

    def _field(self, key: str) -> Any:
        data = self.raw.get("data")
        if isinstance(data, Mapping) and data.get(key) is not None:
            return data[key]
        return self.raw.get(key)

    def _text(self, key: str) -> str:
        return _as_text(self._field(key), key)

    @property
    def name(self) -> str:
        name = self._text("name")
        if not name.strip() and self.raw.get("name") is not None:  # as SillyTavern reads it: data.name || name
            name = _as_text(self.raw["name"], "name")
        return name

    @property
    def description(self) -> str:
        return self._text("description")

    @property
    def personality(self) -> str:
        return self._text("personality")

    @property
    def scenario(self) -> str:
        return self._text("scenario")

    @property
    def first_mes(self) -> str:
        return self._text("first_mes")

    @property
    def mes_example(self) -> str:
        return self._text("mes_example")

    @property
    def system_prompt(self) -> str:
        return self._text("system_prompt")

    @property
    def post_history_instructions(self) -> str:
        return self._text("post_history_instructions")

    @property
    def creator_notes(self) -> str:
        notes = self._field("creator_notes")
        if notes is None:  # SillyTavern's V1 files call it creatorcomment
            notes = self.raw.get("creatorcomment")
        return _as_text(notes, "creator_notes")

    @property
    def alternate_greetings(self) -> tuple[str, ...]:
        return _as_texts(self._field("alternate_greetings"), "alternate_greetings", split_commas=False)

    @property
    def tags(self) -> tuple[str, ...]:
        return _as_texts(self._field("tags"), "tags", split_commas=True)

    @property
    def extensions(self) -> Mapping[str, Any]:
        extensions = self._field("extensions")
        return extensions if isinstance(extensions, Mapping) else _EMPTY

    @property
    def talkativeness(self) -> float:
        value = self.extensions.get("talkativeness")
        if value is None:
            value = self.raw.get("talkativeness")  # V1 files keep it at the top
        number = _as_number(value)
        if number is None or math.isnan(number):
            return DEFAULT_TALKATIVENESS
        return min(1.0, max(0.0, number))

    @property
    def depth_prompt(self) -> tuple[str, int, str] | None:
        """(prompt, depth, role) of SillyTavern's depth prompt, or None when the card has none."""
        entry = self.extensions.get("depth_prompt")
        if not isinstance(entry, Mapping):
            return None
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return None
        depth = _as_number(entry.get("depth"))
        depth_value = DEFAULT_DEPTH if depth is None or not math.isfinite(depth) else max(0, int(depth))
        role = entry.get("role")
        role_value = role.strip().lower() if isinstance(role, str) else ""
        return prompt, depth_value, role_value if role_value in _DEPTH_ROLES else "system"

    @property
    def character_book(self) -> Mapping[str, Any] | None:
        book = self._field("character_book")
        if book is None or isinstance(book, Mapping):
            return book
        raise CardError(f"The card's lorebook (character_book) should be an object, but it is {_kind(book)}.")


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _as_text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # numbers as strings are a common quirk; the digits are what was meant
    raise CardError(f'The card\'s "{key}" should be text, but it is {_kind(value)}.')


def _as_texts(value: Any, key: str, *, split_commas: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # a lone string where a list belongs, as SillyTavern accepts it
        if split_commas:
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return (value,)
    if isinstance(value, tuple | list):
        return tuple(_as_text(item, key) for item in value if item is not None)
    raise CardError(f'The card\'s "{key}" should be a list of texts, but it is {_kind(value)}.')


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


# --- the object model: read-only on the way in, plain on the way out ---------------------------------


def _freeze(value: Any, depth: int = 0) -> Any:
    if depth > MAX_NESTING:
        raise CardError(f"The card is nested more than {MAX_NESTING} levels deep.")
    if isinstance(value, str):
        # JSON can spell lone surrogates (\ud800) that no UTF-8 writer, Discord included, accepts.
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, dict):
        return MappingProxyType({_freeze(k, depth): _freeze(v, depth + 1) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item, depth + 1) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(item) for item in value]
    return value


def _spec_of(raw: Mapping[str, Any]) -> str:
    spec = raw.get("spec")
    data = raw.get("data")
    if data is not None and not isinstance(data, Mapping):
        raise CardError(f"The card's data should be an object, but it is {_kind(data)}.")
    if spec is None:
        # A `data` object without a spec is a V2 card whose writer forgot the spec: data wins.
        return V1 if data is None else V2
    if not isinstance(spec, str):
        raise CardError(f"The card's spec should be text such as chara_card_v2, but it is {_kind(spec)}.")
    if spec not in _SPEC_MAJOR:
        raise CardError(
            f'This card is in the format "{spec[:60]}", which I cannot read '
            "(I read Character Card V1, V2 and V3: chara_card_v2, chara_card_v3)."
        )
    version = raw.get("spec_version")
    if version is None:
        return spec
    major = _as_number(version.split(".", 1)[0] if isinstance(version, str) else version)
    if major is None or not math.isfinite(major):
        raise CardError(f"The card's spec_version ({str(version)[:30]!r}) is not a version number.")
    if int(major) != _SPEC_MAJOR[spec]:
        raise CardError(
            f"This card is {spec} version {str(version)[:30]}, which I cannot read "
            f"(I read {spec} version {_SPEC_MAJOR[spec]}.x)."
        )
    return spec


def _make(raw: Mapping[str, Any], avatar: bytes | None) -> CharacterCard:
    """A checked card: every property readable, a name present."""
    card = CharacterCard(spec=_spec_of(raw), raw=raw, avatar=avatar)
    if not card.name.strip():
        raise CardError("The card has no name.")
    for key in _TEXT_FIELDS:
        card._text(key)
    _ = (card.creator_notes, card.alternate_greetings, card.tags, card.character_book)
    return card


def _card_object(blob: bytes, where: str) -> Mapping[str, Any]:
    """The frozen JSON object in `blob`; CardError naming what is wrong with it."""
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CardError(f"The card data {where} is not UTF-8 text (byte {error.start}).") from None
    return _parse_object(text, where)


def _parse_object(text: str, where: str) -> Mapping[str, Any]:
    try:
        # NaN and Infinity are not JSON; other readers of an exported card would choke on them.
        value = json.loads(text, parse_constant=lambda _constant: None)
    except json.JSONDecodeError as error:
        raise CardError(
            f"The card data {where} is broken JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        ) from None
    except (ValueError, RecursionError):  # a number beyond Python's digit limit, or absurd nesting
        raise CardError(f"The card data {where} is JSON I cannot read (absurd nesting or numbers).") from None
    if not isinstance(value, dict):
        raise CardError(f"The card data {where} is JSON, but {_kind(value)} rather than a card object.")
    return _freeze(value)


# --- reading ---------------------------------------------------------------------------------------------


def read_card(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> CharacterCard:
    """The card in a JSON, PNG or CHARX file; CardError with a specific reason for anything else."""
    if len(data) > max_bytes:
        raise CardError(f"That file is {_mib(len(data))}; a character card may be at most {_mib(max_bytes)}.")
    if not data:
        raise CardError("That file is empty.")
    if data.startswith(PNG_SIGNATURE):
        return _read_png(data, max_bytes)
    if data.startswith(_ZIP_SIGNATURES):
        return _read_charx(data, max_bytes)
    for magic, kind in _OTHER_IMAGES:
        if data.startswith(magic):
            if kind == "JPEG" and zipfile.is_zipfile(io.BytesIO(data)):
                return _read_charx(data, max_bytes)  # RisuAI writes CHARX behind a JPEG
            raise CardError(f"That is a {kind} image; character cards are PNG images, JSON or CHARX files.")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise CardError("That is a WEBP image; character cards are PNG images, JSON or CHARX files.")
    return _read_json(data)


def _read_json(data: bytes) -> CharacterCard:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CardError("That file is not a character card (a PNG image, JSON or CHARX file).") from None
    if text.lstrip()[:1] not in ("{", "["):
        raise CardError("That file is not a character card (a PNG image, JSON or CHARX file).")
    return _make(_parse_object(text, "in the file"), None)


def _read_png(data: bytes, max_bytes: int) -> CharacterCard:
    found, image = _png_chunks(data)
    if not found:
        raise CardError("This PNG image has no character card in it (no chara or ccv3 text chunk).")
    errors: list[CardError] = []
    for keyword in _CARD_KEYWORDS:
        if keyword not in found:
            continue
        cid, body = found[keyword]
        try:
            raw = _card_object(_png_payload(cid, body, max_bytes), f"in the PNG's {keyword} chunk")
            card = _make(raw, None)
        except CardError as error:
            log.debug("PNG %s chunk unreadable: %s", keyword, error.user_message)
            errors.append(error)
            continue
        if errors:
            log.info("Read a card from its chara chunk; its ccv3 chunk was unreadable: %s", errors[0].user_message)
        return replace(card, avatar=_avatar_from_image(image, "The card's image"))
    raise errors[0]


def _png_chunks(data: bytes) -> tuple[dict[str, tuple[bytes, bytes]], bytes]:
    """The card text chunks by lower-case keyword (the first of each), and the PNG without any text chunk."""
    fp = io.BytesIO(data)
    fp.seek(len(PNG_SIGNATURE))
    stream = PngImagePlugin.ChunkStream(fp)
    found: dict[str, tuple[bytes, bytes]] = {}
    kept = [PNG_SIGNATURE]
    while True:
        try:
            cid, pos, length = stream.read()
        except struct.error:
            raise CardError("The PNG file is cut short (it ends before its last chunk).") from None
        except SyntaxError:
            raise CardError("The PNG file is damaged (a chunk has an invalid header).") from None
        if pos + length + 4 > len(data):
            raise CardError("The PNG file is cut short (a chunk runs past the end of the file).")
        body = fp.read(length)
        try:
            stream.crc(cid, body)
        except SyntaxError:
            kind = cid.decode("latin-1")
            raise CardError(f"The PNG file is damaged (the checksum of a {kind} chunk is wrong).") from None
        if cid in _TEXT_CHUNKS:
            keyword, _, rest = body.partition(b"\0")
            name = keyword.decode("latin-1").lower()
            if name in _CARD_KEYWORDS and name not in found:
                found[name] = (cid, rest)
            continue  # text chunks are metadata, and Pillow refuses big ones: the avatar needs none
        kept.append(data[pos - 8 : pos + length + 4])
        if cid == b"IEND":
            return found, b"".join(kept)


def _png_payload(cid: bytes, body: bytes, max_bytes: int) -> bytes:
    """The card JSON bytes in a text chunk's body (after its keyword)."""
    if cid == b"tEXt":
        text = body
    elif cid == b"zTXt":
        if body[:1] != b"\0":
            raise CardError("The card's zTXt chunk uses an unknown compression method.")
        text = _inflate(body[1:], max_bytes)
    else:  # iTXt: flag, method, language \0 translated keyword \0 text
        if len(body) < 2:
            raise CardError("The card's iTXt chunk is cut short.")
        flag, method, rest = body[0], body[1], body[2:]
        parts = rest.split(b"\0", 2)
        if len(parts) != 3:
            raise CardError("The card's iTXt chunk is cut short.")
        text = parts[2]
        if flag:
            if method != 0:
                raise CardError("The card's iTXt chunk uses an unknown compression method.")
            text = _inflate(text, max_bytes)
    text = text.strip()
    if text.startswith(b"{"):
        return text  # a few writers store the JSON itself rather than base64
    return _unbase64(text)


def _inflate(blob: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(blob, limit + 1)
    except zlib.error:
        raise CardError("The card's compressed text chunk in the PNG is damaged.") from None
    if len(out) > limit:
        raise CardError(f"The card's compressed text chunk unpacks to more than {_mib(limit)}; refused.")
    if not inflater.eof:
        raise CardError("The card's compressed text chunk in the PNG is damaged (it is cut short).")
    return out


def _unbase64(text: bytes) -> bytes:
    compact = b"".join(text.split())
    compact += b"=" * (-len(compact) % 4)
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(compact, altchars=altchars, validate=True)
        except binascii.Error:
            continue
    raise CardError("The card data in the PNG is not valid base64.")


class _Budget:
    """What a CHARX archive may still unpack to; a zip's own size fields are not trusted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        if info.flag_bits & 0x1:
            raise CardError(f"The CHARX archive's {info.filename[:80]} is encrypted.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CardError(f"The CHARX archive's {info.filename[:80]} uses a compression method I do not read.")
        try:
            with archive.open(info) as member:
                blob = member.read(self.left + 1)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, NotImplementedError):
            raise CardError(f"The CHARX archive is damaged (cannot unpack {info.filename[:80]}).") from None
        if len(blob) > self.left:
            raise CardError(f"The CHARX archive unpacks to more than {_mib(self.limit)}; refused.")
        self.left -= len(blob)
        return blob


def _read_charx(data: bytes, max_bytes: int) -> CharacterCard:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError):
        # NotImplementedError: a version or feature field beyond what zipfile reads, e.g. after damage
        raise CardError("That zip (CHARX) archive is damaged.") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        info = members.get("card.json") or next(
            (member for name, member in members.items() if name.lower() == "card.json"), None
        )
        if info is None:
            raise CardError("That zip archive is not a CHARX card: it has no card.json at its top level.")
        budget = _Budget(max_bytes)
        card = _make(_card_object(budget.read(archive, info), "in card.json"), None)
        return replace(card, avatar=_charx_icon(archive, members, card.raw, budget))


def _charx_icon(
    archive: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], raw: Mapping[str, Any], budget: _Budget
) -> bytes | None:
    """The CHARX icon asset (the one named main first), else any image under assets/icon/."""
    data = raw.get("data")
    assets = data.get("assets") if isinstance(data, Mapping) else None
    icons = [
        asset
        for asset in (assets if isinstance(assets, tuple) else ())
        if isinstance(asset, Mapping) and asset.get("type") == "icon" and isinstance(asset.get("uri"), str)
    ]
    icons.sort(key=lambda asset: asset.get("name") != "main")
    paths = [path for path in (_zip_path(asset["uri"]) for asset in icons) if path]
    paths += [
        name
        for name in members
        if name.lower().startswith("assets/icon/") and name.lower().endswith(_IMAGE_SUFFIXES)
    ]
    for path in dict.fromkeys(paths):
        info = members.get(path)
        if info is None or info.is_dir():
            continue
        try:
            return _avatar_from_image(budget.read(archive, info), "The card's icon")
        except CardError as error:
            if "unpacks to more than" in error.user_message:
                raise
            log.info("Skipping CHARX icon %s: %s", path[:80], error.user_message)
    return None


def _zip_path(uri: str) -> str | None:
    """The path inside the archive an asset URI names; None for defaults and anything remote."""
    for prefix in ("embeded://", "embedded://", "__asset:"):
        if uri.startswith(prefix):
            return uri[len(prefix) :].lstrip("/") or None
    return None


# --- images -----------------------------------------------------------------------------------------------


@functools.cache
def _image_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(name for name in _IMAGE_FORMATS if name in Image.OPEN)  # AVIF needs a recent Pillow


def _avatar_from_image(data: bytes, what: str) -> bytes:
    """A PNG, JPEG, GIF, WEBP, BMP or AVIF image as a PNG of at most AVATAR_MAX_SIDE a side, without metadata."""
    try:
        with Image.open(io.BytesIO(data), formats=_image_formats()) as image:
            width, height = image.size
            if width * height > IMAGE_MAX_PIXELS:
                raise CardError(f"{what} is {width}x{height} pixels, too large to read.")
            image.thumbnail((AVATAR_MAX_SIDE, AVATAR_MAX_SIDE))
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            converted = image.convert("RGBA" if has_alpha else "RGB")
        out = io.BytesIO()
        converted.save(out, "PNG")
    except CardError:
        raise
    except Image.DecompressionBombError:
        raise CardError(f"{what} has far too many pixels to read.") from None
    except _IMAGE_ERRORS as error:
        log.debug("Unreadable image: %r", error)
        raise CardError(f"{what} could not be read as an image (it is damaged or in an unknown format).") from None
    return out.getvalue()


@functools.lru_cache(maxsize=128)
def _placeholder(name: str) -> bytes:
    """A colored square with the name's initial; the color follows from the name, so it stays the same."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    red, green, blue = colorsys.hsv_to_rgb(digest[0] / 255, 0.45, 0.70)
    image = Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), (int(red * 255), int(green * 255), int(blue * 255)))
    letter = next((char for char in name if char.isalnum()), "?").upper()
    draw = ImageDraw.Draw(image)
    center = PLACEHOLDER_SIDE / 2
    try:
        font: Any = ImageFont.load_default(size=PLACEHOLDER_SIDE * 0.6)
    except TypeError:  # Pillow 10.0 has only the fixed bitmap font
        font = ImageFont.load_default()
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text((center, center), letter, fill="white", font=font, anchor="mm")
    else:
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        draw.text((center - (right - left) / 2, center - (bottom - top) / 2), letter, fill="white", font=font)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def avatar_png(card: CharacterCard) -> bytes:
    """The card's image, or a placeholder with its initial, as PNG bytes (well under Discord's limits)."""
    return card.avatar if card.avatar is not None else _placeholder(card.name)


def with_avatar(card: CharacterCard, image: bytes) -> CharacterCard:
    """The card with a new image (PNG, JPEG, GIF, WEBP, BMP, AVIF), normalized to a PNG of at most 512 a side."""
    if len(image) > DEFAULT_MAX_BYTES:
        raise CardError(f"That image is {_mib(len(image))}; at most {_mib(DEFAULT_MAX_BYTES)} are allowed.")
    return replace(card, avatar=_avatar_from_image(image, "That image"))


# --- making and changing cards ---------------------------------------------------------------------------


def card_from_text(name: str, description: str) -> CharacterCard:
    """A V2 card holding only a name and a description (as plain-text personas had)."""
    raw = {
        "spec": V2,
        "spec_version": "2.0",
        "data": {
            "name": name,
            "description": description,
            "personality": "",
            "scenario": "",
            "first_mes": "",
            "mes_example": "",
            "creator_notes": "",
            "system_prompt": "",
            "post_history_instructions": "",
            "alternate_greetings": [],
            "tags": [],
            "creator": "",
            "character_version": "",
            "extensions": {},
        },
    }
    return _make(_freeze(raw), None)


def with_fields(card: CharacterCard, **changes: Any) -> CharacterCard:
    """The card with some text fields changed in its data object; everything else is kept exactly.

    A hybrid card's top-level V1 copy of a changed field changes too, so V1-only readers see the same text.
    """
    unknown = sorted(set(changes) - EDITABLE_FIELDS)
    if unknown:
        raise TypeError(f"with_fields() cannot change {', '.join(unknown)}")
    raw = _thaw(card.raw)
    if card.spec == V1:
        target = raw
    else:
        target = raw["data"] if isinstance(raw.get("data"), dict) else raw.setdefault("data", {})
    for key, value in changes.items():
        if key == "alternate_greetings":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise TypeError("alternate_greetings must be a sequence of strings")
            value = list(value)
            if not all(isinstance(item, str) for item in value):
                raise TypeError("alternate_greetings must be a sequence of strings")
        elif not isinstance(value, str):
            raise TypeError(f"{key} must be a string, not {type(value).__name__}")
        if key == "name" and not value.strip():
            raise CardError("A character needs a name.")
        target[key] = value
        if target is not raw and key in raw:
            raw[key] = list(value) if isinstance(value, list) else value
    return _make(_freeze(raw), card.avatar)


# --- writing ---------------------------------------------------------------------------------------------


def _upgraded(card: CharacterCard, spec: str, version: str) -> dict[str, Any]:
    """The card's object under `spec`: the V2 fields filled in, every other field kept as it is."""
    raw = _thaw(card.raw)
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for key in _TEXT_FIELDS:
        if not isinstance(data.get(key), str):
            data[key] = card.creator_notes if key == "creator_notes" else card._text(key)
    for key in ("alternate_greetings", "tags"):
        value = data.get(key)
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            data[key] = list(getattr(card, key))
    if not isinstance(data.get("extensions"), dict):
        data["extensions"] = _thaw(card.extensions)
    if card.spec == V1 and "talkativeness" in raw and "talkativeness" not in data["extensions"]:
        data["extensions"]["talkativeness"] = card.talkativeness
    book = card.character_book
    if book is not None and data.get("character_book") is None:
        data["character_book"] = _thaw(book)
    if spec == V3 and not isinstance(data.get("group_only_greetings"), list):
        data["group_only_greetings"] = []
    raw["spec"] = spec
    if not (card.spec == spec and raw.get("spec_version") is not None):
        raw["spec_version"] = version
    raw["data"] = data
    return raw


def to_v2(card: CharacterCard) -> dict[str, Any]:
    """The card as a `chara_card_v2` object (a V1 card is upgraded; V3-only fields stay in data)."""
    return _upgraded(card, V2, "2.0")


def to_v3(card: CharacterCard) -> dict[str, Any]:
    """The card as a `chara_card_v3` object."""
    return _upgraded(card, V3, "3.0")


def _json_bytes(value: Any, *, indent: int | None = None) -> bytes:
    separators = None if indent else (",", ":")
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators).encode("utf-8")


def export_json(card: CharacterCard) -> bytes:
    """The card as a JSON file: V3 if it was read as V3, else V2."""
    return _json_bytes(to_v3(card) if card.spec == V3 else to_v2(card), indent=2)


def export_png(card: CharacterCard) -> bytes:
    """The card as a PNG image with both a `chara` (V2) and a `ccv3` (V3) text chunk, as SillyTavern writes."""
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(_json_bytes(to_v2(card))).decode("ascii"))
    info.add_text("ccv3", base64.b64encode(_json_bytes(to_v3(card))).decode("ascii"))
    out = io.BytesIO()
    try:
        with Image.open(io.BytesIO(avatar_png(card))) as image:
            image.save(out, "PNG", pnginfo=info)
    except _IMAGE_ERRORS as error:  # a stored avatar that no longer decodes: better a placeholder than nothing
        log.warning("Avatar of %r unreadable (%r); exporting with a placeholder", card.name, error)
        out = io.BytesIO()
        with Image.open(io.BytesIO(_placeholder(card.name))) as image:
            image.save(out, "PNG", pnginfo=info)
    return out.getvalue()


def stored_json(card: CharacterCard) -> str:
    """The card's whole object as JSON text, for the database (with the avatar bytes beside it)."""
    return json.dumps(_thaw(card.raw), ensure_ascii=False, separators=(",", ":"))


def from_stored(card_json: str, avatar: bytes | None) -> CharacterCard:
    """The card `stored_json` wrote, with its avatar."""
    return _make(_parse_object(card_json, "stored"), avatar)
