"""Class-weighted BCE with EMA weights: numbers checked by hand on tiny tensors."""

import math

import pytest
import torch

from nf1prov.train.loss import EMPTY_CLASS_WEIGHT, WeightedBCELoss, initial_class_weights


def one_hot(labels: list[list[int]]) -> torch.Tensor:
    """(H, W) class labels -> (1, 3, H, W) float one-hot target."""
    t = torch.tensor(labels)
    return torch.stack([(t == c).float() for c in range(3)])[None]


def test_initial_weights_are_normalised_inverse_counts():
    # 6 background, 2 inner-cell, 1 boundary pixel: inverse counts 1/6, 1/2, 1 -> sum 5/3.
    target = one_hot([[0, 0, 0], [0, 0, 0], [1, 1, 2]])
    w = initial_class_weights(target)
    assert w.dtype == torch.float32 and w.shape == (3,)
    expected = torch.tensor([1 / 6, 1 / 2, 1.0]) / (5 / 3)
    torch.testing.assert_close(w, expected)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)


def test_class_without_pixels_gets_tiny_weight_before_normalising():
    target = one_hot([[0, 0], [1, 1]])  # no boundary pixel: inverse counts 1/2, 1/2, 1e-12
    w = initial_class_weights(target)
    total = 0.5 + 0.5 + EMPTY_CLASS_WEIGHT
    torch.testing.assert_close(w, torch.tensor([0.5 / total, 0.5 / total, 1e-12 / total]))


def test_counts_pool_over_the_batch():
    a = one_hot([[0, 0], [0, 1]])
    b = one_hot([[2, 2], [0, 1]])  # pooled counts: background 4, inner 2, boundary 2
    w = initial_class_weights(torch.cat([a, b]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.5, 0.5]) / 1.25)


def test_loss_is_weighted_sum_of_per_class_mean_bce():
    target = one_hot([[0, 1], [2, 0]])
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]],
                           [[-2.0, 1.0], [0.5, -1.0]],
                           [[0.0, 0.0], [4.0, -3.0]]])[None]
    weights = torch.tensor([0.2, 0.3, 0.5])
    loss, per_class = WeightedBCELoss(weights, alpha=0.9)(logits, target)

    def bce(x: float, y: float) -> float:  # -[y log s(x) + (1-y) log(1 - s(x))]
        s = 1 / (1 + math.exp(-x))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    expected = [sum(bce(logits[0, c].flatten()[i].item(), target[0, c].flatten()[i].item())
                    for i in range(4)) / 4 for c in range(3)]
    torch.testing.assert_close(per_class, torch.tensor(expected))
    weighted = sum(w * e for w, e in zip([0.2, 0.3, 0.5], expected, strict=True))
    assert loss.item() == pytest.approx(weighted, rel=1e-6)
    assert not per_class.requires_grad


def test_ema_update_happens_before_the_loss_and_only_when_asked():
    target = one_hot([[0, 0, 0], [0, 0, 0], [1, 1, 2]])  # batch weights (0.1, 0.3, 0.6)
    logits = torch.zeros(1, 3, 3, 3, requires_grad=True)  # BCE is log 2 everywhere
    criterion = WeightedBCELoss(torch.tensor([1.0, 0.0, 0.0]), alpha=0.75)

    loss, _ = criterion(logits, target)  # evaluation: weights unchanged
    torch.testing.assert_close(criterion.weights, torch.tensor([1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(math.log(2))

    loss, _ = criterion(logits, target, update=True)
    # w = 0.75 * (1, 0, 0) + 0.25 * (0.1, 0.3, 0.6)
    expected = torch.tensor([0.775, 0.075, 0.15])
    torch.testing.assert_close(criterion.weights, expected)
    assert loss.item() == pytest.approx(math.log(2) * expected.sum().item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and criterion.weights.grad is None


def test_weights_are_saved_with_state_dict():
    criterion = WeightedBCELoss(torch.tensor([0.5, 0.25, 0.25]), alpha=0.9)
    restored = WeightedBCELoss(torch.tensor([1.0, 0.0, 0.0]), alpha=0.9)
    restored.load_state_dict(criterion.state_dict())
    torch.testing.assert_close(restored.weights, criterion.weights)
