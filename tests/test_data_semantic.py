import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from nf1prov.data.semantic import (
    SHIFT_METHOD_MAX_THICKNESS,
    _boundary_by_cell_edt,
    boundary_mask,
    instance_to_semantic,
)


def per_label_edt_reference(instance_mask: np.ndarray, thickness: float) -> np.ndarray:
    """The slow definition of DESIGN 3.6: a per-label distance transform, slice by slice."""
    out = np.zeros((3, *instance_mask.shape), dtype=np.uint8)
    for z, labels in enumerate(instance_mask):
        out[0, z] = labels == 0
        for label in np.unique(labels[labels != 0]):
            cell = labels == label
            if cell.all():  # no other label anywhere in the slice: all inner-cell
                out[1, z][cell] = 1
                continue
            distance = ndimage.distance_transform_edt(cell)
            out[2, z][cell & (distance <= thickness)] = 1
            out[1, z][cell & (distance > thickness)] = 1
    return out


@st.composite
def label_stacks(draw):
    """Touching cells from upsampled random label grids, cells on the edges, background gaps."""
    depth = draw(st.integers(1, 2))
    coarse = draw(arrays(np.int32, (depth, draw(st.integers(1, 5)), draw(st.integers(1, 5))),
                         elements=st.integers(0, 6)))
    zoom = draw(st.integers(1, 6))
    labels = coarse.repeat(zoom, axis=1).repeat(zoom, axis=2)
    height = draw(st.integers(1, labels.shape[1]))
    width = draw(st.integers(1, labels.shape[2]))
    return labels[:, :height, :width]


@settings(max_examples=60, deadline=None)
@given(label_stacks(), st.integers(1, 4))
def test_equals_per_label_edt(labels, thickness):
    expected = per_label_edt_reference(labels, thickness)
    got = instance_to_semantic(labels, boundary_thickness=thickness)
    assert got.dtype == np.uint8 and got.shape == (3, *labels.shape)
    np.testing.assert_array_equal(got, expected)


def test_one_hot_everywhere_and_single_label_slice_is_inner():
    labels = np.zeros((2, 20, 20), dtype=np.uint16)
    labels[0, 5:15, 5:15] = 3
    labels[1] = 7  # one label fills the slice: nothing differs, so all inner-cell
    semantic = instance_to_semantic(labels)
    assert (semantic.sum(axis=0) == 1).all()
    assert semantic[1, 1].all()
    assert semantic[2, 0, 5, 5] == 1 and semantic[1, 0, 10, 10] == 1
    assert semantic[2, 0].sum() == 100 - 36  # a 2-pixel ring around a 6x6 core


def test_touching_cells_share_a_boundary():
    labels = np.zeros((1, 10, 20), dtype=np.int64)
    labels[0, :, :10], labels[0, :, 10:] = 1, 2
    semantic = instance_to_semantic(labels, boundary_thickness=1)
    # Only the columns next to the other cell are boundary; the array edge does not count.
    assert semantic[2, 0, :, 9].all() and semantic[2, 0, :, 10].all()
    assert semantic[2, 0].sum() == 20


@settings(max_examples=30, deadline=None)
@given(label_stacks(), st.sampled_from([1.5, 2.5, SHIFT_METHOD_MAX_THICKNESS + 1, 20]))
def test_fractional_and_thick_boundaries_equal_per_label_edt(labels, thickness):
    # Above SHIFT_METHOD_MAX_THICKNESS the bounding-box distance transforms take over.
    np.testing.assert_array_equal(instance_to_semantic(labels, thickness),
                                  per_label_edt_reference(labels, thickness))


@settings(max_examples=40, deadline=None)
@given(label_stacks(), st.integers(1, 4))
def test_both_methods_agree_on_thin_boundaries(labels, thickness):
    by_cell = np.stack([_boundary_by_cell_edt(s, thickness) for s in labels])
    np.testing.assert_array_equal(boundary_mask(labels, thickness), by_cell)


def test_large_label_values_and_dtypes():
    small = np.zeros((1, 12, 12), dtype=np.uint8)
    small[0, 2:8, 2:6], small[0, 2:8, 6:10], small[0, 9:, :] = 1, 2, 3
    expected = instance_to_semantic(small, 2)
    for dtype, offset in ((np.uint32, 4_000_000_000), (np.int64, 2**40), (np.int16, 1000)):
        big = np.where(small > 0, small.astype(np.int64) + offset, 0).astype(dtype)
        for thickness in (2, SHIFT_METHOD_MAX_THICKNESS + 1):
            np.testing.assert_array_equal(instance_to_semantic(big, thickness),
                                          instance_to_semantic(small, thickness))
    np.testing.assert_array_equal(expected, per_label_edt_reference(small, 2))


def test_rejects_wrong_shapes_and_float_labels():
    with pytest.raises(ValueError, match="Z, H, W"):
        instance_to_semantic(np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="integer"):
        instance_to_semantic(np.zeros((1, 4, 4), dtype=np.float32))
