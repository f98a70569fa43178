"""Normalisation: one definition, the same floats in a training crop and in whole-stack
prediction, for both methods (DESIGN 4's dtype maximum and per-slice percentiles)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from nf1prov.data.dataset import CropDataset
from nf1prov.data.inputs import PERCENTILES, normalise, slice_ranges
from nf1prov.data.layout import discover_fields, validate_fields
from nf1prov.errors import UserError
from nf1prov.segment.predict import predict_stack, slice_windows


def dim_stack(depth=4, size=48, seed=0):
    """A real camera's uint16 stack: values in a narrow band far below the dtype maximum, each
    slice brighter than the last (as when the focus or the lamp drifts)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(200, 30, (depth, size, size)) + 40 * np.arange(depth)[:, None, None]
    return base.clip(0, None).astype(np.uint16)


def write_field(root, stack, patient="NF0001", fov="A1-1"):
    images = root / patient / "zstack_images" / fov
    masks = root / patient / "segmentation_masks" / fov
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    tifffile.imwrite(images / f"{fov}_TRANS.tif", stack)
    mask = np.zeros(stack.shape, np.uint16)
    mask[:, 8:20, 8:20] = 1
    tifffile.imwrite(masks / "cell_mask.tiff", mask)


def test_percentile_ranges_are_per_slice():
    stack = dim_stack()
    offset, scale = slice_ranges(stack, "percentile")
    assert offset.dtype == scale.dtype == np.float32 and offset.shape == (4,)
    for z in range(4):
        low, high = np.percentile(stack[z], PERCENTILES)
        assert offset[z] == pytest.approx(low) and scale[z] == pytest.approx(high - low)
    image = normalise(stack, "percentile")
    # every slice spans about 0..1 whatever its brightness; dtype_max leaves it near 0
    assert np.all(np.abs(np.percentile(image, PERCENTILES, axis=(1, 2)) - [[0], [1]]) < 1e-3)
    assert normalise(stack).max() < 0.01


def test_constant_slices_and_float_images():
    flat = np.full((2, 8, 8), 7, np.uint16)
    np.testing.assert_array_equal(normalise(flat, "percentile"), 0)  # scale 1, not a division by 0
    floats = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    assert np.isfinite(normalise(floats, "percentile")).all()  # percentile takes any real dtype
    with pytest.raises(UserError, match="percentile"):  # the message offers the way out
        normalise(floats, "dtype_max")


@pytest.mark.parametrize("method", ["dtype_max", "percentile"])
def test_training_crops_equal_the_prediction_inputs(tmp_path, method):
    stack = dim_stack()
    write_field(tmp_path / "data", stack)
    fields = discover_fields(tmp_path / "data")
    validate_fields(fields, 3, 32, normalisation=method, edge_slices="clamp")
    ds = CropDataset(fields, input_slices=3, crop_size=32, crop_stride=16, boundary_thickness=2,
                     cache_dir=tmp_path / "cache", normalisation=method, edge_slices="clamp")
    assert len(ds) == 4 * 2 * 2  # clamp: every slice is a centre, edge slices included
    whole = normalise(stack, method)
    windows = slice_windows(4, 3)
    for i in range(len(ds)):
        meta = ds.meta(i)
        z, y, x = meta["z"], meta["y"], meta["x"]
        expected = whole[windows[z], y:y + 32, x:x + 32]
        np.testing.assert_array_equal(ds[i][0].numpy(), expected)  # bitwise

    # and prediction feeds the model those same values: a "model" whose logits are its input
    prob = predict_stack(CentreSlice(), stack, input_slices=3, tile_size=32,
                         normalisation=method)
    np.testing.assert_allclose(prob[0], 1 / (1 + np.exp(-whole.astype(np.float64))), rtol=1e-6)


class CentreSlice(torch.nn.Module):
    """Logits = the centre input slice, for every class."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, 1:2].repeat(1, 3, 1, 1)


def test_skip_needs_enough_slices_and_clamp_takes_a_2d_image(tmp_path):
    write_field(tmp_path / "data", dim_stack(depth=1))
    fields = discover_fields(tmp_path / "data")
    with pytest.raises(UserError, match="edge_slices"):
        validate_fields(fields, 3, 32)
    validate_fields(fields, 3, 32, edge_slices="clamp")
    ds = CropDataset(fields, 3, 32, 16, 2, tmp_path / "cache", normalisation="percentile",
                     edge_slices="clamp")
    image, _, _ = ds[0]
    assert image.shape == (3, 32, 32) and np.array_equal(image[0], image[2])
    with pytest.raises(UserError, match="unsigned"):
        write_field(tmp_path / "float", dim_stack().astype(np.float32))
        validate_fields(discover_fields(tmp_path / "float"), 3, 32)
