"""`nf1prov reproduce`: a tiny real training, retrained from its commit in a temporary worktree
by a real subprocess, against a real sqlite store."""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov import git, tracking
from nf1prov.cli import cli
from nf1prov.data.layout import IMAGE_DIR, IMAGE_SUFFIX, MASK_DIR, MASK_NAME
from nf1prov.data.synthetic import synthesize_field
from nf1prov.errors import CheckFailed
from nf1prov.provenance.reproduce import (
    RESULT,
    Reproduction,
    check_identical,
    compare_metrics,
    compare_splits,
    format_comparison,
)
from nf1prov.provenance.run_tags import ENV_THREADS
from tests.conftest import run_git, train_once, use_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args, expect=0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == expect, (result.output, result.exception)
    return result


def train_model(project: Path) -> tuple[str, str]:
    """(codename, run ID) of one tiny committed model."""
    output = invoke("train", "--config", "configs/tiny.toml").output
    name = re.search(r"codename: +(\S+)", output).group(1)
    run_id = re.search(r"run ID: +(\S+)", output).group(1)
    return name, run_id


@dataclass(frozen=True)
class Trained:
    project: Path
    tracking_uri: str
    name: str
    run_id: str


@pytest.fixture(scope="module")
def _trained_workspace(tmp_path_factory, _migrated_store, data_root):
    """One tiny committed model, trained once for the module (`train_once`); `trained` copies
    it for each test."""
    base, (name, run_id) = train_once(tmp_path_factory, _migrated_store, data_root,
                                      "reproduce-model", train_model)
    return base, name, run_id


@pytest.fixture
def trained(_trained_workspace, tmp_path, monkeypatch) -> Trained:
    """A copy of the module's one trained model for this test (its repository, store and
    artifacts, which the test may change), as if the test had trained it in `project`."""
    base, name, run_id = _trained_workspace
    uri = use_workspace(base, tmp_path, monkeypatch)
    return Trained(tmp_path / "repo", uri, name, run_id)


