"""Character cards: every format and quirk SillyTavern and chub.ai write, every bad file, exact round trips."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.core import cards
from bot.core.cards import CardError, CharacterCard
from bot.errors import TavernError
from tests.card_files import (
    EXTENSIONS,
    PNG_SIGNATURE,
    UNKNOWN_DATA,
    UNKNOWN_TOP,
    b64,
    charx,
    image_bytes,
    json_file,
    lorebook,
    png_card,
    png_with_chunk,
    raw_chunk,
    text_chunks,
    v1_card,
    v2_card,
    v2_data,
    v3_card,
)

MiB = 1024 * 1024


def refused(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(CardError) as caught:
        cards.read_card(data, **kwargs)
    return caught.value.user_message


def image_of(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# --- formats ---------------------------------------------------------------------------------------------


def test_card_error_is_a_tavern_error() -> None:
    assert issubclass(CardError, TavernError)
    assert cards.DEFAULT_MAX_BYTES == 16 * 1024 * 1024


def test_v1_json() -> None:
    card = cards.read_card(json_file(v1_card()))
    assert card.spec == "chara_card_v1"
    assert card.name == "Aria"
    assert card.description == "{{char}} is a knight. <BOT> guards <USER>."  # macros are expanded elsewhere
    assert (card.personality, card.scenario, card.first_mes) == ("brave", "A tower.", "Halt!")
    assert card.mes_example.startswith("<START>")
    assert card.creator_notes == "Old notes"  # SillyTavern's V1 name for it
    assert card.talkativeness == pytest.approx(0.3)
    assert card.system_prompt == card.post_history_instructions == ""
    assert card.alternate_greetings == card.tags == ()
    assert card.character_book is None and card.depth_prompt is None
    assert card.avatar is None


def test_v1_upgrades_to_v2_and_v3_keeping_its_fields() -> None:
    card = cards.read_card(json_file(v1_card()))
    v2 = cards.to_v2(card)
    assert (v2["spec"], v2["spec_version"]) == ("chara_card_v2", "2.0")
    assert v2["data"]["name"] == "Aria" and v2["data"]["first_mes"] == "Halt!"
    assert v2["data"]["creator_notes"] == "Old notes"
    assert v2["data"]["extensions"]["talkativeness"] == pytest.approx(0.3)
    assert v2["x_v1_extra"] == {"kept": True}  # top-level fields stay for V1-only readers
    assert v2["name"] == "Aria"
    v3 = cards.to_v3(card)
    assert (v3["spec"], v3["spec_version"]) == ("chara_card_v3", "3.0")
    assert v3["data"]["group_only_greetings"] == []
    again = cards.read_card(cards.export_png(card))
    assert (again.name, again.description, again.talkativeness) == (card.name, card.description, card.talkativeness)


def test_v2_json_with_a_character_book() -> None:
    card = cards.read_card(json_file(v2_card()))
    assert card.spec == "chara_card_v2"
    assert card.name == "Aria"
    assert card.system_prompt == "Write as {{char}}."
    assert card.post_history_instructions == "Stay terse."
    assert card.creator_notes == "Made for testing."
    assert card.alternate_greetings == ("Who goes there?", "Welcome back.")
    assert card.tags == ("knight", "fantasy")
    assert card.talkativeness == pytest.approx(0.8)  # a numeric string
    assert card.depth_prompt == ("Stay in character.", 2, "user")
    book = card.character_book
    assert book is not None
    assert book["name"] == "Tower lore"
    assert [entry["keys"] for entry in book["entries"]] == [("tower0",), ("tower1",)]
    assert card.extensions["x_custom"]["deep"]["deeper"][2] == {"three": 3}


def test_v3_png_prefers_ccv3_over_chara() -> None:
    png = png_card([("tEXt", "chara", b64(v2_card("Old name"))), ("tEXt", "ccv3", b64(v3_card("New name")))])
    card = cards.read_card(png)
    assert card.spec == "chara_card_v3"
    assert card.name == "New name"
    assert card.raw["data"]["nickname"] == "Ari"


@pytest.mark.parametrize("keyword", ["CCV3", "CcV3", "Chara", "CHARA"])
def test_keywords_match_in_any_case(keyword: str) -> None:
    card = cards.read_card(png_card([("tEXt", keyword, b64(v3_card("Cased")))]))
    assert card.name == "Cased"


@pytest.mark.parametrize("kind", ["iTXt", "iTXt-z", "zTXt"])
def test_itxt_and_ztxt_chunks(kind: str) -> None:
    card = cards.read_card(png_card([(kind, "ccv3", b64(v3_card("Packed")))]))
    assert card.name == "Packed"
    assert card.character_book is not None


def test_png_chunk_holding_plain_json() -> None:
    card = cards.read_card(png_card([("iTXt", "chara", json.dumps(v2_card("Plain"), ensure_ascii=False))]))
    assert card.name == "Plain"


def test_png_card_avatar_is_the_image_without_card_chunks() -> None:
    png = png_card([("tEXt", "chara", b64(v2_card())), ("tEXt", "Comment", "hello")], image=image_bytes((40, 60)))
    card = cards.read_card(png)
    assert card.avatar is not None
    image = image_of(card.avatar)
    assert image.format == "PNG" and image.size == (40, 60)
    assert image.getpixel((5, 5))[:3] == (200, 30, 30)
    assert text_chunks(card.avatar) == {}


def test_large_card_images_are_scaled_down_keeping_aspect() -> None:
    card = cards.read_card(png_card([("tEXt", "chara", b64(v2_card()))], image=image_bytes((1200, 1800))))
    assert card.avatar is not None
    assert image_of(card.avatar).size == (341, 512)


def test_character_book_null() -> None:
    card = cards.read_card(json_file(v2_card(character_book=None)))
    assert card.character_book is None
    assert cards.to_v2(card)["data"]["character_book"] is None  # kept as it was


def test_hybrid_card_data_wins_and_v1_fields_fill_gaps() -> None:
    hybrid = {
        **v1_card("Top name"),
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": "Data name", "description": "Data description"},
    }
    card = cards.read_card(json_file(hybrid))
    assert card.spec == "chara_card_v2"
    assert (card.name, card.description) == ("Data name", "Data description")
    assert card.first_mes == "Halt!"  # only at the top level
    assert card.talkativeness == pytest.approx(0.3)


def test_data_without_a_spec_reads_as_v2() -> None:
    card = cards.read_card(json_file({"name": "Top", "data": {"name": "Inner"}}))
    assert (card.spec, card.name) == ("chara_card_v2", "Inner")


def test_missing_optional_fields_take_defaults() -> None:
    card = cards.read_card(json_file({"spec": "chara_card_v2", "data": {"name": "Bare"}}))
    assert card.name == "Bare"
    for key in ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt"):
        assert getattr(card, key) == ""
    assert card.post_history_instructions == card.creator_notes == ""
    assert card.alternate_greetings == card.tags == ()
    assert card.talkativeness == 0.5
    assert card.depth_prompt is None and card.character_book is None
    assert dict(card.extensions) == {}
    v2 = cards.to_v2(card)["data"]
    assert v2["alternate_greetings"] == [] and v2["extensions"] == {} and v2["creator"] == ""


@pytest.mark.parametrize(
    ("extensions", "talkativeness", "depth_prompt"),
    [
        ({"talkativeness": 3}, 1.0, None),
        ({"talkativeness": "-1"}, 0.0, None),
        ({"talkativeness": "lots"}, 0.5, None),
        ({"talkativeness": True}, 0.5, None),
        (
            {"talkativeness": 10**400, "depth_prompt": {"prompt": "Be kind.", "depth": -(10**400)}},
            1.0,
            ("Be kind.", 4, "system"),
        ),
        ({"talkativeness": None, "depth_prompt": {"prompt": "Be kind.", "depth": "x"}}, 0.5, ("Be kind.", 4, "system")),
        ({"depth_prompt": {"prompt": "Be kind.", "depth": -3, "role": "ASSISTANT"}}, 0.5, ("Be kind.", 0, "assistant")),
        ({"depth_prompt": {"prompt": "Be kind.", "depth": 2.7, "role": "narrator"}}, 0.5, ("Be kind.", 2, "system")),
        ({"depth_prompt": {"prompt": "  ", "depth": 2}}, 0.5, None),
        ({"depth_prompt": "Be kind."}, 0.5, None),
    ],
)
def test_extension_quirks(extensions: dict[str, Any], talkativeness: float, depth_prompt: Any) -> None:
    card = cards.read_card(json_file(v2_card(extensions=extensions)))
    assert card.talkativeness == talkativeness
    assert card.depth_prompt == depth_prompt


def test_numbers_and_lone_strings_are_coerced() -> None:
    card = cards.read_card(
        json_file(v2_card(name=42, description=1.5, alternate_greetings="Only one", tags="a, b,,c", extensions=[]))
    )
    assert (card.name, card.description) == ("42", "1.5")
    assert card.alternate_greetings == ("Only one",)
    assert card.tags == ("a", "b", "c")
    assert dict(card.extensions) == {}


def test_blank_data_name_falls_back_to_the_top_level_name() -> None:
    card = cards.read_card(json_file({**v2_card(name=""), "name": "Top"}))
    assert card.name == "Top"


def test_nan_and_infinity_become_null() -> None:
    card = cards.read_card(b'{"name": "A", "x": NaN, "extensions": {"talkativeness": Infinity}}')
    assert card.raw["x"] is None and card.talkativeness == 0.5
    json.loads(cards.export_json(card), parse_constant=pytest.fail)


def test_lone_surrogates_are_replaced() -> None:
    card = cards.read_card(b'{"name": "Ari\\ud800a", "description": "\\ud83d\\ude00"}')
    assert card.name == "Ari\ufffda"
    assert card.description == "\U0001f600"
    cards.export_png(card).decode("latin-1")  # encodable all the way


def test_charx_icon_asset_named_main_wins() -> None:
    assets = [
        {"type": "background", "uri": "embeded://assets/background/bg.png", "name": "bg", "ext": "png"},
        {"type": "icon", "uri": "embeded://assets/icon/other.png", "name": "other", "ext": "png"},
        {"type": "icon", "uri": "embeded://assets/icon/main.png", "name": "main", "ext": "png"},
    ]
    archive = charx(
        v3_card("Zipped", assets=assets),
        {
            "assets/background/bg.png": image_bytes(color=(0, 0, 200)),
            "assets/icon/other.png": image_bytes(color=(0, 200, 0)),
            "assets/icon/main.png": image_bytes(color=(10, 20, 30)),
        },
    )
    card = cards.read_card(archive)
    assert card.name == "Zipped" and card.spec == "chara_card_v3"
    assert card.avatar is not None
    assert image_of(card.avatar).getpixel((1, 1))[:3] == (10, 20, 30)


def test_charx_asset_prefix_and_jpeg_icon() -> None:
    assets = [{"type": "icon", "uri": "__asset:assets/icon/images/face.jpg", "name": "main", "ext": "jpg"}]
    archive = charx(v3_card(assets=assets), {"assets/icon/images/face.jpg": image_bytes((30, 20), fmt="JPEG")})
    card = cards.read_card(archive)
    assert card.avatar is not None
    assert image_of(card.avatar).size == (30, 20)


def test_charx_falls_back_to_any_icon_image() -> None:
    # The card names only the default asset; the image sits under assets/icon/ anyway.
    archive = charx(v3_card(), {"assets/icon/images/1.png": image_bytes((9, 9)), "readme.txt": b"hi"})
    card = cards.read_card(archive)
    assert card.avatar is not None and image_of(card.avatar).size == (9, 9)


def test_charx_without_icon_and_with_a_broken_one() -> None:
    assert cards.read_card(charx(v3_card())).avatar is None
    broken = charx(v3_card(), {"assets/icon/main.png": b"\x89PNG\r\n\x1a\nnot really"})
    assert cards.read_card(broken).avatar is None


def test_risu_jpeg_with_a_charx_behind_it() -> None:
    blob = image_bytes(fmt="JPEG") + charx(v3_card("Hybrid"), {"assets/icon/main.png": image_bytes((5, 7))})
    card = cards.read_card(blob)
    assert card.name == "Hybrid"
    assert card.avatar is not None and image_of(card.avatar).size == (5, 7)


def test_multi_megabyte_lorebook_chunk_is_read() -> None:
    content = "The tower keeps its secrets. " * 110_000  # ~3.2 MB of lore
    card_object = v3_card("Big", character_book=lorebook(1, content))
    for kind in ("tEXt", "zTXt", "iTXt-z"):  # compressed chunks exceed Pillow's 1 MiB text chunk limit
        card = cards.read_card(png_card([(kind, "ccv3", b64(card_object))]))
        assert card.character_book is not None
        assert card.character_book["entries"][0]["content"] == content
        assert card.avatar is not None


# --- round trips -----------------------------------------------------------------------------------------


def assert_same_card(first: CharacterCard, second: CharacterCard) -> None:
    for key in (
        "name", "description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
        "post_history_instructions", "creator_notes", "alternate_greetings", "tags", "talkativeness", "depth_prompt",
        "character_book",
    ):  # fmt: skip
        assert getattr(first, key) == getattr(second, key), key
    if first.spec != "chara_card_v1":  # an upgraded V1 card gains extensions.talkativeness
        assert first.extensions == second.extensions


@pytest.mark.parametrize("source", [v2_card, v3_card])
def test_export_png_round_trip_keeps_unknown_fields_and_extensions(source: Any) -> None:
    original = cards.read_card(png_card([("tEXt", "chara", b64(source()))], image=image_bytes((20, 30))))
    exported = cards.export_png(original)
    chunks = text_chunks(exported)
    assert set(chunks) == {"chara", "ccv3"}
    assert json.loads(base64.b64decode(chunks["chara"]))["spec"] == "chara_card_v2"
    assert json.loads(base64.b64decode(chunks["ccv3"]))["spec"] == "chara_card_v3"
    again = cards.read_card(exported)
    assert again.spec == "chara_card_v3"
    assert_same_card(original, again)
    assert again.avatar == original.avatar  # the image survives the trip
    for key, value in UNKNOWN_TOP.items():
        assert cards.stored_json(again).count(json.dumps(key)) == 1
        assert json.loads(cards.stored_json(again))[key] == value
    again_data = json.loads(cards.stored_json(again))["data"]
    for key, value in UNKNOWN_DATA.items():
        assert again_data[key] == value
    assert again_data["extensions"] == EXTENSIONS
    assert again_data["character_book"] == lorebook()
    v2 = json.loads(base64.b64decode(chunks["chara"]))
    assert v2["data"]["extensions"] == EXTENSIONS and v2["x_tool"] == UNKNOWN_TOP["x_tool"]


@pytest.mark.parametrize(
    ("source", "spec"), [(v1_card, "chara_card_v2"), (v2_card, "chara_card_v2"), (v3_card, "chara_card_v3")]
)
def test_export_json_round_trip(source: Any, spec: str) -> None:
    original = cards.read_card(json_file(source()))
    exported = cards.export_json(original)
    assert json.loads(exported.decode("utf-8"))["spec"] == spec
    again = cards.read_card(exported)
    assert again.spec == spec
    assert_same_card(original, again)
    if source is not v1_card:
        assert json.loads(exported) == json.loads(json_file(source()))  # a complete card comes back as it was


@pytest.mark.parametrize("source", [v1_card, v2_card, v3_card])
def test_stored_json_round_trip_is_exact(source: Any) -> None:
    original = cards.read_card(json_file(source()))
    stored = cards.stored_json(original)
    assert json.loads(stored) == source()
    again = cards.from_stored(stored, b"avatar bytes")
    assert again.raw == original.raw and again.spec == original.spec
    assert again.avatar == b"avatar bytes"
    assert cards.from_stored(stored, None) == original


def test_from_stored_refuses_damage() -> None:
    with pytest.raises(CardError, match="broken JSON"):
        cards.from_stored('{"name": ', None)


def test_raw_is_read_only() -> None:
    card = cards.read_card(json_file(v2_card()))
    with pytest.raises(TypeError):
        card.raw["data"]["name"] = "Changed"  # type: ignore[index]
    assert isinstance(card.raw["data"]["alternate_greetings"], tuple)


# --- making and changing cards ---------------------------------------------------------------------------


def test_card_from_text() -> None:
    card = cards.card_from_text("Mira", "A cheerful bard.")
    assert (card.spec, card.name, card.description) == ("chara_card_v2", "Mira", "A cheerful bard.")
    assert card.avatar is None and card.talkativeness == 0.5
    assert cards.to_v2(card)["data"]["extensions"] == {}
    with pytest.raises(CardError, match="no name"):
        cards.card_from_text("  ", "text")


def test_with_fields_changes_data_and_keeps_everything_else() -> None:
    original = cards.read_card(png_card([("tEXt", "ccv3", b64(v3_card()))]))
    changed = cards.with_fields(original, name="Bryn", description="A smith.", alternate_greetings=["Hey."])
    assert (changed.name, changed.description, changed.alternate_greetings) == ("Bryn", "A smith.", ("Hey.",))
    assert changed.avatar == original.avatar and changed.spec == original.spec
    before, after = json.loads(cards.stored_json(original)), json.loads(cards.stored_json(changed))
    for key in ("name", "description", "alternate_greetings"):
        before["data"].pop(key), after["data"].pop(key)
    assert before == after


def test_with_fields_on_hybrid_and_v1_cards() -> None:
    hybrid = cards.read_card(json_file({**v1_card(), "spec": "chara_card_v2", "data": v2_data()}))
    changed = cards.with_fields(hybrid, first_mes="Hello.")
    assert changed.raw["data"]["first_mes"] == changed.raw["first_mes"] == "Hello."
    assert "system_prompt" not in changed.raw  # only copies that were there are updated
    v1 = cards.with_fields(cards.read_card(json_file(v1_card())), scenario="A ship.")
    assert v1.spec == "chara_card_v1" and v1.raw["scenario"] == "A ship." and "data" not in v1.raw


def test_with_fields_refuses_bad_changes() -> None:
    card = cards.card_from_text("Mira", "A bard.")
    with pytest.raises(TypeError):
        cards.with_fields(card, extensions={})
    with pytest.raises(TypeError):
        cards.with_fields(card, description=3)
    with pytest.raises(TypeError):
        cards.with_fields(card, alternate_greetings="one")
    with pytest.raises(CardError, match="needs a name"):
        cards.with_fields(card, name=" ")


def test_with_avatar_normalizes_any_image() -> None:
    card = cards.with_avatar(cards.card_from_text("Mira", "A bard."), image_bytes((2000, 1000), fmt="JPEG"))
    assert card.avatar is not None
    image = image_of(card.avatar)
    assert image.format == "PNG" and image.size == (512, 256)
    assert cards.avatar_png(card) == card.avatar
    exported = cards.read_card(cards.export_png(card))
    assert exported.avatar is not None and image_of(exported.avatar).size == (512, 256)
    with pytest.raises(CardError, match="could not be read"):
        cards.with_avatar(card, b"not an image")
    with pytest.raises(CardError, match="could not be read"):  # only web formats reach a decoder
        cards.with_avatar(card, image_bytes(fmt="TIFF"))
    webp = cards.with_avatar(card, image_bytes((3, 4), fmt="WEBP"))
    assert webp.avatar is not None and image_of(webp.avatar).size == (3, 4)


def test_placeholder_avatar() -> None:
    card = cards.card_from_text("mira", "A bard.")
    first = cards.avatar_png(card)
    image = image_of(first)
    assert image.format == "PNG" and image.size == (256, 256)
    assert cards.avatar_png(cards.card_from_text("mira", "Other text.")) == first  # the color follows the name
    exported = cards.read_card(cards.export_png(card))
    assert exported.name == "mira" and exported.avatar is not None


def test_a_damaged_stored_avatar_exports_with_a_placeholder() -> None:
    card = cards.from_stored(cards.stored_json(cards.card_from_text("Mira", "A bard.")), b"junk")
    assert cards.read_card(cards.export_png(card)).name == "Mira"


# --- bad files -------------------------------------------------------------------------------------------


def zip_bytes(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, blob in files.items():
            archive.writestr(name, blob)
    return out.getvalue()


def flip_after(blob: bytes, marker: bytes) -> bytes:
    """`blob` with the byte 10 past `marker` changed."""
    index = blob.index(marker) + len(marker) + 10
    return blob[:index] + bytes([blob[index] ^ 1]) + blob[index + 1 :]


def declared_png(width: int, height: int) -> bytes:
    """A card PNG whose header claims a size; the pixel data never gets read."""
    return (
        PNG_SIGNATURE
        + raw_chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00")
        + raw_chunk(b"tEXt", b"chara\0" + b64(v2_card()).encode())
        + raw_chunk(b"IEND", b"")
    )


def nested(depth: int) -> bytes:
    return b'{"name": "Deep", "x": ' + b"[" * depth + b"]" * depth + b"}"


BAD_FILES = {
    "empty": (b"", "empty"),
    "random bytes": (bytes(range(256)) * 4, "not a character card"),
    "plain text": (b"hello there", "not a character card"),
    "plain png": (image_bytes(), "no character card in it"),
    "jpeg": (image_bytes(fmt="JPEG"), "JPEG image"),
    "gif": (image_bytes(fmt="GIF"), "GIF image"),
    "webp": (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP image"),
    "json list": (b'[{"name": "A"}]', "a list rather than a card object"),
    "json without name": (json_file({"description": "nameless"}), "no name"),
    "json blank name": (json_file(v2_card(name="  ")), "no name"),
    "broken json": (b'{"name": "A",', "broken JSON (line 1, column 14"),
    "json not utf-8": (b'{"name": "\xff"}', "not a character card"),
    "json nested too deep": (nested(150), "nested more than 100"),
    "json giant number": (b'{"name": "A", "x": ' + b"9" * 5000 + b"}", "JSON I cannot read"),
    "unknown spec": (json_file({"spec": "chara_card_v4", "data": {"name": "A"}}), '"chara_card_v4"'),
    "spec not text": (json_file({"spec": 2, "data": {"name": "A"}}), "spec should be text"),
    "unknown spec version": (json_file({**v3_card(), "spec_version": "4.0"}), "chara_card_v3 version 4.0"),
    "v2 with a v3 version": (json_file({**v2_card(), "spec_version": 3}), "chara_card_v2 version 3"),
    "spec version junk": (json_file({**v2_card(), "spec_version": "two"}), "not a version number"),
    "data not an object": (json_file({"spec": "chara_card_v2", "data": ["A"]}), "data should be an object"),
    "description a list": (json_file(v2_card(description=["a"])), '"description" should be text, but it is a list'),
    "first_mes an object": (json_file(v2_card(first_mes={})), '"first_mes" should be text, but it is an object'),
    "greetings an object": (json_file(v2_card(alternate_greetings={})), '"alternate_greetings" should be a list'),
    "greeting junk": (json_file(v2_card(alternate_greetings=[True])), "true/false"),
    "lorebook a list": (json_file(v2_card(character_book=[])), "lorebook (character_book) should be an object"),
    "png broken base64": (png_card([("tEXt", "chara", "not base64!!")]), "not valid base64"),
    "png broken json": (png_card([("tEXt", "chara", base64.b64encode(b'{"name":').decode())]), "broken JSON"),
    "png json not an object": (png_card([("tEXt", "ccv3", base64.b64encode(b'"A"').decode())]), "rather than a card"),
    "png not utf-8": (png_card([("tEXt", "chara", base64.b64encode(b'{"name":"\xff"}').decode())]), "not UTF-8"),
    "png unknown spec": (png_card([("tEXt", "ccv3", b64({"spec": "chara_card_v4", "data": {}}))]), "chara_card_v4"),
    "png cut short": (png_card([("tEXt", "chara", b64(v2_card()))])[:-30], "cut short"),
    "png bad checksum": (flip_after(png_card([("tEXt", "chara", b64(v2_card()))]), b"tEXtchara\0"), "checksum"),
    "png broken chunk header": (PNG_SIGNATURE + b"\x00\x00\x00\x01\x00\x00\x00\x00", "invalid header"),
    "png broken ztxt": (png_with_chunk(b"zTXt", b"chara\0\0" + b"not zlib"), "chunk in the PNG is damaged"),
    "png cut ztxt": (png_with_chunk(b"zTXt", b"chara\0\0" + zlib.compress(b64(v2_card()).encode())[:-9]), "cut short"),
    "png ztxt method": (png_with_chunk(b"zTXt", b"chara\0\x05" + zlib.compress(b"x")), "unknown compression method"),
    "png short itxt": (png_with_chunk(b"iTXt", b"ccv3\0\x00"), "iTXt chunk is cut short"),
    "png undecodable image": (
        PNG_SIGNATURE
        + raw_chunk(b"IHDR", bytes.fromhex("0000000800000008") + b"\x08\x02\x00\x00\x00")
        + raw_chunk(b"tEXt", b"chara\0" + b64(v2_card()).encode())
        + raw_chunk(b"IDAT", b"garbage that is not zlib")
        + raw_chunk(b"IEND", b""),
        "image could not be read",
    ),
    "png large image": (declared_png(6000, 6000), "is 6000x6000 pixels, too large to read"),
    "png huge image": (declared_png(32768, 32768), "far too many pixels"),
    "zip without card.json": (zip_bytes({"character.json": json_file(v3_card())}), "no card.json"),
    "zip card.json in a folder": (zip_bytes({"inner/card.json": json_file(v3_card())}), "no card.json"),
    "zip damaged": (b"PK\x03\x04" + b"\x00" * 100, "archive is damaged"),
    "charx broken card": (zip_bytes({"card.json": b"{nope"}), "in card.json is broken JSON"),
    "charx unknown spec": (zip_bytes({"card.json": json_file({"spec": "chara_card_v9", "data": {}})}), "chara_card_v9"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_refused_with_a_specific_message(case: str) -> None:
    data, expected = BAD_FILES[case]
    assert expected in refused(data)


def test_unreadable_ccv3_falls_back_to_chara() -> None:
    png = png_card([("tEXt", "ccv3", "%%%broken%%%"), ("tEXt", "chara", b64(v2_card("Fallback")))])
    assert cards.read_card(png).name == "Fallback"
    only_broken = png_card([("tEXt", "ccv3", "%%%broken%%%"), ("tEXt", "chara", "%%%")])
    assert "not valid base64" in refused(only_broken)


def test_compressed_chunk_bombs_are_refused() -> None:
    bomb = zlib.compress(b" " * (17 * MiB), 9)  # ~17 KB that unpacks to 17 MiB
    assert "unpacks to more than 16.0 MiB" in refused(png_with_chunk(b"zTXt", b"ccv3\0\0" + bomb))
    assert "unpacks to more than 16.0 MiB" in refused(png_with_chunk(b"iTXt", b"ccv3\0\x01\x00\0\0" + bomb))
    small = zlib.compress(b" " * 2 * MiB, 9)
    assert "unpacks to more than 1.0 MiB" in refused(png_with_chunk(b"zTXt", b"chara\0\0" + small), max_bytes=MiB)


def test_charx_bombs_are_refused() -> None:
    padded_card = json_file(v3_card()) + b" " * (17 * MiB)
    assert "unpacks to more than 16.0 MiB" in refused(zip_bytes({"card.json": padded_card}))
    icon_bomb = zip_bytes({"card.json": json_file(v3_card()), "assets/icon/main.png": b"\0" * (17 * MiB)})
    assert len(icon_bomb) < MiB
    assert "unpacks to more than 16.0 MiB" in refused(icon_bomb)


def test_size_cap_is_checked_before_decoding() -> None:
    big = b'{"name": "Big", "description": "' + b"x" * (17 * MiB) + b'"}'  # valid JSON, but too big
    started = time.perf_counter()
    message = refused(big)
    assert time.perf_counter() - started < 0.05
    assert message == "That file is 17.0 MiB; a character card may be at most 16.0 MiB."
    assert "at most 0.0 MiB" in refused(json_file(v2_card()), max_bytes=10)


# --- arbitrary input -------------------------------------------------------------------------------------

VALID_PNG = png_card([("tEXt", "chara", b64(v2_card())), ("zTXt", "ccv3", b64(v3_card()))], image=image_bytes((6, 6)))
VALID_CHARX = charx(v3_card(), {"assets/icon/main.png": image_bytes((4, 4))})
PREFIXES = [b"", PNG_SIGNATURE, b"PK\x03\x04", b"{", b'{"spec": "chara_card_v2", "data": ', b"\xff\xd8\xff"]


def read_or_refuse(data: bytes) -> None:
    try:
        card = cards.read_card(data)
    except CardError as error:
        assert error.user_message
        return
    cards.export_png(card)
    cards.export_json(card)
    cards.from_stored(cards.stored_json(card), card.avatar)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_card_errors(prefix: bytes, body: bytes) -> None:
    read_or_refuse(prefix + body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from([VALID_PNG, VALID_CHARX]), data=st.data())
def test_damaged_card_files_raise_only_card_errors(source: bytes, data: st.DataObject) -> None:
    blob = bytearray(source)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(blob) // 2, len(blob)))
    read_or_refuse(bytes(blob[:cut]))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
CARD_KEYS = st.sampled_from(
    ["name", "description", "first_mes", "alternate_greetings", "tags", "extensions", "character_book", "spec",
     "spec_version", "data", "talkativeness"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(top=st.dictionaries(CARD_KEYS, JSON_VALUES, max_size=6), inner=st.dictionaries(CARD_KEYS, JSON_VALUES))
def test_arbitrary_card_objects_raise_only_card_errors(top: dict[str, Any], inner: dict[str, Any]) -> None:
    extensions = inner.get("extensions")
    read_or_refuse(json_file(top))
    read_or_refuse(json_file({**top, "spec": "chara_card_v2", "data": {"name": "A", **inner}}))
    read_or_refuse(json_file({"spec": "chara_card_v3", "data": {"name": "A", "extensions": {"x": extensions}}}))
