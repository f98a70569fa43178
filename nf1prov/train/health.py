"""The health verdict of a trained model: the `nf1prov.health` tag (DESIGN 3.3) and the warning
`nf1prov train` prints. Pure functions of what a training logged, so that they are tested on
made-up histories and a search's model gets the verdict of its best trial's history.

The thresholds and why: docs/training.md, "Health verdict".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

OK = "ok"
WARNING = "warning: "
REASON_SEPARATOR = "; "

# "did not learn to find cells": scores near 0. Failed models seen score 0.004 (inner-cell Dice)
# and 0.000-0.012 (instance F1); trained demo models 0.77-0.94 / 0.68-0.91, the classical
# baseline 0.73 / 0.61 on real nuclei (docs/training.md, "Health verdict").
MIN_INNER_DICE = 0.1
MIN_INSTANCE_F1 = 0.1
# "still improving": the last epoch is the best and lowered the validation loss by at least this
# fraction of the best before it (a plateau creeping down by less is not worth more epochs)
MIN_LAST_GAIN = 0.01

NOT_LEARNED = "did not learn to find cells"
IMPROVING = "still improving at the last epoch"
CELL = "inner-cell"


def verdict(history: Sequence[Mapping[str, float]], best_epoch: int, epochs: int,
            stopped_early: bool, instance_f1: float | None = None,
            class_fractions: Mapping[str, float] | None = None) -> str:
    """``"ok"`` or ``"warning: <reason>[; <reason>]"`` for a training whose per-epoch metrics
    (epoch 1 first, names as DESIGN 3.7) are ``history`` and whose kept model is that of
    ``best_epoch`` (1-based), out of ``epochs`` configured; ``stopped_early``: early stopping
    ended it. ``instance_f1``: `val_instance_f1` when the instance parameters were chosen;
    ``class_fractions``: the validation pixels' share of each class, for the loss a constant
    guess of them would have."""
    reasons = [reason for reason in (
        not_learned(history[best_epoch - 1], instance_f1, class_fractions),
        still_improving(history, best_epoch, epochs, stopped_early)) if reason]
    return WARNING + REASON_SEPARATOR.join(reasons) if reasons else OK


def not_learned(best: Mapping[str, float], instance_f1: float | None,
                class_fractions: Mapping[str, float] | None) -> str | None:
    """The reason, with its evidence, when the best epoch's model finds no cells: inner-cell
    Dice or instance F1 near 0, or an inner-cell loss no lower than that of guessing the class's
    share everywhere (a model that calls every pixel a cell scores a fair Dice, and no F1)."""
    evidence = []
    dice = best.get(f"val_dice_{CELL}", math.nan)
    if not dice >= MIN_INNER_DICE:  # NaN too
        evidence.append(f"val {CELL} Dice {dice:.3f} < {MIN_INNER_DICE:g}")
    if instance_f1 is not None and not instance_f1 >= MIN_INSTANCE_F1:
        evidence.append(f"val instance F1 {instance_f1:.3f} < {MIN_INSTANCE_F1:g}")
    share = (class_fractions or {}).get(CELL)
    bce = best.get(f"val_bce_{CELL}", math.nan)
    if share is not None and 0 < share < 1 and not bce < guess_bce(share):
        evidence.append(f"val {CELL} BCE {bce:.3f} >= {guess_bce(share):.3f} of a constant "
                        "guess")
    return f"{NOT_LEARNED} ({', '.join(evidence)})" if evidence else None


def guess_bce(share: float) -> float:
    """The mean binary cross-entropy (nats) of predicting ``share`` for every pixel of a class
    that covers ``share`` of them: the best any constant guess does."""
    return -(share * math.log(share) + (1 - share) * math.log(1 - share))


def still_improving(history: Sequence[Mapping[str, float]], best_epoch: int, epochs: int,
                    stopped_early: bool) -> str | None:
    """The reason when the last epoch trained is the best and lowered the validation loss by at
    least `MIN_LAST_GAIN` (a single epoch always counts): more epochs would likely help."""
    last = len(history)
    if stopped_early or best_epoch != last:
        return None
    if last == 1:
        return f"{IMPROVING} (best epoch 1 of {epochs}: trained 1 epoch)"
    earlier = [s.get("val_loss", math.nan) for s in history[:-1]]
    before = min((loss for loss in earlier if not math.isnan(loss)), default=math.inf)
    gain = (before - history[-1].get("val_loss", math.nan)) / before if before > 0 else math.inf
    if not gain >= MIN_LAST_GAIN:
        return None
    return f"{IMPROVING} (epoch {last} of {epochs} lowered val loss by {gain:.1%})"


ADVICE = {
    NOT_LEARNED: "do not use it. Check that the masks match the images and data.normalisation "
                 "suits them, then train with more epochs, more data or another "
                 "train.learning_rate",
    IMPROVING: "more epochs would likely make it better: train a new model with a higher "
               "train.epochs",
}


def reasons(health: str | None) -> list[str]:
    """The reasons of a ``nf1prov.health`` value (none for ``ok``, a missing or unknown one);
    read leniently (spaces around the separators), as the catalogue reads stored tags."""
    prefix = WARNING.rstrip()
    if not health or not health.strip().startswith(prefix):
        return []
    parts = health.strip().removeprefix(prefix).split(REASON_SEPARATOR.strip())
    return [r.strip() for r in parts if r.strip()]


def warning_lines(health: str | None) -> list[str]:
    """What `nf1prov train` prints for a verdict: one ``Warning: ...`` line per reason, with
    what to do; nothing for ``ok``."""
    lines = []
    for reason in reasons(health):
        advice = next((text for key, text in ADVICE.items() if reason.startswith(key)), None)
        subject = "was " + reason if reason.startswith(IMPROVING) else reason
        lines.append(f"Warning: this model {subject}" + (f": {advice}." if advice else "."))
    return lines
