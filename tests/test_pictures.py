"""The pictures nf1prov draws (`nf1prov.segment.pictures`): outlines where the cells' boundaries
are, the slice with the most cells, titles and legends, one colour scheme."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from nf1prov.data.semantic import CLASS_NAMES
from nf1prov.segment import pictures
from nf1prov.segment.pictures import (
    BOTH_COLOUR,
    CLASS_COLOURS,
    MODEL_COLOUR,
    TRUTH_COLOUR,
)
from tests.picture_checks import check_header, count, decode, header_rows


def discs(shape, centres, radius):
    """(H, W) uint16 labels: disc k + 1 at centres[k] (later discs over earlier ones)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint16)
    for label, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = label
    return labels


def image_of(labels, seed=0):
    """Dark cells on a bright noisy medium, uint16."""
    rng = np.random.default_rng(seed)
    return (np.where(labels > 0, 15000, 45000) + rng.normal(0, 2000, labels.shape)).astype(
        np.uint16)


def test_model_outlines_lie_exactly_on_the_boundaries_of_the_labels():
    # touching cells: a shared boundary must be drawn on both sides; image 300 px: no enlarging
    labels = discs((300, 300), [(60, 60), (60, 95), (200, 150), (280, 290)], 20)
    rgb = pictures.outline_overlay(image_of(labels), model=labels)
    assert rgb.shape == (300, 300, 3) and rgb.dtype == np.uint8
    drawn = np.all(rgb == MODEL_COLOUR, axis=-1)
    np.testing.assert_array_equal(drawn, find_boundaries(labels, mode="inner"))
    # enlarged (a 64-px crop x4): on the enlarged labels' boundaries, two pixels thick
    small = discs((64, 64), [(20, 20), (40, 44)], 9)
    big = pictures.outline_overlay(image_of(small), model=small, factor=4)
    assert big.shape == (256, 256, 3)
    enlarged = np.kron(small, np.ones((4, 4), small.dtype))
    inner = find_boundaries(enlarged, mode="inner")
    thick = inner | (find_boundaries(enlarged * ~inner, mode="inner") & (enlarged > 0))
    np.testing.assert_array_equal(np.all(big == MODEL_COLOUR, axis=-1), thick)


def test_truth_and_model_outlines_and_where_they_agree():
    truth = discs((256, 256), [(60, 60), (180, 180)], 25)
    model = discs((256, 256), [(60, 60), (180, 190)], 25)  # first cell exact, second shifted
    rgb = pictures.outline_overlay(image_of(truth), model=model, truth=truth)
    t, m = find_boundaries(truth, mode="inner"), find_boundaries(model, mode="inner")
    np.testing.assert_array_equal(np.all(rgb == BOTH_COLOUR, axis=-1), t & m)
    np.testing.assert_array_equal(np.all(rgb == MODEL_COLOUR, axis=-1), m & ~t)
    np.testing.assert_array_equal(np.all(rgb == TRUTH_COLOUR, axis=-1), t & ~m)
    # the exactly matched cell is white all round
    assert (t & m)[:128, :128].sum() == t[:128, :128].sum() > 100


def test_the_slice_with_the_most_cells_is_drawn():
    labels = np.zeros((5, 40, 40), np.uint16)
    labels[0, :10, :10] = 1
    labels[3, :10, :10], labels[3, 20:30, :10], labels[3, 20:, 20:] = 4, 7, 9
    labels[4, :10, :10], labels[4, 20:, 20:] = 2, 3
    assert pictures.most_cells_slice(labels) == 3
    np.testing.assert_array_equal(pictures.cell_counts(labels), [1, 0, 0, 3, 2])
    # among equals, the one nearest the middle; no cells at all: the middle
    ties = np.zeros((5, 8, 8), np.uint16)
    ties[[0, 3, 4], 2, 2] = 1
    assert pictures.most_cells_slice(ties) == 3
    assert pictures.most_cells_slice(np.zeros((5, 8, 8), np.uint8)) == 2
    assert pictures.most_cells_slice(np.ones((8, 8), np.uint8)) == 0


