"""What a training shows its user (DESIGN 3.10): the health verdict on made-up histories, the
line each epoch leaves on screen, and the learning curve's PNG. No training here: the trainings
that check the tag, the printed lines and the logged picture are in test_dogfood.py (`--json`,
the epoch lines) and test_provenance_flow.py (the printed verdict, a resumed run)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nf1prov.train import health
from nf1prov.train.health import verdict, warning_lines


def epoch(val_loss: float, dice: float = 0.85, bce: float = 0.12, train_loss: float = 0.3,
          background: float = 0.97, boundary: float = 0.5) -> dict[str, float]:
    return {"train_loss": train_loss, "val_loss": val_loss, "val_dice_background": background,
            "val_dice_inner-cell": dice, "val_dice_cell-boundary": boundary,
            "val_bce_inner-cell": bce}


FRACTIONS = {"background": 0.6, "inner-cell": 0.1677, "cell-boundary": 0.2323}


def test_a_model_that_converged_and_stopped_early_is_ok():
    history = [epoch(v) for v in (0.6, 0.4, 0.3, 0.28, 0.29, 0.3, 0.31)]
    assert verdict(history, best_epoch=4, epochs=20, stopped_early=True, instance_f1=0.8,
                   class_fractions=FRACTIONS) == "ok"
    assert warning_lines("ok") == [] and warning_lines(None) == []


def test_the_issues_model_did_not_learn_to_find_cells():
    """The new user's model: val Dice inner-cell 0.004, val instance F1 0.012, exit 0."""
    history = [epoch(v, dice=0.004) for v in (0.7, 0.69, 0.695)]
    result = verdict(history, best_epoch=2, epochs=3, stopped_early=False, instance_f1=0.012)
    assert result == ("warning: did not learn to find cells (val inner-cell Dice 0.004 < 0.1, "
                      "val instance F1 0.012 < 0.1)")
    (line,) = warning_lines(result)
    assert line.startswith("Warning: this model did not learn to find cells (val inner-cell "
                           "Dice 0.004 < 0.1, val instance F1 0.012 < 0.1): do not use it.")


def test_calling_every_pixel_a_cell_is_no_better_than_a_constant_guess():
    """What a 2-epoch width-4 model on tiny data did: inner-cell recall 1, precision 0.168 (the
    class's share), so Dice 0.287, and an inner-cell BCE (0.840) above the 0.452 nats of
    guessing the share everywhere; no instance F1 (a search trial, or postprocess.tune off)."""
    history = [epoch(0.80, dice=0.20, bce=0.9), epoch(0.79, dice=0.287, bce=0.84)]
    assert health.guess_bce(0.1677) == pytest.approx(0.452, abs=1e-3)
    result = verdict(history, best_epoch=2, epochs=4, stopped_early=True,
                     class_fractions=FRACTIONS)
    assert result == ("warning: did not learn to find cells (val inner-cell BCE 0.840 >= 0.452 "
                      "of a constant guess)")
    # without the shares, Dice alone cannot tell
    assert verdict(history, best_epoch=2, epochs=4, stopped_early=True) == "ok"


def test_the_best_epoch_is_the_last_still_improving():
    history = [epoch(v) for v in (0.6, 0.5, 0.45, 0.40)]
    result = verdict(history, best_epoch=4, epochs=4, stopped_early=False, instance_f1=0.8)
    assert result == ("warning: still improving at the last epoch (epoch 4 of 4 lowered val "
                      "loss by 11.1%)")
    (line,) = warning_lines(result)
    assert line.startswith("Warning: this model was still improving at the last epoch (epoch 4 "
                           "of 4 lowered val loss by 11.1%): more epochs would likely")
    assert "train.epochs" in line
    # an epoch without a validation loss (NaN, or not logged) is no best to compare with
    gappy = [epoch(0.6), epoch(math.nan), {"train_loss": 0.5}, epoch(0.5)]
    assert verdict(gappy, best_epoch=4, epochs=4, stopped_early=False).endswith(
        "(epoch 4 of 4 lowered val loss by 16.7%)")


def test_a_last_best_epoch_on_a_plateau_is_not_worth_more_epochs():
    history = [epoch(v) for v in (0.6, 0.3, 0.2, 0.2, 0.1999)]  # 0.05 % lower at the end
    assert verdict(history, best_epoch=5, epochs=5, stopped_early=False) == "ok"


def test_one_epoch_is_always_still_improving_and_both_reasons_are_listed():
    result = verdict([epoch(0.7, dice=0.05)], best_epoch=1, epochs=1, stopped_early=False,
                     instance_f1=0.0)
    assert result == ("warning: did not learn to find cells (val inner-cell Dice 0.050 < 0.1, "
                      "val instance F1 0.000 < 0.1); still improving at the last epoch (best "
                      "epoch 1 of 1: trained 1 epoch)")
    assert health.reasons(result) == result.removeprefix("warning: ").split("; ")
    assert [line.split(" (")[0] for line in warning_lines(result)] == [
        "Warning: this model did not learn to find cells",
        "Warning: this model was still improving at the last epoch"]


