"""What the catalogue lists and shows comes from the MLflow store alone (DESIGN 3.4): only
committed models, their recorded status (never the host's processes or clock), and the recorded
facts of their training beside the hand-written description. Real sqlite stores, real git
repositories, a real (tiny) training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import run_git
from test_catalog_helpers import client_for, experiment, model_run

from nf1prov import catalog, tracking
from nf1prov.cli import cli
from nf1prov.config import defaults
from nf1prov.train.trainer import train_model

STILL_TRAINING = "> **Important!!!** This model is still training: its figures are not final <br>"


@pytest.fixture
def client(tracking_uri):
    return client_for(tracking_uri)


def render(tmp_path: Path, client) -> str:
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    return catalog.rebuild(readme, catalog.fetch_runs(client)).new


# --- only runs that got their commit ----------------------------------------------------------


def test_a_model_run_without_its_commit_is_not_listed(tmp_path, client):
    exp = experiment(client)
    model_run(client, exp, "kept-kiwi-1", start_time=1_000)
    refused = model_run(client, exp, "hook-hare-2", start_time=2_000, status="FAILED",
                        extra_tags={tracking.FAILURE: "GitError: pre-commit hook refused"})
    waiting = model_run(client, exp, "lock-lynx-3", start_time=3_000, status="KILLED",
                        extra_tags={tracking.FAILURE: "interrupted by Ctrl-C (SIGINT)"})
    for run in (refused, waiting):  # the commit never happened: no commit tag was ever set
        client.delete_tag(run.info.run_id, tracking.GIT_COMMIT)
    text = render(tmp_path, client)
    assert "kept-kiwi-1" in text
    assert "hook-hare-2" not in text and "lock-lynx-3" not in text
    assert "not recorded" not in text
    context = catalog.build_context(catalog.fetch_runs(client))
    assert context["model_count"] == 1


def test_a_training_whose_commit_a_hook_refused_stays_out(project, tracking_uri, data_root,
                                                          one_thread):
    hook = project / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'lint failed' >&2\nexit 1\n")
    hook.chmod(0o755)
    result = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml"])
    assert result.exit_code == 2, result.output
    (run,) = tracking.model_runs(client_for(tracking_uri))  # a model run, FAILED, no commit
    assert run.info.status == "FAILED" and tracking.GIT_COMMIT not in run.data.tags

    (project / "README.md").write_text("# Project\n")
    result = CliRunner().invoke(cli, ["catalog"])
    assert result.exit_code == 0, result.output
    assert "0 models, written" in result.output
    readme = (project / "README.md").read_text()
    assert "No models recorded yet" in readme and run.info.run_id not in readme


# --- the store alone, never the host -----------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has ended (started and reaped here)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_running_run_renders_the_same_whether_its_process_lives_or_not(tmp_path, client):
    run = model_run(client, experiment(client), "busy-bee-1", status=None)
    run_id = run.info.run_id
    client.set_tag(run_id, tracking.HOST, socket.gethostname())

    client.set_tag(run_id, tracking.PID, str(dead_pid()))  # its process is gone ...
    client.set_tag(run_id, tracking.HEARTBEAT, str(time.time() - 86_400))  # ... a day ago
    gone = render(tmp_path, client)
    client.set_tag(run_id, tracking.PID, str(os.getpid()))  # a live process, beating now
    client.set_tag(run_id, tracking.HEARTBEAT, str(time.time()))
    alive = render(tmp_path, client)

    assert gone == alive
    assert STILL_TRAINING in gone.splitlines() and "(2023-11-14, RUNNING)" in gone


RENDER_ELSEWHERE = """
import sys
from pathlib import Path
from mlflow import MlflowClient
from nf1prov import catalog

