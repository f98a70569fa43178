"""Instance and semantic metrics against hand-made label images, and `nf1prov evaluate` on a
real sqlite MLflow store with a tiny hand-logged model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nf1prov.segment.evaluate import (
    THRESHOLDS,
    count_matches,
    instance_counts,
    instance_scores,
    semantic_counts,
    semantic_scores,
)


def squares(shape, boxes):
    """Label image with label i+1 on box i = (y0, y1, x0, x1)."""
    labels = np.zeros(shape, np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        labels[y0:y1, x0:x1] = i + 1
    return labels


CELLS = [(0, 10, 0, 10), (0, 10, 20, 30), (20, 30, 0, 10)]


def scores(true, pred):
    return instance_scores(instance_counts(true, pred))


def test_perfect_match():
    true = squares((40, 40), CELLS)
    pred = true * 7  # label values do not matter
    s = scores(true, pred)
    assert s == {"instance_precision": 1.0, "instance_recall": 1.0, "instance_f1": 1.0,
                 "instance_ap50": 1.0, "instance_ap": 1.0}


def test_one_missed_cell():
    true = squares((40, 40), CELLS)
    pred = squares((40, 40), CELLS[:2])
    counts = instance_counts(true, pred)
    assert (counts == [2, 0, 1]).all()  # every threshold: TP 2, FP 0, FN 1
    s = instance_scores(counts)
    assert s["instance_precision"] == 1.0
    assert s["instance_recall"] == pytest.approx(2 / 3)
    assert s["instance_f1"] == pytest.approx(0.8)
    assert s["instance_ap"] == pytest.approx(2 / 3)


def test_one_split_cell():
    # cell 1 is split into a 10x6 part (IoU 0.6) and a 10x4 part (IoU 0.4); cell 2 is perfect
    true = squares((40, 40), CELLS[:2])
    pred = squares((40, 40), [(0, 10, 0, 6), (0, 10, 6, 10), CELLS[1]])
    counts = instance_counts(true, pred)
    low = THRESHOLDS <= 0.6
    assert (counts[low] == [2, 1, 0]).all() and (counts[~low] == [1, 2, 1]).all()
    s = instance_scores(counts)
    assert s["instance_precision"] == pytest.approx(2 / 3)
    assert s["instance_recall"] == 1.0
    assert s["instance_f1"] == pytest.approx(0.8)
    assert s["instance_ap"] == pytest.approx((3 * 2 / 3 + 7 * 1 / 4) / 10)  # 0.375


def test_one_merged_cell():
    # two true cells (10x6 and 10x4) predicted as one 10x10 object: IoU 0.6 with the first
    true = squares((40, 40), [(0, 10, 0, 6), (0, 10, 6, 10), CELLS[1]])
    pred = squares((40, 40), CELLS[:2])
    counts = instance_counts(true, pred)
    low = THRESHOLDS <= 0.6
    assert (counts[low] == [2, 0, 1]).all() and (counts[~low] == [1, 1, 2]).all()
    s = instance_scores(counts)
    assert (s["instance_precision"], s["instance_recall"]) == (1.0, pytest.approx(2 / 3))


def test_shifted_cells_with_known_iou():
    # 10x10 squares shifted by 2 px: intersection 80, union 120, IoU 2/3
    true = squares((40, 40), CELLS)
    pred = squares((40, 40), [(y0, y1, x0 + 2, x1 + 2) for y0, y1, x0, x1 in CELLS])
    counts = instance_counts(true, pred)
    matched = THRESHOLDS <= 2 / 3  # 0.50, 0.55, 0.60, 0.65
    assert matched.sum() == 4
    assert (counts[matched] == [3, 0, 0]).all() and (counts[~matched] == [0, 3, 3]).all()
    s = instance_scores(counts)
    assert s["instance_f1"] == 1.0 and s["instance_ap"] == pytest.approx(0.4)


def test_iou_exactly_half_matches_only_once():
    true = squares((4, 4), [(0, 4, 0, 4)])
    pred = squares((4, 4), [(0, 4, 0, 2), (0, 4, 2, 4)])  # two halves, IoU 0.5 each
    assert instance_counts(true, pred, [0.5]).tolist() == [[1, 1, 0]]


def test_low_threshold_matching_is_optimal_not_greedy():
    # true 0 overlaps pred 0 (0.40) and pred 1 (0.30); true 1 overlaps pred 0 (0.35) only.
    # Greedy by IoU takes (0, 0) and stops at 1 match; the optimal matching has 2.
    ti, pi, iou = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.40, 0.30, 0.35])
    assert count_matches(ti, pi, iou, 0.25) == 2
    assert count_matches(ti, pi, iou, 0.38) == 1
    assert count_matches(ti, pi, iou, 0.5) == 0


def test_lower_thresholds_on_label_images():
    true = squares((20, 40), [(0, 10, 0, 10), (0, 10, 10, 20)])
    pred = squares((20, 40), [(0, 10, 5, 15)])  # IoU 1/3 with each true cell
    assert instance_counts(true, pred, [0.3, 0.5]).tolist() == [[1, 0, 1], [0, 1, 2]]


def test_objects_are_matched_per_slice():
    true = np.stack([squares((20, 20), [(0, 10, 0, 10)])] * 2)  # one label in two slices
    pred = true.copy()
    pred[1] = 0  # found in slice 0 only
    assert instance_counts(true, pred, [0.5]).tolist() == [[1, 0, 1]]
    # as one 3-D object the prediction covers half of it: IoU 0.5
    assert instance_counts(true, pred, [0.5, 0.55], per_slice=False).tolist() == [[1, 0, 0],
                                                                                 [0, 1, 1]]


def test_empty_images():
    empty = np.zeros((8, 8), np.int32)
    s = scores(empty, empty)
    assert all(v == 1.0 for v in s.values())  # nothing there, nothing predicted
    one = squares((8, 8), [(0, 4, 0, 4)])
    assert scores(empty, one)["instance_precision"] == 0.0
    assert scores(one, empty)["instance_recall"] == 0.0


def test_semantic_counts_and_scores():
    target = np.zeros((3, 2, 4), np.uint8)
    target[0, 0] = 1  # row 0 background
    target[1, 1, :2] = 1  # inner
    target[2, 1, 2:] = 1  # boundary
    prob = np.zeros((3, 2, 4), np.float32)
    prob[0, 0, :3] = 0.9  # 3 of 4 background found
    prob[0, 1, 0] = 0.6  # one false background
    prob[1, 1, :2] = 0.6
    prob[1, 0, 0] = 0.5  # the threshold is strict, like the training metrics
    prob[2, 1, 3] = 0.7  # one of two boundary pixels
    counts = semantic_counts(target, prob)
    assert counts.tolist() == [[3, 1, 1], [2, 0, 0], [1, 0, 1]]
    s = semantic_scores(counts)
    assert s["dice_background"] == pytest.approx(6 / 8)
    assert s["iou_inner-cell"] == 1.0
    assert s["dice_cell-boundary"] == pytest.approx(2 / 3)
    assert s["recall_cell-boundary"] == 0.5
    # pooled over classes: TP 6, FP 1, FN 2
    assert s["dice_total"] == pytest.approx(12 / 15)
    assert semantic_scores(np.zeros((3, 3), int))["dice_total"] == 1.0


def test_matching_is_vectorised_for_many_cells():
    rng = np.random.default_rng(0)
    true = np.arange(1, 40001, dtype=np.int32).reshape(200, 200).repeat(2, 0).repeat(2, 1)
    pred = true.copy()
    flip = rng.random(true.shape) < 0.3  # perturb 30 % of pixels
    pred[flip] = 0
    counts = instance_counts(true, pred)
    assert counts[:, 0].sum() + counts[:, 2].sum() == 40000 * len(THRESHOLDS)


# --- end to end -------------------------------------------------------------------------------

def write_field(root, patient, well_site, seed):
    """One field of view in the upstream layout (DESIGN 3.5): dark cells on a bright medium."""
    import tifffile

    rng = np.random.default_rng(seed)
    z, h, w = 3, 48, 64
    mask = np.zeros((z, h, w), np.uint16)
    yy, xx = np.mgrid[:h, :w]
    for label, (cy, cx) in enumerate(rng.integers(8, [h - 8, w - 8], size=(5, 2)), start=1):
        mask[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = label
    image = np.where(mask > 0, 15000, 45000) + rng.normal(0, 2000, mask.shape)
    image = image.clip(0, 65535).astype(np.uint16)
    images = root / patient / "zstack_images" / well_site
    masks = root / patient / "segmentation_masks" / well_site
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    tifffile.imwrite(images / f"{well_site}_TRANS.tif", image, photometric="minisblack")
    tifffile.imwrite(masks / "cell_mask.tiff", mask, photometric="minisblack")


def log_tiny_model(codename="tiny-eel-1", holdout=("NF0014",)):
    """A width-4 UNet logged by hand like the trainer does: model + config/config.toml."""
    import mlflow
    import torch

    from models.unet import UNet
    from nf1prov import tracking
    from nf1prov.config import defaults, to_toml
    from nf1prov.train.trainer import log_model

    torch.manual_seed(0)
    model = UNet(3, 3, 4).eval()
    config = defaults()
    config["data"].update(crop_size=32, input_slices=3, holdout_patients=list(holdout),
                          root="no-such-data")
    config["model"]["base_width"] = 4
    client = mlflow.MlflowClient()
    experiment = tracking.ensure_experiment(client, "nf1-test", mlflow.get_tracking_uri())
    with mlflow.start_run(experiment_id=experiment, run_name=codename) as run:
        log_model(model)
        mlflow.log_text(to_toml(config), "config/config.toml")
        mlflow.set_tags({tracking.KIND: tracking.KIND_MODEL, tracking.CODENAME: codename,
                         tracking.GIT_COMMIT: "0" * 40, tracking.GIT_TAG: f"model/{codename}"})
    return run.info.run_id


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_field(root, "NF0014_T1", "C4-2", 1)
    write_field(root, "NF0014_T1", "D5-1", 2)
    write_field(root, "NF0016", "C4-2", 3)
    return root


def check_evaluation_overlays(run_id, tmp_path):
    """One PNG per holdout field in the run's evaluation/overlays/ and in --overlays: model |
    baseline panels (48 x 64 enlarged x6) with the ground truth's five cells outlined."""
    import mlflow

    from nf1prov.segment.pictures import BOTH_COLOUR, GAP, MODEL_COLOUR, TRUTH_COLOUR
    from tests.picture_checks import check_header, count, decode

    names = ["NF0014_T1_C4-2.png", "NF0014_T1_D5-1.png"]
    logged = mlflow.MlflowClient().list_artifacts(run_id, "evaluation/overlays")
    assert sorted(a.path for a in logged) == [f"evaluation/overlays/{n}" for n in names]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == names
    folder = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                 artifact_path="evaluation/overlays",
                                                 dst_path=str(tmp_path / "logged"))
    for name in names:
        rgb = decode(f"{folder}/{name}")
        assert rgb.shape[1] == 2 * 384 + GAP
        panels = check_header(rgb, [MODEL_COLOUR, TRUTH_COLOUR, BOTH_COLOUR])[-288:]
        model, baseline = panels[:, :384], panels[:, -384:]
        # five discs of radius 5 px, x6: ~150 outline pixels each, drawn in both panels
        for panel in (model, baseline):
            assert count(panel, TRUTH_COLOUR) + count(panel, BOTH_COLOUR) > 5 * 100
        assert count(baseline, BOTH_COLOUR) > 3 * 100  # the baseline finds most discs
        assert (rgb == np.asarray(decode(tmp_path / "overlays" / name))).all()


