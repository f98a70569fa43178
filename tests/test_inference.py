"""Tiled whole-stack prediction, instance labels and `nf1prov predict` (tiny models, CPU)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from scipy import ndimage
from torch import nn

from models.unet import UNet
from nf1prov.cli import cli
from nf1prov.config import defaults, to_toml
from nf1prov.errors import UserError
from nf1prov.segment.files import read_stack
from nf1prov.segment.instances import probabilities_to_instances
from nf1prov.segment.predict import (
    blend_window,
    class_map,
    inference_copy,
    normalise,
    predict_stack,
    slice_windows,
    tile_grid,
)


def smooth_stack(shape, seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), (0, 2, 2))
    img = (img - img.min()) / (img.max() - img.min())
    return (img * np.iinfo(dtype).max).astype(dtype)


def unet(width=4, in_channels=3, gain=30.0):
    """A random width-4 UNet whose head is scaled so that its outputs vary strongly in space."""
    torch.manual_seed(0)
    model = UNet(in_channels, 3, width).eval()
    with torch.no_grad():
        model.head.weight.mul_(gain)
    return model


class Pointwise(nn.Module):
    """1x1 convolution: each output pixel depends on its own input pixel only."""

    def __init__(self, in_channels=3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(in_channels, 3, 1)
        with torch.no_grad():
            self.conv.weight.mul_(10)

    def forward(self, x):
        return self.conv(x)


class PickSlice(nn.Module):
    """Logit of every class = 10 * (input channel ``k``) - 5: shows which slice was used."""

    def __init__(self, k, in_channels=3):
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (10 * x[:, self.k:self.k + 1] - 5).repeat(1, 3, 1, 1) + self.dummy


# --- tiling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 37, 53), (1, 5, 7), (3, 64, 64), (1, 33, 97)])
def test_output_shape_and_range_for_odd_sizes(shape):
    prob = predict_stack(unet(), smooth_stack(shape), input_slices=3, tile_size=32, batch_size=4)
    assert prob.shape == (3, *shape)
    assert prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


def test_2d_image_is_a_one_slice_stack():
    image = smooth_stack((1, 40, 30))
    prob2d = predict_stack(unet(), image[0], input_slices=3, tile_size=32)
    prob3d = predict_stack(unet(), image, input_slices=3, tile_size=32)
    assert prob2d.shape == (3, 1, 40, 30)
    np.testing.assert_array_equal(prob2d, prob3d)


def summed_weights(grid):
    """Every tile's 2-D weight added up on the padded slice."""
    total = np.zeros(grid.padded_shape)
    for (i, y), (j, x) in itertools.product(enumerate(grid.starts[0]),
                                            enumerate(grid.starts[1])):
        total[y:y + grid.tile_shape[0], x:x + grid.tile_shape[1]] += np.outer(
            grid.weights[0][i], grid.weights[1][j])
    return total


def test_tile_grid_stays_inside_the_image_and_its_weights_add_up_to_one():
    grid = tile_grid(37, 53, 32, 16)
    assert grid.tile_shape == (32, 32) and grid.padded_shape == (48, 64)  # multiples of 16
    # stride tile - overlap, the last tile at the border, never past it
    assert grid.starts[0].tolist() == [0, 16]
    assert grid.starts[1].tolist() == [0, 16, 32]
    assert tile_grid(1024, 1000, 256, 128).starts[1].tolist() == [0, 128, 256, 384, 512, 640,
                                                                  752]
    assert len(grid.starts[0]) * len(grid.starts[1]) == 6
    np.testing.assert_allclose(summed_weights(grid), 1, atol=1e-6)


def test_an_axis_shorter_than_a_tile_is_one_tile():
    grid = tile_grid(5, 40, 32, 16)
    assert grid.tile_shape == (16, 32) and grid.padded_shape == (16, 48)
    assert grid.starts[0].tolist() == [0] and grid.starts[1].tolist() == [0, 16]
    np.testing.assert_allclose(summed_weights(grid), 1, atol=1e-6)
    whole = tile_grid(37, 53, None)
    assert whole.tile_shape == whole.padded_shape == (48, 64)
    assert [len(starts) for starts in whole.starts] == [1, 1]
    np.testing.assert_array_equal(summed_weights(whole), 1)


