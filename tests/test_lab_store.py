"""A lab's shared store, tried as a lab runs it: `mlflow server` on PostgreSQL 15 with its
artifacts in S3 (moto), a bare git remote, collaborators' clones that hold no S3 credentials.

- eight trainings from two collaborators at the same moment on a brand-new server, all pushed,
  each model an MLflow model in the object store; a third, fresh clone rebuilds the catalogue
  from the server, checks a model out (its tag fetched, its weights from the object store
  through the server) and predicts with it, by codename and from the checked-out folder;
  registered, MLflow's own API loads it by ``runs:/`` and ``models:/`` URIs and `mlflow models
  serve` scores a request with the same probabilities (DESIGN 3.11);
- the server going away in the middle of a training: the training goes on, what it could not
  log (the MLflow model too) arrives when the server is back, or waits in the outbox for
  `nf1prov sync`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov import tracking
from nf1prov.cli import cli
from tests.conftest import run_git, tiny_config
from tests.test_lab_servers import SERVER_SIDE_VARS
from tests.test_mlflow_model import served_probabilities
from tests.test_provenance_flow import BIN, assert_contract

pytestmark = pytest.mark.usefixtures("one_thread")


def client_env(uri: str, **extra: str) -> dict[str, str]:
    """A collaborator's environment: the server's URI and nothing of S3 (no credentials, no
    endpoint: artifacts go through the server)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra)
    return env


def start(cwd, uri, *args, **extra):
    """`nf1prov ARGS` as a process of its own, its output in files: a pipe nobody reads
    while the test waits would fill up (MLflow warns at every retry while a server is away)
    and stop the training at its next line."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([str(BIN / "nf1prov"), *args], cwd=cwd,
                            env=client_env(uri, **extra), stdout=out, stderr=err, text=True)
    proc.output_files = (out, err)
    return proc


def finish(proc, expect=0, timeout=600):
    proc.wait(timeout=timeout)
    out, err = (read_back(f) for f in proc.output_files)
    assert proc.returncode == expect, f"{proc.args}\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def read_back(handle) -> str:
    handle.seek(0)
    text = handle.read()
    handle.close()
    return text


@contextlib.contextmanager
def fluent_store(uri: str):
    """MLflow's fluent API (``mlflow.pyfunc.load_model``, the CLI's calls) on the store at
    ``uri`` for a while."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def nf1prov(cwd, uri, *args, expect=0):
    """`nf1prov ARGS` in ``cwd`` as a collaborator runs it (the server's URI, no S3 settings),
    by this process's CLI: a fresh interpreter would spend 2-3 s importing mlflow first. (The
    trainings run as processes of their own: `start`.) Returns (stdout, stderr)."""
    env = client_env(uri)
    # what client_env leaves out is unset while the command runs (CliRunner: None unsets)
    env = {**{k: None for k in os.environ if k not in env},
           **{k: env[k] for k in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}}
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with fluent_store(uri):
            result = CliRunner().invoke(cli, list(args), env=env)
    finally:
        os.chdir(here)
    assert result.exit_code == expect, (args, result.stdout[-2000:], result.stderr[-4000:],
                                        result.exception)
    return result.stdout, result.stderr


@pytest.fixture
def lab(project, tmp_path):
    """The project pushed to a bare 'lab' remote; a collaborator's clone of it."""
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")
    remote = tmp_path / "lab.git"
    run_git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(remote))
    run_git(project, "remote", "add", "origin", str(remote))
    run_git(project, "push", "--quiet", "-u", "origin", "HEAD:main")
    colleague = tmp_path / "colleague"
    run_git(tmp_path, "clone", "--quiet", str(remote), str(colleague))
    return project, colleague, remote


def the_mlflow_model(client, run_id: str):
    """The run's one MLflow logged model: named "model", READY, the run's one model output."""
    from mlflow.entities import LoggedModelStatus

    models = tracking.run_logged_models(client, run_id)
    assert [(m.name, m.status) for m in models] == [("model", LoggedModelStatus.READY)], models
    outputs = client.get_run(run_id).outputs
    assert [o.model_id for o in outputs.model_outputs] == [models[0].model_id]
    return models[0]


def bucket_files(mlflow_server, logged) -> dict[str, bytes]:
    """The files of logged model ``logged`` in the server's bucket (path in the model: bytes),
    where `mlflow server --artifacts-destination` keeps ``mlflow-artifacts:/`` locations."""
    location = logged.artifact_location
    assert location.startswith("mlflow-artifacts:/"), location  # the server's, not a local path
    prefix = location.removeprefix("mlflow-artifacts:/").strip("/")
    prefix = f"{mlflow_server.artifacts_destination.split('/', 3)[3]}/{prefix}/"
    s3 = mlflow_server.s3.client()
    return {key.removeprefix(prefix): s3.get_object(Bucket=mlflow_server.bucket,
                                                    Key=key)["Body"].read()
            for key in mlflow_server.artifact_keys(prefix)}


