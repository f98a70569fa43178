"""`nf1prov train --json` and `nf1prov show --json` in a real process: standard output is one JSON
object (the training process's own output goes to standard error), and it names what the store
and the repository hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nf1prov import tracking
from tests.conftest import run_git


def test_train_json_prints_one_object_that_matches_the_run_and_the_tag(project, tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    done = subprocess.run([sys.executable, "-m", "nf1prov", "train", "--config",
                           "configs/tiny.toml", "--json"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)  # nothing else on standard output
    assert "training..." in done.stderr  # the human messages went to standard error

    run = tracking.client(tracking_uri).get_run(record["run_id"])
    assert record["codename"] == run.info.run_name and record["kind"] == "model"
    assert record["experiment_id"] == run.info.experiment_id
    assert record["commit"] == run.data.tags[tracking.GIT_COMMIT]
    assert record["commit"] == run_git(project, "rev-parse", f"model/{record['codename']}^{{}}")
    assert record["git_tag"] == f"model/{record['codename']}" and record["head"] is None
    assert record["best_epoch"] == int(run.data.metrics["best_epoch"])
    assert record["best_val_dice"]["inner-cell"] == run.data.metrics["best_val_dice_inner-cell"]
    assert set(record["instances"]) == {"seed_threshold", "foreground_threshold", "min_size"}
    assert record["push_failures"] == [] and record["pushed_to"] is None

    shown = subprocess.run([sys.executable, "-m", "nf1prov", "show", record["codename"],
                            "--json"], cwd=project, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    shown = json.loads(shown.stdout)
    assert (shown["run_id"], shown["commit"], shown["status"]) == (
        record["run_id"], record["commit"], "FINISHED")
    assert shown["metrics"]["best_epoch"] == record["best_epoch"]
