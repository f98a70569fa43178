"""Instance parameters: the thresholds and size a model's labels are made with, chosen on its
validation split after training, logged, and read back by `predict` and `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov.cli import cli
from nf1prov.provenance.models import load_model
from nf1prov.segment.instances import PostProcess, probabilities_to_instances, score, tune
from tests.test_evaluate import log_tiny_model
from tests.test_evaluate import write_field as write_eval_field
from tests.test_trainer import tiny_config, train_in_run


def two_touching_cells():
    """Probabilities of two 10x10 cells side by side whose inner regions meet in a 'neck' of
    inner probability 0.6: seeds at 0.5 merge them, seeds at 0.6 or above keep them apart."""
    mask = np.zeros((1, 14, 26), np.uint16)
    mask[0, 2:12, 2:12] = 1
    mask[0, 2:12, 12:22] = 2
    prob = np.zeros((3, 1, 14, 26), np.float32)
    prob[0] = 0.95
    cells = mask > 0
    prob[0][cells] = 0.05
    prob[1][cells] = 0.9
    prob[1, 0, 2:12, 10:14] = 0.6  # the neck between the two cores, top to bottom
    prob[2][cells] = 0.2
    prob[2, 0, 2:12, 11:13] = 0.55
    return prob, mask


def test_thresholds_decide_whether_touching_cells_are_split():
    prob, mask = two_touching_cells()
    merged = probabilities_to_instances(prob, seed_threshold=0.5, foreground_threshold=0.5)
    split = probabilities_to_instances(prob, seed_threshold=0.7, foreground_threshold=0.5)
    assert merged.max() == 1 and split.max() == 2
    # the merged object overlaps each true cell with IoU 0.5: one match, one cell missed
    assert score(PostProcess(0.5, 0.5, 0), [(prob, mask)])["instance_f1"] == pytest.approx(2 / 3)
    assert score(PostProcess(0.7, 0.5, 0), [(prob, mask)])["instance_f1"] == 1


def test_tune_finds_the_parameters_that_separate_the_cells():
    prob, mask = two_touching_cells()
    chosen, scores = tune([(prob, mask)], PostProcess(0.5, 0.5, 10))
    # 0.6 is the lowest seed threshold that splits the neck (p = 0.6 is not above it): ties go
    # to the values closest to the start
    assert chosen.seed_threshold == 0.6 and scores["instance_f1"] == 1.0
    assert scores == score(chosen, [(prob, mask)])
    # ties go to the values closest to the start: the foreground threshold had no effect here
    # between 0.3 and 0.7 (cells are 0.95 vs 0.05), so it stays at the start's 0.5
    assert chosen.foreground_threshold == 0.5


def test_params_round_trip():
    chosen = PostProcess(0.7, 0.4, 20)
    params = chosen.params()
    assert params == {"instances.seed_threshold": "0.7", "instances.foreground_threshold": "0.4",
                      "instances.min_size": "20"}
    assert PostProcess.from_mapping(params, prefix="instances.") == chosen
    assert PostProcess.from_mapping(json.loads(chosen.to_json())) == chosen
    assert PostProcess.from_mapping({}) is None
    old = PostProcess()  # models trained before: argmax rule
    assert PostProcess.from_mapping(old.params(), prefix="instances.") == old
    assert chosen.replace(min_size=3, seed_threshold=None) == PostProcess(0.7, 0.4, 3)


@pytest.mark.usefixtures("one_thread")
def test_training_chooses_logs_and_predict_reads_them_back(tracking_uri, data_root, tmp_path):
    run_id, _ = train_in_run(tiny_config(epochs=1, max_batches_per_epoch=2), data_root,
                             tmp_path / "cache")
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    chosen = PostProcess.from_mapping(run.data.params, prefix="instances.")
    assert chosen is not None and chosen.seed_threshold is not None
    assert 0 <= run.data.metrics["val_instance_f1"] <= 1
    artifact = Path(client.download_artifacts(run_id, "config/instances.json", str(tmp_path)))
    assert PostProcess.from_mapping(json.loads(artifact.read_text())) == chosen
    # and those of cells as 3-D objects, scored by 3-D IoU on whole validation stacks
    cells = PostProcess.from_mapping(run.data.params, prefix="instances3d.")
    assert cells is not None and cells.dims == 3 and 0 < cells.link_iou <= 1
    assert 0 <= run.data.metrics["val_instance3d_f1"] <= 1
    assert 0 <= run.data.metrics["val_instance3d_ap"] <= 1
    artifact = Path(client.download_artifacts(run_id, "config/instances3d.json", str(tmp_path)))
    assert PostProcess.from_mapping(json.loads(artifact.read_text())) == cells

    # a local model folder in checkout's layout reads config/instances.json and instances3d.json
    local = tmp_path / "checkout"
    for folder in ("model", "config"):
        client.download_artifacts(run_id, folder, str(local))
    loaded = load_model(str(local / "model"), device="cpu")
    assert loaded.postprocess == chosen and loaded.instance_params(3) == cells
    assert load_model(run_id, tracking_uri=tracking_uri, device="cpu").instance_params(3) == cells


def test_predict_and_evaluate_use_the_models_parameters(tracking_uri, tmp_path):
    run_id = log_tiny_model()
    chosen = PostProcess(0.45, 0.35, 3)
    mlflow.MlflowClient().log_batch(run_id, params=[
        mlflow.entities.Param(k, v) for k, v in chosen.params().items()])
    data = tmp_path / "data"
    write_eval_field(data, "NF0014", "C4-2", 1)
    stack = data / "NF0014" / "zstack_images" / "C4-2" / "C4-2_TRANS.tif"

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", "tiny-eel-1", str(stack), "-o", str(out),
                                      "--probabilities-dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "seed threshold 0.45, foreground threshold 0.35, min size 3 px" in result.output
    prob = tifffile.imread(out / "C4-2_TRANS_probabilities.ome.tif")
    labels = tifffile.imread(out / "C4-2_TRANS_labels.ome.tif")
    # a model without 3-D parameters (trained before) makes 3-D cells with its per-slice ones
    np.testing.assert_array_equal(labels, chosen.replace(dims=3).segment(prob, 1.0))
    result = CliRunner().invoke(cli, ["predict", "tiny-eel-1", str(stack), "-o", str(out),
                                      "--instances", "2d", "--no-progress"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(tifffile.imread(out / "C4-2_TRANS_labels.ome.tif"),
                                  chosen.segment(prob))
    # once the model has 3-D parameters, predict makes its cells with them
    cells = PostProcess(0.55, 0.35, 3, dims=3, link_iou=0.3)
    mlflow.MlflowClient().log_batch(run_id, params=[
        mlflow.entities.Param(k, v) for k, v in cells.params().items()])
    result = CliRunner().invoke(cli, ["predict", "tiny-eel-1", str(stack), "-o", str(out),
                                      "--z-ratio", "2", "--no-progress"])
    assert "slices linked at IoU >= 0.3" in result.output, result.output
    np.testing.assert_array_equal(tifffile.imread(out / "C4-2_TRANS_labels.ome.tif"),
                                  cells.segment(prob, 2.0))

    # an option overrides one value and keeps the others
    result = CliRunner().invoke(cli, ["predict", "tiny-eel-1", str(stack), "-o", str(out),
                                      "--seed-threshold", "0.8", "--no-progress"])
    assert "seed threshold 0.8, foreground threshold 0.35, min size 3 px" in result.output

    result = CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(data),
                                      "--no-progress", "--no-log"])
    assert result.exit_code == 0, result.output
    assert "seed threshold 0.45, foreground threshold 0.35, min size 3 px" in result.output


def test_evaluate_takes_a_data_root_holding_only_the_holdout_patients(tracking_uri, tmp_path):
    log_tiny_model(holdout=("NF0014",))
    holdout_only = tmp_path / "holdout"
    write_eval_field(holdout_only, "NF0014_T1", "C4-2", 1)
    write_eval_field(holdout_only, "NF0014_T2", "B2-1", 2)
    result = CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(holdout_only),
                                      "--baseline", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "on 2 stack(s) of NF0014" in result.output
    metrics = mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()])[0].data.metrics
    assert 0 <= metrics["holdout_instance_f1"] <= 1
