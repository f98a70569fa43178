"""`plots/learning_curve.png`: what a training did, epoch by epoch, in one picture.

Left: training and validation loss together; right: validation Dice per class in the shared
class colours (`nf1prov.segment.pictures`); the best epoch (the kept model) marked on both.
matplotlib is imported here only, once per training (`Figure` + `savefig`, no pyplot: no GUI
backend, no global state), so that verbs that draw nothing never import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from nf1prov.data.semantic import CLASS_NAMES
from nf1prov.segment.pictures import CLASS_COLOURS, MODEL_COLOUR, hex_colour

SIZE_INCHES, DPI = (10.0, 4.2), 100  # 1000 x 420 pixels
MARKERS_UP_TO = 30  # epochs: beyond this, points would hide the lines
TICK_EVERY_EPOCH_UP_TO = 12


def learning_curve(history: Sequence[Mapping[str, float]], best_epoch: int, path: Path,
                   title: str | None = None) -> Path:
    """Draw ``history`` (per-epoch metrics, epoch 1 first, DESIGN 3.7 names) into the PNG
    ``path``, with ``best_epoch`` marked; ``title``: e.g. the codename. A metric missing from an
    epoch, or NaN, leaves a gap."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(1, len(history) + 1))
    points = len(epochs) <= MARKERS_UP_TO

    def style(marker: str) -> dict:
        return {"marker": marker, "markersize": 4} if points else {}

    def series(name: str) -> list[float]:
        return [float(scores.get(name, math.nan)) for scores in history]

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    # fixed margins (the texts are fixed): a layout engine would draw the figure twice
    loss, dice = figure.subplots(1, 2, gridspec_kw={
        "left": 0.065, "right": 0.985, "bottom": 0.12, "top": 0.86, "wspace": 0.18})
    loss.plot(epochs, series("train_loss"), color="black", linestyle="--", label="train",
              **style("s"))
    loss.plot(epochs, series("val_loss"), color="black", label="validation", **style("o"))
    loss.set(title="Loss (class-weighted BCE)", xlabel="epoch", ylabel="loss")
    for name in CLASS_NAMES:
        dice.plot(epochs, series(f"val_dice_{name}"), color=hex_colour(CLASS_COLOURS[name]),
                  linewidth=2, label=name, **style("o"))
    dice.set(title="Validation Dice per class", xlabel="epoch", ylabel="Dice",
             ylim=(-0.02, 1.02))  # a Dice of 0 stays in view
    for axes in (loss, dice):  # the best epoch in the colour of the model's outlines
        axes.axvline(best_epoch, color=hex_colour(MODEL_COLOUR), linestyle="--", linewidth=2,
                     label=f"best epoch {best_epoch} (kept)", zorder=0)
        axes.set_xlim(0.5, len(epochs) + 0.5)
        if len(epochs) <= TICK_EVERY_EPOCH_UP_TO:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    figure.suptitle(f"{title}: learning curve" if title else "Learning curve")
    figure.savefig(path, format="png")
    return path