@pytest.mark.parametrize("overlap", [4, 8, 16])
def test_blend_window_ramps_over_the_overlap_and_is_flat_at_image_borders(overlap):
    middle = blend_window(32, overlap)
    assert middle.min() > 0 and middle[0] < 0.05 and middle[-1] < 0.05
    assert (middle[overlap:32 - overlap] == 1).all()
    # a neighbour 32 - overlap pixels on: the two ramps add up to 1 (sin^2 + cos^2)
    np.testing.assert_allclose(middle[32 - overlap:] + middle[:overlap], 1, atol=1e-6)
    first, last = blend_window(32, overlap, first=True), blend_window(32, overlap, last=True)
    assert (first[:32 - overlap] == 1).all() and first[-1] < 0.05
    assert (last[overlap:] == 1).all() and last[0] < 0.05
    assert (blend_window(32, 0) == 1).all()


def test_pointwise_model_tiled_equals_single_pass_everywhere():
    stack = smooth_stack((2, 45, 71))
    model = Pointwise()
    tiled = predict_stack(model, stack, input_slices=3, tile_size=16, overlap=8)
    single = predict_stack(model, stack, input_slices=3, tile_size=None)
    assert single.std() > 0.05  # the comparison means something
    np.testing.assert_allclose(tiled, single, atol=1e-5)


@pytest.mark.parametrize("shape, tile", [((1, 96, 112), 32), ((2, 200, 260), 64)])
def test_unet_tiled_matches_single_pass_up_to_the_borders(shape, tile):
    # Tiles end at the image border, where a whole-slice pass sees the same zero-padded edge,
    # instead of reaching past it into reflected context (0.19 and 0.14 std at the border before).
    stack = smooth_stack(shape)
    model = unet()
    tiled = predict_stack(model, stack, input_slices=3, tile_size=tile)
    single = predict_stack(model, stack, input_slices=3, tile_size=None)
    assert single.std() > 0.03
    assert np.abs(tiled - single).max() < 0.03 * single.std()
    assert np.abs(tiled - single).mean() < 0.001 * single.std()


