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

Cells in 3-D (``dims=3``). The model is 2-D and its boundary class is drawn per slice, so the
probabilities say nothing of where one cell ends in z and the next begins above it; what does
say so is the footprint: a cell's outline changes little from one slice to the next, another
cell's outline at the same place is another shape. So the slices are labelled as above and the
2-D objects of neighbouring slices are **linked** into one 3-D object when their IoU is at least
``link_iou ** z_ratio`` and each is the other's best match (one-to-one: a 3-D object has at
most one 2-D object per slice, and two cells never merge through a slice). ``z_ratio`` is the
z step over the xy pixel size: for a convex cell the IoU lost between slices grows with the
distance between them, about geometrically, so ``link_iou`` is the IoU asked of a step of one
xy pixel and a stack with steps of ``z_ratio`` pixels asks ``link_iou ** z_ratio`` (coarse
steps, looser links). A 2-D object left without a link forward is linked to one without a link
backward two slices on (IoU at least ``link_iou ** (2 z_ratio)``, counted only where the slice
between is labelled): a cell merged with its neighbour in one slice stays one cell, while a
cell that ends before an empty slice is not joined to one that starts after it. Before that,
objects of neighbouring slices still unlinked are linked when `CAP_INSIDE` of the smaller lies
inside the larger: the tapering top and bottom of a cell, whose IoU with the next slice is low
however fine the z steps.

``min_volume`` (voxels, 0 = off): after linking, a 3-D object with fewer voxels is **removed**
(its voxels become background; labels are renumbered 1..N in the same order). What it removes
is an object seen on about one slice where whole cells run through many: a speck above the
per-slice ``min_size`` that no cell continues. Removed, not merged: one that touches a cell in
its slice was already merged by ``min_size`` or is a cell of its own there, and merging it
into a cell of another slice would give that cell two objects in a slice. 2-D images and
one-slice stacks are per-slice labels and keep every object.
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
LINK_IOUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # 3-D only
# 3-D only: min_volume in cross-sections of a typical true cell (the median area of the cells'
# per-slice objects on validation): an object seen on one slice has about one section at most,
# a whole cell many; in sections the grid fits any cell size and z step (see `volume_grid`).
MIN_VOLUME_SECTIONS = (0.5, 1, 2, 4)
# A cell's end slices taper (a ball's last slice has a third of the next one's area, IoU ~0.35)
# but lie inside the next; another cell's first slice is rarely so much inside this one's last.
CAP_INSIDE = 0.8
PARAM_PREFIX = "instances."  # MLflow params of the parameters a model uses
POSTPROCESS_ARTIFACT = "config/instances.json"  # the same, as a run artifact (checkout gets it)
PARAM_PREFIX_3D = "instances3d."  # the same for cells as 3-D objects (dims = 3)
POSTPROCESS_ARTIFACT_3D = "config/instances3d.json"