def test_evaluate_cli_logs_holdout_metrics_to_the_finished_run(tracking_uri, dataset, tmp_path):
    import mlflow
    from click.testing import CliRunner

    from nf1prov.cli import cli

    run_id = log_tiny_model()
    result = CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(dataset),
                                      "--baseline", "--no-progress", "--min-size", "5",
                                      "--overlays", str(tmp_path / "overlays")])
    assert result.exit_code == 0, result.output
    check_evaluation_overlays(run_id, tmp_path)
    assert "NF0014_T1 (2 stacks)" in result.output and "all (2 stacks)" in result.output
    assert "NF0016" not in result.output
    assert "difference" in result.output
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("holdout_dice_inner-cell", "holdout_iou_cell-boundary", "holdout_dice_total",
                 "holdout_instance_f1", "holdout_instance_ap", "holdout_baseline_dice_total",
                 "holdout_baseline_instance_f1", "holdout_instance3d_f1", "holdout_instance3d_ap",
                 "holdout_instance3d_ap50", "holdout_baseline_instance3d_f1"):
        assert 0 <= metrics[name] <= 1, name
    # The baseline finds the dark discs: well above chance on this easy data.
    assert metrics["holdout_baseline_instance_f1"] > 0.8
    csv = mlflow.artifacts.download_artifacts(run_id=run_id,
                                              artifact_path="evaluation/holdout_metrics.csv",
                                              dst_path=str(tmp_path / "dl"))
    import pandas as pd

    table = pd.read_csv(csv)
    assert set(zip(table["method"], table["patient"], strict=True)) == {
        ("model", "NF0014_T1"), ("model", "all"), ("baseline", "NF0014_T1"),
        ("baseline", "all")}
    assert metrics["holdout_instance_f1"] == pytest.approx(
        table.set_index(["method", "patient"]).loc[("model", "all"), "instance_f1"])
    assert metrics["holdout_baseline_instance3d_f1"] == pytest.approx(
        table.set_index(["method", "patient"]).loc[("baseline", "all"), "instance3d_f1"])
    # each disc is one cell through the 3 slices: as 3-D objects the baseline's 3-D variant
    # finds them too, and the report has the 3-D rows
    assert metrics["holdout_baseline_instance3d_f1"] > 0.8
    assert "instance3d_f1" in result.output


