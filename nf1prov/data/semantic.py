"""Instance labels to the three semantic classes the model predicts (DESIGN 3.6)."""

from __future__ import annotations

import numpy as np

from nf1prov.data import CLASS_NAMES as CLASS_NAMES

BACKGROUND, INNER_CELL, CELL_BOUNDARY = 0, 1, 2


def _half_disk_offsets(thickness: float) -> list[tuple[int, int]]:
    """Offsets (dy, dx) with 0 < dy² + dx² <= thickness², one of each ± pair."""
    reach = int(np.floor(thickness))
    return [
        (dy, dx)
        for dy in range(0, reach + 1)
        for dx in range(-reach, reach + 1)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx <= thickness * thickness
    ]


# Above this thickness the shifted comparisons (O(thickness²) passes over the slice) cost more
# than distance transforms restricted to each cell's bounding box.
SHIFT_METHOD_MAX_THICKNESS = 16


def boundary_mask(labels: np.ndarray, thickness: float = 2) -> np.ndarray:
    """Labelled pixels within Euclidean distance ``thickness`` of a pixel of another label.

    Parameters
    ----------
    labels : (Z, H, W) or (H, W) integer array
        Instance labels, 0 is background.
    thickness : float
        Boundary thickness in pixels (>= 1).

    Returns
    -------
    (same shape) bool array

    Pixels outside the array do not count as "another label"; slices are independent.
    For thickness <= 16 the label image is compared with itself shifted by every offset inside
    the disk of radius ``thickness``: a pixel's nearest differently-labelled pixel lies at
    distance <= thickness exactly when one of those offsets reaches it, so this equals a
    per-label ``distance_transform_edt`` test, in O(thickness² · pixels) vectorised work.
    Thicker boundaries use exact distance transforms of each cell's bounding box instead.
    """
    labels = np.asarray(labels)
    if thickness > SHIFT_METHOD_MAX_THICKNESS:
        if labels.ndim == 2:
            return _boundary_by_cell_edt(labels, thickness)
        flat = labels.reshape(-1, *labels.shape[-2:])
        out = np.stack([_boundary_by_cell_edt(s, thickness) for s in flat]) if len(flat) else (
            np.zeros(flat.shape, dtype=bool))
        return out.reshape(labels.shape)
    differs = np.zeros(labels.shape, dtype=bool)
    height, width = labels.shape[-2:]
    for dy, dx in _half_disk_offsets(thickness):
        if dy >= height or abs(dx) >= width:
            continue
        # a = pixel p, b = pixel p + (dy, dx); both in bounds.
        ys_a, ys_b = slice(0, height - dy), slice(dy, height)
        xs_a = slice(max(0, -dx), width - max(0, dx))
        xs_b = slice(max(0, dx), width - max(0, -dx))
        diff = labels[..., ys_a, xs_a] != labels[..., ys_b, xs_b]
        differs[..., ys_a, xs_a] |= diff
        differs[..., ys_b, xs_b] |= diff
    return differs & (labels != 0)


def _boundary_by_cell_edt(labels: np.ndarray, thickness: float) -> np.ndarray:
    """(H, W) bool boundary of one slice via distance transforms of each cell's bounding box.

    Exact: the nearest pixel q of another label than p's label L has a 4-neighbour of label L
    (step from q towards p: that pixel is closer to p, so it is not foreign), hence q lies in
    L's bounding box grown by one pixel, and the transform of that box sees every candidate.
    """
    from scipy import ndimage

    boundary = np.zeros(labels.shape, dtype=bool)
    # Dense labels 1..n so find_objects' list stays small whatever the label values are.
    values, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape) + (0 if values[0] == 0 else 1)
    height, width = labels.shape
    for index, box in enumerate(ndimage.find_objects(dense), start=1):
        if box is None:
            continue
        ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, height))
        xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, width))
        cell = dense[ys, xs] == index
        if cell.all():  # no other label anywhere near, hence none in the slice
            continue
        near = ndimage.distance_transform_edt(cell) <= thickness
        boundary[ys, xs] |= cell & near
    return boundary


def instance_to_semantic(instance_mask: np.ndarray, boundary_thickness: float = 2) -> np.ndarray:
    """One-hot semantic target from instance labels.

    Parameters
    ----------
    instance_mask : (Z, H, W) integer array
        Instance labels; 0 is background.
    boundary_thickness : float
        A labelled pixel whose Euclidean distance to the nearest pixel of a different label
        (background included; outside the array does not count) is <= this is cell-boundary,
        otherwise inner-cell.

    Returns
    -------
    (3, Z, H, W) uint8 array, channels background, inner-cell, cell-boundary; exactly one
    channel is 1 at every pixel.
    """
    instance_mask = np.asarray(instance_mask)
    if instance_mask.ndim != 3:
        raise ValueError(f"instance_mask must be (Z, H, W), got shape {instance_mask.shape}")
    if not np.issubdtype(instance_mask.dtype, np.integer):
        raise ValueError(f"instance_mask must hold integer labels, got {instance_mask.dtype}")
    boundary = boundary_mask(instance_mask, boundary_thickness)
    background = instance_mask == 0
    semantic = np.empty((3, *instance_mask.shape), dtype=np.uint8)
    semantic[BACKGROUND] = background
    semantic[CELL_BOUNDARY] = boundary
    semantic[INNER_CELL] = ~(background | boundary)
    return semantic
