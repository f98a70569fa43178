"""Instance labels from class probabilities, and the choice of their parameters on validation data.

`probabilities_to_instances` turns (3, Z, H, W) probabilities into labels with a seeded
watershed; `PostProcess` holds its three parameters; `tune` picks them on the validation split
at the end of training (`nf1prov.train.trainer.tune_postprocess`), so that `predict` and
`evaluate` use, by default, what separated this model's cells best on data it never trained on.

Parameters (all per slice; the model is 2-D):

- ``seed_threshold``: a pixel seeds a cell where its inner-cell probability exceeds it. Higher
  values shrink seeds, which splits touching cells whose inner regions merge at 0.5.
- ``foreground_threshold``: a pixel belongs to some cell where ``1 - p(background)`` exceeds it;
  it moves every cell's outline in or out.
- ``min_size``: objects smaller than this (pixels) are merged into the cell that floods them, or
  removed when they touch none.

``None`` thresholds mean the argmax of the three channels (inner-cell seeds, non-background
foreground): the rule of models trained before parameters were chosen.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nf1prov.data.semantic import BACKGROUND, CELL_BOUNDARY, INNER_CELL

# The grids `tune` searches: thresholds in steps of 0.1, sizes roughly doubling.
SEED_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FOREGROUND_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_SIZES = (0, 5, 10, 20, 40, 80)
PARAM_PREFIX = "instances."  # MLflow params of the parameters a model uses
POSTPROCESS_ARTIFACT = "config/instances.json"  # the same, as a run artifact (checkout gets it)


@dataclass(frozen=True)
class PostProcess:
    """The parameters of `probabilities_to_instances` (see the module docstring)."""

    seed_threshold: float | None = None
    foreground_threshold: float | None = None
    min_size: int = 10

    def segment(self, prob: np.ndarray) -> np.ndarray:
        return probabilities_to_instances(prob, self.min_size, seed_threshold=self.seed_threshold,
                                          foreground_threshold=self.foreground_threshold)

    def replace(self, **changes) -> PostProcess:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        return PostProcess(**(asdict(self) | {k: v for k, v in changes.items() if v is not None}))

    def params(self) -> dict[str, str]:
        """As MLflow params ``instances.<name>`` (``argmax`` for a None threshold)."""
        return {PARAM_PREFIX + k: ("argmax" if v is None else str(v))
                for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_mapping(cls, values: dict, prefix: str = "") -> PostProcess | None:
        """From ``{prefix + name: value}`` (params as text, or a config section / JSON as
        numbers); None when none of the names is there."""
        found = {name: values[prefix + name] for name in ("seed_threshold", "foreground_threshold",
                                                          "min_size") if prefix + name in values}
        if not found:
            return None

        def number(name, value):
            if value is None or value == "argmax":
                return None
            return int(float(value)) if name == "min_size" else float(value)

        return cls().replace(**{k: number(k, v) for k, v in found.items()})

    def describe(self) -> str:
        def threshold(v):
            return "argmax" if v is None else f"{v:g}"

        return (f"seed threshold {threshold(self.seed_threshold)}, foreground threshold "
                f"{threshold(self.foreground_threshold)}, min size {self.min_size} px")


def probabilities_to_instances(prob: np.ndarray, min_size: int = 0, *,
                               seed_threshold: float | None = None,
                               foreground_threshold: float | None = None) -> np.ndarray:
    """Instance labels from 3-class probabilities (or a one-hot class map).

    ``prob``: float (3, H, W) or (3, Z, H, W), channels background / inner-cell / cell-boundary.
    Seeds are the connected components (4-connected, within a slice) of ``p(inner) >
    seed_threshold``; each is grown through the foreground (``1 - p(background) >
    foreground_threshold``) by a watershed on the boundary probability, so touching cells are
    separated where the boundary is likely. Foreground pixels no seed reaches (a boundary-only
    blob) become background. A None threshold uses the argmax class map instead.

    ``min_size`` (pixels per slice): an object smaller than this is dropped as a seed and the
    watershed is run again, so its pixels are **merged** into the neighbouring cell that floods
    them, or **removed** (background) when it touches no other cell.

    Slices are labelled independently: a label never spans two slices, and labels are unique
    across the whole stack (numbered slice after slice). Returns (H, W) or (Z, H, W) labels
    numbered 1..N, uint16, or uint32 when N > 65535.

    Memory: one slice is segmented at a time (the watershed makes float64 and padded copies of
    what it is given), so a stack needs about its labels' size beyond the probabilities.
    """
    prob = np.asarray(prob)
    if prob.ndim not in (3, 4) or prob.shape[0] != 3:
        raise ValueError(f"prob must be (3, H, W) or (3, Z, H, W), not shape {prob.shape}")
    squeeze = prob.ndim == 3
    if squeeze:
        prob = prob[:, None]
    labels = np.zeros(prob.shape[1:], np.uint32)
    count = 0
    for z in range(prob.shape[1]):
        count = _label_slice(prob[:, z], labels[z], count, min_size, seed_threshold,
                             foreground_threshold)
    if count <= np.iinfo(np.uint16).max:
        labels = labels.astype(np.uint16)
    return labels[0] if squeeze else labels


def _label_slice(prob: np.ndarray, out: np.ndarray, count: int, min_size: int,
                 seed_threshold: float | None, foreground_threshold: float | None) -> int:
    """Label the cells of one slice's (3, H, W) probabilities into ``out`` as ``count + 1``,
    ``count + 2``, ... (see `probabilities_to_instances`); returns the last label used."""
    from scipy import ndimage
    from skimage.segmentation import relabel_sequential, watershed

    classes = np.argmax(prob, axis=0) if None in (seed_threshold, foreground_threshold) else None
    foreground = (classes != BACKGROUND if foreground_threshold is None
                  else prob[BACKGROUND] < 1 - foreground_threshold)
    seeds = classes == INNER_CELL if seed_threshold is None else prob[INNER_CELL] > seed_threshold
    structure = ndimage.generate_binary_structure(2, 1)  # 4-connectivity
    markers, _ = ndimage.label(seeds & foreground, structure=structure)
    elevation = prob[CELL_BOUNDARY].astype(np.float32, copy=False)
    labels = watershed(elevation, markers, connectivity=structure, mask=foreground)
    del markers
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
            labels = watershed(elevation, labels, connectivity=structure, mask=foreground)
    if not labels.any():
        return count
    labels = relabel_sequential(labels, offset=count + 1)[0]
    out[...] = labels
    return int(labels.max())


def score(params: PostProcess, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Instance scores (`nf1prov.segment.evaluate.instance_scores`) of ``params`` on (prob,
    mask) pairs, counts pooled over the pairs."""
    from nf1prov.segment.evaluate import THRESHOLDS, instance_counts, instance_scores

    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for prob, mask in pairs:
        counts += instance_counts(mask, params.segment(prob))
    return instance_scores(counts)


