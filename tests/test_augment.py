"""Augmentation: image and target move together, each epoch's draws depend only on the seed,
the epoch and the crop, and training with it on is as reproducible as without."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from nf1prov.data.augment import draw, enabled, orient
from nf1prov.data.dataset import CropDataset
from nf1prov.data.layout import discover_fields
from tests.test_trainer import metric_history, tiny_config, train_in_run

OFF = {"flip": False, "rotate90": False, "intensity_scale": 0.0, "intensity_offset": 0.0}
ALL = {"flip": True, "rotate90": True, "intensity_scale": 0.2, "intensity_offset": 0.1}


def dihedral(x: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of a (C, H, W) array, written independently of `orient`."""
    out = []
    for v in (x, x[..., ::-1]):
        for k in range(4):
            out.append(np.rot90(v, k, axes=(1, 2)))
    return out


@pytest.fixture
def crops(data_root, tmp_path):
    fields = discover_fields(data_root)
    return CropDataset(fields, input_slices=3, crop_size=32, crop_stride=16,
                       boundary_thickness=2, cache_dir=tmp_path / "cache")


def test_orient_is_every_flip_and_rotation():
    x = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    got = [orient(x, k, f) for f in (False, True) for k in range(4)]
    for a, b in zip(got, dihedral(x), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in got}) == 8


def test_crops_move_image_and_target_together(crops):
    plain = [crops[i] for i in range(len(crops))]
    crops.augment(OFF | {"flip": True, "rotate90": True}, seed=0)
    crops.set_epoch(1)
    used = set()
    for i in range(len(crops)):
        image, target, index = crops[i]
        assert index == i and image.dtype == torch.float32 and target.dtype == torch.float32
        # crop i is one of the 8 transforms of its plain crop, the same one for its target
        options = dihedral(plain[i][0].numpy())
        matches = [k for k, v in enumerate(options) if np.array_equal(v, image.numpy())]
        assert matches, i
        assert any(np.array_equal(dihedral(plain[i][1].numpy())[k], target.numpy())
                   for k in matches)
        used.add(matches[0])
    assert len(used) == 8  # a few dozen crops draw every transform


def test_intensity_changes_the_image_only_within_its_range(crops):
    plain = [crops[i] for i in range(len(crops))]
    crops.augment(OFF | {"intensity_scale": 0.2, "intensity_offset": 0.1}, seed=0)
    crops.set_epoch(1)
    for i in range(len(crops)):
        image, target, _ = crops[i]
        assert torch.equal(target, plain[i][1])
        x, y = plain[i][0].flatten().numpy(), image.flatten().numpy()
        a, b = np.polyfit(x, y, 1)  # out = a * in + b, a in [0.8, 1.2], b in [-0.1, 0.1]
        assert 0.8 - 1e-6 <= a <= 1.2 + 1e-6 and -0.1 - 1e-6 <= b <= 0.1 + 1e-6
        np.testing.assert_allclose(y, a * x + b, atol=1e-5)


def test_draws_depend_on_seed_epoch_and_crop_only():
    first, again = draw(ALL, 100, seed=3, epoch=1), draw(ALL, 100, seed=3, epoch=1)
    for name in ("turns", "flips", "gain", "shift"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.turns, draw(ALL, 100, seed=3, epoch=2).turns)
    assert not np.array_equal(first.turns, draw(ALL, 100, seed=4, epoch=1).turns)
    assert set(first.turns) == {0, 1, 2, 3} and first.flips.any() and not first.flips.all()
    assert not enabled(OFF) and enabled(ALL)


@pytest.mark.usefixtures("one_thread")
def test_training_with_augmentation_is_deterministic(tracking_uri, data_root, tmp_path):
    config = tiny_config(epochs=2, max_batches_per_epoch=3, num_workers=0)
    config["augment"].update(ALL)
    cache = tmp_path / "cache"
    first_id, first = train_in_run(config, data_root, cache)
    second_id, second = train_in_run(config, data_root, cache)
    assert first.history == second.history  # bitwise
    client = mlflow.MlflowClient(tracking_uri)
    assert metric_history(client, first_id) == metric_history(client, second_id)

    config["train"]["num_workers"] = 2  # loader workers read the same draws
    _, workers = train_in_run(config, data_root, cache)
    assert workers.history == first.history

    config["augment"].update(OFF)  # and augmentation did change what was trained on
    _, plain = train_in_run(config, data_root, cache)
    assert plain.history[0]["train_loss"] != first.history[0]["train_loss"]
