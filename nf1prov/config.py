"""Training configuration: TOML files with sections [experiment] [data] [model] [train]
[description], as plain nested dicts.

`SCHEMA` below holds every key with its default value; its type is the key's type. A config
file may leave keys out (the default applies) but may not add unknown ones, and `--set KEY=VALUE`
overrides are parsed as TOML values and type-checked against the schema.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from nf1prov.errors import UserError

SCHEMA: dict[str, dict[str, Any]] = {
    "experiment": {
        "name": "nf1-segmentation",  # MLflow experiment (created when missing)
        "max_commit_file_mb": 10.0,  # preflight: refuse to commit a file larger than this
    },
    "data": {
        "root": "data",  # relative paths are relative to the repository root
        "holdout_patients": ["NF0014"],  # 'NF0014' holds out NF0014 and NF0014_T1, NF0014_T2...
        "input_slices": 3,  # odd: the centre slice's mask is predicted
        "crop_size": 512,
        "crop_stride": 512,
        "crop_margin": 2,  # target pixels trimmed at each crop edge
        "boundary_thickness": 2,
        "split_fractions": [0.8, 0.1, 0.1],  # train / val / test, by field of view
    },
    "model": {
        "architecture": "unet",  # a key of models.ARCHITECTURES
        "base_width": 64,
    },
    "train": {
        "epochs": 20,
        "batch_size": 8,
        "learning_rate": 1e-4,
        "alpha": 0.9,  # EMA factor of the class weights
        "weight_samples": 40,  # training targets drawn for the initial class weights
        "patience": 5,  # early stopping on validation loss
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda
        "num_workers": 0,
        "trials": 1,  # > 1: Optuna trials as nested runs trial_<n>
        "search_batch_size": [4, 13],  # Optuna: inclusive integer range
        "search_learning_rate": [1e-5, 1e-2],  # Optuna: log-uniform range
        "overlay_crops": 3,  # validation crops drawn as PNG overlays each epoch
        "max_batches_per_epoch": 0,  # 0 = all; a cap for quick runs
    },
    "description": {
        # Catalogue fields (DESIGN 3.3): a string, or a list of items where a list inside the list
        # holds the sub-items of the item before it.
        "architecture": "",
        "task": "",
        "qc": "",
        "data": "",
        "preprocessing": "",
        "loss": "",
        "summary": "",  # free text shown first in the MLflow note
    },
}

# Keys whose values may be a string or a (nested) list of strings.
_FREE_FORM_SECTIONS = {"description"}


def defaults() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(SCHEMA)


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read ``path`` (TOML), fill defaults, apply ``--set`` overrides, and validate.

    Returns a nested dict ``{section: {key: value}}``. Raises UserError naming the file and key
    for unreadable TOML, unknown sections or keys, wrongly typed values and bad overrides.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Config file {path} does not exist. Pass --config with the path of a "
                        "TOML file such as configs/demo.toml.") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Config file {path} is not valid TOML: {exc}. Fix the syntax.") from None
    config = merge(defaults(), raw, source=str(path))
    for item in overrides:
        apply_override(config, item)
    validate(config, source=str(path))
    return config


def merge(base: dict, raw: dict, source: str) -> dict:
    for section, values in raw.items():
        if section not in SCHEMA:
            raise UserError(
                f"{source}: unknown section [{section}]. Known sections: "
                f"{', '.join('[' + s + ']' for s in SCHEMA)}."
            )
        if not isinstance(values, dict):
            raise UserError(f"{source}: '{section}' must be a [section] table.")
        for key, value in values.items():
            set_value(base, section, key, value, source)
    return base


def apply_override(config: dict, item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as TOML, else as a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set train.epochs=3.")
    dotted, text = item.split("=", 1)
    if "." not in dotted:
        raise UserError(f"--set {item!r}: the key must name its section, e.g. train.epochs.")
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: --set train.device=cpu
    set_value(config, section, key, value, source=f"--set {item}")


def set_value(config: dict, section: str, key: str, value: Any, source: str) -> None:
    if section not in SCHEMA:
        raise UserError(f"{source}: unknown section {section!r}. Known: {', '.join(SCHEMA)}.")
    if key not in SCHEMA[section]:
        raise UserError(
            f"{source}: unknown key {section}.{key}. Known keys in [{section}]: "
            f"{', '.join(SCHEMA[section])}."
        )
    expected = SCHEMA[section][key]
    if section in _FREE_FORM_SECTIONS:
        _check_description(value, f"{source}: {section}.{key}")
    elif isinstance(expected, bool):
        if not isinstance(value, bool):
            raise _type_error(source, section, key, value, "true or false")
    elif isinstance(expected, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(source, section, key, value, "a number")
        value = float(value)
    elif isinstance(expected, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(source, section, key, value, "an integer")
    elif isinstance(expected, str):
        if not isinstance(value, str):
            raise _type_error(source, section, key, value, "a string")
    elif isinstance(expected, list):
        if not isinstance(value, list):
            raise _type_error(source, section, key, value, "a list")
        if expected and isinstance(expected[0], int | float):
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise _type_error(source, section, key, value, "a list of numbers")
        elif not all(isinstance(v, str) for v in value):
            raise _type_error(source, section, key, value, "a list of strings")
    config[section][key] = value


def _check_description(value: Any, where: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list):
        for item in value:
            if isinstance(item, list):
                if not all(isinstance(sub, str | list) for sub in item):
                    raise UserError(f"{where}: sub-items must be strings.")
                for sub in item:
                    if isinstance(sub, list):
                        _check_description(sub, where)
            elif not isinstance(item, str):
                raise UserError(f"{where}: items must be strings or lists of strings.")
        return
    raise UserError(f"{where}: must be a string or a list of strings, not {value!r}.")


def _type_error(source: str, section: str, key: str, value: Any, expected: str) -> UserError:
    return UserError(f"{source}: {section}.{key} must be {expected}, not {value!r}.")


def validate(config: dict, source: str) -> None:
    """Cross-field checks the type check cannot make."""
    data, train = config["data"], config["train"]
    if data["input_slices"] < 1 or data["input_slices"] % 2 == 0:
        raise UserError(f"{source}: data.input_slices must be odd and >= 1 "
                        f"(the centre slice is predicted), not {data['input_slices']}.")
    if data["crop_size"] < 16 or data["crop_size"] % 16:
        raise UserError(f"{source}: data.crop_size must be a positive multiple of 16, "
                        f"not {data['crop_size']}.")
    if data["crop_stride"] < 1:
        raise UserError(f"{source}: data.crop_stride must be >= 1, not {data['crop_stride']}.")
    if not 0 <= data["crop_margin"] < data["crop_size"] // 2:
        raise UserError(f"{source}: data.crop_margin must be in [0, crop_size/2).")
    if data["boundary_thickness"] < 1:
        raise UserError(f"{source}: data.boundary_thickness must be >= 1.")
    fractions = data["split_fractions"]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"{source}: data.split_fractions must be three non-negative numbers "
                        f"(train, val, test) summing to 1, not {fractions}.")
    if train["device"] not in ("auto", "cpu", "cuda"):
        raise UserError(f"{source}: train.device must be auto, cpu or cuda, not "
                        f"{train['device']!r}.")
    for key in ("epochs", "batch_size", "trials", "weight_samples"):
        if train[key] < 1:
            raise UserError(f"{source}: train.{key} must be >= 1, not {train[key]}.")
    if not 0 <= train["alpha"] <= 1:
        raise UserError(f"{source}: train.alpha must be in [0, 1], not {train['alpha']}.")
    from models import ARCHITECTURES  # noqa: PLC0415  (models is light, but keep import local)

    if config["model"]["architecture"] not in ARCHITECTURES:
        raise UserError(f"{source}: model.architecture {config['model']['architecture']!r} is "
                        f"not known. Known: {', '.join(sorted(ARCHITECTURES))}.")


def flatten(config: dict) -> dict[str, Any]:
    """{'data.input_slices': 3, ...} for MLflow params (description excluded: it becomes tags)."""
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if section != "description"
        for key, value in values.items()
    }


def to_toml(config: dict) -> str:
    """Serialise a config (as loaded) back to TOML, for the logged config artifact."""
    lines: list[str] = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        import json

        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
