"""Hyper-parameter trials in RDB storage: several worker processes, and another clone joining
a model's search (`nf1prov search-join`). Real sqlite MLflow stores, real sqlite Optuna files,
real git repositories, real worker processes; tiny settings (UNet width 4, 32-pixel crops,
1 epoch of 2 batches).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState

from nf1prov import tracking
from nf1prov.cli import cli
from nf1prov.config import to_toml
from nf1prov.train import search, search_worker
from nf1prov.train.run import train_model
from nf1prov.train.trainer import prepare_data
from tests.conftest import run_git
from tests.test_trainer import tiny_config as trainer_tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CODENAME = "brave-fox-1"


def tiny_config(**train) -> dict:
    return trainer_tiny_config(**{
        "epochs": 1, "weight_samples": 4, "overlay_crops": 1, "max_batches_per_epoch": 2,
        "search_batch_size": [2, 4], "search_learning_rate": [1e-3, 1e-2], **train})


def trial_runs(client, parent_id: str, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def run_model(client, run_id: str):
    from nf1prov import weights

    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
    return weights.load(Path(folder), ref=run_id)


def per_epoch(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    once = ("epochs_run", "val_instance_f1", "val_instance_ap", "val_instance3d_f1",
            "val_instance3d_ap")
    names = [k for k in client.get_run(run_id).data.metrics
             if not k.startswith("best_") and k not in once]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in names}


def real_trials(study) -> list:
    return [t for t in study.get_trials() if not t.user_attrs.get(search_worker.SURPLUS_ATTR)]


def test_two_worker_processes_share_the_trials_and_the_model_takes_the_best(
        tracking_uri, data_root, tmp_path):
    config = tiny_config(trials=3, search_workers=2)
    with mlflow.start_run() as run:
        result = train_model(config, data_root, cache_dir=tmp_path / "cache")
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(run.info.run_id)
    assert parent.info.status == "FINISHED"

    # the study: in the workspace's .nf1prov/ (here: beside the cache), named by the run ID
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = f"nf1prov-{parent.info.run_id}"
    assert parent.data.tags[search.STUDY_TAG] == name
    assert parent.data.tags[search.STORAGE_TAG] == url
    study = optuna.load_study(study_name=name, storage=url)
    trials = real_trials(study)
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)

    # one nested run per trial, trained by the worker processes, not this one
    children = trial_runs(client, parent.info.run_id, parent.info.experiment_id)
    assert sorted(r.info.run_name for r in children) == ["trial_0", "trial_1", "trial_2"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags[tracking.KIND] == tracking.KIND_TRIAL for r in children)
    assert all(r.data.tags[tracking.PID] != str(os.getpid()) for r in children)
    assert {t.user_attrs[search_worker.RUN_ID_ATTR] for t in trials} == \
        {r.info.run_id for r in children}

    # the model run holds the best trial: its number, metrics and weights
    losses = {r.info.run_name: r.data.metrics["best_val_loss"] for r in children}
    best_name = min(losses, key=losses.get)
    best = next(r for r in children if r.info.run_name == best_name)
    assert parent.data.params["best_trial"] == parent.data.tags["best_trial"] == \
        best_name.removeprefix("trial_") == str(study.best_trial.number)
    assert parent.data.tags[search.BEST_RUN_TAG] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == best.data.metrics["best_val_loss"] == \
        result.best_val_loss
    assert parent.data.params["best_trial.train.batch_size"] == \
        best.data.params["train.batch_size"]
    assert per_epoch(client, parent.info.run_id) == per_epoch(client, best.info.run_id)
    mine, theirs = run_model(client, parent.info.run_id), run_model(client, best.info.run_id)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(mine.state_dict()[k], theirs.state_dict()[k])
               for k in mine.state_dict())
    assert all(torch.equal(result.model.state_dict()[k], theirs.state_dict()[k])
               for k in theirs.state_dict())


# --- search-join ----------------------------------------------------------------------------


@pytest.fixture
def committed(project) -> str:
    """The project's code as a commit (the model's), HEAD on it."""
    run_git(project, "add", "-A")
    run_git(project, "commit", "--quiet", "-m", "model code")
    return run_git(project, "rev-parse", "HEAD")


def searching_model(client, project: Path, data_root: Path, sha: str, storage: str,
                    trials: int, **tags) -> tuple[str, dict]:
    """A RUNNING model run searching in ``storage`` (its study created, no trial yet), as
    `nf1prov train` leaves it before its own trials start; returns (run ID, config)."""
    experiment_id = client.create_experiment(
        "join", artifact_location=(project.parent / "mlartifacts").as_uri())
    config = tiny_config(trials=trials)
    config["data"]["root"] = str(data_root)
    config["postprocess"]["tune"] = False
    run = client.create_run(experiment_id, run_name=CODENAME, tags={
        tracking.KIND: tracking.KIND_MODEL, tracking.CODENAME: CODENAME,
        tracking.GIT_COMMIT: sha, tracking.HOST: socket.gethostname(),
        search.STUDY_TAG: search.study_name("0" * 32), search.STORAGE_TAG: storage} | tags)
    run_id = run.info.run_id
    client.set_tag(run_id, search.STUDY_TAG, search.study_name(run_id))
    client.log_text(run_id, to_toml(config), "config/config.toml")
    data = prepare_data(config, data_root, project / ".nf1prov" / "cache")
    client.log_text(run_id, data.manifest.to_csv(index=False), "manifest/split_manifest.csv")
    search.create_study(storage, run_id, experiment_id, trials, config["train"]["seed"])
    return run_id, config


def join(*args: str):
    return CliRunner().invoke(cli, ["search-join", CODENAME, *args])


def test_search_join_refuses_what_it_cannot_join(project, committed, tracking_uri, data_root,
                                                  tmp_path):
    from nf1prov.data.synthetic import write_demo_dataset

    client = mlflow.MlflowClient(tracking_uri)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_id, _ = searching_model(client, project, data_root, committed, storage, trials=2)

    # a sqlite study of another machine
    client.set_tag(run_id, tracking.HOST, "another-machine")
    result = join()
    assert result.exit_code == 2, result.output
    assert "another-machine" in result.output and search.STORAGE_ENV in result.output
    assert "postgresql+psycopg2://" in result.output
    client.set_tag(run_id, tracking.HOST, socket.gethostname())

    # data that is not the model's
    other = tmp_path / "other-data"
    write_demo_dataset(other, patients=3, sites=2, slices=5, height=48, width=48, seed=1)
    result = join("--data-root", str(other))
    assert result.exit_code == 2, result.output
    assert "split manifest" in result.output and "content" in result.output

    # HEAD is not the model's commit
    run_git(project, "commit", "--quiet", "--allow-empty", "-m", "later work")
    result = join()
    assert result.exit_code == 2, result.output
    assert f"nf1prov checkout {CODENAME}" in result.output and committed[:12] in result.output
    run_git(project, "checkout", "--quiet", committed)

    # a run without a study
    client.delete_tag(run_id, search.STUDY_TAG)
    result = join()
    assert result.exit_code == 2 and "nf1prov.search.study" in result.output, result.output
    client.set_tag(run_id, search.STUDY_TAG, search.study_name(run_id))

    # a run that has ended
    client.set_terminated(run_id, "FINISHED")
    result = join()
    assert result.exit_code == 2, result.output
    assert "FINISHED, not RUNNING" in result.output

    assert trial_runs(client, run_id, client.get_run(run_id).info.experiment_id) == []
    study = optuna.load_study(study_name=search.study_name(run_id), storage=storage)
    assert study.get_trials() == []


def test_search_join_runs_trials_the_model_run_then_takes(project, committed, tracking_uri,
                                                          data_root, tmp_path):
    client = mlflow.MlflowClient(tracking_uri)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_id, config = searching_model(client, project, data_root, committed, storage, trials=2)

    result = join("--data-root", str(data_root))
    assert result.exit_code == 0, result.output
    assert "trained trial(s) 0, 1" in result.output

    study = optuna.load_study(study_name=search.study_name(run_id), storage=storage)
    assert [t.state for t in real_trials(study)] == [TrialState.COMPLETE] * 2
    experiment_id = client.get_run(run_id).info.experiment_id
    children = trial_runs(client, run_id, experiment_id)
    assert sorted(r.info.run_name for r in children) == ["trial_0", "trial_1"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags[tracking.HOST] == socket.gethostname() for r in children)
    assert all(r.data.tags[tracking.PID] != str(os.getpid()) for r in children)
    assert client.get_run(run_id).info.status == "RUNNING"  # the model's own process ends it

    # Joining a full study does nothing.
    again = join("--data-root", str(data_root))
    assert again.exit_code == 0 and "nothing to join" in again.output, again.output

    # The model run takes the best of the trials another process trained.
    data = prepare_data(config, data_root, project / ".nf1prov" / "cache")
    with mlflow.start_run(run_id=run_id):
        best = search.finish_search(config, data, study, client)
    parent = client.get_run(run_id)
    assert parent.data.params["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_val_loss"] == best.best_val_loss == study.best_value
    winner = study.best_trial.user_attrs[search_worker.RUN_ID_ATTR]
    theirs = run_model(client, winner).state_dict()
    assert all(torch.equal(run_model(client, run_id).state_dict()[k], v)
               for k, v in theirs.items())


# --- storage, and trials whose worker is gone ------------------------------------------------


def test_storage_comes_from_the_environment_the_config_or_the_workspace(tmp_path, monkeypatch):
    from nf1prov.commands.search_join import study_storage
    from nf1prov.errors import UserError

    monkeypatch.delenv(search.STORAGE_ENV, raising=False)
    config = tiny_config()
    cache = tmp_path / "ws" / ".nf1prov" / "cache"
    assert search.storage_url(config, cache) == \
        f"sqlite:///{tmp_path / 'ws' / '.nf1prov' / 'optuna.db'}"
    config["train"]["search_storage"] = "postgresql+psycopg2://lab@db/optuna"
    assert search.storage_url(config, cache) == "postgresql+psycopg2://lab@db/optuna"
    secret = "postgresql+psycopg2://lab:s3cret@db/optuna"
    monkeypatch.setenv(search.STORAGE_ENV, secret)
    assert search.storage_url(config, cache) == secret
    assert search_worker.masked(secret) == "postgresql+psycopg2://lab:***@db/optuna"
    monkeypatch.setenv(search.STORAGE_ENV, "sqlite:///relative.db")
    with pytest.raises(UserError, match="absolute path"):
        search.storage_url(config, cache)

    # search-join: the tag's URL, completed by the environment's password
    tags = {search.STORAGE_TAG: search_worker.masked(secret)}
    monkeypatch.delenv(search.STORAGE_ENV)
    with pytest.raises(UserError, match=f"password is not recorded.*{search.STORAGE_ENV}"):
        study_storage(tags, CODENAME)
    monkeypatch.setenv(search.STORAGE_ENV, secret)
    assert study_storage(tags, CODENAME) == secret
    monkeypatch.setenv(search.STORAGE_ENV, "postgresql+psycopg2://lab:s3cret@other/optuna")
    with pytest.raises(UserError, match="other/optuna.*but brave-fox-1's study is in"):
        study_storage(tags, CODENAME)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # study.ask() here
def test_a_running_trial_whose_worker_is_gone_counts_as_failed(tracking_uri, tmp_path):
    import subprocess
    import sys

    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("settle")
    parent = client.create_run(experiment_id, run_name=CODENAME)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = search.create_study(storage, parent.info.run_id, experiment_id, 3, 0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    here = socket.gethostname()

    def running_trial(pid: int, status: str | None) -> optuna.trial.Trial:
        trial = study.ask()
        trial.set_user_attr(search_worker.HOST_ATTR, here)
        trial.set_user_attr(search_worker.PID_ATTR, pid)
        if status:
            run = client.create_run(experiment_id, run_name=f"trial_{trial.number}")
            trial.set_user_attr(search_worker.RUN_ID_ATTR, run.info.run_id)
            if status != "RUNNING":
                client.set_terminated(run.info.run_id, status)
        return trial

    killed = running_trial(os.getpid(), "KILLED")  # its run was ended KILLED
    vanished = running_trial(int(dead.stdout), "RUNNING")  # its process is gone
    alive = running_trial(os.getpid(), "RUNNING")  # this process: still working
    still = search.settle_trials(study, client)
    assert [t.number for t in still] == [alive.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {killed.number: TrialState.FAIL, vanished.number: TrialState.FAIL,
                      alive.number: TrialState.RUNNING}
    gone = client.get_run(study.trials[vanished.number].user_attrs[search_worker.RUN_ID_ATTR])
    assert gone.info.status == "FAILED"
    assert f"pid {int(dead.stdout)}" in gone.data.tags[tracking.FAILURE]


def test_workers_share_a_study_in_postgresql(tracking_uri, data_root, tmp_path, postgres,
                                             monkeypatch):
    """A lab's case: the study in PostgreSQL (named by NF1PROV_SEARCH_STORAGE, as on every
    machine that joins), two worker processes."""
    url = postgres.new_database("optuna")
    monkeypatch.setenv(search_worker.STORAGE_ENV, url)
    with mlflow.start_run() as run:
        train_model(tiny_config(trials=2, search_workers=2), data_root,
                    cache_dir=tmp_path / "cache")
    parent = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[search.STORAGE_TAG] == search_worker.masked(url)
    study = optuna.load_study(study_name=search.study_name(run.info.run_id), storage=url)
    trials = real_trials(study)
    assert sorted(t.number for t in trials) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert not (tmp_path / "optuna.db").exists()  # not the workspace's sqlite file


def test_an_unreachable_study_database_is_refused_before_any_commit(project, tracking_uri,
                                                                    monkeypatch):
    monkeypatch.setenv(search_worker.STORAGE_ENV, "postgresql+psycopg2://lab@127.0.0.1:9/optuna")
    run_git(project, "add", "-A")
    run_git(project, "commit", "--quiet", "-m", "project")
    head = run_git(project, "rev-parse", "HEAD")
    result = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml",
                                      "--set", "train.trials=2"])
    assert result.exit_code == 2, result.output
    assert "Cannot open the Optuna storage postgresql+psycopg2://lab@127.0.0.1:9/optuna" \
        in result.output
    assert run_git(project, "rev-parse", "HEAD") == head  # no model commit
    assert tracking.model_runs(tracking.client(tracking_uri)) == []
