"""The lab-server fixtures themselves: PostgreSQL databases, S3 buckets and an `mlflow server`
that keeps artifacts in S3 for clients with no AWS credentials, and comes back after a stop."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.lab_servers import missing

# What a client of the tracking server must not need (the server holds the S3 settings).
SERVER_SIDE_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_PROFILE", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")


def test_missing_piece_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="initdb is missing"):
        missing("initdb is missing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="initdb is missing.*CI=true"):
        missing("initdb is missing")


def test_new_database_is_fresh_and_empty(postgres):
    import sqlalchemy

    first, second = postgres.new_database("Some Hint!"), postgres.new_database("Some Hint!")
    assert first != second
    assert first.startswith("postgresql+psycopg2://")
    engine = sqlalchemy.create_engine(first)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def health(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def test_mlflow_server_keeps_artifacts_in_s3_and_comes_back_after_stop(
        mlflow_server, tmp_path, monkeypatch):
    import mlflow

    for var in SERVER_SIDE_VARS:
        monkeypatch.delenv(var, raising=False)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("lab")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "width", 4)
    client.log_metric(run_id, "dice", 0.5, step=0)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00\x01weights" * 100)
    client.log_artifact(run_id, str(weights), "model")

    keys = mlflow_server.artifact_keys("artifacts/")
    assert f"artifacts/{experiment_id}/{run_id}/artifacts/model/weights.bin" in keys, keys
    body = mlflow_server.s3.client().get_object(
        Bucket=mlflow_server.bucket,
        Key=f"artifacts/{experiment_id}/{run_id}/artifacts/model/weights.bin")["Body"].read()
    assert body == weights.read_bytes()

    mlflow_server.stop()
    assert not mlflow_server.running and not health(mlflow_server.uri)
    mlflow_server.start()
    assert health(mlflow_server.uri)

    client.log_metric(run_id, "dice", 0.75, step=1)
    client.set_terminated(run_id)
    run = client.get_run(run_id)
    assert run.data.params == {"width": "4"} and run.data.metrics["dice"] == 0.75
    assert run.info.status == "FINISHED"
    downloaded = client.download_artifacts(run_id, "model/weights.bin", str(tmp_path / "back"))
    assert open(downloaded, "rb").read() == weights.read_bytes()