def probabilities(out) -> np.ndarray:
    """The probabilities `nf1prov predict` wrote into ``out``, float32 (3, Z, H, W)."""
    (path,) = out.glob("*_probabilities*.tif")
    return tifffile.imread(path)


def test_eight_first_trainings_at_once_on_a_fresh_server_then_a_clone_checks_out(
        lab, mlflow_server, data_root, tmp_path, monkeypatch):
    alice, bob, remote = lab
    uri = mlflow_server.uri
    procs = [start(clone, uri, "train", "--config", "configs/tiny.toml", "--push")
             for _ in range(4) for clone in (alice, bob)]
    for proc in procs:
        finish(proc)

    client = tracking.client(uri)
    runs = tracking.model_runs(client)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    codenames = {r.info.run_name for r in runs}
    assert len(codenames) == 8
    assert len(client.search_experiments()) == 2  # Default and "flow", each created once
    for run in runs:
        assert [i.tags[0].value for i in run.inputs.dataset_inputs] == ["training"]
        # every model's tag reached the lab remote, pointing at its own commit
        sha = run.data.tags[tracking.GIT_COMMIT]
        assert run_git(remote, "rev-parse", f"model/{run.info.run_name}^{{commit}}") == sha
    shas = {run.data.tags[tracking.GIT_COMMIT] for run in runs}
    assert len(shas) == 8
    # each model is an MLflow model whose files (weights too) are in the object store, put
    # there through the server; none was written to a local disk
    for run in runs:
        files = bucket_files(mlflow_server, the_mlflow_model(client, run.info.run_id))
        assert {"MLmodel", "mlflow_pyfunc.py", "artifacts/weights.pt",
                "artifacts/architecture.json"} <= set(files), run.info.run_id
    assert not list(tmp_path.rglob("weights.pt")) and not list(tmp_path.rglob("mlartifacts"))

    # A newcomer's fresh clone: the catalogue from the server, a model checked out, used.
    newcomer = tmp_path / "newcomer"
    run_git(tmp_path, "clone", "--quiet", str(remote), str(newcomer))
    nf1prov(newcomer, uri, "catalog")
    readme = (newcomer / "README.md").read_text()
    assert all(name in readme for name in codenames)
    chosen = sorted(codenames)[0]
    run = next(r for r in runs if r.info.run_name == chosen)
    assert_contract(client, alice if run_git(alice, "tag", "--list", f"model/{chosen}")
                    else bob, run.info.run_id)
    out, _ = nf1prov(newcomer, uri, "checkout", chosen, "--worktree", str(tmp_path / "wt"))
    assert run_git(tmp_path / "wt", "rev-parse", "HEAD") == run.data.tags[tracking.GIT_COMMIT]
    # the checked-out model/ is the MLflow model: MLmodel, its weights under artifacts/
    folder = tmp_path / "wt" / ".nf1prov" / "models" / chosen / "model"
    assert (folder / "MLmodel").is_file()
    logged = the_mlflow_model(client, run.info.run_id)
    assert (folder / "artifacts" / "weights.pt").read_bytes() \
        == bucket_files(mlflow_server, logged)["artifacts/weights.pt"]
    stack = tmp_path / "stack.tif"
    shutil.copyfile(next(data_root.rglob("*_TRANS.tif")), stack)
    nf1prov(newcomer, uri, "predict", chosen, str(stack), "-o", str(tmp_path / "out"))
    assert (tmp_path / "out" / "stack_labels.ome.tif").is_file()
    expected = probabilities(tmp_path / "out")
    nf1prov(tmp_path / "wt", uri, "predict", f".nf1prov/models/{chosen}/model", str(stack),
            "-o", str(tmp_path / "from-folder"))
    np.testing.assert_array_equal(probabilities(tmp_path / "from-folder"), expected)

    # MLflow's own API, through the server, with no S3 settings here either: by run, and by
    # alias once registered; `mlflow models serve` answers a JSON request the same
    import mlflow

    for var in SERVER_SIDE_VARS:
        monkeypatch.delenv(var, raising=False)
    out, _ = nf1prov(newcomer, uri, "register", chosen, "--alias", "champion")
    assert f"models:/{logged.model_id}" in out
    registered = client.get_experiment(run.info.experiment_id).name
    image = tifffile.imread(stack)
    for model_uri in (f"runs:/{run.info.run_id}/model", f"models:/{registered}@champion"):
        with fluent_store(uri):
            model = mlflow.pyfunc.load_model(model_uri, model_config={"device": "cpu"})
        got = model.predict(image)
        assert got.dtype == np.float32, model_uri
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=model_uri)
    served = served_probabilities(f"models:/{registered}@champion", uri, image,
                                  tmp_path / "serve.log", env=client_env(uri))
    np.testing.assert_allclose(served, expected, atol=1e-4)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def outage_project(project, data_root, epochs: int):
    (project / "configs" / "tiny.toml").write_text(
        tiny_config(data_root, epochs=epochs, patience=epochs))
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")


def epochs_logged(client, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "val_loss")]


EPOCHS = 12  # tiny epochs: the server goes away after the first, the training outlasts that