def test_class_pictures_use_the_class_colours():
    classes = np.array([[0, 1], [2, 1]])
    rgb = pictures.class_picture(classes)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert [tuple(rgb[0, 0]), tuple(rgb[0, 1]), tuple(rgb[1, 0])] == [
        CLASS_COLOURS[n] for n in CLASS_NAMES]
    one_hot = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    np.testing.assert_array_equal(pictures.class_picture(one_hot), rgb)
    nothing = pictures.class_picture(np.zeros((3, 2, 2), np.float32))
    assert (nothing == 0).all()  # no class claims the pixel: dark


def test_preview_png_has_title_legend_and_outlines_where_the_cells_are(tmp_path):
    stack = np.zeros((3, 64, 64), np.uint16)
    labels = np.zeros((3, 64, 64), np.uint16)
    labels[1] = discs((64, 64), [(16, 16), (16, 46), (46, 30)], 8)
    labels[2] = discs((64, 64), [(30, 30)], 8)
    stack[:] = image_of(labels[1])
    path = pictures.write_preview(tmp_path / "a_preview.png", stack, labels,
                                  name="a.tif", model="tiny-eel-1")
    rgb = decode(path)
    panel = check_header(rgb, [MODEL_COLOUR])
    assert rgb.shape[1] == 256 and panel.shape[:2] == (256, 256)  # 64 px enlarged x4
    expected = np.kron(labels[1], np.ones((4, 4), np.uint16))  # slice 1: three cells
    drawn = np.all(panel == MODEL_COLOUR, axis=-1)
    assert drawn[expected == 0].sum() == 0  # inner outlines: only on cells
    per_cell = np.bincount(expected[drawn], minlength=4)[1:]
    assert (per_cell > 150).all()  # every cell outlined all round (2 px x ~200 px)


def test_evaluation_picture_has_one_panel_per_prediction(tmp_path):
    truth = np.stack([discs((96, 96), [(30, 30), (60, 70)], 12)] * 2)
    truth[0, 50:] = 0  # slice 1 has more true cells
    model = truth.copy()
    model[:, :, 3:] = model[:, :, :-3]
    picture = pictures.comparison_picture(image_of(truth), truth,
                                          [("model", model), ("baseline", truth)],
                                          name="NF0014 C4-2", model="tiny-eel-1")
    picture.save(tmp_path / "eval.png")
    rgb = decode(tmp_path / "eval.png")
    below = check_header(rgb, [MODEL_COLOUR, TRUTH_COLOUR, BOTH_COLOUR])
    assert rgb.shape[1] == 2 * 288 + pictures.GAP  # two 96-px panels enlarged x3
    model_panel, baseline_panel = below[-288:, :288], below[-288:, -288:]
    assert count(model_panel, MODEL_COLOUR) > 200 and count(model_panel, TRUTH_COLOUR) > 200
    # the baseline here is the truth: every outline agrees, round both cells of slice 1 (~160
    # pixels each)
    assert count(baseline_panel, BOTH_COLOUR) > 250
    assert count(baseline_panel, MODEL_COLOUR) == count(baseline_panel, TRUTH_COLOUR) == 0


def test_training_picture_and_cover_use_the_class_colours(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (32, 32))
    one_hot = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    picture = pictures.training_picture(rng.random((32, 32), np.float32), one_hot, one_hot,
                                        title="epoch 3 · NF0014_C4-2_z001_y00000_x00000")
    picture.save(tmp_path / "train.png")
    rgb = decode(tmp_path / "train.png")
    below = check_header(rgb, CLASS_COLOURS.values())
    assert rgb.shape[1] == 3 * 256 + 2 * pictures.GAP  # three 32-px panels enlarged x8
    classes_panels = below[:, 256 + pictures.GAP:]  # target and prediction: the same classes
    for name in CLASS_NAMES:
        assert count(classes_panels, CLASS_COLOURS[name]) == pytest.approx(
            2 * 64 * (classes == CLASS_NAMES.index(name)).sum())
    cover = pictures.cover_picture(rng.random((32, 32)), one_hot, title="tiny-eel-1")
    assert cover.width == 2 * cover.height  # bioimage.io asks for 2:1
    rgb = np.asarray(cover)
    assert header_rows(rgb) > 20
    assert all(count(rgb, c) > 1000 for c in CLASS_COLOURS.values())
