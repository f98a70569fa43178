"""Builders shared by the catalogue tests (no tests here): real model runs in a real store."""

from __future__ import annotations

import json

from nf1prov import tracking

UPSTREAM_SHA = "07e0368d2d435e4ad04902e242cfee934adc50e0"
UPSTREAM_NOTE = "The binary cross entropy (BCE) was not computed after the first trial (trial 0)"
UPSTREAM_DESCRIPTION = {
    "architecture": "UNet Generator",
    "task": "One-to-One slice segmentation mask prediction",
    "qc": "Does not perform any QC or filtering of images or slices",
    "data": [
        "Trained and evaluated on all patient data except patient NF0014 (Holdout Patient)",
        "The model was developed using multiple segmentation masks:",
        ["Background", "Inner-cell", "Cell-boundary"],
    ],
    "preprocessing": [
        "Each input slice is normalized",
        "Each input is padded to preserve dimensionality (height and width divisible by 16)",
    ],
    "loss": [
        "The BCE loss is modified to account for segmentation mask pixel frequencies",
        ["Computed using an exponential moving average during training by initially randomly "
         "sampling image patches"],
        "The logged BCE used a random alpha exponential moving average hyperparameter",
    ],
}

# The fearless-eel-256 entry of the upstream README, verbatim.
UPSTREAM_ENTRY = """\
**Commit:** `07e0368d2d435e4ad04902e242cfee934adc50e0` <br>
**Codename:** fearless-eel-256

> **Note:** The binary cross entropy (BCE) was not computed after the first trial (trial 0) <br>

- **Architecture:** UNet Generator
- **Task:** One-to-One slice segmentation mask prediction
- **QC / Filtering:** Does not perform any QC or filtering of images or slices
- **Data:**
  - Trained and evaluated on all patient data except patient NF0014 (Holdout Patient)
  - The model was developed using multiple segmentation masks:
    - Background
    - Inner-cell
    - Cell-boundary
- **Preprocessing:**
  - Each input slice is normalized
  - Each input is padded to preserve dimensionality (height and width divisible by 16)
- **Loss:**
  - The BCE loss is modified to account for segmentation mask pixel frequencies
    - Computed using an exponential moving average during training by initially randomly \
sampling image patches
  - The logged BCE used a random alpha exponential moving average hyperparameter
"""


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment(client, name: str = "nf1-segmentation") -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def model_run(client, exp_id: str, codename: str, *, sha: str = "ab" * 20,
              start_time: int = 1_700_000_000_000, description: dict | None = None,
              notes: list[str] | None = None, status: str | None = "FINISHED",
              extra_tags: dict | None = None, metrics: dict | None = None,
              params: dict | None = None):
    """A model run carrying the DESIGN 3.3 contract tags, created through the real client."""
    from mlflow.entities import Metric, Param, RunTag

    tags = {
        tracking.KIND: tracking.KIND_MODEL,
        tracking.CODENAME: codename,
        tracking.GIT_COMMIT: sha,
        tracking.GIT_TAG: f"model/{codename}",
    }
    for name, value in (description or {}).items():
        tags[tracking.DESCRIPTION_PREFIX + name] = (
            value if isinstance(value, str) else json.dumps(value))
    if notes is not None:
        tags[tracking.NOTES] = json.dumps(notes)
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, start_time=start_time, run_name=codename)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, start_time, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    if status is not None:
        client.set_terminated(run.info.run_id, status, end_time=start_time + 60_000)
    return client.get_run(run.info.run_id)


# --- a lab's store: every shape the read-only verbs meet, and many runs fast --------------------

EEL, HOG = "fearless-eel-256", "sedate-hog-257"
TWIN = "twin-tit-262"  # a codename in two experiments: `show` asks which one


