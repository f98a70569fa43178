from pathlib import Path

import pytest

from nf1prov.config import flatten, load_config, to_toml
from nf1prov.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    default = load_config(CONFIGS / "default.toml")
    demo = load_config(CONFIGS / "demo.toml")
    assert default["model"]["base_width"] == 64 and default["train"]["trials"] == 4
    assert demo["train"]["device"] == "cpu"


def test_defaults_fill_missing_keys(tmp_path):
    config = load_config(write(tmp_path, "[train]\nepochs = 3\n"))
    assert config["train"]["epochs"] == 3
    assert config["train"]["patience"] == 5
    assert config["data"]["split_fractions"] == [0.8, 0.1, 0.1]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(UserError, match=r"train\.epoch\b"):
        load_config(write(tmp_path, "[train]\nepoch = 3\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(UserError, match=r"\[trian\]"):
        load_config(write(tmp_path, "[trian]\nepochs = 3\n"))


def test_set_overrides_are_type_checked(tmp_path):
    path = write(tmp_path, "")
    config = load_config(path, ["train.epochs=7", "train.device=cpu", "train.alpha=1"])
    assert config["train"]["epochs"] == 7
    assert config["train"]["device"] == "cpu"
    assert config["train"]["alpha"] == 1.0 and isinstance(config["train"]["alpha"], float)
    with pytest.raises(UserError, match="train.epochs must be an integer"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(UserError, match="unknown key data.slices"):
        load_config(path, ["data.slices=3"])
    with pytest.raises(UserError, match="SECTION.KEY=VALUE"):
        load_config(path, ["train.epochs"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(UserError, match="input_slices must be odd"):
        load_config(write(tmp_path, "[data]\ninput_slices = 2\n"))
    with pytest.raises(UserError, match="multiple of 16"):
        load_config(write(tmp_path, "[data]\ncrop_size = 100\n"))
    with pytest.raises(UserError, match="architecture 'vit'"):
        load_config(write(tmp_path, "[model]\narchitecture = 'vit'\n"))


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(UserError, match="c.toml is not valid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(UserError, match="nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_round_trip_through_toml(tmp_path):
    config = load_config(CONFIGS / "default.toml", ["train.learning_rate=1e-5"])
    again = load_config(write(tmp_path, to_toml(config)))
    assert again == config
    assert flatten(again)["train.learning_rate"] == 1e-5
    assert "description.loss" not in flatten(again)
