"""Models that MLflow's own API loads and serves (DESIGN 3.11): one tiny committed model,
trained once for the module on a real sqlite store, loaded with `mlflow.pyfunc.load_model`
by ``runs:/``, ``models:/<name>@<alias>``, ``models:/<name>/<version>`` and
``models:/<model_id>``, compared with what `nf1prov predict` writes; `mlflow models serve`
answering a JSON request; a tampered weights file refused; a model trained before (a plain
``model/`` artifact, no MLflow model) registered and then loaded the same way."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from mlflow.exceptions import MlflowException

from nf1prov import tracking
from nf1prov.cli import cli
from nf1prov.errors import UserError
from tests.conftest import train_once, use_workspace


def invoke(*args, expect=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.output, result.exception)
    return result


@dataclass(frozen=True)
class Trained:
    repo: Path
    uri: str
    codename: str
    run_id: str
    stack: Path  # a real stack of the data, a copy outside the data root
    experiment: str  # its experiment's name: the registered model's


def train_model(repo: Path) -> dict:
    out = invoke("train", "--config", "configs/tiny.toml", "--json").stdout
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="module")
def _workspace(tmp_path_factory, _migrated_store, data_root):
    """One tiny committed model trained with `nf1prov train` (`train_once`), a stack of its
    data copied beside it, and its experiment's name."""
    import mlflow

    def train_with_a_stack_beside(repo: Path) -> dict:
        shutil.copyfile(next(Path(data_root).rglob("*.tif*")), repo.parent / "stack.tif")
        return train_model(repo)

    base, record = train_once(tmp_path_factory, _migrated_store, data_root, "mlflow-model",
                              train_with_a_stack_beside)
    client = mlflow.MlflowClient(f"sqlite:///{base / 'mlflow.db'}")
    experiment = client.get_experiment(client.get_run(record["run_id"]).info.experiment_id).name
    return base, record["codename"], record["run_id"], experiment


@pytest.fixture
def trained(_workspace, tmp_path, monkeypatch) -> Trained:
    base, codename, run_id, experiment = _workspace
    uri = use_workspace(base, tmp_path, monkeypatch)
    return Trained(tmp_path / "repo", uri, codename, run_id, tmp_path / "stack.tif", experiment)


def nf1prov_probabilities(model: str, stack: Path, out: Path) -> np.ndarray:
    """What `nf1prov predict MODEL STACK` writes as probabilities, float32 (3, Z, H, W)."""
    invoke("predict", model, stack, "-o", out, "--no-progress")
    return tifffile.imread(next(out.glob("*_probabilities*.tif")))


