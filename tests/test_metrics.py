"""Epoch metrics: known answers on hand-built masks, epoch sums (not batch means), names."""

import math

import pytest
import torch

from nf1prov.train.metrics import CLASS_NAMES, EpochMetrics, metric_names


def logits_from(mask: list[list[list[int]]]) -> torch.Tensor:
    """(3, H, W) 0/1 predictions -> (1, 3, H, W) logits of +-4 (sigmoid 0.98 / 0.02)."""
    return (torch.tensor(mask, dtype=torch.float32) * 8 - 4)[None]


def target_from(mask: list[list[list[int]]]) -> torch.Tensor:
    return torch.tensor(mask, dtype=torch.float32)[None]


# 2x2 images: class 0 background, 1 inner-cell, 2 cell-boundary.
TARGET = [[[1, 1], [0, 0]], [[0, 0], [1, 0]], [[0, 0], [0, 1]]]
PRED = [[[1, 0], [0, 0]], [[0, 1], [1, 1]], [[0, 0], [0, 0]]]


def test_names_follow_the_contract():
    names = metric_names("val")
    assert "val_dice_inner-cell" in names and "val_loss" in names
    assert "val_iou_cell-boundary" in names and "val_recall_total" in names
    assert len(names) == 5 * 4 + 1
    m = EpochMetrics("train")
    m.update(logits_from(PRED), target_from(TARGET), torch.zeros(3), torch.tensor(0.0))
    assert list(m.compute()) == metric_names("train")


def test_known_answers_per_class_and_total():
    m = EpochMetrics("val")
    m.update(logits_from(PRED), target_from(TARGET), torch.tensor([0.1, 0.2, 0.3]),
             torch.tensor(0.5))
    s = m.compute()
    # background: tp 1, pred 1, true 2
    assert s["val_dice_background"] == pytest.approx(2 / 3)
    assert s["val_iou_background"] == pytest.approx(1 / 2)
    assert s["val_precision_background"] == pytest.approx(1.0)
    assert s["val_recall_background"] == pytest.approx(1 / 2)
    # inner-cell: tp 1, pred 3, true 1
    assert s["val_dice_inner-cell"] == pytest.approx(2 / 4)
    assert s["val_iou_inner-cell"] == pytest.approx(1 / 3)
    assert s["val_precision_inner-cell"] == pytest.approx(1 / 3)
    assert s["val_recall_inner-cell"] == pytest.approx(1.0)
    # boundary: tp 0, pred 0, true 1 -> dice 0, precision has nothing predicted -> 1.0
    assert s["val_dice_cell-boundary"] == 0.0
    assert s["val_precision_cell-boundary"] == 1.0
    assert s["val_recall_cell-boundary"] == 0.0
    # pooled: tp 2, pred 4, true 4
    assert s["val_dice_total"] == pytest.approx(4 / 8)
    assert s["val_iou_total"] == pytest.approx(2 / 6)
    assert s["val_precision_total"] == pytest.approx(2 / 4)
    # bce: the per-class batch means come back; total is their mean
    assert s["val_bce_inner-cell"] == pytest.approx(0.2)
    assert s["val_bce_total"] == pytest.approx(0.2)
    assert s["val_loss"] == pytest.approx(0.5)


def test_epoch_scores_are_sums_not_means_of_batch_scores():
    perfect = target_from(TARGET)
    m = EpochMetrics("train")
    # batch 1: inner-cell perfect (dice 1, 1 true pixel); batch 2: 3 true pixels, none found.
    m.update(logits_from(TARGET), perfect, torch.zeros(3), torch.tensor(1.0))
    t2 = target_from([[[0, 0], [0, 1]], [[1, 1], [1, 0]], [[0, 0], [0, 0]]])
    p2 = logits_from([[[0, 0], [0, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    m.update(p2, t2, torch.zeros(3), torch.tensor(3.0))
    s = m.compute()
    # pooled: tp 1, pred 1, true 4 -> 2/5 (the mean of batch dice scores would be 0.5)
    assert s["train_dice_inner-cell"] == pytest.approx(2 / 5)
    assert s["train_recall_inner-cell"] == pytest.approx(1 / 4)
    assert s["train_loss"] == pytest.approx(2.0)


def test_bce_and_loss_are_weighted_by_pixels_and_samples():
    m = EpochMetrics("train")
    big = torch.zeros(3, 3, 4, 4)  # 3 samples x 16 pixels
    small = torch.zeros(1, 3, 4, 4)  # 1 sample x 16 pixels
    m.update(big, big, torch.tensor([1.0, 1.0, 1.0]), torch.tensor(1.0))
    m.update(small, small, torch.tensor([5.0, 5.0, 5.0]), torch.tensor(5.0))
    s = m.compute()
    assert s["train_bce_background"] == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)
    assert s["train_loss"] == pytest.approx(2.0)


def test_threshold_is_half_on_sigmoid_and_empty_classes_score_one():
    # Every logit is slightly negative: nothing predicted; target empty too -> all 1.0.
    m = EpochMetrics("val")
    zeros = torch.zeros(1, 3, 2, 2)
    m.update(torch.full((1, 3, 2, 2), -1e-3), zeros, torch.zeros(3), torch.tensor(0.0))
    s = m.compute()
    for c in CLASS_NAMES:
        assert s[f"val_dice_{c}"] == 1.0 and s[f"val_iou_{c}"] == 1.0
    m2 = EpochMetrics("val")
    m2.update(torch.full((1, 3, 2, 2), 1e-3), torch.ones(1, 3, 2, 2), torch.zeros(3),
              torch.tensor(0.0))
    assert m2.compute()["val_dice_total"] == 1.0


def test_values_are_plain_floats():
    m = EpochMetrics("val")
    m.update(logits_from(PRED), target_from(TARGET), torch.zeros(3), torch.tensor(0.0))
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.compute().values())
