"""What a model sees of a stack, one definition for training, prediction, evaluation and export:
the input slices of each centre slice (`slice_windows`) and their normalisation (`normalise`).

A model sees each z-slice mapped by an affine ``(x - offset) / scale`` whose offset and scale
belong to that slice of that stack (never to a crop or a tile, so that a crop in training and the
same pixels in a whole-stack prediction get the same values). The method is the config's
``data.normalisation``:

- ``dtype_max`` (upstream, DESIGN 4): offset 0, scale the dtype's maximum (65535 for uint16).
  Only unsigned integer images have one.
- ``percentile``: offset the slice's 1st percentile, scale the distance from it to the 99.8th
  (as CSBDeep, StarDist and Cellpose normalise), values not clipped. Any real dtype. A real
  microscope rarely fills its dtype: a uint16 camera image whose values lie in 100..400 is
  nearly black under ``dtype_max``, and its brightness changes from one acquisition to the next.
"""

from __future__ import annotations

import numpy as np

from nf1prov.errors import UserError

METHODS = ("dtype_max", "percentile")
PERCENTILES = (1.0, 99.8)


def dtype_maximum(dtype: np.dtype) -> float:
    """What ``dtype_max`` divides by: the unsigned integer dtype's maximum (1 for bool).
    Raises UserError for any other dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return 1.0
    if np.issubdtype(dtype, np.unsignedinteger):
        return float(np.iinfo(dtype).max)
    raise UserError(
        f"input dtype {dtype} is not an unsigned integer type: data.normalisation 'dtype_max' "
        "divides images by their dtype's maximum (uint8/uint16), which a "
        f"{dtype} image does not have. Convert the image to uint8 or uint16, or train with "
        "data.normalisation = 'percentile'."
    )


def slice_ranges(stack: np.ndarray, method: str = "dtype_max") -> tuple[np.ndarray, np.ndarray]:
    """Offset and scale of every slice: two float32 arrays of shape (Z,).

    ``stack``: (Z, H, W) (or (H, W), one slice). A constant slice gets scale 1 under
    ``percentile`` (its values map to 0). Raises UserError for a dtype the method cannot scale.
    """
    stack = np.asarray(stack)
    if stack.ndim not in (2, 3):
        raise ValueError(f"stack must be (Z, H, W) or (H, W), not shape {stack.shape}")
    planes = stack.reshape(1 if stack.ndim == 2 else stack.shape[0], -1)
    if method == "dtype_max":
        depth = len(planes)
        return (np.zeros(depth, np.float32),
                np.full(depth, dtype_maximum(stack.dtype), np.float32))
    if method == "percentile":
        if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)
                or stack.dtype.kind == "b"):
            raise UserError(f"input dtype {stack.dtype} is not a real-valued image type; "
                            "percentile normalisation needs integers or floats.")
        low, high = np.percentile(planes, PERCENTILES, axis=1).astype(np.float32)
        scale = high - low
        return low, np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(METHODS)}")


def apply_ranges(slices: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``(x - offset) / scale`` of (S, H, W) ``slices`` with their (S,) ranges: the one
    formula training crops and whole-stack prediction share, so both give the same floats."""
    return ((np.asarray(slices, dtype=np.float32) - offset[:, None, None])
            / scale[:, None, None])


def normalise(stack: np.ndarray, method: str = "dtype_max") -> np.ndarray:
    """float32 (Z, H, W) or (H, W): each slice as ``(x - offset) / scale`` (`slice_ranges`)."""
    stack = np.asarray(stack)
    offset, scale = slice_ranges(stack, method)
    if stack.ndim == 2:
        return apply_ranges(stack[None], offset, scale)[0]
    return apply_ranges(stack, offset, scale)


def slice_windows(depth: int, input_slices: int) -> np.ndarray:
    """Indices of the input slices of every centre slice: int64 (depth, input_slices).

    Row ``z`` is ``z - k .. z + k`` (``k = input_slices // 2``) clamped to ``[0, depth - 1]``:
    edge slices repeat the first/last slice.
    """
    if input_slices < 1 or input_slices % 2 == 0:
        raise ValueError(f"input_slices must be odd and >= 1, not {input_slices}")
    half = input_slices // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)