def random_batch_norms(model):
    """Batch norms with running statistics and affine parameters far from the identity."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            size = norm.num_features
            norm.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            norm.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
            norm.bias.copy_(torch.rand(size, generator=generator) - 0.5)
    return model


def test_inference_copy_folds_batch_norms_and_computes_the_same():
    model = random_batch_norms(unet())
    copy = inference_copy(model, "cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        np.testing.assert_allclose(copy(x.contiguous(memory_format=torch.channels_last)),
                                   model(x), atol=1e-5, rtol=1e-5)


def test_predicting_leaves_the_model_as_it_was():
    model = random_batch_norms(unet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict_stack(model, smooth_stack((2, 40, 40)), input_slices=3, tile_size=32)
    assert model.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.stem[0][0].weight.is_contiguous()  # not switched to channels-last


def _jumps_at(prob, positions):
    """Largest change between neighbouring columns x-1 and x, at each x in ``positions``."""
    return np.abs(prob[..., positions] - prob[..., np.asarray(positions) - 1]).max()


def test_no_seams_at_tile_borders():
    stack = smooth_stack((1, 64, 128))
    model = unet(gain=100.0)
    single = predict_stack(model, stack, input_slices=3, tile_size=None)
    # Abutting tiles without blending (overlap 0) have seams at x = 32, 64, 96 ...
    hard = predict_stack(model, stack, input_slices=3, tile_size=32, overlap=0)
    seams = [32, 64, 96]
    hard_excess = _jumps_at(hard, seams) - _jumps_at(single, seams)
    assert hard_excess > 2e-3  # the test can see a seam
    # ... while blended tiles (overlap 16, tile starts at x = 8, 24, 40 ... in image
    # coordinates) change across their borders no more than the single pass does.
    blended = predict_stack(model, stack, input_slices=3, tile_size=32, overlap=16)
    borders = list(range(8, 120, 16))
    excess = _jumps_at(blended, borders) - _jumps_at(single, borders)
    assert excess < 0.1 * hard_excess


def test_batched_equals_unbatched():
    stack = smooth_stack((3, 50, 41))
    model = unet()
    one = predict_stack(model, stack, input_slices=3, tile_size=32, batch_size=1)
    many = predict_stack(model, stack, input_slices=3, tile_size=32, batch_size=7)
    allin = predict_stack(model, stack, input_slices=3, tile_size=32, batch_size=1000)
    np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_allclose(one, allin, atol=1e-5)


# --- slice windows and normalisation ---------------------------------------------------------

def test_slice_windows_are_clamped_at_the_edges():
    np.testing.assert_array_equal(slice_windows(3, 5), [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2],
                                                        [0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(slice_windows(1, 3), [[0, 0, 0]])
    np.testing.assert_array_equal(slice_windows(4, 1), [[0], [1], [2], [3]])


@pytest.mark.parametrize("k, expected_source", [(0, [0, 0, 1, 2]), (2, [1, 2, 3, 3])])
def test_prediction_uses_window_and_dtype_maximum(k, expected_source):
    # slice z is constant z * 85 in uint8: normalised 0, 1/3, 2/3, 1
    stack = (np.arange(4, dtype=np.uint8)[:, None, None] * 85).repeat(20, 1).repeat(20, 2)
    prob = predict_stack(PickSlice(k), stack, input_slices=3, tile_size=16)
    expected = 1 / (1 + np.exp(-(10 * np.asarray(expected_source) / 3 - 5)))
    np.testing.assert_allclose(prob[0, :, 10, 10], expected, rtol=1e-5)


def test_normalise_by_dtype_maximum_and_rejects_float():
    np.testing.assert_allclose(normalise(np.array([[0, 65535]], np.uint16)), [[0, 1]])
    np.testing.assert_allclose(normalise(np.array([[0, 51, 255]], np.uint8)), [[0, 0.2, 1]])
    with pytest.raises(UserError, match="float32"):
        normalise(np.zeros((2, 2), np.float32))


# --- instance labels -------------------------------------------------------------------------

def one_hot(classes):
    return np.stack([classes == c for c in range(3)]).astype(np.float32)


def test_touching_cells_are_separated_through_the_boundary_class():
    classes = np.zeros((12, 20), int)
    classes[2:10, 2:18] = 2  # one foreground blob, boundary ring
    classes[3:9, 3:9] = 1  # two inner cores, separated by boundary pixels at x = 9..10
    classes[3:9, 11:17] = 1
    labels = probabilities_to_instances(one_hot(classes))
    assert labels.dtype == np.uint16 and labels.shape == (12, 20)
    assert labels.max() == 2
    assert (labels > 0).sum() == (classes > 0).sum()  # all foreground claimed
    assert len(np.unique(labels[2:10, 2:9])) == 1 and len(np.unique(labels[2:10, 11:18])) == 1
    assert labels[5, 5] != labels[5, 14]


def test_watershed_follows_boundary_probability():
    # Two inner seeds; the foreground between them is boundary. The boundary probability is low
    # near x <= 12, so the left cell claims up to there (a flat landscape would split at the
    # midpoint x = 9.5).
    classes = np.zeros((5, 20), int)
    classes[1:4, 1:19] = 2
    classes[2, 2] = 1
    classes[2, 17] = 1
    prob = one_hot(classes) * 0.9
    prob[2] = np.where(classes == 2, np.where(np.arange(20) <= 12, 0.6, 0.95), 0)
    labels = probabilities_to_instances(prob)
    assert labels[2, 12] == labels[2, 2] and labels[2, 16] == labels[2, 17]
    assert labels[2, 2] != labels[2, 17]
    flat = probabilities_to_instances(one_hot(classes))
    assert flat[2, 12] == flat[2, 17]


def test_small_objects_are_merged_into_neighbours_or_removed():
    classes = np.zeros((12, 30), int)
    classes[2:10, 2:12] = 2
    classes[3:9, 3:9] = 1  # big cell core
    classes[5, 10] = 1  # a 1-pixel spurious core inside the same blob: merged
    classes[5:7, 25:27] = 1  # an isolated 2x2 blob: removed
    labels = probabilities_to_instances(one_hot(classes), min_size=12)  # the spur grows to 10
    assert labels.max() == 1
    assert labels[5, 10] == labels[5, 5] == 1
    assert labels[5, 25] == 0
    kept = probabilities_to_instances(one_hot(classes), min_size=0)
    assert kept.max() == 3


def test_slices_are_labelled_independently():
    classes = np.zeros((2, 8, 8), int)
    classes[:, 2:6, 2:6] = 1
    labels = probabilities_to_instances(one_hot(classes))
    assert labels.shape == (2, 8, 8)
    assert labels[0, 3, 3] != labels[1, 3, 3] and labels.max() == 2


def test_more_than_65535_cells_give_uint32():
    classes = np.zeros((600, 600), int)
    classes[::2, ::2] = 1  # 90 000 isolated one-pixel cells
    labels = probabilities_to_instances(one_hot(classes))
    assert labels.dtype == np.uint32 and labels.max() == 90000


def traced_peak(function, *args, **kwargs) -> int:
    """Peak bytes NumPy allocated (tracemalloc sees its arrays) while ``function`` ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_prediction_holds_no_full_size_copies():
    """`predict` on a 4096 x 4096 image held 1.6 GB: no normalised copy of the stack, no blend
    beside the output, no argmax indices of every pixel, and a watershed a slice at a time."""
    model, stack = Pointwise(), smooth_stack((1, 512, 512))  # the arrays, not the network
    prob = predict_stack(model, stack[:, :64, :64], input_slices=3, tile_size=64)  # imports
    probabilities_to_instances(prob, 10, seed_threshold=0.5, foreground_threshold=0.5)
    out_bytes = 3 * stack.size * 4  # the float32 probabilities
    assert traced_peak(predict_stack, model, stack, input_slices=3, tile_size=64,
                       batch_size=2) < 1.3 * out_bytes  # was 2.6x
    prob = np.random.default_rng(0).random((3, 4, 512, 512), dtype=np.float32)
    assert traced_peak(class_map, prob) < 3 * prob[0].size  # was 20 bytes a pixel
    prob = prob[:, :, :256, :256]
    slice_pixels = 256 * 256
    assert traced_peak(probabilities_to_instances, prob, 10, seed_threshold=0.5,
                       foreground_threshold=0.5) < 100 * slice_pixels  # was 190 bytes