def test_mlflow_loads_the_model_by_every_uri_and_predicts_what_nf1prov_predict_writes(
        trained, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    printed = invoke("register", trained.codename, "--alias", "champion").output
    logged = tracking.run_logged_model(client, trained.run_id)
    assert logged is not None and f"models:/{logged.model_id}" in printed
    version = client.get_model_version_by_alias(trained.experiment, "champion")
    assert version.source == f"models:/{logged.model_id}" and version.run_id == trained.run_id
    assert version.tags[tracking.CODENAME] == trained.codename

    stack = tifffile.imread(trained.stack)
    assert stack.ndim == 3 and stack.dtype.kind == "u"
    expected = nf1prov_probabilities(trained.codename, trained.stack, tmp_path / "out")
    for uri in (f"runs:/{trained.run_id}/model", f"models:/{trained.experiment}@champion",
                f"models:/{trained.experiment}/{version.version}", f"models:/{logged.model_id}"):
        model = mlflow.pyfunc.load_model(uri)
        got = model.predict(stack)
        assert got.dtype == np.float32 and got.shape == (3, *stack.shape), uri
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=uri)
    # numbers as JSON gives them (signed integers) are read as the training dtype; a 2-D image
    # is one slice
    np.testing.assert_allclose(model.predict(stack.astype(np.int64)), expected, atol=1e-4)
    assert model.predict(stack[0]).shape == (3, 1, *stack.shape[1:])
    with pytest.raises(MlflowException, match="outside the uint16 range") as refused:
        model.predict(np.full((1, 16, 16), -1, np.int64))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # served: HTTP 400
    assert model.metadata.model_id == logged.model_id
    assert json.loads(client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"]) \
        == [{"name": trained.experiment, "version": version.version}]  # the UI: registered

    # what MLflow shows of it: signature, input example, the model's settings and metrics
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.signature.outputs.to_dict()[0]["tensor-spec"] == {
        "dtype": "float32", "shape": (3, -1, -1, -1)}
    assert info.saved_input_example_info["type"] == "ndarray"
    assert info.metadata["nf1prov"] == {"codename": trained.codename,
                                        "commit": version.tags[tracking.MODEL_COMMIT],
                                        "run_id": trained.run_id}
    mlmodel = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{logged.artifact_location}/MLmodel", dst_path=str(tmp_path / "mlmodel")))
    # the code MLflow runs is the file from the model's commit (the training ran that code)
    commit = version.tags[tracking.MODEL_COMMIT]
    assert re.search(rf"model_code_path: \S*nf1prov-code-{commit[:12]}\S*/nf1prov/segment/"
                     "mlflow_pyfunc.py", mlmodel.read_text())
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
    assert {"mlflow_pyfunc.py", "artifacts"} <= files and not [f for f in files if "pkl" in f]
    stored = Path(logged.artifact_location.removeprefix("file://")) / "mlflow_pyfunc.py"
    assert stored.stat().st_mode & 0o200  # not the checkout's read-only mode: downloads overwrite
    logged = client.get_logged_model(logged.model_id)
    assert logged.params["tile_size"] == "32" and "instances.min_size" in logged.params
    linked = {m.key: m for m in logged.metrics}
    run = client.get_run(trained.run_id)
    assert linked["best_val_dice_total"].value == run.data.metrics["best_val_dice_total"]
    # the parameters of 3-D cells ride with the model too (tiny.toml: the config's, untuned)
    assert logged.params["instances3d.link_iou"] == run.data.params["instances3d.link_iou"]
    manifest = next(d.dataset for d in run.inputs.dataset_inputs
                    if d.dataset.name == "split_manifest")
    assert linked["best_val_dice_total"].dataset_digest == manifest.digest
    ranked = client.search_logged_models(
        [run.info.experiment_id], order_by=[{"field_name": "metrics.best_val_dice_total",
                                             "ascending": False}])
    assert [m.model_id for m in ranked] == [logged.model_id]
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND_MODELS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_probabilities(model_uri: str, tracking_uri: str, stack: np.ndarray, log: Path,
                         env: dict[str, str] | None = None) -> np.ndarray:
    """What `mlflow models serve -m MODEL_URI --env-manager local` (``MLFLOW_TRACKING_URI``:
    ``tracking_uri``; the rest of the environment ``env``, default this process's) answers
    at /invocations for the JSON request ``{"inputs": stack}``; its output goes to ``log``."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = dict(os.environ if env is None else env)
    # MLflow runs `uvicorn` from PATH: the environment's, as an activated one would give
    env.update(MLFLOW_TRACKING_URI=tracking_uri,
               PATH=f"{mlflow_cli.parent}{os.pathsep}{env.get('PATH', '')}")
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps({"inputs": stack.tolist()}).encode(),
        headers={"Content-Type": "application/json"})
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with no_proxy.open(request, timeout=60) as response:
                    return np.asarray(json.loads(response.read())["predictions"], np.float32)
            except OSError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and the uvicorn it started
        server.wait()


def test_mlflow_models_serve_scores_a_json_request(trained, tmp_path):
    import mlflow

    invoke("register", trained.codename, "--alias", "champion")
    stack = tifffile.imread(trained.stack)[:2, :40, :48]
    uri = f"models:/{trained.experiment}@champion"
    expected = mlflow.pyfunc.load_model(uri).predict(stack)
    np.testing.assert_allclose(served_probabilities(uri, trained.uri, stack,
                                                    tmp_path / "serve.log"), expected, atol=1e-4)


class Payload:
    """What a tampered weights file would run when unpickled: it writes a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_weights_file_holding_code_is_refused_through_mlflow(trained, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    logged = tracking.run_logged_model(client, trained.run_id)
    weights = Path(logged.artifact_location.removeprefix("file://")) / "artifacts" / "weights.pt"
    assert weights.is_file()
    marker = tmp_path / "ran.txt"
    weights.write_bytes(pickle.dumps({"conv.weight": Payload(marker)}))
    with pytest.raises(Exception, match="not tensors only"):
        mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")
    assert not marker.exists()


def test_load_model_finds_the_store_by_uri_or_environment(trained, monkeypatch):
    from nf1prov.provenance.models import load_model

    assert load_model(trained.codename, tracking_uri=trained.uri, device="cpu").run_id \
        == trained.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    assert load_model(trained.codename, device="cpu").codename == trained.codename
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        load_model(trained.codename, device="cpu")


def make_it_old(client, run_id: str, tmp_path: Path) -> None:
    """Turn the run into one trained before MLflow models: its weights and architecture as the
    plain run artifact model/, no logged model."""
    import mlflow

    from nf1prov import weights

    logged = tracking.run_logged_model(client, run_id)
    folder = weights.model_files(Path(mlflow.artifacts.download_artifacts(
        f"models:/{logged.model_id}", dst_path=str(tmp_path / "logged"))))
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (weights.WEIGHTS_FILE, weights.ARCHITECTURE_FILE):
        shutil.copyfile(folder / name, plain / name)
    client.log_artifacts(run_id, str(plain), "model")
    client.delete_logged_model(logged.model_id)
    assert tracking.run_logged_model(client, run_id) is None


def test_a_model_trained_before_gets_its_mlflow_model_when_registered(trained, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    make_it_old(client, trained.run_id, tmp_path)
    expected = nf1prov_probabilities(trained.codename, trained.stack, tmp_path / "before")

    # registered as nf1prov registered models before: a version whose source is runs:/
    client.create_registered_model(trained.experiment)
    client.create_model_version(trained.experiment, f"runs:/{trained.run_id}/model",
                                run_id=trained.run_id)
    client.set_registered_model_alias(trained.experiment, "champion", "1")

    printed = invoke("register", trained.codename).output
    assert "made now from its model/ artifact" in printed
    assert "registered as" in printed and "version 2 (replacing version 1" in printed
    logged = tracking.run_logged_model(client, trained.run_id)
    champion = client.get_model_version_by_alias(trained.experiment, "champion")
    assert (str(champion.version), champion.source) == ("2", f"models:/{logged.model_id}")
    got = mlflow.pyfunc.load_model(f"models:/{trained.experiment}@champion").predict(
        tifffile.imread(trained.stack))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # and nf1prov itself reads the run as before
    np.testing.assert_allclose(
        nf1prov_probabilities(trained.codename, trained.stack, tmp_path / "after"), expected,
        atol=0)
    assert "already registered" in invoke("register", trained.codename).output
    assert len(tracking.run_logged_models(client, trained.run_id)) == 1

    # checked out, the run's own model/ and its logged model make one folder, each file once
    from nf1prov.provenance.checkout import download_artifacts

    files = download_artifacts(client, client.get_run(trained.run_id), tmp_path / "checkout")
    assert len(files) == len(set(files)) and "model/artifacts/weights.pt" in files
    np.testing.assert_allclose(
        nf1prov_probabilities(str(tmp_path / "checkout" / "model"), trained.stack,
                              tmp_path / "from-folder"), expected, atol=0)


def test_delivering_a_logged_model_again_completes_it_once(trained, tmp_path):
    import mlflow

    from nf1prov.segment import mlflow_model

    client = mlflow.MlflowClient(trained.uri)
    first = tracking.run_logged_model(client, trained.run_id)
    saved = Path(mlflow.artifacts.download_artifacts(f"models:/{first.model_id}",
                                                     dst_path=str(tmp_path / "saved")))
    assert (saved / "MLmodel").is_file() and mlflow_model.SETTINGS_FILE in os.listdir(
        saved / "artifacts")
    upload = uuid.uuid4().hex
    again = [tracking.log_logged_model(client, trained.run_id, saved, upload=upload)
             for _ in range(2)]
    assert again[0] == again[1] != first.model_id
    # the earlier upload is gone: runs:/<id>/model means the new one
    assert [m.model_id for m in tracking.run_logged_models(client, trained.run_id)] \
        == [again[0]]