@dataclass(frozen=True)
class PostProcess:
    """The parameters of `probabilities_to_instances` (see the module docstring); ``dims`` 2
    labels each slice on its own, 3 links them into cells through the stack (``link_iou``)."""

    seed_threshold: float | None = None
    foreground_threshold: float | None = None
    min_size: int = 10
    dims: int = 2
    link_iou: float = 0.5  # dims = 3 only
    min_volume: int = 0  # dims = 3 only: 3-D objects with fewer voxels are removed; 0 = off

    def segment(self, prob: np.ndarray, z_ratio: float = 1.0) -> np.ndarray:
        """Labels of (3, [Z,] H, W) probabilities; ``z_ratio``: the stack's z step over its xy
        pixel size (used with ``dims=3``)."""
        return probabilities_to_instances(prob, self.min_size, seed_threshold=self.seed_threshold,
                                          foreground_threshold=self.foreground_threshold,
                                          dims=self.dims, z_ratio=z_ratio, link_iou=self.link_iou,
                                          min_volume=self.min_volume)

    def cells(self, prob: np.ndarray, z_ratio: float, flat: PostProcess,
              flat_labels: np.ndarray) -> np.ndarray:
        """`segment` with ``dims=3``, reusing ``flat_labels`` (``flat.segment(prob)``) when
        ``flat`` labels the slices as this does: only the linking is left to do."""
        if flat_labels.ndim == 3 and flat.replace(dims=3, link_iou=self.link_iou,
                                                  min_volume=self.min_volume) == self:
            return drop_small_cells(link_slices(flat_labels, self.link_iou, z_ratio),
                                    self.min_volume)
        return self.segment(prob, z_ratio)

    def replace(self, **changes) -> PostProcess:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        return PostProcess(**(asdict(self) | {k: v for k, v in changes.items() if v is not None}))

    def values(self) -> dict:
        """The fields that apply: the three of per-slice labels, and ``dims`` and ``link_iou``
        for 3-D ones, with ``min_volume`` when it is on (what sidecars, run records and JSON
        artifacts hold: those of models from before it are unchanged)."""
        values = asdict(self)
        if self.dims == 2:
            del values["dims"], values["link_iou"]
        if self.dims == 2 or not self.min_volume:
            del values["min_volume"]
        return values

    def params(self) -> dict[str, str]:
        """As MLflow params ``instances.<name>`` (``instances3d.<name>`` for dims 3; ``argmax``
        for a None threshold)."""
        prefix = PARAM_PREFIX if self.dims == 2 else PARAM_PREFIX_3D
        return {prefix + k: ("argmax" if v is None else str(v))
                for k, v in self.values().items() if k != "dims"}

    def to_json(self) -> str:
        return json.dumps(self.values(), indent=2) + "\n"

    @classmethod
    def from_mapping(cls, values: dict, prefix: str = "") -> PostProcess | None:
        """From ``{prefix + name: value}`` (params as text, or a config section / JSON as
        numbers); None when none of the thresholds and size is there. The prefix
        ``instances3d.`` means dims 3."""
        found = {name: values[prefix + name] for name in ("seed_threshold", "foreground_threshold",
                                                          "min_size") if prefix + name in values}
        if not found:
            return None
        found |= {name: values[prefix + name] for name in ("dims", "link_iou", "min_volume")
                  if prefix + name in values}
        if prefix == PARAM_PREFIX_3D:
            found["dims"] = 3

        def number(name, value):
            if value is None or value == "argmax":
                return None
            return (int(float(value)) if name in ("min_size", "dims", "min_volume")
                    else float(value))

        return cls().replace(**{k: number(k, v) for k, v in found.items()})

    def describe(self) -> str:
        def threshold(v):
            return "argmax" if v is None else f"{v:g}"

        text = (f"seed threshold {threshold(self.seed_threshold)}, foreground threshold "
                f"{threshold(self.foreground_threshold)}, min size {self.min_size} px")
        if self.dims == 3:
            text += f", cells in 3-D (slices linked at IoU >= {self.link_iou:g}^z-ratio"
            text += (f", cells under {self.min_volume} voxels removed)" if self.min_volume
                     else ")")
        return text


