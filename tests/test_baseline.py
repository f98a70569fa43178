"""The classical baseline (Gaussian, Otsu, distance-transform watershed) on synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest

from nf1prov.segment.baseline import (
    labels_to_probabilities,
    segment_baseline,
    segment_baseline_3d,
)


def discs(shape, centres, radius, cell=15000, medium=45000, noise=1500, seed=0):
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros(shape, np.int32)
    for label, (cy, cx) in enumerate(centres, start=1):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = label
    rng = np.random.default_rng(seed)
    image = np.where(mask > 0, cell, medium) + rng.normal(0, noise, shape)
    return image.clip(0, 65535).astype(np.uint16), mask


def test_finds_separate_dark_cells():
    image, mask = discs((64, 64), [(15, 15), (15, 45), (45, 30)], 7)
    labels = segment_baseline(image, min_size=10)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    assert labels.max() == 3
    for label in range(1, 4):  # each true cell is covered mostly by one predicted cell
        values = labels[mask == label]
        assert np.bincount(values).argmax() > 0
        assert (values == np.bincount(values).argmax()).mean() > 0.8


def test_touching_cells_are_split():
    image, _ = discs((48, 64), [(24, 22), (24, 40)], 10)  # overlapping discs, one blob
    labels = segment_baseline(image, min_size=10, min_distance=5)
    assert labels.max() == 2
    assert labels[24, 14] != labels[24, 48]


@pytest.mark.parametrize("polarity", ["bright", "auto"])
def test_bright_cells(polarity):
    image, _ = discs((64, 64), [(20, 20), (44, 44)], 6, cell=50000, medium=10000)
    assert segment_baseline(image, foreground=polarity).max() == 2


def test_stack_slices_are_labelled_independently_and_blank_slices_are_empty():
    image, _ = discs((48, 48), [(24, 24)], 8)
    stack = np.stack([image, np.full_like(image, 30000), image])
    labels = segment_baseline(stack)
    assert labels.shape == stack.shape
    assert labels[1].max() == 0
    assert labels[0].max() == 1 and labels[2].max() == 2


def test_labels_to_probabilities_is_one_hot():
    labels = np.zeros((1, 10, 10), np.uint16)
    labels[0, 2:8, 2:8] = 1
    prob = labels_to_probabilities(labels, boundary_thickness=1)
    assert prob.shape == (3, 1, 10, 10) and prob.dtype == np.float32
    np.testing.assert_array_equal(prob.sum(axis=0), 1)
    assert prob[0, 0, 0, 0] == 1 and prob[2, 0, 2, 2] == 1 and prob[1, 0, 4, 4] == 1


# --- cells as 3-D objects (segment_baseline_3d) ----------------------------------------------

def balls(shape, centres, radius, z_ratio, cell=15000, medium=45000, noise=1500, seed=0):
    """A (Z, H, W) uint16 stack of dark balls of ``radius`` (xy pixels, physical) whose slices
    lie ``z_ratio`` xy pixels apart, and their (Z, H, W) labels."""
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(float)
    mask = np.zeros(shape, np.int32)
    for label, (cz, cy, cx) in enumerate(centres, start=1):
        inside = ((zz - cz) * z_ratio) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        mask[inside & (mask == 0)] = label
    rng = np.random.default_rng(seed)
    image = np.where(mask > 0, cell, medium) + rng.normal(0, noise, shape)
    return image.clip(0, 65535).astype(np.uint16), mask


def f1_3d(mask, labels):
    from nf1prov.segment.evaluate import instance_counts, instance_scores

    return instance_scores(instance_counts(mask, labels, per_slice=False))["instance_f1"]


def test_3d_cells_are_one_label_through_the_stack():
    image, mask = balls((16, 48, 48), [(8, 14, 14), (7, 34, 30)], 7, z_ratio=2.0)
    labels = segment_baseline_3d(image, z_ratio=2.0, sigma=1.0, min_size=10)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    assert labels.max() == 2  # one label per cell, not one per slice
    assert f1_3d(mask, labels) == 1.0
    for label in (1, 2):  # each true cell is one predicted label on every slice it spans
        values = labels[mask == label]
        assert (values == np.bincount(values).argmax()).mean() > 0.9


def test_3d_touching_cells_are_split():
    image, mask = balls((9, 40, 60), [(4, 20, 21), (4, 20, 39)], 8, z_ratio=3.0)
    labels = segment_baseline_3d(image, z_ratio=3.0, sigma=1.0, min_distance=5)
    assert labels.max() == 2
    assert f1_3d(mask, labels) == 1.0


def test_3d_cells_stacked_in_z_are_split_by_the_anisotropy():
    # Balls of radius 9 xy pixels, slices 3 pixels apart, one above the other and overlapping:
    # in physical units two cells with a narrow neck; read as isotropic voxels, one column.
    image, mask = balls((14, 32, 32), [(3.5, 16, 16), (8.5, 16, 16)], 9, z_ratio=3.0)
    labels = segment_baseline_3d(image, z_ratio=3.0, sigma=1.0)
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0
    assert segment_baseline_3d(image, z_ratio=1.0, sigma=1.0).max() == 1


def test_3d_a_cell_ending_above_another_at_the_same_xy_is_two_cells():
    image, mask = balls((24, 32, 32), [(6, 16, 16), (17, 16, 16)], 7, z_ratio=1.5)
    labels = segment_baseline_3d(image, z_ratio=1.5, sigma=1.0)
    assert labels.max() == 2
    assert labels[6, 16, 16] != labels[17, 16, 16]
    assert f1_3d(mask, labels) == 1.0


def test_3d_blank_stack_and_bright_cells():
    blank = np.full((5, 32, 32), 30000, np.uint16)
    assert not segment_baseline_3d(blank).any()
    image, mask = balls((12, 40, 40), [(6, 12, 12), (6, 28, 28)], 6, z_ratio=1.0,
                        cell=50000, medium=10000)
    labels = segment_baseline_3d(image, sigma=1.0)
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0


def test_3d_one_slice_is_the_per_slice_pipeline():
    image, _ = discs((64, 64), [(15, 15), (15, 45), (45, 30)], 7)
    np.testing.assert_array_equal(segment_baseline_3d(image), segment_baseline(image))
    with pytest.raises(ValueError, match="z_ratio"):
        segment_baseline_3d(image[None], z_ratio=0)