# --- files and the CLI -----------------------------------------------------------------------

def save_local_model(tmp_path, *, crop_size=32, input_slices=3, width=4):
    """What `nf1prov checkout` leaves: <dir>/model (weights) and <dir>/config/config.toml."""
    from nf1prov import weights

    root = tmp_path / "checkout"
    model = unet(width, input_slices)
    weights.save(model, root / "model")
    config = defaults()
    config["data"].update(crop_size=crop_size, input_slices=input_slices)
    config["model"]["base_width"] = width
    (root / "config").mkdir()
    (root / "config" / "config.toml").write_text(to_toml(config))
    return root / "model", model


def test_predict_cli_writes_ome_tiffs(tmp_path):
    model_dir, model = save_local_model(tmp_path)
    inputs = tmp_path / "in"
    for patient in ("NF0014", "NF0016"):  # same well-site names in two patients
        d = inputs / patient / "zstack_images" / "C4-2"
        d.mkdir(parents=True)
        tifffile.imwrite(d / "C4-2_TRANS.tif", smooth_stack((3, 40, 50)))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(model_dir), str(inputs), "-o", str(out),
                                      "--no-progress", "--min-size", "0", "--preview",
                                      "--probabilities-dtype", "float16"])
    assert result.exit_code == 0, result.output
    for patient in ("NF0014", "NF0016"):
        d = out / patient / "zstack_images" / "C4-2"
        # float16 (asked for): no OME pixel type, a shaped TIFF with the axes in its metadata
        with tifffile.TiffFile(d / "C4-2_TRANS_probabilities.tif") as tif:
            assert tif.series[0].axes == "CZYX"
            prob = tif.asarray()
        assert prob.dtype == np.float16 and prob.shape == (3, 3, 40, 50)
        with tifffile.TiffFile(d / "C4-2_TRANS_labels.ome.tif") as tif:
            assert tif.is_ome and tif.series[0].axes == "ZYX"
            labels = tif.asarray()
        assert labels.dtype == np.uint16 and labels.shape == (3, 40, 50)
        classes = tifffile.imread(d / "C4-2_TRANS_classes.ome.tif")
        expected = predict_stack(model, read_stack(inputs / patient / "zstack_images" / "C4-2"
                                                   / "C4-2_TRANS.tif"),
                                 input_slices=3, tile_size=32)
        np.testing.assert_allclose(prob, expected, atol=1e-3)
        assert (classes == np.argmax(prob, axis=0)).mean() > 0.99
        # the config's [postprocess] values (the file has no chosen ones), --min-size overriding;
        # cells through the stack, at z ratio 1 (the file states no sizes)
        expected_labels = probabilities_to_instances(expected, 0, seed_threshold=0.5,
                                                     foreground_threshold=0.5, dims=3,
                                                     link_iou=0.5, z_ratio=1.0)
        np.testing.assert_array_equal(labels, expected_labels)
        check_preview(d / "C4-2_TRANS_preview.png", labels)


