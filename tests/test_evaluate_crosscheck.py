"""Instance matching and average precision checked against an independent implementation.

The reference below shares no code with `nf1prov.segment.evaluate`: IoU from one boolean mask per
object (not a contingency table), and the largest one-to-one matching from augmenting paths
(Kuhn's algorithm, not `linear_sum_assignment`), on random label images whose objects overlap in
every way (splits, merges, shifts, misses, false detections), so IoUs fall on both sides of each
threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from nf1prov.segment.evaluate import THRESHOLDS, instance_counts, instance_scores


def reference_iou(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """float64 (n_true, n_pred) IoU of the objects of two (H, W) label images, mask by mask."""
    true_masks = [true == label for label in np.unique(true) if label]
    pred_masks = [pred == label for label in np.unique(pred) if label]
    iou = np.zeros((len(true_masks), len(pred_masks)))
    for i, t in enumerate(true_masks):
        for j, p in enumerate(pred_masks):
            union = np.logical_or(t, p).sum()
            iou[i, j] = np.logical_and(t, p).sum() / union
    return iou


def largest_matching(edges: np.ndarray) -> int:
    """Size of a maximum matching of the bipartite graph with boolean adjacency ``edges``
    (rows: true objects, columns: predictions), by augmenting paths."""
    match_of_column = [-1] * edges.shape[1]

    def augment(row, seen):
        for column in np.flatnonzero(edges[row]):
            if column not in seen:
                seen.add(column)
                if match_of_column[column] < 0 or augment(match_of_column[column], seen):
                    match_of_column[column] = row
                    return True
        return False

    return sum(augment(row, set()) for row in range(edges.shape[0]))


def reference_counts(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """int64 (len(THRESHOLDS), 3) TP, FP, FN summed over the slices of (Z, H, W) labels."""
    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for true_slice, pred_slice in zip(true, pred, strict=True):
        iou = reference_iou(true_slice, pred_slice)
        for k, threshold in enumerate(THRESHOLDS):
            tp = largest_matching(iou >= threshold)
            counts[k] += (tp, iou.shape[1] - tp, iou.shape[0] - tp)
    return counts


def random_labels(rng, shape=(3, 40, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A true label image of overlapping rectangles (later ones paint over earlier ones) and a
    prediction made of shifted, grown, shrunk, split (some in exact halves) and merged copies,
    misses and extras."""
    true = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    _, height, width = shape
    for z in range(shape[0]):
        next_pred = 1
        for label in range(1, rng.integers(4, 14)):
            y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
            h, w = rng.integers(3, 14, size=2)
            true[z, y:y + h, x:x + w] = label
            kind = rng.random()
            if kind < 0.1:
                continue  # missed
            if kind < 0.2 and w % 2 == 0:  # exact halves: two candidates at IoU 0.5 each
                pred[z, y:y + h, x:x + w // 2] = next_pred
                pred[z, y:y + h, x + w // 2:x + w] = next_pred + 1
                next_pred += 2
                continue
            dy, dx = rng.integers(-3, 4, size=2)
            dh, dw = rng.integers(-2, 3, size=2)
            y0, x0 = max(0, y + dy), max(0, x + dx)
            y1, x1 = max(y0 + 1, y + dy + h + dh), max(x0 + 1, x + dx + w + dw)
            if kind < 0.3 and x1 - x0 > 3:  # split in two
                middle = (x0 + x1) // 2
                pred[z, y0:y1, x0:middle] = next_pred
                pred[z, y0:y1, middle:x1] = next_pred + 1
                next_pred += 2
            elif kind < 0.4 and next_pred > 1:  # merged into the previous prediction
                pred[z, y0:y1, x0:x1] = next_pred - 1
            else:
                pred[z, y0:y1, x0:x1] = next_pred
                next_pred += 1
        for _ in range(rng.integers(0, 3)):  # false detections
            y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
            pred[z, y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = next_pred
            next_pred += 1
    # labels need not be consecutive, and a label may be reused in another slice
    return true, scrambled(rng, pred)


def scrambled(rng, pred: np.ndarray) -> np.ndarray:
    """``pred`` with its labels replaced by random distinct ones below 1001."""
    relabel = rng.permutation(1000)[: pred.max() + 1] + 1
    relabel[0] = 0
    return relabel[pred]


@pytest.mark.parametrize("seed", range(40))
def test_counts_equal_an_independent_matching_on_random_labels(seed):
    true, pred = random_labels(np.random.default_rng(seed))
    expected = reference_counts(true, pred)
    np.testing.assert_array_equal(instance_counts(true, pred), expected)
    scores = instance_scores(expected)
    tp, fp, fn = expected.T
    assert scores["instance_ap"] == pytest.approx(np.mean(tp / np.maximum(tp + fp + fn, 1)))
    assert scores["instance_ap50"] == pytest.approx(tp[0] / max(tp[0] + fp[0] + fn[0], 1))


def test_random_labels_exercise_ambiguous_matches():
    """The random images above are not all easy: some have objects with two candidates at IoU
    exactly 0.5 (where counting pairs overcounts and only a one-to-one matching is right), and
    the counts differ across the thresholds."""
    ambiguous = spread = 0
    for seed in range(40):
        true, pred = random_labels(np.random.default_rng(seed))
        for true_slice, pred_slice in zip(true, pred, strict=True):
            edges = reference_iou(true_slice, pred_slice) >= 0.5
            ambiguous += int((edges.sum(axis=0) > 1).any() or (edges.sum(axis=1) > 1).any())
        counts = reference_counts(true, pred)
        spread += int(counts[0, 0] > counts[-1, 0])
    assert ambiguous >= 5
    assert spread >= 30


def test_many_cells_match_the_counts_derived_from_pixels():
    """40,000 2 x 2 cells, 30 % of their pixels dropped from the prediction: each predicted
    cell lies inside its true cell, so its IoU is (kept pixels) / 4 and TP at threshold t is
    the number of cells with kept / 4 >= t."""
    rng = np.random.default_rng(0)
    true = np.arange(1, 40001, dtype=np.int32).reshape(200, 200).repeat(2, 0).repeat(2, 1)
    pred = true.copy()
    pred[rng.random(true.shape) < 0.3] = 0
    kept = (pred > 0).reshape(200, 2, 200, 2).sum(axis=(1, 3)).ravel()
    tp = np.array([(kept / 4 >= t).sum() for t in THRESHOLDS])
    n_pred = (kept > 0).sum()
    expected = np.stack([tp, n_pred - tp, 40000 - tp], axis=1)
    np.testing.assert_array_equal(instance_counts(true, pred), expected)


def reference_counts_3d(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """int64 (len(THRESHOLDS), 3) TP, FP, FN of (Z, H, W) labels as 3-D objects: IoU of whole
    boolean volumes (`reference_iou` takes any shape)."""
    iou = reference_iou(true, pred)
    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for k, threshold in enumerate(THRESHOLDS):
        tp = largest_matching(iou >= threshold)
        counts[k] = (tp, iou.shape[1] - tp, iou.shape[0] - tp)
    return counts


def random_cells_3d(rng, shape=(8, 28, 32)) -> tuple[np.ndarray, np.ndarray]:
    """True cells as boxes through several slices (later ones paint over earlier ones) and a
    prediction of copies shifted in z and x-y, cut in two along z (a cell split at a slice, as
    unlinked slices make it), cut in exact halves, merged with the previous one, missed, and
    extras."""
    true = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    depth, height, width = shape
    next_pred = 1
    for label in range(1, rng.integers(4, 12)):
        z, y, x = rng.integers(0, [depth - 1, height - 4, width - 4])
        d, h, w = rng.integers(1, 6), rng.integers(3, 12), rng.integers(3, 12)
        true[z:z + d, y:y + h, x:x + w] = label
        kind = rng.random()
        if kind < 0.1:
            continue  # missed
        if kind < 0.25 and d >= 2:  # cut in two along z (exact halves when d is even)
            pred[z:z + d // 2, y:y + h, x:x + w] = next_pred
            pred[z + d // 2:z + d, y:y + h, x:x + w] = next_pred + 1
            next_pred += 2
            continue
        dz, dy, dx = rng.integers(-1, 2), rng.integers(-2, 3), rng.integers(-2, 3)
        z0, y0, x0 = max(0, z + dz), max(0, y + dy), max(0, x + dx)
        z1 = max(z0 + 1, z + dz + d + rng.integers(-1, 2))
        y1, x1 = max(y0 + 1, y + dy + h), max(x0 + 1, x + dx + w)
        if kind < 0.35 and next_pred > 1:  # merged into the previous prediction
            pred[z0:z1, y0:y1, x0:x1] = next_pred - 1
        else:
            pred[z0:z1, y0:y1, x0:x1] = next_pred
            next_pred += 1
    for _ in range(rng.integers(0, 3)):  # false detections
        z, y, x = rng.integers(0, [depth, height - 4, width - 4])
        d, h, w = rng.integers([1, 2, 2], [3, 6, 6])
        pred[z:z + d, y:y + h, x:x + w] = next_pred
        next_pred += 1
    return true, scrambled(rng, pred)


@pytest.mark.parametrize("seed", range(30))
def test_3d_counts_equal_an_independent_matching_on_random_cells(seed):
    true, pred = random_cells_3d(np.random.default_rng(seed))
    np.testing.assert_array_equal(instance_counts(true, pred, per_slice=False),
                                  reference_counts_3d(true, pred))


def test_random_cells_exercise_3d_matching():
    """The random cells are not all easy: per slice and in 3-D the counts differ (a label
    through several slices is one object, not one per slice), some objects have two
    candidates at IoU >= 0.5, and the counts differ across the thresholds."""
    ambiguous = spread = differ = 0
    for seed in range(30):
        true, pred = random_cells_3d(np.random.default_rng(seed))
        edges = reference_iou(true, pred) >= 0.5
        ambiguous += int((edges.sum(axis=0) > 1).any() or (edges.sum(axis=1) > 1).any())
        counts = reference_counts_3d(true, pred)
        spread += int(counts[0, 0] > counts[-1, 0])
        differ += int(not np.array_equal(counts, instance_counts(true, pred)))
    assert ambiguous >= 3 and spread >= 20 and differ >= 25
