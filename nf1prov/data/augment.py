"""Random transforms of training crops: flips, 90-degree rotations, intensity scale and offset.

Each epoch draws every crop's transform at once from a generator seeded with (seed, epoch)
(`draw`), and the dataset applies crop i's transform when it reads crop i (`orient`, and an
affine of the normalised image). So the transforms depend only on the seed, the epoch and the
crop, never on the batch order, the number of loader workers or where a run was resumed, and
they cost almost nothing: a flip or rotation of a NumPy crop is a view, copied once by the
conversion the loader does anyway (`benchmarks/bench_loader.py`).

Geometric transforms move image and target together; intensity ones change the image only.
Crops are square, so a rotation keeps their shape, and the crop margin trimmed from the loss
is the same on every side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def enabled(settings: dict) -> bool:
    """Whether a config's ``[augment]`` section asks for any transform."""
    return bool(settings["flip"] or settings["rotate90"] or settings["intensity_scale"]
                or settings["intensity_offset"])


@dataclass(frozen=True)
class Draws:
    """One epoch's transforms, one entry per crop: ``turns`` int (N,) quarter turns,
    ``flips`` bool (N,) left-right mirror (applied before the turns), ``gain`` and ``shift``
    float32 (N,): the normalised image becomes ``image * gain + shift``."""

    turns: np.ndarray
    flips: np.ndarray
    gain: np.ndarray
    shift: np.ndarray


def draw(settings: dict, count: int, seed: int, epoch: int) -> Draws:
    """The transforms of ``count`` crops for one epoch: a flip with probability 1/2
    (``flip``), k * 90 degrees with k uniform in 0..3 (``rotate90``), a gain uniform in
    ``1 +- intensity_scale`` and a shift uniform in ``+- intensity_offset``. The same
    (settings, count, seed, epoch) give the same draws."""
    rng = np.random.default_rng([seed, epoch])
    turns = rng.integers(0, 4, count) if settings["rotate90"] else np.zeros(count, np.int64)
    flips = rng.random(count) < 0.5 if settings["flip"] else np.zeros(count, bool)
    gain = 1 + rng.uniform(-1, 1, count) * settings["intensity_scale"]
    shift = rng.uniform(-1, 1, count) * settings["intensity_offset"]
    return Draws(turns, flips, gain.astype(np.float32), shift.astype(np.float32))


def orient(array: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """``array`` (..., C, C) mirrored left-right when ``flip``, then rotated by ``turns``
    quarter turns counter-clockwise in its last two axes: a view, no copy."""
    if flip:
        array = array[..., ::-1]
    return np.rot90(array, turns, axes=(-2, -1)) if turns % 4 else array
