import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nf1prov import tracking
from nf1prov.config import RANGES, SCHEMA, flatten, load_config, to_toml
from nf1prov.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    shipped = sorted(CONFIGS.glob("*.toml"))
    assert len(shipped) >= 2
    for path in shipped:
        load_config(path)  # every shipped config passes the range checks
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
    # the architecture is checked against the repository's models/ by preflight, not here
    assert load_config(write(tmp_path, "[model]\narchitecture = 'vit'\n"))["model"][
        "architecture"] == "vit"


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


# --- ranges of the numeric settings -------------------------------------------------------------

# (--set override, the allowed range as the message words it). Every numeric key of SCHEMA
# appears at least once (test_every_numeric_setting_has_a_rule_and_a_bad_value).
BAD_VALUES = [
    ("experiment.max_commit_file_mb=0", "a finite number > 0"),
    ("experiment.max_commit_file_mb=-1", "a finite number > 0"),
    ("experiment.max_commit_file_mb=nan", "a finite number > 0"),
    ("experiment.max_commit_file_mb=inf", "a finite number > 0"),
    ("data.input_slices=0", "odd and >= 1"),
    ("data.input_slices=2", "odd and >= 1"),
    ("data.input_slices=-3", "odd and >= 1"),
    ("data.crop_size=0", "a positive multiple of 16"),
    ("data.crop_size=8", "a positive multiple of 16"),
    ("data.crop_size=24", "a positive multiple of 16"),
    ("data.crop_size=-16", "a positive multiple of 16"),
    ("data.crop_stride=0", "an integer >= 1"),
    ("data.crop_stride=-16", "an integer >= 1"),
    ("data.crop_margin=-1", "an integer in [0, crop_size/2), i.e. 0 to 255 for crop_size 512"),
    ("data.crop_margin=256", "an integer in [0, crop_size/2), i.e. 0 to 255 for crop_size 512"),
    ("data.boundary_thickness=0", "an integer >= 1"),
    ("data.boundary_thickness=-2", "an integer >= 1"),
    ("data.split_fractions=[0.5, 0.5, 0.5]", "summing to 1"),
    ("data.split_fractions=[1.2, -0.1, -0.1]", "three finite numbers >= 0"),
    ("data.split_fractions=[0, 0.5, 0.5]", "with train > 0"),
    ("data.split_fractions=[0.8, 0.2]", "three finite numbers"),
    ("data.split_fractions=[nan, 0.5, 0.5]", "three finite numbers"),
    ("data.split_fractions=[inf, 0, 0]", "three finite numbers"),
    ('data.fields=["NF0017-C4-2"]', '"<patient>/<well>-<site>"'),
    ('data.fields=["NF0017/C4-2", "NF0017/C4-2"]', "distinct field-of-view ids"),
    ("model.base_width=0", "an integer >= 1"),
    ("train.epochs=0", "an integer >= 1"),
    ("train.epochs=-1", "an integer >= 1"),
    ("train.batch_size=0", "an integer >= 1"),
    ("train.learning_rate=-1", "a finite number in (0, 1]"),
    ("train.learning_rate=0", "a finite number in (0, 1]"),
    ("train.learning_rate=nan", "a finite number in (0, 1]"),
    ("train.learning_rate=inf", "a finite number in (0, 1]"),
    ("train.learning_rate=-inf", "a finite number in (0, 1]"),
    ("train.learning_rate=1e9", "a finite number in (0, 1]"),  # Adam's step is about lr
    ("train.learning_rate=1.5", "a finite number in (0, 1]"),
    ("train.alpha=-0.1", "a finite number in [0, 1]"),
    ("train.alpha=1.5", "a finite number in [0, 1]"),
    ("train.alpha=nan", "a finite number in [0, 1]"),
    ("train.weight_samples=0", "an integer >= 1"),
    ("train.patience=0", "an integer >= 1"),
    ("train.patience=-1", "an integer >= 1"),
    ("train.seed=-1", "an integer in [0, 4294967295]"),
    ("train.seed=4294967296", "an integer in [0, 4294967295]"),
    ("train.num_workers=-1", "an integer >= 0"),
    ("train.trials=0", "an integer >= 1"),
    ("train.search_batch_size=[5, 4]", "two integers [low, high] with 1 <= low <= high"),
    ("train.search_batch_size=[0, 4]", "two integers [low, high] with 1 <= low <= high"),
    ("train.search_batch_size=[4.5, 8]", "two integers [low, high] with 1 <= low <= high"),
    ("train.search_batch_size=[4]", "two integers [low, high] with 1 <= low <= high"),
    ("train.search_batch_size=[4, inf]", "two integers [low, high] with 1 <= low <= high"),
    ("train.search_learning_rate=[1e-2, 1e-5]", "two finite numbers [low, high] with 0 < low"),
    ("train.search_learning_rate=[0, 1e-2]", "two finite numbers [low, high] with 0 < low"),
    ("train.search_learning_rate=[-1, 1]", "two finite numbers [low, high] with 0 < low"),
    ("train.search_learning_rate=[nan, 1]", "two finite numbers [low, high] with 0 < low"),
    ("train.search_learning_rate=[1e-5, inf]", "two finite numbers [low, high] with 0 < low"),
    ("train.search_learning_rate=[1e-5, 10]", "0 < low <= high <= 1"),
    ("train.search_workers=0", "an integer >= 1"),
    ("train.nproc=0", "an integer >= 1"),
    ('train.search_storage="postgresql+psycopg2://lab:secret@db/optuna"', "without a password"),
    ('train.search_storage="sqlite:///optuna.db"', "sqlite:////absolute/path/optuna.db"),
    ('train.search_storage="sqlite:////:memory:"', "an SQLAlchemy URL"),
    ('train.search_storage=".nf1prov/optuna.db"', "an SQLAlchemy URL"),
    ("train.overlay_crops=-1", "an integer >= 0"),
    ("train.threads=-1", "an integer >= 0 (torch CPU threads"),
    ("train.max_batches_per_epoch=-1", "an integer >= 0"),
    ("train.device=gpu", "auto, cpu or cuda"),
    ("data.normalisation=minmax", "dtype_max or percentile"),
    ("data.edge_slices=wrap", "skip or clamp"),
    ("augment.intensity_scale=1", "a number in [0, 1)"),
    ("augment.intensity_scale=-0.1", "a number in [0, 1)"),
    ("augment.intensity_offset=2", "a number in [0, 1]"),
    ("postprocess.seed_threshold=1", "a probability in (0, 1)"),
    ("postprocess.foreground_threshold=0", "a probability in (0, 1)"),
    ("postprocess.min_size=-1", "an integer >= 0"),
    ("postprocess.link_iou=0", "an IoU in (0, 1]"),
    ("postprocess.min_volume=-1", "an integer >= 0 (voxels"),
    ("postprocess.z_ratio=0", "a number > 0"),
    ('experiment.name=""', "a non-empty MLflow experiment name"),
    ('experiment.name=" nf1 "', "without leading or trailing spaces"),
    ('data.root=" "', "a folder"),
    ('data.holdout_patients=["NF0014/C4-2"]', "distinct patient folder names"),
    ('data.holdout_patients=[""]', "distinct patient folder names"),
    ('data.holdout_patients=["NF0014", "NF0014"]', "distinct patient folder names"),
    ('model.architecture="my net"', "a name of ARCHITECTURES"),
    ('export.tags=["cells", ""]', "a list of non-empty tags"),
    ('export.license="MIT License"', "an SPDX licence id"),
    ('export.cite_doi="https://doi.org/10.5281/zenodo.1"', "a DOI such as"),
    ('export.cite_url="github.com/lab/project"', "an http(s) URL"),
]


