"""Cells as 3-D objects (`PostProcess(dims=3)`): synthetic stacks whose 3-D truth is known,
probabilities made from that truth (the one-hot classes of `instance_to_semantic`, plus noise),
labels scored by 3-D IoU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nf1prov.data.semantic import instance_to_semantic
from nf1prov.segment.evaluate import instance_counts, instance_scores
from nf1prov.segment.instances import (
    PostProcess,
    link_slices,
    probabilities_to_instances,
    score,
    tune,
)

CELLS_3D = PostProcess(0.5, 0.5, 0, dims=3)


def probabilities(mask: np.ndarray, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """float32 (3, Z, H, W): the one-hot classes of ``mask`` (boundary 1 px) in [0.05, 0.95],
    plus Gaussian noise."""
    onehot = instance_to_semantic(mask, 1).astype(np.float32)
    prob = 0.05 + 0.9 * onehot + np.random.default_rng(seed).normal(0, noise, onehot.shape)
    return prob.clip(0, 1).astype(np.float32)


def f1_3d(mask: np.ndarray, labels: np.ndarray) -> float:
    return instance_scores(instance_counts(mask, labels, per_slice=False))["instance_f1"]


def slices_of(labels: np.ndarray, label: int) -> list[int]:
    return sorted({int(z) for z in np.nonzero(labels == label)[0]})


def test_touching_cells_stay_two_cells_through_the_stack():
    mask = np.zeros((6, 20, 30), np.uint16)
    mask[:, 4:16, 3:15] = 1
    mask[:, 4:16, 15:27] = 2
    labels = CELLS_3D.segment(probabilities(mask))
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0
    assert slices_of(labels, 1) == slices_of(labels, 2) == list(range(6))


def test_a_cell_above_another_of_another_footprint_is_another_cell():
    mask = np.zeros((8, 28, 28), np.uint16)
    mask[:4, 4:16, 4:16] = 1
    mask[4:, 10:22, 10:22] = 2  # starts on the next slice where the first ends, shifted
    labels = CELLS_3D.segment(probabilities(mask))
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0
    assert slices_of(labels, 1) == [0, 1, 2, 3] and slices_of(labels, 2) == [4, 5, 6, 7]


def test_a_cell_after_an_empty_slice_is_another_cell_even_with_the_same_footprint():
    mask = np.zeros((7, 20, 20), np.uint16)
    mask[:3, 4:16, 4:16] = 1
    mask[4:, 4:16, 4:16] = 2  # slice 3 empty
    labels = CELLS_3D.segment(probabilities(mask))
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0


def test_a_cell_seen_on_one_slice_only_is_kept():
    mask = np.zeros((5, 20, 36), np.uint16)
    mask[:, 4:16, 3:15] = 1
    mask[2, 5:15, 20:30] = 2  # beside the first, on slice 2 only
    labels = CELLS_3D.segment(probabilities(mask))
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0
    (single,) = {int(v) for v in np.unique(labels[:, 5:15, 20:30])} - {0}
    assert slices_of(labels, single) == [2]


def test_a_slice_where_two_cells_merge_does_not_split_either():
    """On slice 3 the probabilities join two touching cells into one 2-D object: one cell
    keeps that slice, the other is linked across it (its slices 2 and 4)."""
    mask = np.zeros((7, 20, 30), np.uint16)
    mask[:, 4:16, 3:14] = 1
    mask[:, 4:16, 14:25] = 2
    prob = probabilities(mask)
    prob[:, 3, 5:15, 12:16] = np.array([0.05, 0.95, 0.05])[:, None, None]  # no boundary
    assert probabilities_to_instances(prob[:, 3:4], seed_threshold=0.5,
                                      foreground_threshold=0.5).max() == 1
    labels = CELLS_3D.segment(prob)
    assert labels.max() == 2 and f1_3d(mask, labels) == 1.0
    assert sorted(len(slices_of(labels, k)) for k in (1, 2)) == [6, 7]


def sphere(radius: float, z_step: float, size: int = 28) -> np.ndarray:
    """One ball of ``radius`` pixels sampled every ``z_step`` pixels in z."""
    heights = np.arange(-radius + z_step / 2, radius, z_step)
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    disks = yy**2 + xx**2 <= radius**2 - heights[:, None, None] ** 2
    return disks.astype(np.uint16)


def tilted_cell(shift: float, slices: int = 5, radius: float = 6, size: int = 40) -> np.ndarray:
    """A column of disks whose centre moves ``shift`` pixels along x from slice to slice: a
    cell tilted at 45 degrees sampled every ``shift`` pixels in z."""
    yy, xx = np.mgrid[:size, :size]
    centres = size / 2 + shift * (np.arange(slices) - slices // 2)
    return ((yy - size / 2) ** 2 + (xx - centres[:, None, None]) ** 2 <= radius**2
            ).astype(np.uint16)


def test_z_ratio_decides_how_far_a_cells_outline_may_move_between_slices():
    """A tilted cell sampled every 4 px moves 4 px from slice to slice (IoU 0.4 between
    slices): one cell at its true z ratio of 4, pieces when read as if slices were 1 px apart;
    sampled every pixel, the same link keeps it whole at z ratio 1."""
    mask = tilted_cell(4)
    prob = probabilities(mask)
    assert CELLS_3D.segment(prob, z_ratio=4).max() == 1
    assert f1_3d(mask, CELLS_3D.segment(prob, z_ratio=4)) == 1.0
    assert CELLS_3D.segment(prob, z_ratio=1).max() == 5
    assert CELLS_3D.segment(probabilities(tilted_cell(1)), z_ratio=1).max() == 1


def ball(radius: float, z_step: float, size: int = 28) -> np.ndarray:
    """One ball of ``radius`` pixels sampled every ``z_step`` pixels in z."""
    heights = np.arange(-radius + z_step / 2, radius, z_step)
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    return (yy**2 + xx**2 <= radius**2 - heights[:, None, None] ** 2).astype(np.uint16)


def test_a_balls_tapering_ends_stay_with_it():
    """The last slices of a ball sampled every pixel have IoU ~0.35 with the next: linked
    because they lie inside it."""
    mask = ball(10, 1)
    assert CELLS_3D.segment(probabilities(mask), z_ratio=1).max() == 1


def test_3d_labels_are_the_2d_objects_renamed():
    """Per slice, 3-D labels partition the pixels exactly as the per-slice labels do (so the
    per-slice scores of the two agree), and a 2-D image gets the same labels either way."""
    rng = np.random.default_rng(3)
    prob = rng.random((3, 6, 40, 40)).astype(np.float32)
    prob = np.stack([prob[0] * 0.8, prob[1], prob[2] * 0.6])
    flat = probabilities_to_instances(prob, 5, seed_threshold=0.6, foreground_threshold=0.4)
    cells = probabilities_to_instances(prob, 5, seed_threshold=0.6, foreground_threshold=0.4,
                                       dims=3, link_iou=0.3)
    assert cells.max() < flat.max()  # something was linked
    for z in range(len(prob[0])):
        pairs = np.unique(np.stack([flat[z].ravel(), cells[z].ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    np.testing.assert_array_equal(instance_counts(flat, flat), instance_counts(flat, cells))
    image = prob[:, 2]
    flat_2d = probabilities_to_instances(image, 5, seed_threshold=0.6, foreground_threshold=0.4)
    cells_2d = probabilities_to_instances(image, 5, seed_threshold=0.6,
                                          foreground_threshold=0.4, dims=3)
    assert cells_2d.dtype == flat_2d.dtype and cells_2d.shape == flat_2d.shape
    np.testing.assert_array_equal(cells_2d, flat_2d)


def test_link_slices_numbers_cells_in_order_and_keeps_a_chain_per_slice():
    labels = np.zeros((3, 6, 6), np.uint32)
    labels[0, :3, :3], labels[1, :3, :3], labels[2, :3, :3] = 1, 3, 5
    labels[0, 3:, 3:], labels[1, 3:, 3:] = 2, 4
    linked = link_slices(labels)
    assert linked.dtype == np.uint32
    np.testing.assert_array_equal(linked, np.where(labels % 2, 1, 2) * (labels > 0))
    with pytest.raises(ValueError, match="z_ratio"):
        link_slices(labels, z_ratio=0)


def test_tune_chooses_the_link_that_separates_stacked_cells():
    """Two stacked cells whose footprints overlap with IoU 0.56: linked at link_iou 0.5 (the
    start), kept apart from 0.6 on; tuning scores 3-D objects and picks 0.6."""
    mask = np.zeros((8, 24, 24), np.uint16)
    mask[:4, 4:18, 4:18] = 1
    mask[4:, 6:20, 6:20] = 2
    prob = probabilities(mask)
    start = PostProcess(0.5, 0.5, 0, dims=3, link_iou=0.5)
    assert score(start, [(prob, mask)])["instance_f1"] < 1
    chosen, scores = tune([(prob, mask, 1.0)], start)
    assert chosen.dims == 3 and chosen.link_iou == 0.6 and scores["instance_f1"] == 1.0
    assert scores == score(chosen, [(prob, mask, 1.0)])


def test_3d_params_round_trip_and_fall_apart_from_2d_ones():
    chosen = PostProcess(0.7, 0.4, 20, dims=3, link_iou=0.3)
    params = chosen.params()
    assert params == {"instances3d.seed_threshold": "0.7",
                      "instances3d.foreground_threshold": "0.4", "instances3d.min_size": "20",
                      "instances3d.link_iou": "0.3"}
    assert PostProcess.from_mapping(params, prefix="instances3d.") == chosen
    assert PostProcess.from_mapping(params, prefix="instances.") is None
    assert PostProcess.from_mapping(json.loads(chosen.to_json())) == chosen
    assert chosen.values() == {"seed_threshold": 0.7, "foreground_threshold": 0.4,
                               "min_size": 20, "dims": 3, "link_iou": 0.3}
    assert PostProcess(0.7, 0.4, 20).values() == {"seed_threshold": 0.7,
                                                  "foreground_threshold": 0.4, "min_size": 20}
    assert "cells in 3-D" in chosen.describe()
    assert "3-D" not in chosen.replace(dims=2).describe()


def test_demo_fields_are_found_as_3d_cells():
    """The cells of a synthesized demo field, found from their own classes: one object per
    cell as 3-D objects (slice-by-slice labels match none of them)."""
    from nf1prov.data.synthetic import synthesize_field

    _, mask = synthesize_field(np.random.default_rng(1), 7, 64, 64)
    prob = probabilities(mask)
    assert f1_3d(mask, CELLS_3D.segment(prob)) >= 0.95
    assert f1_3d(mask, CELLS_3D.replace(dims=2).segment(prob)) < 0.5


def test_z_ratio_comes_from_the_physical_sizes_in_any_length_unit():
    from nf1prov.segment.ome import z_ratio

    sizes = {"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5,
             "PhysicalSizeZ": 2000, "PhysicalSizeZUnit": "nm"}
    assert z_ratio(sizes) == pytest.approx(4.0)
    assert z_ratio({k: v for k, v in sizes.items() if "Z" not in k}) is None
    assert z_ratio(sizes | {"PhysicalSizeZUnit": "pixel"}) is None


def test_models_without_3d_parameters_use_their_per_slice_ones_in_3d():
    from nf1prov.provenance.models import model_postprocess

    flat = PostProcess(0.6, 0.4, 7)
    config = {"postprocess": {"seed_threshold": 0.5, "foreground_threshold": 0.5,
                              "min_size": 10, "link_iou": 0.4, "z_ratio": 2.0}}
    assert model_postprocess(config, params=flat.params()) == flat
    assert model_postprocess(config, params=flat.params(), dims=3) == flat.replace(dims=3)
    cells = PostProcess(0.7, 0.3, 5, dims=3, link_iou=0.3)
    params = flat.params() | cells.params()
    assert model_postprocess(config, params=params, dims=3) == cells
    assert model_postprocess(config, params=params) == flat
    # a model trained before any were chosen: its config's, link_iou included
    assert model_postprocess(config, params={}, dims=3) == PostProcess(0.5, 0.5, 10, dims=3,
                                                                       link_iou=0.4)


def cells_and_a_speck() -> tuple[np.ndarray, np.ndarray]:
    """(whole cells, the same with a speck): two cells through 6 slices (196 px a slice), and
    a 100-px object on slice 0 only, first in the stack (it takes label 1 when kept)."""
    cells = np.zeros((6, 30, 48), np.uint16)
    cells[:, 14:28, 3:17] = 1
    cells[:, 14:28, 25:39] = 2
    specked = cells.copy()
    specked[0, 0:10, 1:11] = 3  # 10 x 10 px, 100 > the largest per-slice min_size (80)
    return cells, specked


def test_min_volume_removes_a_cell_seen_on_one_slice_and_keeps_whole_cells():
    cells, specked = cells_and_a_speck()
    prob = probabilities(specked)
    kept = CELLS_3D.segment(prob)
    assert kept.max() == 3 and slices_of(kept, 1) == [0]  # the speck, numbered first
    assert CELLS_3D.replace(min_size=80).segment(prob).max() == 3  # min_size cannot remove it
    labels = CELLS_3D.replace(min_volume=150).segment(prob)
    assert not labels[0, 0:10, 1:11].any()
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])  # renumbered 1..N
    assert f1_3d(cells, labels) == 1.0
    np.testing.assert_array_equal(labels > 0, (kept > 0) & (kept != 1))
    # 2-D images and one-slice stacks are per-slice labels: no volume to speak of
    flat = CELLS_3D.replace(dims=2)
    for image in (prob[:, 0], prob[:, :1]):
        np.testing.assert_array_equal(CELLS_3D.replace(min_volume=10**6).segment(image),
                                      flat.segment(image))


def test_tune_chooses_a_min_volume_when_validation_has_specks():
    """Validation stacks whose probabilities hold a speck the truth does not: no threshold,
    link or per-slice size removes it, a minimum volume does (and keeps the cells)."""
    cells, specked = cells_and_a_speck()
    pairs = [(probabilities(specked, seed=s), cells, 1.0) for s in range(2)]
    start = PostProcess(0.5, 0.5, 0, dims=3)
    assert score(start, pairs)["instance_f1"] < 1
    chosen, scores = tune(pairs, start)
    assert chosen.min_volume > 0 and scores["instance_f1"] == 1.0
    assert scores == score(chosen, pairs)  # the shortcut scores what segment makes
    # whole validation cells alone: nothing to remove, the start's 0 stays
    clean = [(probabilities(cells, seed=s), cells, 1.0) for s in range(2)]
    assert tune(clean, start)[0].min_volume == 0


def test_recorded_3d_parameters_without_min_volume_segment_as_before():
    """A model's instances3d.* params from before min_volume: read with it off, written back
    unchanged, labels those of the per-slice objects linked (what dims 3 made before)."""
    from nf1prov.provenance.models import model_postprocess

    recorded = {"instances3d.seed_threshold": "0.5", "instances3d.foreground_threshold": "0.5",
                "instances3d.min_size": "0", "instances3d.link_iou": "0.4"}
    cells = PostProcess.from_mapping(recorded, prefix="instances3d.")
    assert cells.min_volume == 0 and cells.params() == recorded
    assert "min_volume" not in cells.values() and "voxels" not in cells.describe()
    assert model_postprocess({"postprocess": {}}, params=recorded, dims=3) == cells
    prob = probabilities(cells_and_a_speck()[1])
    flat = cells.replace(dims=2)
    before = link_slices(flat.segment(prob), 0.4)
    np.testing.assert_array_equal(cells.segment(prob), before)
    np.testing.assert_array_equal(cells.cells(prob, 1.0, flat, flat.segment(prob)), before)
    # with it: recorded, read back, described
    chosen = cells.replace(min_volume=300)
    assert chosen.params()["instances3d.min_volume"] == "300"
    assert PostProcess.from_mapping(chosen.params(), prefix="instances3d.") == chosen
    assert PostProcess.from_mapping(json.loads(chosen.to_json())) == chosen
    assert "300 voxels" in chosen.describe()
    assert chosen.replace(dims=2).values() == flat.values()
