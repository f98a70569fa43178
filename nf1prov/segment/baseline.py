"""The classical baseline every evaluation is compared with (scikit-image, no learning).

Per slice of a brightfield z-stack:

1. normalise each slice by its percentiles (any dtype; Otsu does not depend on the scale) and
   smooth with a Gaussian (``sigma`` pixels);
2. threshold with Otsu's method; which side is foreground (``foreground``): ``"dark"``,
   ``"bright"``, or ``"auto"``, the side that covers fewer pixels (cells are the minority of a
   field of view; brightfield cells can be darker or brighter than the medium);
3. fill holes and drop objects smaller than ``min_size`` pixels;
4. split touching cells with a watershed of the negated Euclidean distance transform, seeded at
   its local maxima at least ``min_distance`` pixels apart (one seed per connected component at
   the least).

`segment_baseline_3d` takes the same steps on the whole stack at once, so that a cell is one 3-D
object through the slices it spans: smoothing, one Otsu threshold, holes filled slice by slice,
small objects removed in 3-D, a distance transform in physical units (``z_ratio``: the z step
over the xy pixel size) and a 3-D watershed from its peaks.

`segment_baseline` returns instance labels; `labels_to_probabilities` turns them into the same
(3, Z, H, W) class-channel form a model predicts (one-hot of `instance_to_semantic`), so both go
through one evaluation path.
"""

from __future__ import annotations

import numpy as np

from nf1prov.data.inputs import normalise


