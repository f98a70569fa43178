"""The README's own loop, in a copy of this very repository (its real README.md, .gitignore and
configs), run with the installed `nf1prov` command, which comes from another checkout (this
one): demo-data -> train (--json) -> show --json -> catalog -> catalog --check -> catalog
--commit, with the README's pre-commit hook installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from nf1prov import tracking
from nf1prov.catalog import BEGIN_MARKER, END_MARKER
from tests.conftest import REPO_ROOT, run_git
from tests.test_provenance_flow import BIN, subprocess_env

TINY = ["train.epochs=1", "model.base_width=4", "data.crop_size=32", "data.crop_stride=16",
        "train.max_batches_per_epoch=2", "train.weight_samples=4", "train.overlay_crops=1"]


def clone_of_this_repository(destination: Path) -> Path:
    """This repository's files as a new clone would have them (the work tree's versions of
    every file git tracks or would track), committed in a fresh repository."""
    files = run_git(REPO_ROOT, "ls-files", "--cached", "--others", "--exclude-standard")
    for rel in files.splitlines():
        source = REPO_ROOT / rel
        if source.is_file():
            (destination / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / rel)
    run_git(destination, "init", "--quiet", "--initial-branch=main")
    run_git(destination, "add", "--all")
    run_git(destination, "commit", "--quiet", "-m", "clone")
    return destination


def outside_markers(text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    begin, end = lines.index(BEGIN_MARKER + "\n"), lines.index(END_MARKER + "\n")
    return "".join(lines[:begin]), "".join(lines[end:])


def test_a_fresh_clone_with_an_empty_store_passes_catalog_check(tmp_path, tracking_uri,
                                                                 monkeypatch):
    """What CI and the documented pre-commit hook see before anyone trains: this README's
    committed catalogue is the one an empty store renders."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    repo = clone_of_this_repository(tmp_path / "nf1prov")
    env = subprocess_env(tracking_uri)
    del env["MLFLOW_TRACKING_URI"]
    proc = subprocess.run([str(BIN / "nf1prov"), "catalog", "--check"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "catalogue up to date (0 models)" in proc.stdout


def test_the_readme_loop_in_a_clone_with_the_documented_hook(tmp_path, tracking_uri,
                                                              monkeypatch):
    """The README's loop with its documented pre-commit hook (`nf1prov catalog --check`):
    model commits go through (a model commit cannot hold its own catalogue entry), `train
    --json` prints one JSON object on standard output even while the hook prints on its own,
    any other commit with a stale catalogue is refused until `catalog --commit` (itself checked
    by the hook) brings it up to date."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the README's default: <repo>/mlflow.db
    repo = clone_of_this_repository(tmp_path / "nf1prov")
    readme = (REPO_ROOT / "README.md").read_text()
    assert "entry: nf1prov catalog --check" in readme  # what the README documents
    env = subprocess_env(tracking_uri)
    del env["MLFLOW_TRACKING_URI"]
    hook = repo / ".git" / "hooks" / "pre-commit"
    # the hook also prints on standard output, as hooks do, and counts its runs
    hook.write_text("#!/bin/sh\necho pre-commit hook ran\necho ran >> .git/hook-runs\n"
                    "exec nf1prov catalog --check\n")
    hook.chmod(0o755)

    def run(*args, expect=0):
        proc = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == expect, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    def nf1prov(*args, expect=0):
        return run(str(BIN / "nf1prov"), *args, expect=expect)

    readme_before = (repo / "README.md").read_text()
    nf1prov("demo-data", "demo-data", "--patients", "3", "--sites", "2", "--slices", "5",
            "--height", "48", "--width", "48")
    overrides = [arg for item in TINY for arg in ("--set", item)]
    # as the README writes it: the JSON goes to a file outside the repository
    trained = run("sh", "-c", 'exec "$0" "$@" --json > ../model.json', str(BIN / "nf1prov"),
                  "train", "--config", "configs/demo.toml", *overrides)
    # nothing else on standard output, the hook's included
    record = json.loads((repo.parent / "model.json").read_text())
    assert f"Model {record['codename']} (run" in trained.stderr
    assert (repo / ".git" / "hook-runs").read_text() == "ran\n"  # and let the model through
    sha = run_git(repo, "rev-parse", "HEAD")
    committed = run_git(repo, "show", "--name-only", "--format=", sha).splitlines()
    assert not [path for path in committed if path.startswith("demo-data/")]
    assert git_status(repo) == []

    client = tracking.client(tracking.default_tracking_uri(repo))
    (run_1,) = tracking.model_runs(client)
    assert record["codename"] == run_1.info.run_name and record["kind"] == "model"
    assert record["run_id"] == run_1.info.run_id
    assert record["experiment_id"] == run_1.info.experiment_id
    assert record["commit"] == sha == run_1.data.tags[tracking.GIT_COMMIT]
    assert record["commit"] == run_git(repo, "rev-parse", f"model/{record['codename']}^{{}}")
    assert record["git_tag"] == f"model/{record['codename']}" and record["head"] is None
    assert record["best_epoch"] == int(run_1.data.metrics["best_epoch"])
    assert record["best_val_dice"]["inner-cell"] == run_1.data.metrics[
        "best_val_dice_inner-cell"]
    assert set(record["instances"]) == {"seed_threshold", "foreground_threshold", "min_size"}
    assert record["push_failures"] == [] and record["pushed_to"] is None
    assert_what_the_user_sees(client, run_1, record, trained.stderr)
    shown = json.loads(nf1prov("show", record["codename"], "--json").stdout)
    assert (shown["run_id"], shown["commit"], shown["status"]) == (
        record["run_id"], record["commit"], "FINISHED")
    assert shown["metrics"]["best_epoch"] == record["best_epoch"]

    nf1prov("catalog", "--check", expect=1)  # a new model: the README is stale
    nf1prov("train", "--config", "configs/demo.toml", *overrides)  # still a model commit
    assert len(run("git", "tag", "--list", "model/*").stdout.split()) == 2
    (repo / "notes.txt").write_text("an ordinary change\n")
    run("git", "add", "notes.txt")
    refused = run("git", "commit", "-m", "notes", expect=1)
    assert "out of date" in refused.stderr

    nf1prov("catalog")
    readme = (repo / "README.md").read_text()
    assert outside_markers(readme) == outside_markers(readme_before)
    for model in tracking.model_runs(client):
        assert f"**Codename:** {model.info.run_name}" in readme
        assert model.data.tags[tracking.GIT_COMMIT] in readme
    nf1prov("catalog", "--check")
    assert git_status(repo) == [" M README.md", "A  notes.txt"]
    nf1prov("catalog", "--commit")
    nf1prov("catalog", "--check")
    run("git", "commit", "-m", "notes")
    assert git_status(repo) == []


def assert_what_the_user_sees(client, run, record: dict, stderr: str) -> None:
    """DESIGN 3.10 for a `train --json` of 1 epoch (patience 5): its epoch's line stays, the
    health verdict is tagged, in the JSON and printed last, and the learning curve is logged."""
    from nf1prov.segment.pictures import CLASS_COLOURS
    from nf1prov.train.health import warning_lines
    from tests.test_health import colours_of

    assert re.search(r"(?:^|\r)epoch 1/1  loss \d+\.\d{3} val \d+\.\d{3}  Dice bg \d\.\d\d inner "
                     r"\d\.\d\d boundary \d\.\d\d  best 1  patience 5/5$", stderr, re.M), stderr
    verdict = run.data.tags[tracking.HEALTH]
    assert record["health"] == verdict and "still improving at the last epoch" in verdict
    warnings = warning_lines(verdict)
    assert stderr.rstrip("\n").splitlines()[-len(warnings):] == warnings
    curve = client.download_artifacts(run.info.run_id, "plots/learning_curve.png")
    size, colours = colours_of(curve)
    assert size == (1000, 420) and len(colours) > 100
    assert all(colours.get(rgb, 0) >= 20 for rgb in CLASS_COLOURS.values())


def git_status(repo: Path) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def write_2d_field(root: Path, patient: str, fov: str, seed: int) -> None:
    """A real camera's kind of image: one slice, uint16 values in a narrow band (100..400), a
    few bright discs as the hand-labelled cells."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    mask = np.zeros((1, 64, 64), np.uint16)
    for label, (cy, cx) in enumerate(rng.integers(8, 56, size=(6, 2)), start=1):
        mask[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 20] = label
    image = (np.where(mask > 0, 350, 150) + rng.normal(0, 20, mask.shape)).astype(np.uint16)
    for folder, name, array in (("zstack_images", f"{fov}_TRANS.tif", image),
                                ("segmentation_masks", "cell_mask.tiff", mask)):
        (root / patient / folder / fov).mkdir(parents=True)
        tifffile.imwrite(root / patient / folder / fov / name, array)


def test_cpu_config_on_2d_images_with_the_holdout_kept_elsewhere(tmp_path, tracking_uri,
                                                                 monkeypatch):
    """configs/cpu.toml as shipped, on one-slice uint16 images far below the dtype maximum,
    the holdout patient in a folder of its own (as labs keep it): train, then evaluate and
    predict with the instance parameters chosen at the end of training."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    repo = clone_of_this_repository(tmp_path / "nf1prov")
    env = subprocess_env(tracking_uri)
    del env["MLFLOW_TRACKING_URI"]
    scans, holdout = tmp_path / "scans", tmp_path / "holdout"
    for i, (patient, fov) in enumerate([("P1", "A1-1"), ("P1", "A1-2"), ("P2", "B1-1"),
                                        ("P2", "B1-2"), ("P3", "C1-1")]):
        write_2d_field(scans, patient, fov, seed=i)
    write_2d_field(holdout, "HOLD", "D1-1", seed=9)

    def nf1prov(*args, expect=0):
        proc = subprocess.run([str(BIN / "nf1prov"), *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == expect, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    overrides = [arg for item in [*TINY, 'data.holdout_patients=["HOLD"]']
                 for arg in ("--set", item)]
    trained = nf1prov("train", "--config", "configs/cpu.toml", "--data-root", str(scans),
                      *overrides)
    assert "HOLD have no folder" in trained.stderr  # said, not refused
    client = tracking.client(tracking.default_tracking_uri(repo))
    (run,) = tracking.model_runs(client)
    params = run.data.params
    assert params["data.normalisation"] == "percentile" and params["augment.flip"] == "True"
    used = (f"seed threshold {float(params['instances.seed_threshold']):g}, foreground threshold "
            f"{float(params['instances.foreground_threshold']):g}, min size "
            f"{params['instances.min_size']} px")

    evaluated = nf1prov("evaluate", run.info.run_name, "--data-root", str(holdout),
                        "--baseline", "--no-progress")
    assert used in evaluated.stdout and "HOLD (1 stack)" in evaluated.stdout
    metrics = client.get_run(run.info.run_id).data.metrics
    assert 0 <= metrics["holdout_instance_f1"] <= 1
    assert metrics["holdout_baseline_instance_f1"] > 0.5  # the bright discs are easy to find

    predicted = nf1prov("predict", run.info.run_name, str(holdout), "-o", str(tmp_path / "out"),
                        "--no-progress")
    assert used in predicted.stdout
    assert (tmp_path / "out" / "HOLD" / "zstack_images" / "D1-1"
            / "D1-1_TRANS_labels.ome.tif").is_file()