def test_a_server_that_goes_away_mid_training_loses_nothing(project, data_root, mlflow_server):
    outage_project(project, data_root, epochs=EPOCHS)
    uri = mlflow_server.uri
    client = tracking.client(uri)
    outbox_root = project / ".nf1prov" / "outbox"

    # 1. The server dies after the first epoch and is back before the training gives up.
    proc = start(project, uri, "train", "--config", "configs/tiny.toml",
                 NF1PROV_STORE_PATIENCE_S="300")
    wait_for(lambda: any(epochs_logged(client, r.info.run_id)
                         for r in tracking.model_runs(client)), 300, "epoch 1's metrics")
    (run,) = tracking.model_runs(client)
    mlflow_server.kill()
    # the training goes on: its logging waits in the outbox (a copy of each checkpoint)
    queued = outbox_root / run.info.run_id / "files"
    wait_for(lambda: queued.is_dir() or proc.poll() is not None, 120,
             "the training to queue its logging")
    assert queued.is_dir(), f"the training ended before the server went away: {finish(proc)}"
    mlflow_server.start()
    out, err = finish(proc)
    assert "did not answer for" in err and run.info.run_name in out
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, run.info.run_id) == list(range(1, EPOCHS + 1))
    the_mlflow_model(client, run.info.run_id)  # the weights: queued, then logged
    assert not (outbox_root / run.info.run_id).exists()

    # 2. The server stays away past the training's patience: exit 2, nothing lost, and
    #    `nf1prov sync` delivers it all once the server is back.
    proc = start(project, uri, "train", "--config", "configs/tiny.toml",
                 NF1PROV_STORE_PATIENCE_S="1")
    wait_for(lambda: len(tracking.model_runs(client)) == 2, 300, "the second run")
    second = next(r for r in tracking.model_runs(client) if r.info.run_id != run.info.run_id)
    wait_for(lambda: epochs_logged(client, second.info.run_id), 300, "epoch 1's metrics")
    mlflow_server.kill()
    out, err = finish(proc, expect=2)
    spool = outbox_root / second.info.run_id
    assert "Nothing is lost" in err and str(spool) in err and "nf1prov sync" in err
    assert "the MLflow model (the weights)" in err
    assert (spool / "pending.json").is_file()
    assert list(spool.glob("files/*/model/MLmodel"))  # a copy: the training's is gone
    tag = f"model/{second.info.run_name}"
    assert run_git(project, "tag", "--list", tag) == tag  # the model and its commit stay

    _, err = nf1prov(project, uri, "sync", expect=2)  # still away: said, spool kept
    assert "stays in" in err and (spool / "pending.json").is_file()
    mlflow_server.start()
    # before the sync: this clone knows the run trained and waits; --reap leaves it alone
    out, err = nf1prov(project, uri, "list", "--reap", "--format", "csv")
    sha = client.get_run(second.info.run_id).data.tags[tracking.GIT_COMMIT]  # read now: it
    assert f"WAITING,model,{sha}" in out  # was tagged after `second` was first read
    assert "run `nf1prov sync`" in err
    out, _ = nf1prov(project, uri, "sync")
    assert f"run {second.info.run_id}: logged" in out and "the MLflow model" in out
    second = client.get_run(second.info.run_id)
    assert second.info.status == "FINISHED"
    assert epochs_logged(client, second.info.run_id) == list(range(1, EPOCHS + 1))
    assert "best_val_loss" in second.data.metrics
    logged = the_mlflow_model(client, second.info.run_id)
    assert {m.key for m in client.get_logged_model(logged.model_id).metrics} >= {
        "best_val_loss", "best_val_dice_total"}
    assert not spool.exists()
    import mlflow

    with fluent_store(uri):
        model = mlflow.pyfunc.load_model(f"runs:/{second.info.run_id}/model",
                                         model_config={"device": "cpu"})
    stack = tifffile.imread(next(data_root.rglob("*_TRANS.tif")))
    assert model.predict(stack).shape == (3, *stack.shape)


def test_a_server_that_goes_away_before_the_first_epoch_holds_the_start(
        project, data_root, mlflow_server):
    """The calls the training needs answered before it can start (environment, the run, its
    params, the dataset input) wait for the server instead of failing the training."""
    outage_project(project, data_root, epochs=2)
    uri = mlflow_server.uri
    client = tracking.client(uri)
    proc = start(project, uri, "train", "--config", "configs/tiny.toml",
                 NF1PROV_STORE_PATIENCE_S="300")
    # the run tagged with its commit: `train` now starts the training process
    wait_for(lambda: any(tracking.GIT_COMMIT in r.data.tags for r in tracking.model_runs(client)),
             300, "the model commit")
    mlflow_server.kill()  # the training process is still starting (imports, code snapshot)
    time.sleep(3)
    mlflow_server.start()
    out, err = finish(proc)
    (run,) = tracking.model_runs(client)
    assert run.info.status == "FINISHED" and epochs_logged(client, run.info.run_id) == [1, 2]
    assert "nf1prov.env.python" in run.data.tags and "train.seed" in run.data.params
    assert "the tracking store does not answer" in err or "did not answer for" in err, err
