"""The outbox queues logging while the store cannot be reached, and delivers it later, in order,
nothing lost. A real client on a port nobody listens on is the unreachable store; a real sqlite
store is the one that comes back (the whole server story is in test_lab_store.py)."""

from __future__ import annotations

import json
import shutil
import socket

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.entities import LoggedModelStatus

from nf1prov import outbox, tracking


def dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connection refused


@pytest.fixture
def impatient(monkeypatch):
    for key, value in tracking.TRAINING_HTTP_SETTINGS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture
def run_id(tracking_uri) -> str:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("outbox")
    return client.create_run(experiment).info.run_id


def test_a_refused_connection_is_unreachable_and_a_refusal_is_not(impatient, tracking_uri):
    with pytest.raises(Exception) as refused:
        mlflow.MlflowClient(dead_uri()).get_run("0" * 32)
    assert outbox.is_unreachable(refused.value)
    with pytest.raises(Exception) as missing:
        mlflow.MlflowClient(tracking_uri).get_run("0" * 32)
    assert not outbox.is_unreachable(missing.value)


def test_queued_logging_arrives_in_order_once_the_store_is_back(impatient, tmp_path,
                                                                tracking_uri, run_id):
    away = outbox.Outbox(mlflow.MlflowClient(dead_uri()), tmp_path / "spool",
                         store=tracking_uri)
    checkpoint = tmp_path / "last.pt"
    for epoch in (1, 2, 3):
        away.log_metrics({"val_loss": 1.0 / epoch}, step=epoch, run_id=run_id)
        checkpoint.write_text(f"checkpoint {epoch}")
        away.log_artifact(checkpoint, "checkpoints", run_id=run_id)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "weights.pt").write_text("w")
    away.log_artifacts(folder, "model", run_id=run_id)
    away.log_params({"train.seed": 0}, run_id=run_id)
    away.log_text("a = 1\n", "config/config.toml", run_id=run_id)
    mlflow_model = tmp_path / "mlflow-model"  # the run's MLflow model, as the trainer saves it
    (mlflow_model / "artifacts").mkdir(parents=True)
    (mlflow_model / "MLmodel").write_text("flavors: {}\n")
    (mlflow_model / "artifacts" / "weights.pt").write_text("w")
    away.log_logged_model(mlflow_model, metrics={"best_val_loss": 0.25}, step=3,
                          params={"tile_size": "32"}, run_id=run_id)
    checkpoint.unlink()  # the caller's files are gone: the spool holds copies
    shutil.rmtree(mlflow_model)
    assert away.finish(run_id, patience_s=0) is False
    # only the newest checkpoint waits; every metric value does
    assert [i["op"] for i in away.pending] == ["batch", "batch", "batch", "file", "folder",
                                               "batch", "text", "logged_model", "end"]
    assert away.summary() == ("3 metric values; 1 params; artifacts checkpoints/last.pt, "
                              "model/, config/config.toml; the MLflow model (the weights); "
                              "the run's end")
    assert outbox.describe_saved(tmp_path / "spool") == away.summary()
    saved = json.loads((tmp_path / "spool" / outbox.PENDING_FILE).read_text())
    assert saved["store"] == tracking_uri

    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    outbox.replay(client, tmp_path / "spool")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert run.data.params["train.seed"] == "0"
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints",
                                                dst_path=str(tmp_path / "down"))
    assert (tmp_path / "down" / "checkpoints" / "last.pt").read_text() == "checkpoint 3"
    assert local
    # MLflow 3 lists the run's logged model "model" (MLmodel, artifacts/) under model/ too
    names = {f.path for f in client.list_artifacts(run_id, "model")}
    assert names == {"model/weights.pt", "model/MLmodel", "model/artifacts"}
    (logged,) = tracking.run_logged_models(client, run_id)  # the run's one, complete
    assert logged.status == LoggedModelStatus.READY and logged.params == {"tile_size": "32"}
    assert [(m.key, m.value, m.step) for m in logged.metrics] == [("best_val_loss", 0.25, 3)]
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    assert {f.path for f in client.list_logged_model_artifacts(logged.model_id)} == {
        "MLmodel", "artifacts"}
    assert not (tmp_path / "spool").exists()


def test_sync_delivers_a_saved_spool_and_says_so(impatient, project, tracking_uri, run_id):
    from nf1prov.cli import cli
    from nf1prov.provenance.preflight import CACHE_DIR

    spool = outbox.spool_dir(project / CACHE_DIR, run_id)
    away = outbox.Outbox(mlflow.MlflowClient(dead_uri()), spool, store=tracking_uri)
    away.log_metrics({"best_val_loss": 0.25}, run_id=run_id)
    assert away.finish(run_id, patience_s=0) is False

    result = CliRunner().invoke(cli, ["sync"])
    assert result.exit_code == 0, result.output
    assert f"run {run_id}: logged 1 metric values; the run's end" in result.output
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_loss"] == 0.25
    again = CliRunner().invoke(cli, ["sync"])
    assert again.exit_code == 0 and "Nothing to sync" in again.output


def test_sync_to_a_store_still_away_keeps_the_spool(impatient, project, tracking_uri, run_id):
    from nf1prov.cli import cli
    from nf1prov.provenance.preflight import CACHE_DIR

    spool = outbox.spool_dir(project / CACHE_DIR, run_id)
    dead = dead_uri()
    away = outbox.Outbox(mlflow.MlflowClient(dead), spool, store=dead)
    away.log_metrics({"best_val_loss": 0.25}, run_id=run_id)
    assert away.finish(run_id, patience_s=0) is False
    result = CliRunner().invoke(cli, ["sync"])
    assert result.exit_code == 2
    assert dead in result.output and (spool / outbox.PENDING_FILE).is_file()


def test_a_value_the_store_refuses_is_raised_not_queued(tmp_path, tracking_uri, run_id):
    box = outbox.Outbox(mlflow.MlflowClient(tracking_uri), tmp_path / "spool")
    box.log_params({"a": "1"}, run_id=run_id)
    with pytest.raises(Exception, match="(?i)param"):
        box.log_params({"a": "2"}, run_id=run_id)  # MLflow params are immutable
    assert box.pending == [] and not (tmp_path / "spool").exists()
