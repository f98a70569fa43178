"""Training configuration: TOML files with sections [experiment] [data] [model] [train]
[augment] [postprocess] [description] [export], as plain nested dicts.

`SCHEMA` below holds every key with its default value; its type is the key's type. A config
file may leave keys out (the default applies) but may not add unknown ones, and `--set KEY=VALUE`
overrides are parsed as TOML values and type-checked against the schema.

`RANGES` holds the allowed values of every numeric setting (and of the few other keys with a
fixed set of values); `validate` checks them all when the config is loaded, so that a value such
as `--set train.learning_rate=nan` is refused before anything (commit, tag, run) exists. nan and
inf are refused everywhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nf1prov.data.inputs import METHODS as NORMALISATIONS
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
        # How each slice is scaled (nf1prov.data.inputs): "dtype_max" (upstream) divides by
        # the dtype's maximum; "percentile" maps the slice's 1st..99.8th percentiles to 0..1.
        "normalisation": "dtype_max",
        # Centre slices whose input window leaves the stack: "skip" them (upstream), or "clamp"
        # the window (repeat the first/last slice, as prediction does), so that every slice is
        # trained on and a stack of fewer slices than input_slices (a 2-D image) can be used.
        "edge_slices": "skip",
        # Train on these fields of view only ("<patient>/<well>-<site>" ids, e.g. "NF0017/C4-2");
        # empty = every field under the data root (less the holdout patients). `nf1prov
        # reproduce` sets it to the original's fields when the data root has gained new ones;
        # the split of the listed fields is the hash split of those fields alone.
        "fields": [],
    },
    "model": {
        "architecture": "unet",  # a key of ARCHITECTURES in the repository's models/__init__.py
        "base_width": 64,
    },
    "train": {
        "epochs": 20,
        "batch_size": 8,
        "learning_rate": 1e-4,
        "alpha": 0.9,  # EMA factor of the class weights
        "weight_samples": 40,  # training targets drawn for the initial class weights
        "patience": 5,  # >= 1: stop after this many epochs without a better val_loss
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda
        "num_workers": 0,
        "trials": 1,  # > 1: Optuna trials as nested runs trial_<n>
        "search_batch_size": [4, 13],  # Optuna: inclusive integer range
        "search_learning_rate": [1e-5, 1e-2],  # Optuna: log-uniform range
        # Where the Optuna study lives (nf1prov.train.search): "" = a sqlite file
        # .nf1prov/optuna.db of the workspace; else an SQLAlchemy URL such as
        # "postgresql+psycopg2://user@host/optuna" (no password: $NF1PROV_SEARCH_STORAGE, which
        # overrides this key, may hold one) or "sqlite:////abs/path/optuna.db".
        "search_storage": "",
        "search_workers": 1,  # trial processes on this machine (> 1: each its own process)
        # data-parallel processes on this machine (`train --nproc`); batch_size stays the global
        # batch, cut into nproc shards (nf1prov.train.distributed)
        "nproc": 1,
        # torch CPU threads of the training process (of each rank, each search worker); 0 =
        # OMP_NUM_THREADS when set, else the CPUs this process may use (affinity, cgroup quota)
        # shared out (nf1prov.threads). CPU results depend on it: the run records it.
        "threads": 0,
        "overlay_crops": 3,  # validation crops drawn as PNG overlays each epoch
        "max_batches_per_epoch": 0,  # 0 = all; a cap for quick runs
    },
    # Random transforms of each training batch (nf1prov.train.augment); all off = upstream.
    "augment": {
        "flip": False,  # mirror left-right with probability 1/2
        "rotate90": False,  # rotate by 0, 90, 180 or 270 degrees, equally likely
        "intensity_scale": 0.0,  # multiply the normalised input by 1 + U(-s, s)
        "intensity_offset": 0.0,  # then add U(-o, o)
    },
    # Instance labels from probabilities (nf1prov.segment.instances).
    "postprocess": {
        "tune": True,  # choose the values below on the validation split after training
        "seed_threshold": 0.5,  # used as given when tune = false
        "foreground_threshold": 0.5,
        "min_size": 10,
        "link_iou": 0.5,  # 3-D cells: IoU that links a cell's outlines on neighbouring slices
        "min_volume": 0,  # 3-D cells: those of fewer voxels are removed (0 = none)
        "z_ratio": 1.0,  # z step / xy pixel size of stacks whose physical sizes are unknown
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
    # What `nf1prov export` writes into a bioimage.io package (nf1prov.share.bioimageio). Empty
    # is allowed while training; export refuses a model whose logged config lacks the licence or
    # the citation (`export --set export.license=MIT` fills them in for older models).
    "export": {
        "license": "",  # an SPDX licence id, e.g. "MIT" or "CC-BY-4.0"
        "cite_text": "",  # how to cite the model: the paper or the project
        "cite_doi": "",  # the citation's DOI (10.xxxx/...); cite_doi or cite_url is required
        "cite_url": "",  # or its http(s) URL
        "tags": [],  # bioimage.io tags besides nf1prov's own (segmentation, unet, cells, ...)
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
    origins = {}
    for item in overrides:
        origins[apply_override(config, item)] = f"--set {item}"
    validate(config, source=str(path), origins=origins)
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


def apply_override(config: dict, item: str) -> str:
    """Apply one ``section.key=value`` override; the value is parsed as TOML, else as a string.
    Returns the dotted key."""
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
    return f"{section}.{key}"


def override_key(item: str) -> str:
    """The dotted key a ``--set SECTION.KEY=VALUE`` item sets, as written."""
    return item.split("=", 1)[0].strip()


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


# Allowed values: "section.key" -> (test, the allowed range in words). A test gets the value and
# the whole config; the words may name other settings as {crop_size} / {half_crop}. Every key of
# SCHEMA whose value is a number or a list of numbers has a rule (tests/test_config.py checks).
Rule = tuple[Callable[[Any, dict], bool], str]
SEED_MAX = 2**32 - 1  # NumPy's seed range
SPLIT_TOLERANCE = 1e-6
LEARNING_RATE_MAX = 1.0  # train.learning_rate and the search range (see RANGES)
FIELDS_PARAM_MAX = 500  # characters of data.fields logged as a param (MLflow's oldest limit)

FIELD_ID_RE = re.compile(r"^[^/\s]+/[^/\s-]+-[^/\s]+$")
# [export]: the form of the values (bioimage.io checks the licence id against its SPDX list)
SPDX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
DOI_RE = re.compile(r"^10\.\d{4,9}/\S+$")
EXPORT_URL_RE = re.compile(r"^https?://[^\s/]+\S*$")


def _at_least(low: int | float) -> Callable[[Any, dict], bool]:
    return lambda v, _: v >= low


def _split_ok(v: list, _: dict) -> bool:
    return (len(v) == 3 and all(f >= 0 for f in v) and v[0] > 0
            and abs(sum(v) - 1) <= SPLIT_TOLERANCE)


def _search_batch_ok(v: list, _: dict) -> bool:
    return len(v) == 2 and all(float(x).is_integer() for x in v) and 1 <= v[0] <= v[1]


STORAGE_URL_RE = re.compile(r"^[a-z][a-z0-9]*(\+[a-z0-9_]+)?://")
STORAGE_PASSWORD_RE = re.compile(r"^[^:/]+://[^/@]*:[^/@]*@")  # scheme://user:password@


def _search_storage_ok(v: str, _: dict) -> bool:
    """"" or an SQLAlchemy URL without a password; a sqlite file by its absolute path (the
    training process runs in a temporary folder) and not in memory (workers share it)."""
    if v == "":
        return True
    if not STORAGE_URL_RE.match(v) or STORAGE_PASSWORD_RE.match(v):
        return False
    if v.startswith("sqlite"):
        return v.startswith("sqlite:////") and ":memory:" not in v
    return True


PATIENT_RE = re.compile(r"^[^/\\\s]+$")
ARCHITECTURE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


RANGES: dict[str, Rule] = {
    "experiment.name": (lambda v, _: v.strip() == v != "",
                        "a non-empty MLflow experiment name without leading or trailing spaces"),
    "data.root": (lambda v, _: v.strip() != "",
                  'a folder (relative paths are relative to the repository root), e.g. "data"'),
    "data.holdout_patients": (lambda v, _: all(PATIENT_RE.match(p) for p in v)
                              and len(set(v)) == len(v),
                              'a list of distinct patient folder names such as "NF0014" (no '
                              "slashes or spaces; empty: hold out none)"),
    "model.architecture": (lambda v, _: ARCHITECTURE_NAME_RE.match(v) is not None,
                           'a name of ARCHITECTURES in models/__init__.py, such as "unet"'),
    "export.tags": (lambda v, _: all(t.strip() == t != "" for t in v),
                    'a list of non-empty tags without surrounding spaces, e.g. ["nuclei"]'),
    "experiment.max_commit_file_mb": (lambda v, _: v > 0, "a finite number > 0 (megabytes)"),
    "data.input_slices": (lambda v, _: v >= 1 and v % 2 == 1,
                          "odd and >= 1 (the centre slice's mask is predicted)"),
    "data.crop_size": (lambda v, _: v >= 16 and v % 16 == 0,
                       "a positive multiple of 16 (16, 32, ...: the UNet halves a crop four "
                       "times)"),
    "data.crop_stride": (_at_least(1), "an integer >= 1 (pixels between crops)"),
    "data.crop_margin": (lambda v, c: 0 <= v < c["data"]["crop_size"] / 2,
                         "an integer in [0, crop_size/2), i.e. 0 to {max_margin} for crop_size "
                         "{crop_size} (target pixels trimmed at each crop edge)"),
    "data.boundary_thickness": (_at_least(1),
                                "an integer >= 1 (pixels; with 0 no pixel would be boundary)"),
    "data.split_fractions": (_split_ok,
                             "three finite numbers >= 0 [train, val, test] summing to 1 (within "
                             f"{SPLIT_TOLERANCE:g}), with train > 0"),
    "model.base_width": (_at_least(1), "an integer >= 1 (channels of the first UNet block)"),
    "train.epochs": (_at_least(1), "an integer >= 1"),
    "train.batch_size": (_at_least(1), "an integer >= 1"),
    # Adam moves each weight by about the learning rate per step, and useful rates are 1e-5 to
    # 1e-2 (upstream's search range): a value above 1 is a typo (1e9 for 1e-9), refused before
    # any commit. Up to 1, a training runs (it may learn nothing; a loss that becomes NaN/inf
    # ends it with that reason).
    "train.learning_rate": (lambda v, _: 0 < v <= LEARNING_RATE_MAX,
                            f"a finite number in (0, {LEARNING_RATE_MAX:g}] (e.g. 1e-4)"),
    "train.alpha": (lambda v, _: 0 <= v <= 1, "a finite number in [0, 1] (the EMA factor)"),
    "train.weight_samples": (_at_least(1), "an integer >= 1"),
    "train.patience": (_at_least(1),
                       "an integer >= 1 (epochs without a better val_loss before stopping; set "
                       "it to train.epochs or more to never stop early)"),
    "train.seed": (lambda v, _: 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]"),
    "train.num_workers": (_at_least(0), "an integer >= 0 (0 = load data in the main process)"),
    "train.trials": (_at_least(1), "an integer >= 1 (1 = no search)"),
    "train.search_batch_size": (_search_batch_ok,
                                "two integers [low, high] with 1 <= low <= high"),
    "train.search_learning_rate": (lambda v, _: len(v) == 2 and 0 < v[0] <= v[1]
                                   <= LEARNING_RATE_MAX,
                                   "two finite numbers [low, high] with 0 < low <= high <= "
                                   f"{LEARNING_RATE_MAX:g} (a log-uniform range)"),
    "train.nproc": (_at_least(1),
                    "an integer >= 1 (data-parallel training processes on this machine; "
                    "train.batch_size is the global batch they share)"),
    "train.search_workers": (_at_least(1),
                             "an integer >= 1 (trial processes on this machine)"),
    "train.search_storage": (_search_storage_ok,
                             '"" (a sqlite file in the workspace\'s .nf1prov/) or an '
                             "SQLAlchemy URL such as postgresql+psycopg2://user@host/optuna or "
                             "sqlite:////absolute/path/optuna.db, without a password (the config "
                             "is committed and logged: give a URL with a password in "
                             "NF1PROV_SEARCH_STORAGE instead)"),
    "train.threads": (_at_least(0), "an integer >= 0 (torch CPU threads of each training "
                      "process; 0 = OMP_NUM_THREADS, else chosen from the CPUs)"),
    "train.overlay_crops": (_at_least(0), "an integer >= 0 (0 = no overlays)"),
    "train.max_batches_per_epoch": (_at_least(0), "an integer >= 0 (0 = all batches)"),
    "train.device": (lambda v, _: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "data.normalisation": (lambda v, _: v in NORMALISATIONS, " or ".join(NORMALISATIONS)),
    "data.edge_slices": (lambda v, _: v in ("skip", "clamp"), "skip or clamp"),
    "augment.intensity_scale": (lambda v, _: 0 <= v < 1,
                                "a number in [0, 1) (0 = no intensity scaling)"),
    "augment.intensity_offset": (lambda v, _: 0 <= v <= 1,
                                 "a number in [0, 1] (0 = no intensity offset)"),
    "postprocess.seed_threshold": (lambda v, _: 0 < v < 1, "a probability in (0, 1)"),
    "postprocess.foreground_threshold": (lambda v, _: 0 < v < 1, "a probability in (0, 1)"),
    "postprocess.min_size": (_at_least(0), "an integer >= 0 (pixels)"),
    "postprocess.link_iou": (lambda v, _: 0 < v <= 1, "an IoU in (0, 1]"),
    "postprocess.min_volume": (_at_least(0), "an integer >= 0 (voxels; 0 = off)"),
    "postprocess.z_ratio": (lambda v, _: 0 < v < float("inf"),
                            "a number > 0 (the z step over the xy pixel size)"),
    "data.fields": (lambda v, _: all(FIELD_ID_RE.match(f) for f in v) and len(set(v)) == len(v),
                    'a list of distinct field-of-view ids "<patient>/<well>-<site>" such as '
                    '"NF0017/C4-2" (empty: all fields)'),
    "export.license": (lambda v, _: v == "" or SPDX_ID_RE.match(v) is not None,
                       'an SPDX licence id such as "MIT", "BSD-3-Clause" or "CC-BY-4.0" (see '
                       'https://spdx.org/licenses/), or "" while none is chosen'),
    "export.cite_doi": (lambda v, _: v == "" or DOI_RE.match(v) is not None,
                        'a DOI such as "10.1038/s41592-019-0582-9" (without https://doi.org/), '
                        'or ""'),
    "export.cite_url": (lambda v, _: v == "" or EXPORT_URL_RE.match(v) is not None,
                        'an http(s) URL such as "https://github.com/lab/project", or ""'),
}


def _finite(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(not isinstance(v, float) or math.isfinite(v) for v in values)


def validate(config: dict, source: str, origins: dict[str, str] | None = None) -> None:
    """Check every value against `RANGES`. (The architecture name is checked against the
    repository's models package by `nf1prov.provenance.code_snapshot.check_architecture`, which
    reads the code the model commit will hold; the config alone cannot know it.)

    ``origins`` maps a dotted key to where its value came from (a ``--set`` override), for the
    message; other keys are named with ``source`` (the config file).
    """
    origins = origins or {}
    words = {"crop_size": config["data"]["crop_size"],
             "max_margin": max(0, math.ceil(config["data"]["crop_size"] / 2) - 1)}
    for dotted, (test, allowed) in RANGES.items():
        section, key = dotted.split(".")
        value = config[section][key]
        if _finite(value) and test(value, config):
            continue
        where = origins.get(dotted, source)
        fix = ("Pass such a value to --set." if dotted in origins
               else f"Change it in {source} (or override it with --set {dotted}=VALUE).")
        raise UserError(f"{where}: {dotted} must be {allowed.format(**words)}, not "
                        f"{_toml_value(value)}. {fix}")


def export_settings(logged: dict, overrides: list[str] | tuple[str, ...] = (),
                    source: str = "config/config.toml") -> dict[str, Any]:
    """The ``[export]`` settings of a trained model: its logged config's ``[export]`` table (a
    model trained before the section existed has none) over the defaults, then ``--set
    export.KEY=VALUE`` overrides, type- and range-checked like any config value.

    ``logged`` is the model's config as read from ``source`` (its run artifact); only export.*
    keys may be overridden, since every other section records how the model was trained.
    """
    config = defaults()
    table = logged.get("export", {})
    if not isinstance(table, dict):
        raise UserError(f"{source}: 'export' must be an [export] table.")
    for key, value in table.items():
        set_value(config, "export", key, value, source)
    origins = {}
    for item in overrides:
        if not override_key(item).startswith("export."):
            raise UserError(f"--set {item!r}: only export.* settings can be set when exporting "
                            "(the other sections record how the model was trained), e.g. "
                            "--set export.license=MIT.")
        origins[apply_override(config, item)] = f"--set {item}"
    validate(config, source=source, origins=origins)
    return config["export"]


def flatten(config: dict) -> dict[str, Any]:
    """{'data.input_slices': 3, ...} for MLflow params (description excluded: it becomes tags).

    A long `data.fields` list is summarised (count and digest; the full list is in the logged
    config/config.toml), since an MLflow param holds at most a few thousand characters."""
    flat = {
        f"{section}.{key}": value
        for section, values in config.items()
        if section != "description"
        for key, value in values.items()
    }
    fields = flat.get("data.fields")
    if fields and len(json.dumps(fields)) > FIELDS_PARAM_MAX:
        digest = hashlib.sha256("\n".join(sorted(fields)).encode()).hexdigest()[:16]
        flat["data.fields"] = (f"{len(fields)} fields of view (sha256 {digest} of the sorted "
                               "ids; listed in config/config.toml)")
    return flat


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
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
