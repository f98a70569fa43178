"""Training crops: an odd window of z-slices in, the centre slice's 3-class mask out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nf1prov.data import augment
from nf1prov.data.cache import StackCache
from nf1prov.data.inputs import apply_ranges, slice_windows
from nf1prov.data.layout import DataError, FieldOfView


def crop_starts(length: int, crop: int, stride: int) -> np.ndarray:
    """Start offsets covering ``length`` with crops of ``crop`` every ``stride`` pixels; the last
    crop is aligned to the end so the whole extent is covered."""
    if crop > length:
        raise ValueError(f"a crop of {crop} pixels does not fit in {length} pixels")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, not {stride}")
    starts = np.arange(0, length - crop + 1, stride)
    if starts[-1] != length - crop:
        starts = np.append(starts, length - crop)
    return starts


class CropDataset(Dataset):
    """Every field × every centre slice × every crop position.

    Centre slices: with ``edge_slices="skip"`` (upstream) those whose window of
    ``input_slices`` lies inside the stack; with ``"clamp"`` all of them, the window clamped to
    the stack as in prediction (`nf1prov.data.inputs.slice_windows`). Crop positions lie on a grid
    of ``crop_stride`` pixels whose last row/column is aligned to the image edge, so the crops
    cover the whole image. Stacks and targets come from a `StackCache` under ``cache_dir``: each
    TIFF is decoded once (here, at construction) and read back as a memory map, also by
    DataLoader workers and later trainings.

    ``ds[i]`` is ``(image, target, i)``: image float32 (input_slices, C, C), each slice
    normalised with its own stack slice's range (`nf1prov.data.inputs`, method
    ``normalisation``), so a crop holds exactly the values whole-stack prediction gives those
    pixels; target float32 (3, C, C) one-hot (background, inner-cell, cell-boundary) of the
    centre slice. ``ds.meta(i)`` gives patient, well, site, z, y, x and a stable sample_id.

    Augmentation (training only): after ``ds.augment(settings, seed)`` (a config's
    ``[augment]`` section), ``ds.set_epoch(epoch)`` draws that epoch's transform of every crop
    (`nf1prov.data.augment`) and ``ds[i]`` returns crop i transformed; call it before each
    epoch, before the DataLoader iterator (and its workers) is created.
    """

    def __init__(self, fields: Sequence[FieldOfView], input_slices: int, crop_size: int,
                 crop_stride: int, boundary_thickness: float, cache_dir: Path | str,
                 normalisation: str = "dtype_max", edge_slices: str = "skip") -> None:
        self.fields = list(fields)
        self.input_slices = input_slices
        self.crop_size = crop_size
        self.boundary_thickness = boundary_thickness
        self.normalisation = normalisation
        self.cache = StackCache(cache_dir)
        self.augmentation: tuple[dict, int] | None = None  # (settings, seed)
        self.draws: augment.Draws | None = None
        half = input_slices // 2
        self.windows = []  # per field: int64 (Z, input_slices) slice indices of each centre
        rows = []
        for index, field in enumerate(self.fields):
            depth, height, width = self.cache.image(field.image_path).shape
            # Build the target and slice ranges now, in this process: DataLoader workers then
            # only open memory maps instead of each converting the same mask.
            self.cache.semantic(field.mask_path, boundary_thickness)
            self.cache.ranges(field.image_path, normalisation)
            self.windows.append(slice_windows(depth, input_slices))
            if min(height, width) < crop_size:
                raise DataError(f"{field.image_path} is {height}x{width} pixels, smaller than a "
                                f"{crop_size}x{crop_size} crop (data.crop_size). Lower "
                                "data.crop_size.")
            zs = np.arange(depth) if edge_slices == "clamp" else np.arange(half, depth - half)
            ys, xs = crop_starts(height, crop_size, crop_stride), crop_starts(width, crop_size,
                                                                              crop_stride)
            grid = np.stack(np.meshgrid(zs, ys, xs, indexing="ij"), axis=-1).reshape(-1, 3)
            rows.append(np.column_stack([np.full(len(grid), index), grid]))
        # (N, 4): field index, centre z, crop y, crop x
        self.samples = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)

    def augment(self, settings: dict, seed: int) -> None:
        """Transform crops as ``settings`` says, drawn from ``seed`` and the epoch (no-op when
        every transform is off)."""
        self.augmentation = (settings, seed) if augment.enabled(settings) else None
        self.draws = None

    def set_epoch(self, epoch: int) -> None:
        if self.augmentation is not None:
            settings, seed = self.augmentation
            self.draws = augment.draw(settings, len(self), seed, epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        field_index, z, y, x = (int(v) for v in self.samples[i])
        field, size = self.fields[field_index], self.crop_size
        slices = self.windows[field_index][z]
        stack = self.cache.image(field.image_path)
        offset, scale = self.cache.ranges(field.image_path, self.normalisation)
        window = stack[slices, y:y + size, x:x + size]
        target = self.cache.semantic(field.mask_path, self.boundary_thickness)
        crop = target[:, z, y:y + size, x:x + size]
        offset, scale = offset[slices], scale[slices]
        if self.draws is not None:
            turns, flip = int(self.draws.turns[i]), bool(self.draws.flips[i])
            window, crop = augment.orient(window, turns, flip), augment.orient(crop, turns, flip)
            # image * gain + shift, folded into the normalisation's one pass over the pixels
            gain, shift = self.draws.gain[i], self.draws.shift[i]
            offset, scale = offset - shift * scale / gain, scale / gain
        image = apply_ranges(window, offset, scale)
        return (torch.from_numpy(np.ascontiguousarray(image)),
                torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32)), i)

    def meta(self, i: int) -> dict:
        field_index, z, y, x = (int(v) for v in self.samples[i])
        field = self.fields[field_index]
        return {
            "patient": field.patient, "well": field.well, "site": field.site,
            "z": z, "y": y, "x": x,
            "sample_id": f"{field.patient}_{field.well}-{field.site}_z{z:03d}_y{y:05d}_x{x:05d}",
        }