def tune(pairs: Sequence[tuple[np.ndarray, np.ndarray]], start: PostProcess = PostProcess(),
         ) -> tuple[PostProcess, dict]:
    """The parameters that match the true cells best: highest instance F1 at IoU 0.5, ties
    broken by average precision (IoU 0.5:0.95), then by closeness to ``start``.

    ``pairs``: (prob (3, Z, H, W) float, mask (Z, H, W) instance labels) of validation stacks.
    The thresholds are searched together on a grid (`SEED_THRESHOLDS` x
    `FOREGROUND_THRESHOLDS`) at ``start.min_size``, then ``min_size`` over `MIN_SIZES` at the
    best thresholds: at most 41 segmentations of the validation data. Returns the parameters
    and their scores.
    """
    def objective(params: PostProcess, scores: dict) -> tuple:
        distance = sum(abs((a or 0.5) - (b or 0.5)) for a, b in (
            (params.seed_threshold, start.seed_threshold),
            (params.foreground_threshold, start.foreground_threshold)))
        return (scores["instance_f1"], scores["instance_ap"], -distance,
                -abs(params.min_size - start.min_size))

    scored: dict[PostProcess, dict] = {}  # each setting segmented once

    def pick(current: PostProcess, candidates: list[PostProcess]) -> PostProcess:
        options = [current, *candidates]  # on ties the current setting stays
        for params in options:
            if params not in scored:
                scored[params] = score(params, pairs)
        return max(options, key=lambda p: objective(p, scored[p]))

    best = pick(start, [start.replace(seed_threshold=s, foreground_threshold=f)
                        for s, f in itertools.product(SEED_THRESHOLDS, FOREGROUND_THRESHOLDS)])
    best = pick(best, [best.replace(min_size=m) for m in MIN_SIZES])
    return best, scored[best]
