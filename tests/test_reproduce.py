"""`nf1prov reproduce`: a tiny real training, retrained from its commit in a temporary worktree
by a real subprocess, against a real sqlite store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov import tracking
from nf1prov.cli import cli
from nf1prov.errors import CheckFailed
from nf1prov.provenance import git
from nf1prov.reproduce import RESULT, Reproduction, check_identical, compare_metrics
from tests.conftest import run_git

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


def worktrees(repo: Path) -> list[str]:
    return [line for line in run_git(repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


def runs_in_store(client) -> set[str]:
    return {r.info.run_id for r in tracking.search_runs_all(client)}


def test_reproduce_retrains_the_models_own_code_and_matches_exactly(project, tracking_uri):
    name, run_id = train_model(project)
    client = tracking.client(tracking_uri)
    sha = client.get_run(run_id).data.tags[tracking.GIT_COMMIT]
    # Today's code cannot even be imported: the reproduction must use the model commit's code.
    (project / "models" / "unet.py").write_text("raise RuntimeError('not the model code')\n")
    run_git(project, "commit", "-qam", "break the UNet")
    head = git.head_sha(project)

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


def test_changed_data_is_refused_before_any_run(project, tracking_uri, data_root, tmp_path):
    name, _ = train_model(project)
    client = tracking.client(tracking_uri)
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


def test_failed_retraining_ends_its_run_failed(project, tracking_uri):
    name, run_id = train_model(project)
    client = tracking.client(tracking_uri)

    # The stacks have 5 slices: a 7-slice window is refused by the retraining's preflight.
    result = invoke("reproduce", name, "--set", "data.input_slices=7", expect=1)

    assert "failed (exit 2)" in result.output
    new = [r for r in tracking.search_runs_all(client)
           if r.data.tags.get(tracking.REPRODUCES) == run_id]
    assert [r.info.status for r in new] == ["FAILED"]
    assert "slices" in new[0].data.tags[tracking.FAILURE]
    assert len(worktrees(project)) == 1


def test_a_running_model_is_refused(project, tracking_uri):
    name, run_id = train_model(project)
    client = tracking.client(tracking_uri)
    client.update_run(run_id, status="RUNNING")

    result = invoke("reproduce", name, expect=2)

    assert "RUNNING" in result.output and "FINISHED" in result.output
    assert len(worktrees(project)) == 1


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
