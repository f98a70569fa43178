"""Whole-stack prediction with a trained segmenter: arrays in, arrays out.

Array functions (NumPy in, NumPy out; shapes and dtypes in each docstring):

- `normalise(stack, method)` -- (Z, H, W) -> float32, each slice normalised as in training
  (`nf1prov.data.inputs`: ``dtype_max``, upstream's, or ``percentile``).
- `slice_windows(depth, input_slices)` (from `nf1prov.data.inputs`) -- the input slices of each
  centre slice. Edge slices use **clamped** windows: a slice index outside the stack is replaced
  by the nearest slice (the first or last), so a stack of any depth Z >= 1 can be predicted, a
  single 2-D image included.
- `blend_window(tile_size, overlap)` -- the 1-D weight of a tile along one axis.
- `tile_grid(height, width, tile_size, overlap)` -- where the tiles of a slice go, with weights.
- `predict_stack(model, stack, ...)` -- float32 (3, Z, H, W) per-class probabilities.

Tiling. Tiles of ``tile_size`` (the training crop size, a multiple of 16, so every tile is a
valid UNet input) are laid from the top-left corner with stride ``tile_size - overlap``; the last
tile of each row and column ends at the image border (as MONAI's sliding window does), so no tile
lies outside the image and a tile's border pixels see the image as a whole-slice pass does
(slices are reflect-padded at the bottom and right to multiples of 16 first, as for that pass).
Tiles of every slice are cut and run through the model in batches on its device, weighted by a
separable window that is 1 in the middle and falls off as ``sin^2`` over the ``overlap`` pixels a
neighbour shares (smooth, ~0 at tile edges where zero-padded convolutions are least reliable;
flat up to the image border, where there is no neighbour), and added up on the device; the
weights are divided by their sum beforehand, so adjacent tiles' ramps blend without seams
(``sin^2 + cos^2 = 1``). ``tile_size=None`` predicts each whole slice in a single pass, the
reference the tiling is tested against; an axis shorter than a tile gets one tile of its whole
length.

Memory. On the CPU no float copy of the stack is made (tiles are cut from the stack as read and
normalised a batch at a time) and tiles are added straight into the float32 (3, Z, H, W) output,
so a prediction holds the stack, its output and one batch; `instances` then segments a slice at
a time. `benchmarks/bench_predict_memory.py` measures the peak resident set of `nf1prov
predict` on a 4096 x 4096 image against an earlier commit's.

Speed. The model is run as an inference copy (`inference_copy`: batch norm folded into the
convolutions, channels-last memory), about 1.7x the throughput of the module as trained on a CPU;
`benchmarks/bench_predict.py` compares with MONAI's ``sliding_window_inference``.

Probabilities are per-class sigmoids of the logits (the model is trained with per-class BCE,
DESIGN 4), so the three channels need not sum to 1; the class map is their argmax.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nf1prov.data.inputs import apply_ranges, normalise, slice_ranges, slice_windows
from nf1prov.data.semantic import CLASS_NAMES

__all__ = ["CLASS_NAMES", "blend_window", "class_map", "inference_copy", "normalise",
           "predict_stack", "slice_windows", "tile_grid", "tile_starts"]


# ---------------------------------------------------------------------------------------------
# Array functions
# ---------------------------------------------------------------------------------------------

def blend_window(tile_size: int, overlap: int, *, first: bool = False,
                 last: bool = False) -> np.ndarray:
    """1-D weight of a tile along one axis: float32 (T,), 1 in the middle and raised-cosine ramps
    ``sin^2(pi (i + 0.5) / (2 r))`` over the ``r = min(overlap, T // 2)`` pixels at each edge
    that a neighbouring tile overlaps; flat (1) up to the edge on the side of the image border
    (``first``/``last``), where no tile overlaps. Adjacent tiles ``T - overlap`` apart have
    ramps that add up to 1 (``sin^2 + cos^2``)."""
    ramp_length = min(overlap, tile_size // 2)
    window = np.ones(tile_size, np.float32)
    if ramp_length:
        ramp = np.sin(np.pi * (np.arange(ramp_length) + 0.5) / (2 * ramp_length)) ** 2
        if not first:
            window[:ramp_length] = ramp
        if not last:
            window[tile_size - ramp_length:] = ramp[::-1]
    return window


def tile_starts(size: int, tile_size: int, overlap: int) -> np.ndarray:
    """int64 start positions of tiles of ``tile_size`` covering ``[0, size)`` (size >= tile_size)
    with stride ``tile_size - overlap``; the last tile ends at the image border."""
    if size <= tile_size:
        return np.zeros(1, np.int64)
    count = math.ceil((size - tile_size) / (tile_size - overlap)) + 1
    stride = tile_size - overlap
    return np.minimum(np.arange(count) * stride, size - tile_size)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one (H, W) slice go and how they are weighted.

    ``tile_shape``: (th, tw), multiples of 16; ``padded_shape``: (H', W'), the slice's shape
    rounded up to multiples of 16, reflect-padded at the bottom and right; ``starts``: int64
    tile starts along y and x (tiles are every pair); ``weights``: float32 (n_y, th) and
    (n_x, tw), the 1-D weights of each tile along y and x, already divided by the summed weights
    of all tiles, so that the weighted tiles of a slice add up to its blend directly (the weight
    of tile (i, j) is ``weights[0][i][:, None] * weights[1][j][None, :]``).
    """

    tile_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    starts: tuple[np.ndarray, np.ndarray]
    weights: tuple[np.ndarray, np.ndarray]


def tile_grid(height: int, width: int, tile_size: int | None, overlap: int = 0) -> TileGrid:
    """The tile grid of an (H, W) slice, padded at the bottom and right to multiples of 16 as a
    whole-slice pass is: square tiles of ``tile_size`` (a multiple of 16) overlapping by
    ``overlap`` pixels (0 <= overlap < tile_size), laid from the top-left corner with the last
    tile of each row and column at the padded border, so that border pixels see what a
    whole-slice pass sees; an axis shorter than a tile gets one tile of the whole (padded) axis.
    ``tile_size=None``: one tile, the whole slice."""
    if tile_size is not None and not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), not {overlap}")
    tile_shape, padded, starts, weights = [], [], [], []
    for size in (height, width):
        whole = size + (-size) % 16
        tile = whole if tile_size is None else min(tile_size, whole)
        axis_starts = tile_starts(whole, tile, overlap)
        n = len(axis_starts)
        windows = np.stack([blend_window(tile, overlap, first=i == 0, last=i == n - 1)
                            for i in range(n)])
        total = np.zeros(whole, np.float32)
        for start, window in zip(axis_starts, windows, strict=True):
            total[start:start + tile] += window
        windows /= np.stack([total[start:start + tile] for start in axis_starts])
        tile_shape.append(tile)
        starts.append(axis_starts)
        weights.append(windows)
        padded.append(whole)
    return TileGrid(tuple(tile_shape), tuple(padded), tuple(starts), tuple(weights))


