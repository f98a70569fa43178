"""What the catalogue lists and shows comes from the MLflow store alone (DESIGN 3.4): only
committed models, their recorded status (never the host's processes or clock), and the recorded
facts of their training beside the hand-written description. Real sqlite stores, real git
repositories, a real (tiny) training."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest

from nf1prov import catalog, store_read, tracking
from nf1prov.config import defaults
from nf1prov.train.run import train_model
from tests.catalog_runs import client_for, experiment, model_run
from tests.conftest import run_git

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


# --- a sqlite store read directly: the same runs as MLflow's search -----------------------------


def varied_store(client) -> None:
    """Model runs of every shape the catalogue meets, beside runs it must not list."""
    exp, other = experiment(client), experiment(client, "second")
    model_run(client, exp, "nan-newt-1", start_time=1_000,
              metrics={"best_val_dice_background": float("nan"), "best_epoch": float("inf"),
                       "epochs_run": -float("inf"), "holdout_dice_total": 0.1234567890123456789})
    model_run(client, exp, "tie-toad-2", start_time=2_000, notes=["ünïcødé ✓", "x" * 7_000],
              description={"data": ["a", ["b"]], "summary": "s"}, params={"data.root": "/d"})
    model_run(client, exp, "tie-tern-3", start_time=2_000, status=None)  # same start: by run ID
    model_run(client, other, "far-fox-4", start_time=3_000, status="FAILED",
              extra_tags={tracking.FAILURE: "boom"})
    gone = model_run(client, exp, "gone-gnu-5", start_time=4_000)
    client.delete_run(gone.info.run_id)
    dropped = experiment(client, "dropped")
    model_run(client, dropped, "lost-lark-6", start_time=5_000)
    client.delete_experiment(dropped)
    db = sqlite3.connect(tracking.sqlite_path(client.tracking_uri))
    with db:  # its run left active (MLflow marks it deleted with its experiment)
        db.execute("UPDATE runs SET lifecycle_stage = 'active' WHERE name = 'lost-lark-6'")
    db.close()
    model_run(client, exp, "trial-tit-7", start_time=6_000,
              extra_tags={tracking.KIND: tracking.KIND_TRIAL})
    kindless = model_run(client, exp, "kindless-kea-8", start_time=7_000)
    client.delete_tag(kindless.info.run_id, tracking.KIND)


RUN_INFO = ("run_id", "experiment_id", "user_id", "status", "start_time", "end_time",
            "lifecycle_stage", "artifact_uri", "run_name")  # MLflow's RunInfo


def same_runs(read: list, searched: list) -> None:
    assert [r.info.run_id for r in read] == [r.info.run_id for r in searched]
    for a, b in zip(read, searched, strict=True):
        assert [getattr(a.info, f) for f in RUN_INFO] == [getattr(b.info, f) for f in RUN_INFO]
        assert a.data.tags == b.data.tags and a.data.params == b.data.params
        metrics = [repr(sorted(run.data.metrics.items())) for run in (a, b)]  # NaN: by repr
        assert metrics[0] == metrics[1]


def test_a_sqlite_store_is_read_directly_with_the_runs_mlflow_finds(client):
    varied_store(client)
    read = tracking.read_model_runs(client)
    assert all(isinstance(run, tracking.RunRecord) for run in read)  # not MLflow's search
    assert [r.info.run_name for r in read][::3] == ["far-fox-4", "nan-newt-1"]  # ties between
    assert {r.info.run_name for r in read} == {"far-fox-4", "tie-tern-3", "tie-toad-2",
                                               "nan-newt-1"}
    same_runs(read, catalog.newest_first(tracking.model_runs(client)))
    kinds = (tracking.KIND_MODEL, tracking.KIND_TRIAL)
    same_runs(tracking.read_model_runs(client, kinds),
              catalog.newest_first(tracking.model_runs(client, kinds)))

    some = tracking.read_model_runs(client, params=("data.root",), metrics=("best_epoch", "x"))
    assert {r.info.run_name: r.data.params for r in some if r.data.params} == {
        "tie-toad-2": {"data.root": "/d"}}
    assert {r.info.run_name: r.data.metrics for r in some if r.data.metrics} == {
        "nan-newt-1": {"best_epoch": sys.float_info.max}}  # inf, as MLflow stores it
    assert [run.data.tags for run in some] == [run.data.tags for run in read]


def test_the_catalogue_of_a_direct_read_is_the_one_mlflows_search_gives(tmp_path, client):
    varied_store(client)
    readme = tmp_path / "README.md"
    read = catalog.rebuild(readme, catalog.fetch_runs(client)).new
    searched = catalog.rebuild(readme, catalog.newest_first(tracking.model_runs(client))).new
    assert read == searched and "nan-newt-1" in read and "lost-lark-6" not in read


def test_a_sqlite_store_of_another_schema_is_read_through_mlflow(client, monkeypatch):
    varied_store(client)
    monkeypatch.setitem(store_read.SQLITE_COLUMNS, "runs",
                        store_read.SQLITE_COLUMNS["runs"] | {"a_column_of_a_future_mlflow"})
    read = tracking.read_model_runs(client)
    assert read and not any(isinstance(run, tracking.RunRecord) for run in read)
    same_runs(read, catalog.newest_first(tracking.model_runs(client)))


class Recording(dict):
    """A run's params or metrics that note every name asked for ("*": all of them listed)."""

    def __init__(self, values: dict, asked: set):
        super().__init__(values)
        self.asked = asked

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def __iter__(self):
        self.asked.add("*")
        return super().__iter__()

    def keys(self):
        self.asked.add("*")
        return super().keys()

    def items(self):
        self.asked.add("*")
        return super().items()


def test_the_catalogue_reads_no_params_or_metrics_but_those_it_names(tmp_path, client):
    """`fetch_runs` reads only `PARAMS_READ` and `METRICS_READ` of a sqlite store: whatever
    else `entry` asked for would be missing there and nowhere else."""
    varied_store(client)
    exp = experiment(client)
    model_run(client, exp, "old-owl-9", params={"data.root": "/data/nf1", "dataset.train_fields": 8,
                                                "dataset.val_fields": 1, "other": 2},
              metrics={f"holdout_{s}_{c}": 0.5 for s in ("dice", "iou") for c in catalog.CLASSES}
              | {"epochs_run": 3.0, "best_epoch": 2.0, "val_loss": 0.1})
    params, metrics = set(), set()
    runs = [SimpleNamespace(info=run.info, data=SimpleNamespace(
        tags=run.data.tags, params=Recording(run.data.params, params),
        metrics=Recording(run.data.metrics, metrics))) for run in tracking.model_runs(client)]
    catalog.build_context(runs)
    assert params and params <= set(catalog.PARAMS_READ)
    assert metrics and metrics <= set(catalog.METRICS_READ)