@pytest.mark.parametrize(("override", "allowed"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_out_of_range_values_are_refused_naming_key_and_range(tmp_path, override, allowed):
    key, text = override.split("=", 1)
    with pytest.raises(UserError) as caught:
        load_config(write(tmp_path, ""), [override])
    message = str(caught.value)
    assert message.startswith(f"--set {override}: {key} must be "), message
    assert allowed in message, message
    assert "\n" not in message and "--set" in message

    # The same value in the config file names the file and the key.
    section, name = key.split(".")
    # a bare word is a string to --set only
    value = f'"{text}"' if text in ("gpu", "minmax", "wrap") else text
    path = write(tmp_path, f"[{section}]\n{name} = {value}\n")
    with pytest.raises(UserError, match=rf"^{path}: {key} must be .*Change it in {path}"):
        load_config(path)


def test_every_setting_has_a_rule_and_a_bad_value():
    numeric = {
        f"{section}.{key}" for section, values in SCHEMA.items() for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
        or isinstance(value, list) and value and isinstance(value[0], int | float)
    }
    assert numeric <= set(RANGES)
    # every other setting too, but yes/no switches and free text
    free_text = {"export.cite_text"}
    checked = {f"{section}.{key}" for section, values in SCHEMA.items() if section != "description"
               for key, value in values.items() if not isinstance(value, bool)} - free_text
    assert checked <= set(RANGES), checked - set(RANGES)
    tested = {override.split("=")[0] for override, _ in BAD_VALUES}
    assert set(RANGES) <= tested


@pytest.mark.parametrize("override", [
    "train.patience=1", "train.alpha=0", "train.alpha=1", "data.crop_size=16",
    "data.crop_margin=0", "data.split_fractions=[1, 0, 0]", "data.split_fractions=[0.7, 0.2, 0.1]",
    "train.seed=4294967295", "train.search_batch_size=[4, 4]",
    "train.search_learning_rate=[1e-3, 1e-3]", "train.overlay_crops=0",
    "train.max_batches_per_epoch=0", "train.num_workers=0", "experiment.max_commit_file_mb=0.5",
    'data.fields=["NF0017/C4-2", "NF0018_T1/B2-10"]', "train.search_workers=1",
    'train.search_storage="postgresql+psycopg2://lab@db.example.org/optuna"',
    'train.search_storage="sqlite:////srv/optuna/optuna.db"',
    'export.license="CC-BY-4.0"', 'export.cite_doi="10.5281/zenodo.1234567"',
    'export.cite_url="https://github.com/lab/project"', 'export.license=""',
    'data.holdout_patients=[]', 'data.holdout_patients=["NF0014", "NF0014_T1"]',
    'model.architecture="unet_v2"', 'export.tags=["nuclei", "brightfield"]',
    'experiment.name="nf1 segmentation (lab A)"',
])
def test_values_at_the_edges_of_the_ranges_are_accepted(tmp_path, override):
    load_config(write(tmp_path, ""), [override])


def test_crop_margin_range_follows_crop_size(tmp_path):
    path = write(tmp_path, "[data]\ncrop_size = 32\n")
    assert load_config(path, ["data.crop_margin=15"])["data"]["crop_margin"] == 15
    with pytest.raises(UserError, match=r"0 to 15 for crop_size 32.*not 16\b"):
        load_config(path, ["data.crop_margin=16"])


def test_long_field_lists_are_summarised_in_params(tmp_path):
    ids = [f"NF{p:04d}/C{w}-{s}" for p in range(10) for w in range(5) for s in range(4)]
    config = load_config(write(tmp_path, ""), [f"data.fields={ids!r}".replace("'", '"')])
    assert config["data"]["fields"] == ids
    assert flatten(config)["data.fields"].startswith("200 fields of view (sha256 ")
    short = load_config(write(tmp_path, ""), ['data.fields=["NF0017/C4-2"]'])
    assert flatten(short)["data.fields"] == ["NF0017/C4-2"]
    assert load_config(write(tmp_path, to_toml(config)))["data"]["fields"] == ids


# --- end to end: a bad value costs nothing -------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def small_project(git_repo, tracking_uri, data_root) -> Path:
    """A committed project that `nf1prov train` would train in: models/, nf1prov/, templates/,
    a config on the shared demo data; the store lies outside the repository."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("models", "nf1prov", "templates"):
        shutil.copytree(REPO_ROOT / folder, git_repo / folder, ignore=ignore)
    (git_repo / "configs").mkdir()
    (git_repo / "configs" / "small.toml").write_text(
        f'[data]\nroot = "{data_root}"\nholdout_patients = []\ncrop_size = 32\n'
        "crop_stride = 16\nsplit_fractions = [0.6, 0.4, 0.0]\n"
        "[model]\nbase_width = 4\n[train]\nepochs = 1\nbatch_size = 4\ndevice = \"cpu\"\n")
    (git_repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmlruns/\n.nf1prov/\n"
                                         "__pycache__/\n")
    _git(git_repo, "add", "-A")
    _git(git_repo, "commit", "-qm", "project")
    return git_repo


def test_train_with_an_absurd_learning_rate_exits_2_having_created_nothing(small_project,
                                                                            tracking_uri):
    """`learning_rate=1e9` (issue 24): refused before the commit, not a diverged FAILED run."""
    repo = small_project
    client = tracking.client(tracking_uri)
    runs_before = {r.info.run_id for r in tracking.search_runs_all(client)}
    experiments_before = {e.name for e in client.search_experiments()}
    head, refs = _git(repo, "rev-parse", "HEAD"), _git(repo, "show-ref")
    files = _git(repo, "status", "--porcelain", "--ignored")

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run(
        [sys.executable, "-m", "nf1prov", "train", "--config", "configs/small.toml",
         "--set", "train.learning_rate=1e9"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)

    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    output = proc.stdout + proc.stderr
    assert ("--set train.learning_rate=1e9: train.learning_rate must be a finite number in "
            "(0, 1]") in " ".join(output.split())
    assert "Traceback" not in output
    assert _git(repo, "rev-parse", "HEAD") == head
    assert _git(repo, "show-ref") == refs  # no tag, no branch
    assert _git(repo, "tag", "--list") == ""
    assert _git(repo, "status", "--porcelain", "--ignored") == files  # no file, no cache
    assert {r.info.run_id for r in tracking.search_runs_all(client)} == runs_before
    assert {e.name for e in client.search_experiments()} == experiments_before