def predict_stack(
    model,
    stack: np.ndarray,
    *,
    input_slices: int,
    tile_size: int | None,
    overlap: int | None = None,
    batch_size: int = 8,
    device=None,
    normalisation: str = "dtype_max",
    slices: Iterable[int] | None = None,
    progress: bool = False,
    description: str = "",
) -> np.ndarray:
    """Per-class probabilities of every slice of a z-stack.

    ``model``: a torch module mapping float32 (N, input_slices, h, w) with h, w multiples of 16
    to (N, 3, h, w) logits; it is not changed (an inference copy is made, `inference_copy`).
    ``stack``: (Z, H, W) or (H, W) image, normalised slice by slice with ``normalisation`` (the
    model's ``data.normalisation``: ``dtype_max`` needs unsigned integers). ``tile_size``: the
    training crop size (a multiple of 16), or None for one pass per whole slice. ``overlap``: tile
    overlap in pixels (default ``tile_size // 2``). ``batch_size``: tiles per forward pass.
    ``device``: a torch device (default the model's; CUDA runs under autocast, as training does).
    ``slices``: the centre slices to predict (default all; their input windows still come from the
    whole stack). Returns float32 (3, Z, H, W) sigmoid probabilities (Z = the number of
    ``slices``).
    """
    import torch

    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"stack must be (Z, H, W) or (H, W), not shape {stack.shape}")
    _, height, width = stack.shape
    if tile_size is not None and tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16, not {tile_size}")
    overlap = (tile_size or 0) // 2 if overlap is None else overlap
    grid = tile_grid(height, width, tile_size, overlap)
    windows = slice_windows(len(stack), input_slices)
    if slices is not None:
        windows = windows[np.asarray(list(slices), dtype=np.int64)]
    device = torch.device(next(model.parameters()).device if device is None else device)
    model = inference_copy(model, device)
    weights_y, weights_x = (torch.from_numpy(w).to(device) for w in grid.weights)
    # On a GPU the normalised stack goes to the device once and tiles are cut there. On the CPU
    # NumPy cuts tiles of the stack as read and normalises each batch (elementwise, so the
    # floats are those of a normalised stack, which is never made: 2x the input's bytes), one
    # thread per copy (torch's threaded copies of small tiles stall when another process holds
    # a core).
    cuda = device.type == "cuda"
    offset, scale = slice_ranges(stack, normalisation)
    if cuda:
        image = _pad_to_grid(apply_ranges(stack, offset, scale), grid)
        source = torch.from_numpy(image).pin_memory().to(device, non_blocking=True)
    else:
        source = _pad_to_grid(stack, grid)

    # Every (slice, tile) pair is one item, slice by slice; batches run across slice borders.
    # On the CPU each tile is added straight into the output (zeros, so each pixel sums its
    # tiles in the same order a separate blend would); on a GPU each slice is blended on the
    # device and copied out once its last tile is in.
    (tile_h, tile_w), (n_y, n_x) = grid.tile_shape, (len(grid.starts[0]), len(grid.starts[1]))
    tiles_per_slice = n_y * n_x
    items = np.stack(np.meshgrid(np.arange(len(windows)), np.arange(n_y), np.arange(n_x),
                                 indexing="ij"), axis=-1).reshape(-1, 3)
    out = np.zeros((3, len(windows), height, width), np.float32)
    blends: dict = {}  # on a GPU: slice -> its blend so far
    bar = _progress(len(items), description, progress)
    # Mixed precision on CUDA, as in training (DESIGN 4); exact float32 on the CPU.
    autocast = torch.autocast("cuda", enabled=cuda)
    with torch.inference_mode(), autocast:
        for first in range(0, len(items), batch_size):
            batch = items[first:first + batch_size]
            ys, xs = grid.starts[0][batch[:, 1]], grid.starts[1][batch[:, 2]]
            # One copy per input slice of each tile, straight from views of the stack.
            tiles = [source[k, y:y + tile_h, x:x + tile_w]
                     for z, y, x in zip(batch[:, 0], ys, xs, strict=True) for k in windows[z]]
            if cuda:
                inputs = torch.stack(tiles)
            else:
                ks = windows[batch[:, 0]].ravel()  # each tile's input slice, in tile order
                inputs = torch.from_numpy(apply_ranges(np.stack(tiles), offset[ks], scale[ks]))
            inputs = inputs.view(len(batch), windows.shape[1], tile_h, tile_w).contiguous(
                memory_format=torch.channels_last)
            probs = torch.sigmoid(model(inputs).float())
            probs *= (weights_y[batch[:, 1], :, None] * weights_x[batch[:, 2], None, :])[:, None]
            if not cuda:
                _add_tiles(out, probs.numpy(), batch[:, 0], ys, xs)
                bar.update(len(batch))
                continue
            for prob, z, y, x in zip(probs, batch[:, 0], ys, xs, strict=True):
                if z not in blends:
                    blends[z] = torch.zeros((3, *grid.padded_shape), device=device)
                blends[z][:, y:y + tile_h, x:x + tile_w] += prob
            for z in np.unique(batch[:, 0]):
                if first + len(batch) >= (z + 1) * tiles_per_slice:  # its last tile is in
                    out[:, z] = blends.pop(z)[:, :height, :width].cpu().numpy()
            bar.update(len(batch))
    bar.close()
    return out


