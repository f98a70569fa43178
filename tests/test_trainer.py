"""The trainer end to end: real TIFFs (synthetic), a real sqlite MLflow store, a real active run.

Tiny settings (UNet width 4, 32-pixel crops, 1-2 epochs) keep the whole file to seconds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import pytest
import torch

from nf1prov import tracking
from nf1prov.config import defaults
from nf1prov.errors import UserError
from nf1prov.train.metrics import CLASS_NAMES, metric_names
from nf1prov.train.run import train_model
from nf1prov.train.trainer import TrainResult

pytestmark = pytest.mark.usefixtures("one_thread")


def logged_model(run_id: str) -> torch.nn.Module:
    """The run's `model/` artifact, loaded as `nf1prov predict` loads it."""
    from nf1prov import weights

    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
    return weights.load(Path(folder), ref=run_id)


def tiny_config(**train) -> dict:
    config = defaults()
    config["data"].update(holdout_patients=[], input_slices=3, crop_size=32, crop_stride=16,
                          split_fractions=[0.6, 0.4, 0.0])
    config["model"]["base_width"] = 4
    config["train"].update(epochs=2, batch_size=4, learning_rate=3e-3, device="cpu",
                           weight_samples=8, overlay_crops=2, patience=5)
    config["train"].update(train)
    config["description"].update(
        architecture="UNet (width 4)",
        data=["Synthetic organoids", "Masks:", ["Background", "Inner-cell", "Cell-boundary"]],
        summary="A test model.")
    return config


def train_in_run(config: dict, data_root: Path, cache_dir: Path, **kwargs
                 ) -> tuple[str, TrainResult]:
    """Train inside a fresh run that the test (as the caller) starts and ends."""
    with mlflow.start_run() as run:
        result = train_model(config, data_root, cache_dir=cache_dir, **kwargs)
    return run.info.run_id, result