def worktrees(repo: Path) -> list[str]:
    return [line for line in run_git(repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


def runs_in_store(client) -> set[str]:
    return {r.info.run_id for r in tracking.search_runs_all(client)}


def test_reproduce_retrains_the_models_own_code_and_matches_exactly(trained, monkeypatch):
    project, name, run_id = trained.project, trained.name, trained.run_id
    client = tracking.client(trained.tracking_uri)
    sha = client.get_run(run_id).data.tags[tracking.GIT_COMMIT]
    # Today's code cannot even be imported: the reproduction must use the model commit's code.
    (project / "models" / "unet.py").write_text("raise RuntimeError('not the model code')\n")
    run_git(project, "commit", "-qam", "break the UNet")
    head = git.head_sha(project)
    # The original trained with one torch thread; this shell would give two: the reproduction
    # uses the original's (CPU results depend on it).
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    output = invoke("reproduce", name).output

    assert f"every metric of {name} matches exactly" in output
    reproducing = [r for r in tracking.search_runs_all(client)
                   if r.data.tags.get(tracking.REPRODUCES) == run_id]
    assert len(reproducing) == 1
    new = reproducing[0]
    assert new.info.status == "FINISHED"
    assert new.data.tags[tracking.KIND] == tracking.KIND_SCRATCH
    assert new.data.tags[tracking.GIT_COMMIT] == sha
    assert new.data.tags[tracking.GIT_DIRTY] == "false"
    assert new.data.tags[RESULT] == "identical"
    assert new.data.tags[ENV_THREADS] == client.get_run(run_id).data.tags[ENV_THREADS] == "1"
    assert client.get_run(run_id).data.tags[tracking.REPRODUCED].startswith(
        f"identical (run {new.info.run_id}, ")
    original = client.get_run(run_id).data.metrics
    shared = [k for k in original if k in new.data.metrics]
    assert "best_val_dice_inner-cell" in shared and "val_loss" in shared
    assert all(original[k] == new.data.metrics[k] for k in shared)
    table = pd.read_csv(client.download_artifacts(new.info.run_id,
                                                  "reproduction/comparison.csv"))
    assert set(table["metric"]) == set(shared) and (table["difference"] == 0).all()
    # The user's tree is where it was; the temporary worktree is gone; the cache survived.
    assert git.head_sha(project) == head and git.status_porcelain(project) == []
    assert len(worktrees(project)) == 1
    assert any((project / ".nf1prov" / "cache").iterdir())


def as_dirty_scratch_run(client, run_id: str, diff: str) -> None:
    """Make the trained run what `train --no-commit` leaves on a dirty tree: kind scratch,
    dirty, its changes as git/uncommitted.diff on top of its commit."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client.set_tag(run_id, tracking.KIND, tracking.KIND_SCRATCH)
    client.set_tag(run_id, tracking.GIT_DIRTY, "true")
    # Not client.log_text: MLflow caches artifact locations by run ID for the process, and each
    # test's copy of the store keeps the run's ID at another place.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "uncommitted.diff").write_text(diff)
        get_artifact_repository(client.get_run(run_id).info.artifact_uri).log_artifact(
            str(Path(tmp) / "uncommitted.diff"), "git")


def test_a_dirty_scratch_run_without_its_untracked_files_is_refused(trained):
    """A diff logged before untracked files' content was: other code, so no reproduction."""
    project, name, run_id = trained.project, trained.name, trained.run_id
    client = tracking.client(trained.tracking_uri)
    as_dirty_scratch_run(client, run_id, "# untracked: experiment.py\n")
    before = runs_in_store(client)

    result = invoke("reproduce", name, expect=2)

    assert "untracked files without their content (experiment.py)" in result.output
    assert runs_in_store(client) == before
    assert len(worktrees(project)) == 1


def add_field(root: Path, patient: str, name: str, seed: int = 7) -> str:
    """Write one more field of view (real TIFFs: (Z,H,W) uint16 stack, instance labels) like the
    shared dataset's (5x48x48); returns its id."""
    stack, labels = synthesize_field(np.random.default_rng(seed), 5, 48, 48)
    image = root / patient / IMAGE_DIR / name / f"{name}{IMAGE_SUFFIX}"
    mask = root / patient / MASK_DIR / name / MASK_NAME
    for path, array in ((image, stack), (mask, labels)):
        path.parent.mkdir(parents=True)
        tifffile.imwrite(path, array)
    return f"{patient}/{name}"


def hold_package(project: Path) -> Path:
    """The project holds the nf1prov package too (a model commit holds the code that ran)."""
    package = project / "nf1prov"
    if not package.is_dir():
        shutil.copytree(Path(__file__).resolve().parents[1] / "nf1prov", package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return package


def commit_all(project: Path) -> None:
    run_git(project, "add", "-A")
    run_git(project, "commit", "-qm", "project")


def manifest_of(client, run_id: str) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, "manifest/split_manifest.csv"),
                       dtype={"well": str, "site": str})


def test_fields_added_since_training_are_left_out(trained, data_root, tmp_path):
    """Also (one retraining for two stories) a --no-commit run trained on a dirty tree: its
    code was the base commit plus the logged diff, and that is what retrains, and says so."""
    from nf1prov.provenance.scratch_code import make_diff

    project, name, run_id = trained.project, trained.name, trained.run_id
    assert (project / "nf1prov").is_dir()  # the model commit holds the code that ran
    client = tracking.client(trained.tracking_uri)
    sha = client.get_run(run_id).data.tags[tracking.GIT_COMMIT]
    (project / "scratch_note.txt").write_text("tried on a dirty tree\n")  # changes no metric
    as_dirty_scratch_run(client, run_id, make_diff(project))
    (project / "scratch_note.txt").unlink()
    grown = tmp_path / "grown"
    shutil.copytree(data_root, grown)
    patient = sorted(p.name for p in grown.iterdir())[-1]
    # Hashed into training and sorted first: were it used, every metric would move.
    extra = add_field(grown, patient, "A0-1")  # the shared data root stays as it is

    output = invoke("reproduce", name, "--data-root", str(grown)).output

    assert "Leaving out 1 field(s) of view added to" in output and extra in output
    assert f"at commit {sha[:12]} plus its logged 1-file diff" in output
    assert f"every metric of {name} matches exactly" in output
    new = [r for r in tracking.search_runs_all(client)
           if r.data.tags.get(tracking.REPRODUCES) == run_id]
    assert [r.data.tags[RESULT] for r in new] == ["identical"]
    original, reproduced = manifest_of(client, run_id), manifest_of(client, new[0].info.run_id)
    assert extra not in set(reproduced["fov_id"])
    columns = ["fov_id", "split", "image_sha256", "mask_sha256"]
    assert reproduced[columns].equals(original[columns])  # the recorded fields and split
    assert new[0].data.tags[tracking.GIT_COMMIT] == sha
    assert new[0].data.tags[tracking.GIT_DIRTY] == "true"  # it trained on base + diff
    ran = Path(client.download_artifacts(new[0].info.run_id, "git/uncommitted.diff")).read_text()
    assert "+tried on a dirty tree" in ran
    assert len(worktrees(project)) == 1 and git.status_porcelain(project) == []


def test_added_fields_with_code_that_cannot_leave_them_out_are_refused(
        project, tracking_uri, data_root, tmp_path):
    """A model whose commit holds an nf1prov without data.fields: its training would use the
    extra fields, so reproduce refuses before any run exists."""
    config_py = hold_package(project) / "config.py"
    with config_py.open("a") as handle:  # as before data.fields existed
        handle.write('\nSCHEMA["data"].pop("fields")\nRANGES.pop("data.fields")\n')
    commit_all(project)
    name, _ = train_model(project)
    client = tracking.client(tracking_uri)
    grown = tmp_path / "grown"
    shutil.copytree(data_root, grown)
    add_field(grown, sorted(p.name for p in grown.iterdir())[0], "Z9-9")
    before = runs_in_store(client)

    result = invoke("reproduce", name, "--data-root", str(grown), expect=2)

    assert "predates the setting data.fields" in result.output
    assert runs_in_store(client) == before
    assert len(worktrees(project)) == 1


def test_changed_data_is_refused_before_any_run(trained, data_root, tmp_path):
    project, name = trained.project, trained.name
    client = tracking.client(trained.tracking_uri)
    copy = tmp_path / "copy"
    shutil.copytree(data_root, copy)
    mask = sorted(copy.glob("*/segmentation_masks/*/cell_mask.tiff"))[0]
    labels = tifffile.imread(mask)
    tifffile.imwrite(mask, np.where(labels > 0, labels + 1, 0).astype(labels.dtype))
    before = runs_in_store(client)

    result = invoke("reproduce", name, "--data-root", str(copy), expect=2)

    assert f"content differs: {mask}" in result.output
    assert "--data-root" in result.output
    assert runs_in_store(client) == before
    assert len(worktrees(project)) == 1


def test_failed_retraining_ends_its_run_failed(trained):
    project, name, run_id = trained.project, trained.name, trained.run_id
    client = tracking.client(trained.tracking_uri)

    # The stacks have 5 slices: a 7-slice window is refused by the retraining's preflight.
    result = invoke("reproduce", name, "--set", "data.input_slices=7", expect=1)

    assert "failed (exit 2)" in result.output
    new = [r for r in tracking.search_runs_all(client)
           if r.data.tags.get(tracking.REPRODUCES) == run_id]
    assert [r.info.status for r in new] == ["FAILED"]
    assert "slices" in new[0].data.tags[tracking.FAILURE]
    assert len(worktrees(project)) == 1


def test_a_running_model_is_refused(trained):
    project, name, run_id = trained.project, trained.name, trained.run_id
    client = tracking.client(trained.tracking_uri)
    client.update_run(run_id, status="RUNNING")

    result = invoke("reproduce", name, expect=2)

    assert "RUNNING" in result.output and "FINISHED" in result.output
    assert len(worktrees(project)) == 1


def test_holdout_files_are_in_the_manifest_and_checked_apart(data_root, tmp_path):
    """The logged manifest holds the holdout patients' files (split holdout) too; reproduce
    checks them, and since training never reads them a change is reported, not refused."""
    from nf1prov.config import defaults
    from nf1prov.data.layout import discover_training_fields
    from nf1prov.data.manifest import build_manifest, training_rows
    from nf1prov.data.splits import split_fields
    from nf1prov.provenance.reproduce import check_data, holdout_changes
    from nf1prov.train.trainer import PreparedData, logged_manifest

    config = defaults()
    held = sorted(p.name for p in data_root.iterdir())[0]
    config["data"].update(holdout_patients=[held])
    splits = split_fields(discover_training_fields(data_root, config["data"]))
    data = PreparedData(splits=splits, train=None, val=None, manifest=build_manifest(splits),
                        source=str(data_root), cache_dir=tmp_path / "cache")
    logged = pd.read_csv(io.StringIO(logged_manifest(config, data).to_csv(index=False)),
                         dtype={"well": str, "site": str})  # as reproduce reads it back
    assert set(logged.loc[logged["split"] == "holdout", "patient"]) == {held}
    assert training_rows(logged)["fov_id"].tolist() == data.manifest["fov_id"].tolist()
    assert holdout_changes(logged, data_root, tmp_path / "cache") == []

    changed = tmp_path / "changed"
    shutil.copytree(data_root, changed)
    mask = sorted((changed / held).glob("segmentation_masks/*/cell_mask.tiff"))[0]
    tifffile.imwrite(mask, np.zeros_like(tifffile.imread(mask)))
    gone = tmp_path / "gone"
    shutil.copytree(data_root, gone, ignore=shutil.ignore_patterns(held))
    for root in (changed, gone):
        check_data(training_rows(logged), root, tmp_path / "cache")  # training data: the same
    assert holdout_changes(logged, changed, tmp_path / "cache") == [f"content differs: {mask}"]
    assert len(holdout_changes(logged, gone, tmp_path / "cache")) == 2 * (logged[
        "split"] == "holdout").sum()


def test_compare_metrics_skips_evaluation_and_reports_missing_ones():
    original = {"val_loss": 0.5, "best_epoch": 3.0, "holdout_dice_inner-cell": 0.9,
                "train_loss": 0.25}
    reproduced = {"val_loss": 0.5, "best_epoch": 3.0}
    table, missing = compare_metrics(original, reproduced)
    assert list(table["metric"]) == ["best_epoch", "val_loss"]
    assert list(table["difference"]) == [0.0, 0.0]
    assert missing == ["train_loss"]


def test_check_identical_uses_the_tolerance():
    table, missing = compare_metrics({"val_loss": 0.5}, {"val_loss": 0.5 + 1e-7})
    result = Reproduction(original=SimpleNamespace(codename="calm-cat-1"), run_id="0" * 32,
                          comparison=table, missing=missing)
    assert not result.identical
    check_identical(result, tolerance=1e-6)
    with pytest.raises(CheckFailed, match="calm-cat-1 differs: largest"):
        check_identical(result, tolerance=0.0)


def test_a_different_split_is_not_a_reproduction():
    def manifest(rows):
        return pd.DataFrame([{"patient": p, "well": w, "site": s, "split": split}
                             for p, w, s, split in rows])

    original = manifest([("NF1", "C4", "1", "train"), ("NF1", "C4", "2", "val")])
    same = manifest([("NF1", "C4", "2", "val"), ("NF1", "C4", "1", "train")])
    other = manifest([("NF1", "C4", "1", "val"), ("NF1", "C4", "2", "val"),
                      ("NF2", "A0", "1", "train")])
    assert compare_splits(original, same) == []
    changes = compare_splits(original, other)
    assert changes == ["NF1/C4-1: train -> val", "NF2/A0-1: - -> train"]
    table, missing = compare_metrics({"val_loss": 0.5}, {"val_loss": 0.5})
    result = Reproduction(original=SimpleNamespace(codename="calm-cat-1", run_id="1" * 32),
                          run_id="0" * 32, comparison=table, missing=missing,
                          split_changes=changes, extra_fields=["NF2/A0-1"])
    assert not result.identical
    assert "NF1/C4-1: train -> val" in format_comparison(result)
    assert "Left out: 1 field(s) of view" in format_comparison(result)
    with pytest.raises(CheckFailed, match="the split of 2 field"):
        check_identical(result, tolerance=1.0)