def test_evaluate_cli_patients_option_and_errors(tracking_uri, dataset, tmp_path):
    import mlflow
    from click.testing import CliRunner

    from nf1prov.cli import cli, main

    run_id = log_tiny_model()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "tiny-eel-1", "--data-root", str(dataset), "--patients", "NF9999",
              "--no-progress"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:  # the run's data.root does not exist
        main(["evaluate", "tiny-eel-1", "--no-progress"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "tiny-eel-1", "--data-root", str(dataset), "--patients", "NF0016",
              "--no-progress", "--no-log", "--overlays", str(tmp_path / "o")])
    assert exit_info.value.code == 0
    # --no-log: the overlays go to --overlays only
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["NF0016_C4-2.png"]
    assert mlflow.MlflowClient().list_artifacts(run_id, "evaluation") == []
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(dataset),
                                      "--overlays", str(tmp_path / "file" / "o")])
    assert result.exit_code == 2 and "Cannot create the --overlays folder" in result.output
    assert "Evaluating" not in result.output  # refused before anything was scored


def test_evaluate_refuses_to_log_patients_the_model_trained_on(tracking_uri, dataset):
    """Only the model's holdout patients produce holdout_* (DESIGN 3.7): a training patient is
    refused before anything is scored or logged, and each evaluation records what it scored."""
    import json

    import mlflow
    from click.testing import CliRunner

    from nf1prov import tracking
    from nf1prov.cli import cli
    from nf1prov.data.layout import discover_fields
    from nf1prov.train.trainer import data_splits_tag

    run_id = log_tiny_model(holdout=("NF0014",))
    trained_on = discover_fields(dataset, holdout_patients=("NF0014",))  # NF0016, as training
    client = mlflow.MlflowClient()
    client.set_tag(run_id, tracking.DATA_SPLITS,
                   data_splits_tag({"train": trained_on, "val": [], "test": []}))

    def evaluate(*args):
        return CliRunner().invoke(cli, ["evaluate", "tiny-eel-1", "--data-root", str(dataset),
                                        "--no-progress", *args])

    assert evaluate().exit_code == 0  # the holdout patient NF0014 (folder NF0014_T1)
    before = client.get_run(run_id).data
    assert json.loads(before.tags["nf1prov.evaluation.patients"]) == ["NF0014_T1"]
    assert before.tags["nf1prov.evaluation.data_root"] == str(dataset)

    for patients in (["NF0016"], ["NF0014", "NF0016"]):
        result = evaluate(*[arg for p in patients for arg in ("--patients", p)])
        assert result.exit_code == 2, result.output
        assert "NF0016 (train split)" in result.output and "--no-log" in result.output
        assert "Traceback" not in result.output
    after = client.get_run(run_id).data
    holdout = {k: v for k, v in before.metrics.items() if k.startswith("holdout_")}
    assert holdout and {k: after.metrics[k] for k in holdout} == holdout
    assert after.tags == before.tags

    printed = evaluate("--patients", "NF0016", "--no-log")  # printing is still allowed
    assert printed.exit_code == 0, printed.output
    assert "NF0016 (train split) is not a holdout patient" in printed.output


