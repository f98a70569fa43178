"""`nf1prov export --format bioimageio`: a tiny real model (UNet width 4, 1 epoch, percentile
normalisation) trained once for the module, exported once, and the package checked with
bioimage.io's own `test_model`, offline (no URL in the package; every HTTP request fails the
test)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from nf1prov.cli import cli
from nf1prov.errors import UserError
from tests.conftest import copy_code, run_git, tiny_config

try:
    import bioimageio.core  # noqa: F401
except ImportError:  # the [export] extra; CI installs it with [dev], so there it must be found
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("the [export] extra (bioimageio.core) is not installed", allow_module_level=True)

AUTHOR = ("Ada Exporter", "ada@example.org")
EXPORT_SECTION = """
[export]
cite_text = "nf1prov test model"
cite_doi = "10.5281/zenodo.1234567"
tags = ["nf1prov-test"]
"""


def invoke(*args, expect=0):
    result = CliRunner().invoke(cli, list(args))
    if expect is not None:
        assert result.exit_code == expect, (result.output, result.exception)
    return result


@dataclass(frozen=True)
class Trained:
    repo: Path
    uri: str
    codename: str
    package: Path  # exported once with --set export.license=MIT
    output: str  # what that export printed
    tried: list[str]  # the HTTP requests that export tried (offline: none may)


def _environment(mp: pytest.MonkeyPatch, base: Path, uri: str) -> None:
    gitconfig = base / "gitconfig"
    gitconfig.touch()
    for var, value in {"GIT_CONFIG_GLOBAL": str(gitconfig), "GIT_CONFIG_NOSYSTEM": "1",
                       "GIT_AUTHOR_NAME": AUTHOR[0], "GIT_AUTHOR_EMAIL": AUTHOR[1],
                       "GIT_COMMITTER_NAME": "Test Committer",
                       "GIT_COMMITTER_EMAIL": "committer@example.com",
                       "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}.items():
        mp.setenv(var, value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _migrated_store, data_root) -> Trained:
    """A project whose one model (trained with percentile normalisation and an [export] section
    without a licence) is exported to package.zip."""
    import mlflow
    import torch

    from tests.conftest import REPO_ROOT

    base = tmp_path_factory.mktemp("export")
    repo = base / "repo"
    repo.mkdir()
    db = base / "mlflow.db"
    shutil.copyfile(_migrated_store, db)
    uri = f"sqlite:///{db}"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        _environment(mp, base, uri)
        mp.chdir(repo)
        mlflow.set_tracking_uri(uri)
        torch.set_num_threads(1)
        try:
            run_git(repo, "init", "--quiet", "--initial-branch=main")
            copy_code(repo)
            shutil.copytree(REPO_ROOT / "templates", repo / "templates")
            (repo / "configs").mkdir()
            config = tiny_config(data_root).replace(
                'split_fractions = [0.6, 0.4, 0.0]',
                'split_fractions = [0.6, 0.4, 0.0]\nnormalisation = "percentile"')
            (repo / "configs" / "tiny.toml").write_text(config + EXPORT_SECTION)
            (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmlruns/\n.nf1prov/\n"
                                              "__pycache__/\n*.zip\n")
            trained = invoke("train", "--config", "configs/tiny.toml").output
            codename = next(line.split()[-1] for line in trained.splitlines()
                            if line.startswith("codename:"))
            package = base / "package.zip"
            # offline, as the test below checks: bioimage.io's test_model, which export runs
            # on the package, must find everything in it
            tried = go_offline(mp, base / "bioimageio-cache")
            out = invoke("export", codename, "--format", "bioimageio", "-o", str(package),
                         "--set", "export.license=MIT").output
        finally:
            torch.set_num_threads(threads)
    return Trained(repo, uri, codename, package, out, tried)


@pytest.fixture
def in_project(trained, monkeypatch) -> Trained:
    """The trained project as the working directory, for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    monkeypatch.chdir(trained.repo)
    mlflow.set_tracking_uri(trained.uri)
    return trained


