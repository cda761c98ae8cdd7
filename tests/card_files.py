"""Character card files built in code, as SillyTavern, chub.ai and RisuAI write them (no binary fixtures)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Iterable
from typing import Any

from PIL import Image, PngImagePlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

UNKNOWN_TOP = {"create_date": "2024-5-1 @12h 00m 00s", "x_tool": {"kept": [1, 2.5, None, True]}}
UNKNOWN_DATA = {"x_rating": 7, "x_nested": {"list": ["a", {"b": None}], "empty": {}}, "x_unicode": "ünï 猫 🐈"}
EXTENSIONS = {
    "talkativeness": "0.8",
    "fav": False,
    "world": "Tower lore",
    "depth_prompt": {"prompt": "Stay in character.", "depth": "2", "role": "user"},
    "x_custom": {"deep": {"deeper": [1, "two", {"three": 3}]}},
}


def lorebook(entries: int = 2, content: str = "The tower is old.") -> dict[str, Any]:
    """A character_book with `entries` entries, each holding `content`."""
    return {
        "name": "Tower lore",
        "scan_depth": 4,
        "token_budget": 512,
        "recursive_scanning": False,
        "extensions": {"x_book": True},
        "entries": [
            {
                "keys": [f"tower{index}"],
                "content": content,
                "extensions": {"x_entry": index},
                "enabled": True,
                "insertion_order": index,
                "id": index,
            }
            for index in range(entries)
        ],
    }


def v1_card(name: str = "Aria") -> dict[str, Any]:
    """A Character Card V1: a flat object."""
    return {
        "name": name,
        "description": "{{char}} is a knight. <BOT> guards <USER>.",
        "personality": "brave",
        "scenario": "A tower.",
        "first_mes": "Halt!",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Halt!",
        "talkativeness": "0.3",
        "creatorcomment": "Old notes",
        "x_v1_extra": {"kept": True},
    }


def v2_data(name: str = "Aria", **overrides: Any) -> dict[str, Any]:
    """The data object of a complete V2 card, with unknown fields and extensions."""
    data: dict[str, Any] = {
        "name": name,
        "description": "{{char}} is a knight.",
        "personality": "brave",
        "scenario": "A tower.",
        "first_mes": "Halt, {{user}}!",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Halt!",
        "creator_notes": "Made for testing.",
        "system_prompt": "Write as {{char}}.",
        "post_history_instructions": "Stay terse.",
        "alternate_greetings": ["Who goes there?", "Welcome back."],
        "character_book": lorebook(),
        "tags": ["knight", "fantasy"],
        "creator": "someone",
        "character_version": "1.2",
        "extensions": json.loads(json.dumps(EXTENSIONS)),
        **json.loads(json.dumps(UNKNOWN_DATA)),
    }
    data.update(overrides)
    return data


def v2_card(name: str = "Aria", **overrides: Any) -> dict[str, Any]:
    """A V2 card with unknown fields at the top and in data."""
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": v2_data(name, **overrides), **UNKNOWN_TOP}


def v3_card(name: str = "Aria", **overrides: Any) -> dict[str, Any]:
    """A V3 card (assets, nickname, group-only greetings) with unknown fields."""
    data = v2_data(
        name,
        assets=[{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
        nickname="Ari",
        group_only_greetings=["Hello, all."],
        creation_date=1700000000,
    )
    data.update(overrides)
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data, **UNKNOWN_TOP}


def json_file(card: Any) -> bytes:
    return json.dumps(card, ensure_ascii=False).encode("utf-8")


def b64(card: Any) -> str:
    """The card as a text chunk value: base64 of its UTF-8 JSON."""
    return base64.b64encode(json_file(card)).decode("ascii")


def image_bytes(
    size: tuple[int, int] = (8, 12), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG"
) -> bytes:
    """A plain image with no card in it."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


def png_card(
    chunks: Iterable[tuple[str, str, str]],
    *,
    image: bytes | None = None,
) -> bytes:
    """A PNG with text chunks `(kind, keyword, value)`, kind one of tEXt, zTXt, iTXt, iTXt-z (compressed)."""
    info = PngImagePlugin.PngInfo()
    for kind, keyword, value in chunks:
        if kind == "tEXt":
            info.add_text(keyword, value)
        elif kind == "zTXt":
            info.add_text(keyword, value, zip=True)
        elif kind == "iTXt":
            info.add_itxt(keyword, value)
        elif kind == "iTXt-z":
            info.add_itxt(keyword, value, zip=True)
        else:
            raise ValueError(kind)
    out = io.BytesIO()
    with Image.open(io.BytesIO(image or image_bytes())) as im:
        im.save(out, "PNG", pnginfo=info)
    return out.getvalue()


def raw_chunk(cid: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and checksum (for chunks Pillow will not write, such as broken ones)."""
    return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(cid + body) & 0xFFFFFFFF)


def png_with_chunk(cid: bytes, body: bytes, image: bytes | None = None) -> bytes:
    """A PNG with one raw chunk inserted right after IHDR."""
    png = image or image_bytes()
    ihdr_end = len(PNG_SIGNATURE) + 8 + 13 + 4
    return png[:ihdr_end] + raw_chunk(cid, body) + png[ihdr_end:]


def text_chunks(png: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG by keyword (read with Pillow, which is fine for small test cards)."""
    with Image.open(io.BytesIO(png)) as im:
        return {key: str(value) for key, value in im.text.items()}


def charx(card: Any, files: dict[str, bytes] | None = None, *, card_name: str = "card.json") -> bytes:
    """A CHARX archive: card.json at the top and the given asset files."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(card_name, json_file(card))
        for path, blob in (files or {}).items():
            archive.writestr(path, blob)
    return out.getvalue()