def probabilities_to_instances(prob: np.ndarray, min_size: int = 0, *,
                               seed_threshold: float | None = None,
                               foreground_threshold: float | None = None, dims: int = 2,
                               z_ratio: float = 1.0, link_iou: float = 0.5,
                               min_volume: int = 0) -> np.ndarray:
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

    ``dims=2``: slices are labelled independently: a label never spans two slices, and labels
    are unique across the whole stack (numbered slice after slice). ``dims=3``: the same
    objects, linked through the stack (`link_slices` with ``link_iou`` and ``z_ratio``, the z
    step over the xy pixel size), those under ``min_volume`` voxels removed
    (`drop_small_cells`), numbered in the order they first appear; a 2-D image is labelled as
    with ``dims=2``. Returns (H, W) or (Z, H, W) labels numbered 1..N, uint16, or
    uint32 when N > 65535.

    Memory: one slice is segmented at a time (the watershed makes float64 and padded copies of
    what it is given), so a stack needs about its labels' size beyond the probabilities
    (linking adds a few arrays of one slice pair's size).
    """
    prob = np.asarray(prob)
    if prob.ndim not in (3, 4) or prob.shape[0] != 3:
        raise ValueError(f"prob must be (3, H, W) or (3, Z, H, W), not shape {prob.shape}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, not {dims!r}")
    squeeze = prob.ndim == 3
    if squeeze:
        prob = prob[:, None]
    labels = np.zeros(prob.shape[1:], np.uint32)
    count = 0
    for z in range(prob.shape[1]):
        count = _label_slice(prob[:, z], labels[z], count, min_size, seed_threshold,
                             foreground_threshold)
    if dims == 3:
        labels = drop_small_cells(link_slices(labels, link_iou, z_ratio), min_volume)
        count = int(labels.max(initial=0))
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


def link_slices(labels: np.ndarray, link_iou: float = 0.5, z_ratio: float = 1.0) -> np.ndarray:
    """3-D objects from per-slice labels (see the module docstring): (Z, H, W) labels, each
    label within one slice (as `probabilities_to_instances` makes with ``dims=2``), to uint32
    labels of the same partition of each slice, objects linked through the stack numbered
    1..M in the order of their smallest input label.

    Links: between slices z and z + 1, pairs with IoU >= ``link_iou ** z_ratio`` that are each
    other's best match; then, among objects still without a link forward in slice z and
    without one backward in slice z + 1, best pairs with `CAP_INSIDE` of the smaller inside the
    larger; then, between those in slice z and those in slice z + 2, best pairs with IoU >=
    ``link_iou ** (2 z_ratio)``, the overlap counted where slice z + 1 is labelled.
    Vectorised per pair of slices (one count of label pairs each); the objects are the
    connected components of the links.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    if not 0 < link_iou <= 1:
        raise ValueError(f"link_iou must be in (0, 1], not {link_iou!r}")
    if not z_ratio > 0:
        raise ValueError(f"z_ratio must be > 0, not {z_ratio!r}")
    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    if labels.ndim != 3 or len(labels) < 2 or n == 0:
        return labels.astype(np.uint32, copy=False)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    linked_forward, linked_back = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    linked_forward[0] = linked_back[0] = True  # background is never an end or a start
    links = []

    def link(gap: int, threshold: float, inside: bool = False) -> None:
        """Link free ends in slice z to free starts in slice z + gap (see the docstring)."""
        for z in range(len(labels) - gap):
            ends = np.where(linked_forward[labels[z]], 0, labels[z])
            starts = np.where(linked_back[labels[z + gap]], 0, labels[z + gap])
            a, b = _mutual_best(*_overlaps(ends, starts, labels[z + 1] if gap == 2 else None),
                                area, threshold, inside)
            linked_forward[a], linked_back[b] = True, True
            links.append((a, b))

    link(1, link_iou ** z_ratio)
    link(1, CAP_INSIDE, inside=True)  # the tapering ends of a cell: one lies in the other
    link(2, link_iou ** (2 * z_ratio))
    a, b = (np.concatenate([pair[i] for pair in links]) for i in (0, 1))
    graph = sparse.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n + 1, n + 1))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, n + 1)
    np.minimum.at(first, component, np.arange(n + 1))  # each object's smallest input label
    rank = np.argsort(np.argsort(first)).astype(np.uint32)  # background's component ranks 0
    return rank[component][labels]


def drop_small_cells(labels: np.ndarray, min_volume: int) -> np.ndarray:
    """(Z, H, W) labels of 3-D objects without those of fewer than ``min_volume`` voxels
    (background there), the rest renumbered 1..N in their order; 2-D labels, one-slice stacks
    and ``min_volume`` <= 1 are returned as they are (see the module docstring)."""
    labels = np.asarray(labels)
    if min_volume <= 1 or labels.ndim != 3 or len(labels) < 2:
        return labels
    volume = np.bincount(labels.ravel())
    keep = volume >= min_volume
    keep[0] = False
    if keep.sum() == np.count_nonzero(volume[1:]):
        return labels  # nothing to remove
    return (np.cumsum(keep) * keep).astype(labels.dtype)[labels]