def go_offline(monkeypatch: pytest.MonkeyPatch, cache: Path) -> list[str]:
    """bioimage.io's cache in ``cache``, and a list of the HTTP requests it tried (none may)."""
    import httpx
    from bioimageio.spec._internal._settings import settings

    from nf1prov.share.bioimageio import require_bioimageio

    require_bioimageio()  # what export does first (it makes bioimageio.spec 0.5.12 work here)
    monkeypatch.setattr(settings, "cache_path", cache)
    tried = []

    def refuse(method, url, *args, **kwargs):
        tried.append(f"{method} {url}")
        raise httpx.ConnectError(f"offline test: {method} {url}")

    monkeypatch.setattr(httpx, "request", refuse)
    monkeypatch.setattr(httpx, "stream", refuse)
    return tried


def rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def test_the_package_passes_bioimageio_test_model(trained):
    """`export` ran bioimage.io's own test_model on the package it wrote, offline, and said so
    (CheckFailed and no package otherwise): both weight formats reproduced the test outputs."""
    assert "bioimage.io test_model: passed for pytorch_state_dict and torchscript weights" \
        in trained.output, trained.output
    assert trained.tried == []


def test_rdf_holds_provenance_weights_tensors_and_the_licence(trained, in_project, tmp_path):
    from nf1prov import tracking

    assert f"Wrote {trained.package}" in trained.output
    description = rdf(trained.package)
    sha = run_git(trained.repo, "rev-parse", f"refs/tags/model/{trained.codename}^{{commit}}")
    (run,) = tracking.model_runs(tracking.client(trained.uri))
    manifest = Path(tracking.client(trained.uri).download_artifacts(
        run.info.run_id, "manifest/split_manifest.csv", str(trained.repo.parent)))

    assert description["format_version"].startswith("0.5")
    provenance = description["config"]["nf1prov"]
    assert provenance["codename"] == trained.codename
    assert provenance["commit"] == sha
    assert provenance["run_id"] == run.info.run_id
    assert provenance["tracking_uri"] == trained.uri
    assert provenance["data_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()

    assert description["license"] == "MIT"  # --set over the logged config, which has none
    assert description["cite"] == [{"text": "nf1prov test model",
                                     "doi": "10.5281/zenodo.1234567"}]
    assert description["authors"][0]["name"] == AUTHOR[0]  # the commit's git author
    assert "nf1prov-test" in description["tags"] and "unet" in description["tags"]

    (raw,) = description["inputs"]
    assert [a.get("channel_names") for a in raw["axes"] if a["type"] == "channel"] == \
        [["z-1", "z", "z+1"]]
    steps = [step["id"] for step in raw["preprocessing"]]
    assert steps == ["ensure_dtype", "scale_range", "ensure_dtype"]
    scale = raw["preprocessing"][1]["kwargs"]
    assert (scale["min_percentile"], scale["max_percentile"], scale["axes"]) == \
        (1.0, 99.8, ["y", "x"])
    (probabilities,) = description["outputs"]
    assert [a.get("channel_names") for a in probabilities["axes"] if a["type"] == "channel"] \
        == [["background", "inner-cell", "cell-boundary"]]
    assert probabilities["postprocessing"][0]["id"] == "sigmoid"

    weights = description["weights"]
    assert weights["torchscript"]["parent"] == "pytorch_state_dict"
    architecture = weights["pytorch_state_dict"]["architecture"]
    assert architecture["callable"] == "UNet"
    assert architecture["kwargs"] == {"in_channels": 3, "num_classes": 3, "base_width": 4}
    with zipfile.ZipFile(trained.package) as archive:
        assert archive.read(architecture["source"]) == subprocess.run(
            ["git", "show", f"{sha}:models/unet.py"], cwd=trained.repo, check=True,
            capture_output=True).stdout
        test_input = np.load(archive.open(raw["test_tensor"]["source"]))
        test_output = np.load(archive.open(probabilities["test_tensor"]["source"]))
        readme = archive.read(description["documentation"]["source"]).decode()
        cover = archive.read(description["covers"][0]["source"])
    check_cover(cover, tmp_path)
    assert test_input.shape == (1, 3, 32, 32) and test_input.dtype == np.uint16
    assert test_output.shape == (1, 3, 32, 32) and test_output.dtype == np.float32
    assert trained.codename in readme and "## Validation" in readme
    assert "**Architecture:** UNet (width 4)" in readme  # the catalogue entry


def check_cover(png: bytes, tmp_path) -> None:
    """2:1 as bioimage.io asks; a titled bar with the class legend; the argmax classes of the
    32-px test output (x8) in the shared class colours only."""
    from nf1prov.segment.pictures import BAR_COLOUR, CLASS_COLOURS, GAP
    from tests.picture_checks import check_header, decode

    (tmp_path / "cover.png").write_bytes(png)
    rgb = decode(tmp_path / "cover.png")
    assert rgb.shape[1] == 2 * rgb.shape[0]
    panels = check_header(rgb, CLASS_COLOURS.values())[-256:]
    margin = (rgb.shape[1] - 2 * 256 - GAP) // 2  # centred on the bar colour
    assert (panels[:, :margin] == BAR_COLOUR).all()
    classes = panels[:, margin + 256 + GAP:margin + 512 + GAP].reshape(-1, 1, 3)
    palette = np.array(list(CLASS_COLOURS.values()), np.uint8)
    assert (classes == palette).all(-1).any(-1).all()


def test_a_missing_licence_is_refused_and_nothing_is_written(in_project, tmp_path):
    out = tmp_path / "out" / "model.zip"
    out.parent.mkdir()
    result = invoke("export", in_project.codename, "-o", str(out), expect=2)
    assert "export.license" in result.output and "--set export.license=" in result.output
    assert list(out.parent.iterdir()) == []

    out.write_bytes(b"an earlier package")  # a refused export leaves an existing OUT alone
    result = invoke("export", in_project.codename, "-o", str(out), "--set", "export.license=",
                    expect=2)
    assert "no export.license" in result.output
    result = invoke("export", in_project.codename, "-o", str(out), "--set",
                    "export.license=Not-A-Licence", expect=2)
    assert "not an SPDX licence id" in result.output
    result = invoke("export", in_project.codename, "-o", str(out), "--set", "train.epochs=3",
                    expect=2)
    assert "only export.* settings" in result.output
    assert out.read_bytes() == b"an earlier package"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.zip"]


def test_a_scratch_run_is_not_exported(in_project, tmp_path):
    """A --no-commit run has no model commit or tag for the package to record."""
    from nf1prov import tracking

    client = tracking.client(in_project.uri)
    (run,) = tracking.model_runs(client)
    client.set_tag(run.info.run_id, tracking.KIND, tracking.KIND_SCRATCH)
    try:
        result = invoke("export", in_project.codename, "-o", str(tmp_path / "s.zip"),
                        "--set", "export.license=MIT", expect=2)
    finally:
        client.set_tag(run.info.run_id, tracking.KIND, tracking.KIND_MODEL)
    assert "scratch run, not a model" in result.output
    assert not (tmp_path / "s.zip").exists()


def test_an_unknown_codename_is_refused(git_repo, tracking_uri, monkeypatch, tmp_path):
    monkeypatch.chdir(git_repo)
    out = tmp_path / "model.zip"
    result = invoke("export", "absent-model-1", "-o", str(out), "--set", "export.license=MIT",
                    expect=2)
    assert "No model named 'absent-model-1'" in result.output
    assert not out.exists()


def test_moved_data_is_found_with_data_root(in_project, data_root, tmp_path):
    out = tmp_path / "model.zip"
    gone = tmp_path / "nowhere"
    result = invoke("export", in_project.codename, "-o", str(out), "--set",
                    "export.license=MIT", "--data-root", str(gone), expect=2)
    assert "validation image" in result.output and "--data-root" in result.output
    assert not out.exists()

    moved = tmp_path / "moved"
    shutil.copytree(data_root, moved)
    result = invoke("export", in_project.codename, "-o", str(out), "--set",
                    "export.license=MIT", "--data-root", str(moved), "--no-test")
    assert "not tested (--no-test)" in result.output
    assert rdf(out)["config"]["nf1prov"]["codename"] == in_project.codename


def test_the_architecture_must_be_the_one_in_the_model_commit(in_project):
    from nf1prov.share.bioimageio import architecture_source
    from nf1prov.weights import Architecture, blob_hash

    sha = run_git(in_project.repo, "rev-parse", f"model/{in_project.codename}^{{commit}}")
    source = (in_project.repo / "models" / "unet.py").read_bytes()
    arch = Architecture("unet", "models.unet", "UNet", {}, "models/unet.py", blob_hash(source))
    assert architecture_source(in_project.repo, sha, arch) == source
    with pytest.raises(UserError, match="trained with blob 000000000000"):
        architecture_source(in_project.repo, sha, Architecture(
            "unet", "models.unet", "UNet", {}, "models/unet.py", "0" * 40))
    with pytest.raises(UserError, match="has no models/gone.py"):
        architecture_source(in_project.repo, sha, Architecture(
            "unet", "models.gone", "UNet", {}, "models/gone.py", "0" * 40))


def test_without_bioimageio_core_the_command_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bioimageio.core", None)  # import fails
    result = invoke("export", "calm-cat-1", "-o", str(tmp_path / "m.zip"), expect=2)
    assert "pip install -e '.[export]'" in result.output
    assert not (tmp_path / "m.zip").exists()


# --- array functions and settings -----------------------------------------------------------

def test_channel_names_and_test_crop_sides():
    from nf1prov.share.bioimageio import channel_names, crop_side

    assert channel_names(1) == ["z"]
    assert channel_names(5) == ["z-2", "z-1", "z", "z+1", "z+2"]
    assert crop_side(48, 48, crop_size=32) == 32
    assert crop_side(1000, 700, crop_size=512) == 64
    assert crop_side(40, 100, crop_size=512) == 32
    with pytest.raises(UserError, match="at least 16x16"):
        crop_side(15, 100, crop_size=512)


def test_the_centre_window_repeats_edge_slices_like_prediction():
    from nf1prov.share.bioimageio import centre_window

    stack = np.arange(2 * 6 * 8, dtype=np.uint16).reshape(2, 6, 8)
    window = centre_window(stack, 3, 4)  # centre slice 1 of 2: slices 0, 1, 1
    assert window.shape == (3, 4, 4) and window.dtype == np.uint16
    np.testing.assert_array_equal(window, stack[[0, 1, 1], 1:5, 2:6])
    assert centre_window(stack[0], 1, 4).shape == (1, 4, 4)


def test_dtype_max_preprocessing_is_nf1provs_normalisation():
    from nf1prov.data.inputs import normalise
    from nf1prov.share.bioimageio import preprocessing

    for dtype in (np.uint8, np.uint16):
        steps = preprocessing("dtype_max", np.dtype(dtype))
        assert [s.id for s in steps] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
        image = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (2, 8, 8), dtype)
        scaled = image.astype(np.float32) * np.float32(steps[1].kwargs.gain) + \
            np.float32(steps[1].kwargs.offset)
        np.testing.assert_allclose(scaled, normalise(image, "dtype_max"), rtol=1e-6)


def test_export_settings_come_from_the_logged_config_then_set():
    from nf1prov.config import export_settings

    logged = {"export": {"license": "MIT", "cite_text": "A", "cite_url": "https://x.org/a"}}
    settings = export_settings(logged, ["export.license=BSD-3-Clause"])
    assert (settings["license"], settings["cite_url"]) == ("BSD-3-Clause", "https://x.org/a")
    assert export_settings({})["license"] == ""  # a model trained before [export] existed
    with pytest.raises(UserError, match="export.cite_doi must be a DOI"):
        export_settings({}, ["export.cite_doi=https://doi.org/10.1/x"])
