"""`nf1prov list`, `show` and `note` on a real sqlite store and a real repository (runs made
through MlflowClient the way `train` leaves them, so these tests need no training)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nf1prov import git, tracking
from nf1prov.cli import cli
from nf1prov.provenance import heartbeat, liveness


@pytest.fixture
def store(tracking_uri, git_repo, monkeypatch):
    """(client, experiment_id, repo) with the CLI running inside the repo."""
    client = tracking.client(tracking_uri)
    monkeypatch.chdir(git_repo)
    return client, tracking.ensure_experiment(client, "e", tracking_uri), git_repo


def model_run(client, experiment_id, name, sha=None, status="FINISHED", dice=None, **extra):
    tags = {tracking.KIND: tracking.KIND_MODEL, tracking.CODENAME: name,
            tracking.GIT_DIRTY: "false", **heartbeat.identity_tags(), **extra}
    if sha:
        tags |= {tracking.GIT_COMMIT: sha, tracking.GIT_TAG: f"model/{name}"}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    if dice is not None:
        client.log_metric(run_id, "best_val_dice_inner-cell", dice)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    time.sleep(0.01)  # distinct start times: newest first is well defined
    return run_id


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_list_formats(store):
    client, exp, repo = store
    sha = git.commit(repo, "one\n")
    first = model_run(client, exp, "brave-owl-1", sha, dice=0.8125)
    model_run(client, exp, "calm-cat-2", sha, status="FAILED")
    client.create_run(exp, run_name="not-a-model-3")  # no nf1prov.kind: not listed

    result = invoke("list", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["codename"] for r in rows] == ["calm-cat-2", "brave-owl-1"]  # newest first
    assert rows[1]["run_id"] == first and rows[1]["sha"] == sha
    assert rows[1]["status"] == "FINISHED" and float(rows[1]["best_val_dice_inner-cell"]) == 0.8125
    assert rows[0]["status"] == "FAILED"

    data = json.loads(invoke("list", "--format", "json").output)
    assert data[1]["codename"] == "brave-owl-1" and data[1]["best_val_dice_inner-cell"] == 0.8125
    assert data[0]["best_val_dice_inner-cell"] is None

    table = invoke("list").output
    header = table.splitlines()[0].split()
    assert header[:5] == ["codename", "date", "status", "kind", "sha"]
    assert "0.8125" in table and sha[:10] in table and sha not in table


def test_list_leaves_out_runs_that_never_got_their_commit(store):
    """Older stores hold FAILED/KILLED `kind=model` runs of trainings refused at the commit (a
    hook, a signing key): they are no models. One still RUNNING may yet get its commit."""
    client, exp, repo = store
    sha = git.commit(repo, "one\n")
    model_run(client, exp, "brave-owl-1", sha)
    model_run(client, exp, "hook-cat-2", status="FAILED",
              **{tracking.FAILURE: "the pre-commit hook refused the model commit"})
    model_run(client, exp, "ctrl-c-eel-3", status="KILLED")
    model_run(client, exp, "busy-fox-4", status="RUNNING")  # committing right now
    listed = [row["codename"] for row in json.loads(invoke("list", "--json").output)]
    assert listed == ["busy-fox-4", "brave-owl-1"]


def test_list_empty_store(store):
    result = invoke("list")
    assert result.exit_code == 0 and "No models yet" in result.output
    assert json.loads(invoke("list", "--format", "json").output) == []


def test_list_tells_crashed_from_running_and_reap_fails_them(store):
    client, exp, _ = store
    live = model_run(client, exp, "live-owl-1", status="RUNNING")
    beat = time.time() - 3600
    crashed = model_run(client, exp, "dead-cat-2", status="RUNNING",
                        **{tracking.PID: dead_pid(), tracking.HEARTBEAT: str(beat)})
    rows = {r["codename"]: r for r in json.loads(invoke("list", "--format", "json").output)}
    assert rows["live-owl-1"]["status"] == "RUNNING"
    assert rows["dead-cat-2"]["status"] == "CRASHED"
    assert client.get_run(crashed).info.status == "RUNNING"  # listing alone changes nothing

    result = CliRunner().invoke(cli, ["list", "--reap", "--format", "json"])
    assert result.exit_code == 0
    assert "reaped dead-cat-2" in result.stderr
    run = client.get_run(crashed)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE] == liveness.crash_reason(run)
    assert run.data.tags[tracking.FAILURE].startswith(
        "process ended without finishing (last heartbeat ")
    assert run.info.end_time == int(beat * 1000)
    assert client.get_run(live).info.status == "RUNNING"  # the live one is left alone


def test_show_model_with_files_changed(store):
    client, exp, repo = store
    (repo / "a.py").write_text("A = 1\n")
    git.stage_all(repo)
    first = git.commit(repo, "first\n")
    model_run(client, exp, "brave-owl-1", first)
    (repo / "a.py").write_text("A = 2\n")
    (repo / "b.py").write_text("B = 1\n")
    git.stage_all(repo)
    second = git.commit(repo, "second\n")
    run_id = model_run(client, exp, "calm-cat-2", second, dice=0.5,
                       **{tracking.FAILURE: "ValueError: boom"})
    client.log_param(run_id, "train.epochs", "1")

    result = invoke("show", "calm-cat-2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"commit:      {second}" in out and "git tag:     model/calm-cat-2" in out
    assert f"run ID:      {run_id}" in out and "ValueError: boom" in out
    assert "train.epochs = 1" in out and "best_val_dice_inner-cell = 0.5" in out
    assert f"versus brave-owl-1 ({first[:10]})" in out
    assert "M\ta.py" in out and "A\tb.py" in out
    page = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}{tracking.ML_PAGES}"
    assert f"run page:  {page} (while that `mlflow ui` runs)" in out.splitlines()

    first_out = invoke("show", "brave-owl-1").output
    assert "first model: no previous model" in first_out

    shown = json.loads(invoke("show", "calm-cat-2", "--json").output)
    assert shown["codename"] == "calm-cat-2" and shown["run_id"] == run_id
    assert shown["commit"] == second and shown["git_tag"] == "model/calm-cat-2"
    assert shown["status"] == "FINISHED" and shown["failure"] == "ValueError: boom"
    assert shown["params"] == {"train.epochs": "1"}
    assert shown["metrics"]["best_val_dice_inner-cell"] == 0.5
    assert shown["changes"]["previous"] == "brave-owl-1"
    assert shown["changes"]["files"] == ["M\ta.py", "A\tb.py"]
    assert shown["run_url"] == page
    assert json.loads(invoke("show", "brave-owl-1", "--json").output)["changes"] == {
        "previous": None, "previous_sha": None, "files": None,
        "note": "first model: no previous model to compare with"}
    assert json.loads(invoke("list", "--json").output) == json.loads(
        invoke("list", "--format", "json").output)


def test_show_and_note_refuse_unknown_or_malformed_codenames(store):
    for args in (["show", "nobody-here-1"], ["note", "nobody-here-1", "x"],
                 ["show", "--", "--upload-pack=x"], ["note", "--", "-rf", "x"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, args
        assert "nf1prov list" in result.output


def test_note_adds_a_tag_per_note(store):
    client, exp, repo = store
    run_id = model_run(client, exp, "brave-owl-1", git.commit(repo, "x\n"))
    assert invoke("note", "brave-owl-1", "BCE not computed after trial 0").exit_code == 0
    assert invoke("note", "brave-owl-1", "Crashed at epoch 3;\nresumed").exit_code == 0
    tags = client.get_run(run_id).data.tags
    assert tracking.NOTES not in tags  # the old single array is no longer written
    keys = sorted(k for k in tags if k.startswith(tracking.NOTE_PREFIX))
    assert [tags[k] for k in keys] == ["BCE not computed after trial 0",
                                       "Crashed at epoch 3; resumed"]
    assert tracking.read_notes(tags) == ([tags[k] for k in keys], [])
    assert "- Crashed at epoch 3; resumed" in invoke("show", "brave-owl-1").output
    result = CliRunner().invoke(cli, ["note", "brave-owl-1", "   "])
    assert result.exit_code != 0 and "empty" in result.output


def test_list_outside_a_repository_with_env_uri(tracking_uri, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert invoke("list", "--format", "json").output.strip() == "[]"