def check_preview(png, labels):
    """The model's outlines (enlarged x7 from 40 x 50) on the slice with the most cells: only on
    cells, round every cell, under a titled bar with the legend."""
    from nf1prov.segment.pictures import MODEL_COLOUR, cell_counts, most_cells_slice
    from tests.picture_checks import check_header, decode

    rgb = decode(png)
    assert rgb.shape[1] == 350
    panel = check_header(rgb, [MODEL_COLOUR])[-280:]
    cells = np.kron(labels[most_cells_slice(labels)], np.ones((7, 7), labels.dtype))
    drawn = np.all(panel == MODEL_COLOUR, axis=-1)
    assert cell_counts(labels).max() >= 2 and not drawn[cells == 0].any()
    assert (np.bincount(cells[drawn], minlength=cells.max() + 1)[np.unique(cells)[1:]] > 0).all()


def test_predict_cli_float32_option_and_glob(tmp_path):
    model_dir, _ = save_local_model(tmp_path)
    tifffile.imwrite(tmp_path / "a.tif", smooth_stack((1, 20, 20), dtype=np.uint8))
    result = CliRunner().invoke(cli, ["predict", str(model_dir), str(tmp_path / "*.tif"), "-o",
                                      str(tmp_path / "o"), "--probabilities-dtype", "float32",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(tmp_path / "o" / "a_probabilities.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"  # the reader squeezes Z = 1
        assert tif.series[0].get_shape(False) == (1, 3, 1, 20, 20, 1)  # T C Z Y X S
        assert tif.asarray().dtype == np.float32


@pytest.mark.parametrize("data, message", [
    (np.zeros((2, 16, 16), np.float32), "float32"),
    (np.zeros((16, 16, 3), np.uint8), "RGB"),
    (np.zeros((2, 2, 3, 16, 16), np.uint16), "shape"),
    (np.zeros((2, 16, 16), np.int16), "int16"),
])
def test_predict_cli_rejects_inputs_the_model_cannot_take(tmp_path, data, message):
    from nf1prov.cli import main

    model_dir, _ = save_local_model(tmp_path)
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, data, photometric="rgb" if message == "RGB" else None)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model_dir), str(bad), "-o", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_bad_input_message_names_file(tmp_path):
    bad = tmp_path / "rgb.tif"
    tifffile.imwrite(bad, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(UserError, match=r"rgb\.tif.*RGB"):
        read_stack(bad)


def test_model_folder_without_config_is_a_user_error(tmp_path):
    from nf1prov import weights
    from nf1prov.provenance.models import load_model

    weights.save(unet(), tmp_path / "m")
    with pytest.raises(UserError, match="config.toml"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_a_folder_of_earlier_predictions_is_not_an_input(tmp_path):
    model_dir, _ = save_local_model(tmp_path)
    scans = tmp_path / "scans"
    scans.mkdir()
    tifffile.imwrite(scans / "a.tif", smooth_stack((1, 32, 32)))
    out = tmp_path / "out"
    args = [str(model_dir), "--no-progress", "-o"]
    assert CliRunner().invoke(cli, ["predict", *args[:2], str(scans), args[2], str(out)]
                              ).exit_code == 0
    again = CliRunner().invoke(cli, ["predict", str(model_dir), str(out), "-o",
                                     str(tmp_path / "again"), "--no-progress"])
    assert again.exit_code == 2
    assert "other than the outputs of an earlier" in again.output + str(again.exception)
    # beside a real image, earlier outputs are skipped, not segmented
    tifffile.imwrite(out / "b.tif", smooth_stack((1, 32, 32)))
    mixed = CliRunner().invoke(cli, ["predict", str(model_dir), str(out), "-o",
                                     str(tmp_path / "mixed"), "--no-progress"])
    assert mixed.exit_code == 0, mixed.output
    assert "predictions of 1 stack(s)" in mixed.output