def test_nan_scores_count_as_not_learned():
    history = [epoch(0.5), epoch(0.4, dice=math.nan, bce=math.nan)]
    result = verdict(history, best_epoch=2, epochs=9, stopped_early=True, instance_f1=math.nan,
                     class_fractions=FRACTIONS)
    assert result == ("warning: did not learn to find cells (val inner-cell Dice nan < 0.1, "
                      "val instance F1 nan < 0.1, val inner-cell BCE nan >= 0.452 of a constant "
                      "guess)")


# --- the line each epoch leaves ----------------------------------------------------------------

def test_the_epoch_line_names_losses_dice_per_class_best_and_patience():
    from nf1prov.train.trainer import epoch_line

    t = {"epochs": 8, "patience": 5}
    scores = epoch(0.3981, train_loss=0.41234, dice=0.6149, boundary=0.3349, background=0.971)
    assert epoch_line(3, t, scores, {"best_epoch": 3, "bad_epochs": 0}) == (
        "epoch 3/8  loss 0.412 val 0.398  Dice bg 0.97 inner 0.61 boundary 0.33  best 3  "
        "patience 5/5")
    # a long training still fits a 100-column terminal
    t = {"epochs": 150, "patience": 30}
    line = epoch_line(120, t, scores, {"best_epoch": 117, "bad_epochs": 3})
    assert line.endswith("best 117  patience 27/30") and len(line) <= 100
    # a search trial: shorter, without the Dice
    assert epoch_line(2, {"epochs": 20, "patience": 5}, scores,
                      {"best_epoch": 1, "bad_epochs": 1}, trial=4) == (
        "trial 4 epoch 2/20  loss 0.412 val 0.398  best 1  patience 4/5")


def test_val_class_fractions_are_the_shares_of_the_crops_a_validation_pass_scores(data_root,
                                                                                 tmp_path):
    from nf1prov.data.dataset import CropDataset
    from nf1prov.data.layout import discover_fields
    from nf1prov.train.trainer import val_class_fractions

    fields = discover_fields(data_root, holdout_patients=[])
    dataset = CropDataset(fields[:2], input_slices=3, crop_size=32, crop_stride=16,
                          boundary_thickness=2, cache_dir=tmp_path / "cache")
    t = {"max_batches_per_epoch": 2, "batch_size": 3}
    shares = val_class_fractions(dataset, t, margin=2)
    first_six = np.stack([dataset[i][1].numpy()[:, 2:-2, 2:-2] for i in range(6)])
    expected = first_six.sum(axis=(0, 2, 3)) / first_six.sum()
    assert list(shares) == ["background", "inner-cell", "cell-boundary"]
    assert list(shares.values()) == pytest.approx(expected.tolist())
    everything = val_class_fractions(dataset, {**t, "max_batches_per_epoch": 0}, margin=0)
    assert sum(everything.values()) == pytest.approx(1.0)
    assert everything != shares and 0 < everything["inner-cell"] < 1


# --- the learning curve ------------------------------------------------------------------------

def colours_of(path) -> tuple[tuple[int, int], dict[tuple[int, int, int], int]]:
    from PIL import Image

    with Image.open(path) as picture:
        rgb = np.asarray(picture.convert("RGB")).reshape(-1, 3)
        size = picture.size
    values, counts = np.unique(rgb, axis=0, return_counts=True)
    return size, {tuple(int(v) for v in value): int(n)
                  for value, n in zip(values, counts, strict=True)}


@pytest.mark.parametrize("epochs", [1, 12])
def test_the_learning_curve_shows_losses_dice_in_class_colours_and_the_best_epoch(tmp_path,
                                                                                  epochs):
    from nf1prov.segment.pictures import CLASS_COLOURS, MODEL_COLOUR
    from nf1prov.train.plots import learning_curve

    history = [epoch(0.7 * 0.9 ** k, dice=0.9 * (1 - 0.7 ** (k + 1)), train_loss=0.6 * 0.85 ** k)
               for k in range(epochs)]
    if epochs > 3:
        history[2]["val_loss"] = math.nan  # a gap, not a failure
        del history[1]["val_dice_cell-boundary"]
    path = learning_curve(history, best_epoch=epochs, path=tmp_path / "curve.png",
                          title="dazzling-slug-461")
    size, colours = colours_of(path)
    assert size == (1000, 420)
    assert len(colours) > 100  # text, lines and their anti-aliasing, not a blank canvas
    for rgb in (*CLASS_COLOURS.values(), MODEL_COLOUR, (0, 0, 0)):  # classes, best, losses
        assert colours.get(rgb, 0) >= 20, rgb