runs = catalog.fetch_runs(MlflowClient(tracking_uri=sys.argv[1]))
sys.stdout.write(catalog.rebuild(Path(sys.argv[2]), runs).new)
assert not [m for m in sys.modules if m.startswith("nf1prov.provenance")], "provenance imported"
"""


def test_another_process_in_another_time_zone_renders_the_same_bytes(tmp_path, client,
                                                                     tracking_uri):
    exp = experiment(client)
    model_run(client, exp, "busy-bee-1", status=None, start_time=1_700_000_000_000,
              extra_tags={tracking.HOST: "gpu-box", tracking.PID: "1",
                          tracking.HEARTBEAT: "1700000000.0"})
    model_run(client, exp, "done-dog-2", start_time=1_700_000_050_000)
    here = render(tmp_path, client)
    env = {**os.environ, "TZ": "Pacific/Kiritimati", "HOSTNAME": "ci-runner", "LC_ALL": "C"}
    there = subprocess.run([sys.executable, "-c", RENDER_ELSEWHERE, tracking_uri,
                            str(tmp_path / "README.md")], env=env, capture_output=True,
                           text=True)
    assert there.returncode == 0, there.stderr
    assert there.stdout == here
    assert STILL_TRAINING in here.splitlines()


# --- recorded facts beside the hand-written description ---------------------------------------


def tiny_training_config(data_root: Path, holdout: list[str]) -> dict:
    config = defaults()
    config["data"].update(root=str(data_root), holdout_patients=holdout, input_slices=3,
                          crop_size=32, crop_stride=16, split_fractions=[0.6, 0.4, 0.0])
    config["model"]["base_width"] = 4
    config["train"].update(epochs=2, batch_size=4, learning_rate=3e-3, device="cpu",
                           weight_samples=4, overlay_crops=1, max_batches_per_epoch=2)
    config["description"].update(architecture="UNet (width 4)",
                                 data="All synthetic patients (hand-written, may go stale)")
    return config


def expected_facts(client, run_id: str, data_root: Path, tmp_path: Path) -> list[str]:
    """The two fact lines, from what the run itself recorded: its split manifest (one row per
    field of view) and its per-epoch validation loss."""
    manifest = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="manifest/split_manifest.csv", dst_path=str(tmp_path)))
    parts = []
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split]
        patients = sorted(set(rows["patient"]))
        count = f"{len(rows)}" + ((" field of view" if len(rows) == 1 else " fields of view")
                                  if split == "train" else "")
        parts.append(f"{split} {count}" + (f" ({', '.join(patients)})" if patients else ""))
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "val_loss"),
                                      key=lambda m: m.step)]
    best = losses.index(min(losses)) + 1
    return [f"- **Trained on:** `{data_root}`; " + ", ".join(parts),
            f"- **Epochs:** {len(losses)} run, best {best}"]


def test_a_trained_model_shows_its_recorded_data_and_epochs(tmp_path, client, data_root,
                                                             git_repo, one_thread):
    patients = sorted(p.name for p in data_root.iterdir() if p.is_dir())
    holdout, trained = patients[0], patients[1:]
    with mlflow.start_run(tags={tracking.KIND: tracking.KIND_MODEL}) as run:
        train_model(tiny_training_config(data_root, [holdout]), data_root,
                    cache_dir=tmp_path / "cache")
    run_git(git_repo, "commit", "--quiet", "--allow-empty", "-m", "model")
    client.set_tag(run.info.run_id, tracking.GIT_COMMIT, run_git(git_repo, "rev-parse", "HEAD"))

    lines = render(tmp_path, client).splitlines()
    for line in expected_facts(client, run.info.run_id, data_root, tmp_path):
        assert line in lines, (line, lines)
    assert f"- **Holdout patients:** {holdout}" in lines
    assert "- **Data:** All synthetic patients (hand-written, may go stale)" in lines
    trained_on = next(line for line in lines if line.startswith("- **Trained on:**"))
    assert holdout not in trained_on and all(p in trained_on for p in trained)

    recorded = json.loads(client.get_run(run.info.run_id).data.tags[tracking.DATA_SPLITS])
    assert sorted({p for split in recorded.values() for p in split["patients"]}) == trained


def test_runs_from_before_the_facts_show_their_field_counts(tmp_path, client):
    model_run(client, experiment(client), "old-owl-1",
              params={"data.root": "/data/nf1", "dataset.train_fields": 8,
                      "dataset.val_fields": 1, "dataset.test_fields": 1},
              metrics={"best_epoch": 7.0})
    lines = render(tmp_path, client).splitlines()
    assert "- **Trained on:** `/data/nf1`; train 8 fields of view, val 1, test 1" in lines
    assert "- **Epochs:** best 7" in lines