def metric_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} for every per-epoch metric of a run."""
    once = ("epochs_run", "val_instance_f1", "val_instance_ap", "val_instance3d_f1",
            "val_instance3d_ap")  # once per training
    names = [k for k in client.get_run(run_id).data.metrics
             if not k.startswith("best_") and k not in once]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in names}


def artifact_paths(client, run_id: str, path: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def check_training_overlay(png: Path) -> None:
    """A 32-px crop's overlay: a titled bar with the class legend over three panels enlarged x8
    (input | target | prediction), the target in the class colours only."""
    import numpy as np

    from nf1prov.segment.pictures import CLASS_COLOURS, GAP
    from tests.picture_checks import check_header, decode

    rgb = decode(png)
    assert rgb.shape[1] == 3 * 256 + 2 * GAP
    panels = check_header(rgb, CLASS_COLOURS.values())[-256:]
    target = panels[:, 256 + GAP:512 + GAP].reshape(-1, 1, 3)
    is_class = (target == np.array(list(CLASS_COLOURS.values()), np.uint8)).all(-1).any(-1)
    assert is_class.all()


def epoch_lines(err: str) -> list[str]:
    """The lines epochs left on stderr (not the progress bars, `epoch 1/2 train: 50%|...`)."""
    return [line for line in map(str.strip, err.replace("\r", "\n").splitlines())
            if re.match(r"(trial \d+ )?epoch \d+/\d+  loss ", line)]


def check_learning_curve(client, run_id: str) -> None:
    from nf1prov.segment.pictures import CLASS_COLOURS
    from tests.test_health import colours_of

    size, colours = colours_of(client.download_artifacts(run_id, "plots/learning_curve.png"))
    assert size == (1000, 420) and len(colours) > 100
    assert all(colours.get(rgb, 0) >= 20 for rgb in CLASS_COLOURS.values())


def test_training_logs_everything_into_the_active_run(tracking_uri, data_root, tmp_path,
                                                      capsys):
    config = tiny_config()
    epochs_seen = []
    run_id, result = train_in_run(config, data_root, tmp_path / "cache",
                                  on_epoch=lambda epoch, scores: epochs_seen.append(epoch))
    lines = epoch_lines(capsys.readouterr().err)
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # the caller's `with` ended it; train_model did not

    # the result, and a line per epoch that stays on screen
    assert epochs_seen == [1, 2] and result.epochs_run == 2
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert lines[-1].endswith(f"best {result.best_epoch}  patience "
                              f"{5 - (2 - result.best_epoch)}/5")
    assert result.best_epoch in (1, 2)
    assert result.best_val_loss == result.best_metrics["val_loss"]
    assert math.isfinite(result.best_val_loss)

    # params: the flattened config, lists as JSON
    params = run.data.params
    assert params["model.base_width"] == "4" and params["train.seed"] == "0"
    assert json.loads(params["data.split_fractions"]) == [0.6, 0.4, 0.0]

    # per-epoch metrics with the contract names, step = epoch
    history = metric_history(client, run_id)
    assert set(history) == set(metric_names("train") + metric_names("val"))
    assert "val_dice_inner-cell" in history
    assert all([step for step, _ in h] == [1, 2] for h in history.values())
    best = run.data.metrics
    assert best["best_epoch"] == result.best_epoch
    assert best["epochs_run"] == result.epochs_run == len(history["val_loss"])
    assert best["best_val_loss"] == pytest.approx(result.best_val_loss)
    for c in CLASS_NAMES:
        assert best[f"best_val_dice_{c}"] == pytest.approx(
            dict(history[f"val_dice_{c}"])[result.best_epoch])

    # artifacts
    paths = artifact_paths(client, run_id)
    expected = {"config/config.toml", "manifest/split_manifest.csv", "checkpoints/last.pt",
                "config/instances.json", "config/instances3d.json", "plots/learning_curve.png"}
    assert expected <= set(paths)
    check_learning_curve(client, run_id)
    for epoch in (1, 2):
        pngs = [p for p in paths if p.startswith(f"overlays/epoch_{epoch:03d}/")]
        assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    png = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=pngs[0],
                                                   dst_path=str(tmp_path / "png")))
    check_training_overlay(png)
    toml = client.download_artifacts(run_id, "config/config.toml", str(tmp_path))
    assert "base_width = 4" in Path(toml).read_text()

    # the split manifest is also a dataset input
    inputs = run.inputs.dataset_inputs
    assert [i.tags[0].value for i in inputs] == ["training"]

    # description: JSON array tags and the Markdown note
    tags = run.data.tags
    assert json.loads(tags[tracking.DESCRIPTION_PREFIX + "data"]) == [
        "Synthetic organoids", "Masks:", ["Background", "Inner-cell", "Cell-boundary"]]
    assert tags[tracking.DESCRIPTION_PREFIX + "architecture"] == "UNet (width 4)"
    assert "- **Data:**\n  - Synthetic organoids" in tags[tracking.NOTE_CONTENT]
    assert tags[tracking.HEALTH] == "ok" or tags[tracking.HEALTH].startswith("warning: ")

    # the best model loads and predicts, and equals the returned one
    model = logged_model(run_id)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3, 32, 32)
        torch.testing.assert_close(y, result.model(x))


def test_same_config_same_data_gives_identical_metrics(tracking_uri, data_root, tmp_path):
    config = tiny_config(epochs=1, max_batches_per_epoch=3)
    first_id, first = train_in_run(config, data_root, tmp_path / "cache")
    second_id, second = train_in_run(config, data_root, tmp_path / "cache")
    client = mlflow.MlflowClient(tracking_uri)
    assert first.history == second.history  # bitwise: float equality, not approx
    assert metric_history(client, first_id) == metric_history(client, second_id)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_resume_continues_the_run_exactly(tracking_uri, data_root, tmp_path, augment, capsys):
    cache = tmp_path / "cache"

    def config(epochs):
        c = tiny_config(epochs=epochs)
        c["augment"].update(flip=augment, rotate90=augment, intensity_scale=0.2 * augment)
        return c

    straight_id, straight = train_in_run(config(2), data_root, cache)

    with mlflow.start_run() as run:  # interrupted after epoch 1 ...
        train_model(config(1), data_root, cache_dir=cache)
    checkpoint = Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints/last.pt", dst_path=str(tmp_path)))
    capsys.readouterr()
    with mlflow.start_run(run_id=run.info.run_id):  # ... and resumed in the same run
        resumed = train_model(config(2), data_root, cache_dir=cache, resume_from=checkpoint)
    assert [line.split("  ")[0] for line in epoch_lines(capsys.readouterr().err)] == [
        "epoch 2/2"]

    assert resumed.epochs_run == 2
    assert resumed.history == straight.history
    client = mlflow.MlflowClient(tracking_uri)
    history = metric_history(client, run.info.run_id)
    assert [step for step, _ in history["val_loss"]] == [1, 2]
    assert history == metric_history(client, straight_id)
    overlays = {p.split("/")[1] for p in artifact_paths(client, run.info.run_id, "overlays")}
    assert overlays == {"epoch_001", "epoch_002"}
    # the verdict of the whole training (the checkpoint brought epoch 1 back), as uninterrupted
    verdicts = [client.get_run(i).data.tags[tracking.HEALTH] for i in (run.info.run_id,
                                                                         straight_id)]
    assert verdicts[0] == verdicts[1]
    check_learning_curve(client, run.info.run_id)


def test_trials_run_as_nested_runs_and_the_parent_holds_the_best(tracking_uri, data_root,
                                                                 tmp_path, capsys):
    config = tiny_config(epochs=1, trials=2, search_batch_size=[2, 4],
                         search_learning_rate=[1e-3, 1e-2], max_batches_per_epoch=2)
    parent_id, result = train_in_run(config, data_root, tmp_path / "cache")
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["trial_0", "trial_1"]
    assert all(r.data.tags[tracking.KIND] == tracking.KIND_TRIAL for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    trial_losses = {r.info.run_name: r.data.metrics["best_val_loss"] for r in children}
    best_trial = parent.data.params["best_trial"]
    assert parent.data.tags["best_trial"] == best_trial
    assert trial_losses[f"trial_{best_trial}"] == min(trial_losses.values())
    assert parent.data.metrics["best_val_loss"] == pytest.approx(result.best_val_loss)
    for child in children:
        lr = float(child.data.params["train.learning_rate"])
        assert 1e-3 <= lr <= 1e-2 and 2 <= int(child.data.params["train.batch_size"]) <= 4
    model = logged_model(parent_id)
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    # trials print a shorter line each epoch and get a verdict; the model run draws the curve
    assert sorted(epoch_lines(capsys.readouterr().err)) == [
        f"trial {n} epoch 1/1  loss {child.data.metrics['train_loss']:.3f} val "
        f"{child.data.metrics['val_loss']:.3f}  best 1  patience 5/5"
        for n, child in enumerate(sorted(children, key=lambda r: r.info.run_name))]
    for run in (parent, *children):
        assert run.data.tags[tracking.HEALTH] == "ok" or \
            run.data.tags[tracking.HEALTH].startswith("warning: ")
        assert bool(client.list_artifacts(run.info.run_id, "plots")) == (run is parent)
    check_learning_curve(client, parent_id)


def test_a_failure_mid_training_raises_and_leaves_the_last_checkpoint(tracking_uri, data_root,
                                                                      tmp_path):
    def crash(epoch: int, scores: dict) -> None:
        if epoch == 1:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        with mlflow.start_run() as run:
            train_model(tiny_config(), data_root, cache_dir=tmp_path / "cache", on_epoch=crash)
    client = mlflow.MlflowClient(tracking_uri)
    failed = client.get_run(run.info.run_id)
    assert failed.info.status == "FAILED"  # marked by the caller's context manager
    assert "checkpoints/last.pt" in artifact_paths(client, run.info.run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]


def test_user_errors_name_the_problem(tracking_uri, data_root, tmp_path):
    with mlflow.start_run():
        with pytest.raises(UserError, match="does not exist"):
            train_model(tiny_config(), data_root, cache_dir=tmp_path / "cache",
                        resume_from=tmp_path / "missing.pt")
        with pytest.raises(UserError, match="model.architecture 'vit'.*known: unet"):
            train_model(tiny_config() | {"model": {"architecture": "vit", "base_width": 4}},
                        data_root, cache_dir=tmp_path / "cache")
    if not torch.cuda.is_available():
        with mlflow.start_run():
            with pytest.raises(UserError, match="train.device"):
                train_model(tiny_config(device="cuda"), data_root, cache_dir=tmp_path / "c")


def test_train_model_needs_an_active_run(tracking_uri, data_root, tmp_path):
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="active MLflow run"):
        train_model(tiny_config(), data_root, cache_dir=tmp_path / "cache")


def test_a_non_finite_loss_is_caught_on_the_device_and_named_by_epoch_and_batch():
    """The loop marks the first batch whose loss is NaN or inf without a host sync per batch,
    and ends the training with one line saying where and what to change."""
    from nf1prov.train.trainer import LossNotFinite, LossWatch

    watch = LossWatch(torch.device("cpu"))
    watch.update(torch.tensor(0.7), batch=1)
    watch.check("train", epoch=4, learning_rate=0.5)  # all finite so far: nothing to say
    watch.update(torch.tensor(math.inf), batch=2)
    watch.update(torch.tensor(math.nan), batch=3)  # the first one is the one named
    with pytest.raises(LossNotFinite) as caught:
        watch.check("train", epoch=4, learning_rate=0.5)
    assert str(caught.value) == ("the loss became NaN/inf at epoch 4, batch 2: lower "
                                 "train.learning_rate (now 0.5)")
    assert caught.value.exit_code == 1  # the training failed; no traceback, no usage error

    val = LossWatch(torch.device("cpu"))
    val.update(torch.tensor([math.nan]).sum(), batch=3)
    with pytest.raises(LossNotFinite, match="^the validation loss became NaN/inf at epoch 2, "
                                            r"batch 3: lower train.learning_rate \(now 0.001\)$"):
        val.check("val", epoch=2, learning_rate=1e-3)

    # Before any training step the learning rate cannot be the cause: the inputs can.
    first = LossWatch(torch.device("cpu"))
    first.update(torch.tensor(math.nan), batch=1)
    with pytest.raises(LossNotFinite, match="^the loss was NaN/inf at epoch 1, batch 1, before "
                                            "any training step: not the learning rate"):
        first.check("train", epoch=1, learning_rate=1e-3)