def _add_tiles(out: np.ndarray, probs: np.ndarray, zs, ys, xs) -> None:
    """Add weighted (B, 3, th, tw) tiles into the (3, Z, H, W) ``out`` at their slices ``zs``
    and starts ``ys``, ``xs``, less what lies in the padding beyond the image."""
    height, width = out.shape[2:]
    for prob, z, y, x in zip(probs, zs, ys, xs, strict=True):
        h, w = min(prob.shape[1], height - y), min(prob.shape[2], width - x)
        out[:, z, y:y + h, x:x + w] += prob[:, :h, :w]


def _pad_to_grid(stack: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(Z, H, W) ``stack`` reflect-padded at the bottom and right to the grid's padded shape
    (the stack itself when no padding is needed)."""
    pad_h, pad_w = grid.padded_shape[0] - stack.shape[1], grid.padded_shape[1] - stack.shape[2]
    if not (pad_h or pad_w):
        return stack
    return np.pad(stack, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")


def inference_copy(model, device):
    """A copy of a torch ``model`` for prediction on ``device``: eval mode, each batch norm folded
    into the convolution before it (one pass instead of two: the same function up to float
    rounding), channels-last memory (what oneDNN and cuDNN run fastest). ``model`` is unchanged."""
    import copy

    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if (type(conv) is nn.Conv2d and isinstance(norm, nn.BatchNorm2d)
                    and norm.running_mean is not None):
                module[i], module[i + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
    return model.to(device, memory_format=torch.channels_last)


CLASS_MAP_CHUNK = 1 << 16  # pixels per argmax (which copies them and makes int64 indices)


def class_map(prob: np.ndarray) -> np.ndarray:
    """uint8 argmax class map of (3, ...) probabilities: shape (...), computed a chunk of pixels
    at a time."""
    prob = np.asarray(prob)
    pixels = prob.reshape(len(prob), -1)  # a view of a contiguous array
    classes = np.empty(pixels.shape[1], np.uint8)
    for start in range(0, pixels.shape[1], CLASS_MAP_CHUNK):
        chunk = slice(start, start + CLASS_MAP_CHUNK)
        classes[chunk] = np.argmax(pixels[:, chunk], axis=0)
    return classes.reshape(prob.shape[1:])


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description or None, unit="tile", disable=not enabled,
                leave=False)
