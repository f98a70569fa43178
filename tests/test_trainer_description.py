"""The description encoding shared by the trainer, provenance and the catalogue (DESIGN 3.3)."""

import json

from nf1prov.description import (
    decode_value,
    description_markdown,
    description_tags,
    encode_value,
)

DESCRIPTION = {
    "architecture": "UNet Generator",
    "task": "",
    "data": ["All patients but NF0014", "Masks:", ["Background", "Inner-cell", ["nested"]]],
    "loss": ["Weighted BCE", ["EMA of inverse frequencies"]],
    "summary": "Trained on synthetic data.",
}


def test_tags_are_strings_or_json_arrays_with_sub_item_arrays():
    tags = description_tags(DESCRIPTION)
    assert tags["nf1prov.description.architecture"] == "UNet Generator"
    assert tags["nf1prov.description.task"] == ""
    assert json.loads(tags["nf1prov.description.data"]) == DESCRIPTION["data"]
    assert tags["nf1prov.description.loss"] == '["Weighted BCE", ["EMA of inverse frequencies"]]'
    assert set(tags) == {f"nf1prov.description.{k}" for k in DESCRIPTION}


def test_encode_decode_round_trip():
    for value in ("plain", "[not json", ["a", ["b", ["c"]]], []):
        assert decode_value(encode_value(value)) == value


def test_markdown_nests_sub_items_under_the_item_before_them():
    assert description_markdown(DESCRIPTION) == (
        "Trained on synthetic data.\n"
        "\n"
        "- **Architecture:** UNet Generator\n"
        "- **Data:**\n"
        "  - All patients but NF0014\n"
        "  - Masks:\n"
        "    - Background\n"
        "    - Inner-cell\n"
        "      - nested\n"
        "- **Loss:**\n"
        "  - Weighted BCE\n"
        "    - EMA of inverse frequencies\n"
    )


def test_empty_description_gives_empty_note():
    assert description_markdown({"architecture": "", "summary": ""}) == ""