def _overlaps(a: np.ndarray, b: np.ndarray, between: np.ndarray | None = None):
    """(label in a, label in b, pixels in common) of every overlapping pair of two label
    images, counted only where ``between`` is labelled when given."""
    both = (a > 0) & (b > 0)
    if between is not None:
        both &= between > 0
    width = np.int64(max(int(b.max(initial=0)), 0) + 1)
    pairs, counts = np.unique(a[both].astype(np.int64) * width + b[both], return_counts=True)
    return pairs // width, pairs % width, counts


def _mutual_best(a: np.ndarray, b: np.ndarray, common: np.ndarray, area: np.ndarray,
                 threshold: float, inside: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (a, b) with IoU >= ``threshold`` (``area``: pixels of each label; with
    ``inside``, the share of the smaller of the two that lies in the other), best first: pairs
    where each is the other's best match (ties: the lower label) are taken, the labels they
    use set aside, and so on while any is left (the greedy matching by IoU, a round at once)."""
    smaller = np.minimum(area[a], area[b])
    iou = common / (smaller if inside else area[a] + area[b] - common)
    keep = iou >= threshold
    a, b, iou = a[keep], b[keep], iou[keep]
    taken_a, taken_b = [a[:0]], [b[:0]]
    while len(a):  # the best remaining pair is always mutual: each round takes one at least
        mutual = _is_best(a, b, iou) & _is_best(b, a, iou)
        taken_a.append(a[mutual])
        taken_b.append(b[mutual])
        free = ~np.isin(a, a[mutual]) & ~np.isin(b, b[mutual])
        a, b, iou = a[free], b[free], iou[free]
    return np.concatenate(taken_a), np.concatenate(taken_b)


def _is_best(owner: np.ndarray, other: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """bool per pair: it is its owner's highest-IoU pair (ties: the lowest other)."""
    order = np.lexsort((other, -iou, owner))
    first = np.ones(len(order), bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    best = np.zeros(len(order), bool)
    best[order[first]] = True
    return best


def score(params: PostProcess, pairs: Sequence[tuple]) -> dict:
    """Instance scores (`nf1prov.segment.evaluate.instance_scores`) of ``params`` on (prob,
    mask) or (prob, mask, z_ratio) pairs, counts pooled over the pairs: objects per slice for
    dims 2, 3-D objects by 3-D IoU for dims 3 (z_ratio 1 when a pair does not give it)."""
    from nf1prov.segment.evaluate import THRESHOLDS, instance_counts, instance_scores

    counts = np.zeros((len(THRESHOLDS), 3), np.int64)
    for prob, mask, *z_ratio in pairs:
        labels = params.segment(prob, *z_ratio)
        counts += instance_counts(mask, labels, per_slice=params.dims == 2)
    return instance_scores(counts)


def volume_grid(masks: Sequence[np.ndarray]) -> list[int]:
    """The ``min_volume`` values `tune` tries on validation stacks whose true labels are
    ``masks``: 0 and `MIN_VOLUME_SECTIONS` times the median area (pixels) of the true cells'
    per-slice objects; [0] when the masks hold no cell."""
    areas = np.concatenate([_section_areas(mask) for mask in masks] or [np.zeros(0, np.int64)])
    if not len(areas):
        return [0]
    section = float(np.median(areas))
    return [0, *sorted({max(1, round(k * section)) for k in MIN_VOLUME_SECTIONS})]


def _section_areas(mask: np.ndarray) -> np.ndarray:
    """Pixels of each labelled object of each slice of a ([Z,] H, W) label image."""
    mask = np.asarray(mask)
    slices = mask.reshape(-1, *mask.shape[-2:])
    areas = np.concatenate([np.bincount(s.ravel())[1:] for s in slices])
    return areas[areas > 0]


def _score_volumes(params: PostProcess, pairs: Sequence[tuple],
                   volumes: Sequence[int]) -> list[dict]:
    """`score` of ``params`` with each ``min_volume`` in ``volumes``, from one segmentation of
    each pair: a minimum volume only removes objects from what ``min_volume`` 0 makes."""
    from nf1prov.segment.evaluate import THRESHOLDS, instance_counts, instance_scores

    counts = np.zeros((len(volumes), len(THRESHOLDS), 3), np.int64)
    for prob, mask, *z_ratio in pairs:
        labels = params.replace(min_volume=0).segment(prob, *z_ratio)
        for i, volume in enumerate(volumes):
            counts[i] += instance_counts(mask, drop_small_cells(labels, volume),
                                         per_slice=False)
    return [instance_scores(c) for c in counts]


def tune(pairs: Sequence[tuple], start: PostProcess = PostProcess(),
         ) -> tuple[PostProcess, dict]:
    """The parameters that match the true cells best: highest instance F1 at IoU 0.5, ties
    broken by average precision (IoU 0.5:0.95), then by closeness to ``start``.

    ``pairs``: (prob (3, Z, H, W) float, mask (Z, H, W) instance labels) of validation stacks,
    or (prob, mask, z_ratio) with each stack's z step over its xy pixel size. The thresholds
    are searched together on a grid (`SEED_THRESHOLDS` x `FOREGROUND_THRESHOLDS`) at
    ``start.min_size``, then ``min_size`` over `MIN_SIZES` at the best thresholds: at most 41
    segmentations of the validation data. With ``start.dims == 3`` the parameters are those of
    3-D objects, scored by 3-D IoU (`score`), and ``start`` is the per-slice choice: first
    ``link_iou`` over `LINK_IOUS`, then the thresholds within 0.1 of the start's, then
    ``min_size``, then ``min_volume`` over `volume_grid` (0 and 0.5 to 4 cross-sections of a
    typical true cell), scored from one segmentation (`_score_volumes`): at most 23
    segmentations. Returns the parameters and their scores.
    """
    def objective(params: PostProcess, scores: dict) -> tuple:
        distance = sum(abs((a or 0.5) - (b or 0.5)) for a, b in (
            (params.seed_threshold, start.seed_threshold),
            (params.foreground_threshold, start.foreground_threshold),
            (params.link_iou, start.link_iou)))
        return (scores["instance_f1"], scores["instance_ap"], -distance,
                -abs(params.min_size - start.min_size),
                -abs(params.min_volume - start.min_volume))

    scored: dict[PostProcess, dict] = {}  # each setting segmented once

    def pick(current: PostProcess, candidates: list[PostProcess]) -> PostProcess:
        options = [current, *candidates]  # on ties the current setting stays
        for params in options:
            if params not in scored:
                scored[params] = score(params, pairs)
        return max(options, key=lambda p: objective(p, scored[p]))

    seeds, foregrounds = SEED_THRESHOLDS, FOREGROUND_THRESHOLDS
    best = start
    if start.dims == 3:  # near the per-slice choice: the cells' outlines are those objects
        best = pick(best, [best.replace(link_iou=v) for v in LINK_IOUS])
        seeds, foregrounds = (_near(seeds, start.seed_threshold),
                              _near(foregrounds, start.foreground_threshold))
    best = pick(best, [best.replace(seed_threshold=s, foreground_threshold=f)
                       for s, f in itertools.product(seeds, foregrounds)])
    best = pick(best, [best.replace(min_size=m) for m in MIN_SIZES])
    if start.dims == 3:
        volumes = volume_grid([mask for _, mask, *_ in pairs])
        candidates = [best.replace(min_volume=v) for v in volumes]
        scored |= {p: s for p, s in zip(candidates, _score_volumes(best, pairs, volumes),
                                        strict=True) if p not in scored}
        best = pick(best, candidates)
    return best, scored[best]


def _near(grid: Sequence[float], value: float | None) -> list[float]:
    """The values of ``grid`` within 0.1 of ``value`` (0.5 for the argmax rule's None)."""
    return [v for v in grid if abs(v - (0.5 if value is None else value)) < 0.1 + 1e-9]