def lab_store(client, commits: tuple[str, str]) -> dict[str, str]:
    """Model runs of every shape `catalog`, `list` and `show` meet, beside runs they leave out,
    and a model registry, written through MLflow's client into a sqlite store; ``commits``: two
    real commits (the first two models'), so that `show` compares them. Returns {codename: run
    ID}."""
    exp, other = experiment(client), experiment(client, "second")
    start = 1_700_000_000_000
    made = {}

    def add(codename, exp_id=exp, **kwargs):
        kwargs.setdefault("start_time", start + 60_000 * len(made))
        made[codename] = model_run(client, exp_id, codename, **kwargs).info.run_id
        return made[codename]

    splits = {"train": {"fields": 4, "patients": ["NF0016", "NF0018"]},
              "val": {"fields": 1, "patients": ["NF0016"]}, "test": {"fields": 1, "patients": []}}
    add(EEL, sha=commits[0], description=UPSTREAM_DESCRIPTION, notes=[UPSTREAM_NOTE],
        params={"data.root": "/data/nf1", "data.holdout_patients": '["NF0014"]', "train.lr": 1e-3},
        metrics={"best_val_dice_background": 0.98, "best_val_dice_inner-cell": 0.7612345,
                 "best_val_dice_cell-boundary": 0.5, "best_epoch": 7.0, "epochs_run": 9.0,
                 "holdout_dice_inner-cell": 0.65, "holdout_instance_f1": 0.85,
                 "holdout_baseline_instance_f1": 0.35, "val_loss": 0.25},
        extra_tags={tracking.DATA_SPLITS: json.dumps(splits), tracking.HOST: "gpu-box",
                    tracking.HEALTH: "warning: the best epoch is the last: still improving",
                    "nf1prov.evaluation.patients": '["NF0014_T1"]'})
    long_note = "A note longer than MLflow keeps in one tag. " * 250
    add(HOG, sha=commits[1], description={"summary": "Second try", "data": ["a", ["b"]]},
        params={"data.root": "/data/nf1", "dataset.train_fields": 4, "dataset.val_fields": 1},
        metrics={"best_val_dice_background": float("nan"), "best_epoch": float("inf"),
                 "epochs_run": -float("inf"), "holdout_iou_total": 0.1234567890123456789},
        extra_tags=tracking.long_tag(f"{tracking.NOTE_PREFIX}1700000000000.0123abcd", long_note)
        | {tracking.HEALTH: "ok", tracking.REPRODUCED: "reproduced: same metrics"})
    add("busy-bee-258", status=None, extra_tags={  # RUNNING elsewhere, its heartbeat old
        tracking.HOST: "elsewhere", tracking.PID: "4242", tracking.HEARTBEAT: "1700000000.0"})
    add("far-fox-259", other, status="FAILED", extra_tags={tracking.FAILURE: "boom: CUDA"})
    add("tie-toad-260", start_time=start + 3_600_000, metrics={"best_val_dice_inner-cell": 0.5})
    add("tie-tern-261", start_time=start + 3_600_000, status="KILLED")
    add(TWIN)
    made[TWIN + " (second)"] = model_run(client, other, TWIN,
                                         start_time=start + 3_600_001).info.run_id
    add("scratch-seal-263", extra_tags={tracking.KIND: tracking.KIND_SCRATCH,
                                        tracking.GIT_DIRTY: "true"})
    add("trial-tit-264", extra_tags={tracking.KIND: tracking.KIND_TRIAL})
    client.delete_tag(add("hook-hare-265", status="FAILED"), tracking.GIT_COMMIT)  # no commit
    client.delete_run(add("gone-gnu-266"))
    dropped = experiment(client, "dropped")
    add("lost-lark-267", dropped)
    client.delete_experiment(dropped)
    client.delete_tag(add("kindless-kea-268"), tracking.KIND)
    register(client, made)
    return made


def register(client, runs: dict[str, str]) -> None:
    """Registered models naming some of ``runs``, with aliases; and a prompt (MLflow's prompts
    live in the same tables, and no search of models shows them)."""
    import sqlite3

    client.create_registered_model("nf1-segmentation")
    for codename in (EEL, HOG):
        client.create_model_version("nf1-segmentation", f"runs:/{runs[codename]}/model",
                                    run_id=runs[codename])
    client.set_registered_model_alias("nf1-segmentation", "champion", "2")
    client.set_registered_model_alias("nf1-segmentation", "baseline", "1")
    client.create_registered_model("other-model")
    client.create_model_version("other-model", "file:///tmp/m", run_id=runs["far-fox-259"])
    client.register_prompt("a-prompt", "Segment {{ cells }}")
    db = sqlite3.connect(tracking.sqlite_path(client.tracking_uri))
    with db:  # a prompt version naming a model run (not something MLflow's API writes)
        db.execute("UPDATE model_versions SET run_id = ? WHERE name = 'a-prompt'", (runs[HOG],))
    db.close()


def clone_runs(db, templates: list[str], count: int, start: int) -> None:
    """``count`` model runs copied from the runs ``templates`` (in turn) straight into the sqlite
    store ``db``, rows and all: new run IDs, codenames clone-<i>, start times ``start`` + i
    minutes with two runs a minute (ties), every 97th FAILED. A thousand runs take about a
    second; MLflow's API takes minutes (benchmarks/bench_catalog.py)."""
    import sqlite3
    import uuid

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    with con:
        rows = {table: {run_id: [dict(r) for r in con.execute(
            f"SELECT * FROM {table} WHERE run_uuid = ?", (run_id,))] for run_id in templates}
            for table in ("runs", "tags", "params", "latest_metrics")}
        for i in range(count):
            template, run_id = templates[i % len(templates)], uuid.uuid4().hex
            codename, failed = f"clone-{i:04d}", i % 97 == 5
            time = start + 60_000 * (i // 2)
            renamed = {tracking.RUN_NAME: codename, tracking.CODENAME: codename,
                       tracking.GIT_TAG: f"model/{codename}", tracking.GIT_COMMIT: f"{i:040x}"}
            extra = [{"key": tracking.FAILURE, "value": "RuntimeError: CUDA out of memory"}] \
                if failed else []
            for table, copies in rows.items():
                new = [{**row, "run_uuid": run_id} for row in copies[template]]
                if table == "runs":
                    new[0].update(name=codename, start_time=time, end_time=time + 30_000,
                                  status="FAILED" if failed else "FINISHED")
                if table == "tags":
                    new = [{**row, "value": renamed.get(row["key"], row["value"])}
                           for row in new] + [{"run_uuid": run_id, **tag} for tag in extra]
                for row in new:
                    con.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                                f"({', '.join('?' * len(row))})", tuple(row.values()))
    con.close()
