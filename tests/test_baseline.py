"""The classical baseline (Gaussian, Otsu, distance-transform watershed) on synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest

from nf1prov.segment.baseline import labels_to_probabilities, segment_baseline


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
