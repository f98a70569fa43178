"""`nf1prov register` and `models:/` URIs on a real sqlite store: register, move an alias,
predict and evaluate by alias, the catalogue's Registered line, and the refusals."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov import catalog, tracking
from nf1prov.cli import cli
from nf1prov.share import registry
from tests.test_evaluate import dataset, log_tiny_model  # noqa: F401 - a fixture

EXPERIMENT = "nf1-test"  # log_tiny_model's experiment: the registered model's name


def invoke(*args, expect=0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == expect, (result.output, result.exception)
    return result.output


def test_register_moves_the_alias_and_predict_takes_it(tracking_uri, dataset, tmp_path):  # noqa: F811
    first, second = log_tiny_model("tiny-eel-1"), log_tiny_model("tiny-eel-2")
    client = mlflow.MlflowClient()

    out = invoke("register", "tiny-eel-1", "--alias", "champion")
    assert f"registered as {EXPERIMENT} version 1" in out
    assert f"models:/{EXPERIMENT}@champion" in out
    assert "already registered as" in invoke("register", "tiny-eel-1")  # one version per model
    version = client.get_model_version(EXPERIMENT, "1")
    # a model logged before MLflow models gets one when registered: the version is it
    assert "made now from its model/ artifact" in out
    logged = tracking.run_logged_model(client, first)
    assert version.run_id == first and version.source == f"models:/{logged.model_id}"
    assert version.tags[registry.CODENAME_TAG] == "tiny-eel-1"
    assert version.tags[registry.COMMIT_TAG] == "0" * 40

    out = invoke("register", "tiny-eel-2", "--alias", "champion")  # moves to version 2
    assert "alias @champion now on it, moved from version 1" in out
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").run_id == second
    missing = invoke("predict", f"models:/{EXPERIMENT}/9", "x.tif", "-o", "out", expect=2)
    assert f"{EXPERIMENT} has versions 1, 2; aliases @champion (v2)" in missing
    assert len(client.search_model_versions(f"name = '{EXPERIMENT}'")) == 2

    stack = dataset / "NF0016" / "zstack_images" / "C4-2" / "C4-2_TRANS.tif"
    labels = {}
    for ref in (f"models:/{EXPERIMENT}@champion", "tiny-eel-2", f"models:/{EXPERIMENT}/1"):
        out_dir = tmp_path / ref.replace("/", "_").replace(":", "").replace("@", "_")
        invoke("predict", ref, str(stack), "-o", str(out_dir), "--no-progress")
        labels[ref] = tifffile.imread(out_dir / "C4-2_TRANS_labels.ome.tif")
    np.testing.assert_array_equal(labels[f"models:/{EXPERIMENT}@champion"], labels["tiny-eel-2"])
    invoke("evaluate", f"models:/{EXPERIMENT}@champion", "--data-root", str(dataset),
           "--patients", "NF0016", "--no-progress", "--no-log")

    labels_by_run = registry.labels_by_run(client)
    assert labels_by_run == {first: [f"{EXPERIMENT} v1"], second: [f"{EXPERIMENT} v2 @champion"]}
    readme = tmp_path / "README.md"
    readme.write_text(f"# Models\n\n{catalog.BEGIN_MARKER}\n{catalog.END_MARKER}\n")
    block = catalog.rebuild(readme, catalog.fetch_runs(client), tracking_uri=tracking_uri,
                            registered=labels_by_run).new_block
    assert f"- **Registered:** {EXPERIMENT} v2 @champion" in block
    assert f"- **Registered:** {EXPERIMENT} v1\n" in block


@pytest.mark.parametrize(("args", "message"), [
    (("tiny-eel-1", "--alias", "latest"), "not one MLflow accepts"),
    (("tiny-eel-1", "--alias", "v2"), "not one MLflow accepts"),
    (("missing-eel-9",), "No model named"),
    ((f"models:/{EXPERIMENT}@nobody",), "names no model version"),
])
def test_refusals_name_the_value_and_the_fix(tracking_uri, args, message):
    log_tiny_model("tiny-eel-1")
    result = CliRunner().invoke(cli, ["register", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert mlflow.MlflowClient().search_registered_models() == []


def test_only_finished_committed_models_are_registered(tracking_uri):
    run_id = log_tiny_model("tiny-eel-1")
    client = mlflow.MlflowClient()
    client.set_tag(run_id, tracking.KIND, tracking.KIND_SCRATCH)
    assert "scratch run" in invoke("register", run_id, expect=2)
    client.set_tag(run_id, tracking.KIND, tracking.KIND_MODEL)
    client.update_run(run_id, status="FAILED")
    assert "FAILED, not FINISHED" in invoke("register", "tiny-eel-1", expect=2)
    assert client.search_registered_models() == []