def segment_baseline(stack: np.ndarray, *, sigma: float = 2.0, min_size: int = 10,
                     min_distance: int = 5, foreground: str = "auto") -> np.ndarray:
    """Instance labels of a brightfield stack by smoothing, Otsu and distance watershed.

    ``stack``: (Z, H, W) or (H, W), any real dtype. Returns labels of the same shape, each
    slice labelled on its own (labels unique across the stack), uint16 (uint32 above 65535).
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential, watershed

    _check_foreground(foreground)
    squeeze = stack.ndim == 2
    image = normalise(stack[None] if squeeze else stack, "percentile")
    smooth = ndimage.gaussian_filter(image, sigma=(0, sigma, sigma))
    labels = np.zeros(image.shape, np.int64)
    offset = 0
    for z, plane in enumerate(smooth):  # one Otsu threshold and watershed per slice
        if plane.max() == plane.min():
            continue
        mask = ndimage.binary_fill_holes(_otsu_cells(plane, foreground))
        if min_size > 1:
            mask = remove_small_objects(mask, max_size=min_size - 1)
        if not mask.any():
            continue
        distance = ndimage.distance_transform_edt(mask)
        components, n = ndimage.label(mask)
        peaks = peak_local_max(distance, min_distance=min_distance, labels=components,
                               exclude_border=False, num_peaks_per_label=np.inf)
        markers = np.zeros(plane.shape, np.int64)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        # A component without a peak (a plateau) still gets one seed: its own label.
        seeded = np.zeros(n + 1, bool)
        seeded[components[markers > 0]] = True
        unseeded = ~seeded[components] & mask
        markers[unseeded] = components[unseeded] + len(peaks)
        plane_labels = watershed(-distance, markers, mask=mask)
        plane_labels = relabel_sequential(plane_labels)[0]
        labels[z][plane_labels > 0] = plane_labels[plane_labels > 0] + offset
        offset += int(plane_labels.max())
    dtype = np.uint16 if offset <= np.iinfo(np.uint16).max else np.uint32
    labels = labels.astype(dtype)
    return labels[0] if squeeze else labels


def segment_baseline_3d(stack: np.ndarray, *, z_ratio: float = 1.0, sigma: float = 2.0,
                        min_size: int = 10, min_distance: int = 5,
                        foreground: str = "auto") -> np.ndarray:
    """Instance labels of a stack whose cells are 3-D objects (see the module docstring).

    ``stack``: (Z, H, W), any real dtype; a (H, W) image or a one-slice stack goes through
    `segment_baseline` (one slice has no depth). ``z_ratio``: z step / xy pixel size (> 0).
    Lengths are in xy pixels, the physical unit: the Gaussian has ``sigma`` (``sigma /
    z_ratio`` slices in z); objects under ``min_size`` voxels (6-connected) are removed; seeds
    are the maxima of the distance transform (``sampling=(z_ratio, 1, 1)``) over a box reaching
    ``min_distance`` pixels each way (``round(min_distance / z_ratio)`` slices), touching maxima
    one seed, every object at least one. Returns (Z, H, W) labels, each cell one label through
    the slices it spans, numbered 1..N, uint16 (uint32 above 65535).
    """
    from scipy import ndimage
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential, watershed

    _check_foreground(foreground)
    if not z_ratio > 0:
        raise ValueError(f"z_ratio (z step / xy pixel size) must be > 0, not {z_ratio!r}")
    if stack.ndim == 2 or stack.shape[0] == 1:
        return segment_baseline(stack, sigma=sigma, min_size=min_size,
                                min_distance=min_distance, foreground=foreground)
    labels = np.zeros(stack.shape, np.uint16)
    smooth = ndimage.gaussian_filter(np.asarray(stack, np.float32),
                                     sigma=(sigma / z_ratio, sigma, sigma))
    if smooth.max() == smooth.min():
        return labels
    in_plane = np.zeros((3, 3, 3), bool)  # holes are filled slice by slice: a cell cut by the
    in_plane[1] = ndimage.generate_binary_structure(2, 1)  # stack's end is open in 3-D
    mask = ndimage.binary_fill_holes(_otsu_cells(smooth, foreground), structure=in_plane)
    if min_size > 1:
        mask = remove_small_objects(mask, max_size=min_size - 1)
    if not mask.any():
        return labels
    distance = ndimage.distance_transform_edt(mask, sampling=(z_ratio, 1.0, 1.0))
    reach = (2 * round(min_distance / z_ratio) + 1, 2 * min_distance + 1, 2 * min_distance + 1)
    peaks = mask & (distance == ndimage.maximum_filter(distance, size=reach))
    markers, n = ndimage.label(peaks, structure=np.ones((3, 3, 3), bool))
    components, _ = ndimage.label(mask)
    # A component without a peak still gets one seed: its own label.
    seeded = np.zeros(components.max() + 1, bool)
    seeded[components[markers > 0]] = True
    unseeded = ~seeded[components] & mask
    markers[unseeded] = components[unseeded] + n
    found = relabel_sequential(watershed(-distance, markers, mask=mask))[0]
    return found.astype(np.uint16 if found.max() <= np.iinfo(np.uint16).max else np.uint32)


def _check_foreground(foreground: str) -> None:
    if foreground not in ("auto", "dark", "bright"):
        raise ValueError(f"foreground must be auto, dark or bright, not {foreground!r}")


def _otsu_cells(image: np.ndarray, foreground: str) -> np.ndarray:
    """The side of Otsu's threshold of ``image`` (one slice, or a whole stack) that holds the
    cells: ``dark``, ``bright``, or with ``auto`` the side covering fewer pixels."""
    from skimage.filters import threshold_otsu

    dark = image < threshold_otsu(image)
    if foreground == "dark" or (foreground == "auto" and dark.mean() <= 0.5):
        return dark
    return ~dark


def labels_to_probabilities(labels: np.ndarray, boundary_thickness: int) -> np.ndarray:
    """One-hot float32 (3, Z, H, W) classes of (Z, H, W) instance labels, by
    `nf1prov.data.semantic.instance_to_semantic` with ``boundary_thickness``."""
    from nf1prov.data.semantic import instance_to_semantic

    return instance_to_semantic(labels, boundary_thickness).astype(np.float32)