def test_predict_by_codename_and_run_id_uses_the_run_config(tracking_uri, dataset, tmp_path):
    import tifffile
    from click.testing import CliRunner

    from nf1prov.cli import cli

    run_id = log_tiny_model()
    stack = dataset / "NF0016" / "zstack_images" / "C4-2" / "C4-2_TRANS.tif"
    outputs = {}
    for ref in ("tiny-eel-1", run_id):
        out = tmp_path / ref
        result = CliRunner().invoke(cli, ["predict", ref, str(stack), "-o", str(out),
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
        assert "3 input slices, tiles of 32 px" in result.output  # from config/config.toml
        outputs[ref] = tifffile.imread(out / "C4-2_TRANS_labels.ome.tif")
    np.testing.assert_array_equal(outputs["tiny-eel-1"], outputs[run_id])
    result = CliRunner().invoke(cli, ["predict", "no-such-model", str(stack), "-o",
                                      str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "no-such-model" in result.output + str(result.exception)


def test_a_patient_in_several_splits_is_named_with_each():
    from nf1prov.segment.evaluate import describe_not_held_out

    tag = json.dumps({"train": {"fields": 3, "patients": ["NF0016_T1", "NF0018_T6"]},
                      "val": {"fields": 1, "patients": ["NF0016_T1"]}})
    assert describe_not_held_out(["NF0016_T1", "NF0018_T6", "NF0099"], tag) == (
        "NF0016_T1 (train and val splits), NF0018_T6 (train split), NF0099 (not in its "
        "training data)")
