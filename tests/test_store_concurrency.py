"""Many trainings starting at the same moment on a brand-new store: the store is created once,
experiments and dataset inputs are get-or-create, and every training lands.

Four at once here, on a fresh sqlite file: enough for every race (creating the store, the
experiment and the dataset inputs, taking turns at the commit) to be run into, at half the
suite time of eight. Eight at once, from two clones, run on a fresh PostgreSQL + S3 server in
tests/test_lab_store.py."""

from __future__ import annotations

import subprocess

import pytest

from nf1prov import tracking
from tests.conftest import run_git
from tests.test_provenance_flow import BIN, assert_contract, codename_of, subprocess_env

pytestmark = pytest.mark.usefixtures("project")
TRAININGS = 4


def test_four_trainings_at_once_on_a_fresh_sqlite_store(tmp_path, project):
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")
    fresh = tmp_path / "fresh" / "mlflow.db"  # no file yet: the first command creates it
    fresh.parent.mkdir()
    uri = f"sqlite:///{fresh}"
    env = subprocess_env(uri)
    procs = [subprocess.Popen([str(BIN / "nf1prov"), "train", "--config", "configs/tiny.toml"],
                              cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(TRAININGS)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out[-1500:], err[-3000:])

    client = tracking.client(uri)
    runs = tracking.model_runs(client)
    assert len(runs) == TRAININGS and {r.info.status for r in runs} == {"FINISHED"}
    names = {assert_contract(client, project, r.info.run_id) for r in runs}
    assert names == {codename_of(out) for out, _ in outputs}  # each printed its own model
    assert len({r.data.tags[tracking.GIT_COMMIT] for r in runs}) == TRAININGS
    assert run_git(project, "rev-list", "--count", "HEAD") == str(TRAININGS + 1)  # in turn
    assert len(run_git(project, "tag", "--list", "model/*").split()) == TRAININGS
    assert len(client.search_experiments()) == 2  # Default and "flow", each created once
    for run in runs:
        assert [i.tags[0].value for i in run.inputs.dataset_inputs] == ["training"]
