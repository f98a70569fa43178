"""`nf1prov demo-data`: deterministic synthetic data in the upstream layout, and its CLI."""

import hashlib

import numpy as np
import pytest
import tifffile

from nf1prov.cli import main
from nf1prov.data.layout import discover_fields, validate_fields
from nf1prov.data.semantic import instance_to_semantic
from nf1prov.data.synthetic import synthesize_field, write_demo_dataset


def digest(paths) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_layout_first_patient_and_validity(tmp_path):
    written = write_demo_dataset(tmp_path / "d", patients=3, sites=2, slices=5, height=32,
                                 width=48, seed=0)
    assert len(written) == 3 * 2 * 2 and all(p.is_file() for p in written)
    fields = discover_fields(tmp_path / "d")
    assert len(fields) == 6 and fields[0].patient == "NF0014_T1"
    assert {f.patient for f in discover_fields(tmp_path / "d", ["NF0014"])} == {
        f.patient for f in fields} - {"NF0014_T1"}
    validate_fields(fields, input_slices=3, crop_size=32)
    image, mask = tifffile.imread(fields[0].image_path), tifffile.imread(fields[0].mask_path)
    assert image.shape == mask.shape == (5, 32, 48)
    assert image.dtype == np.uint16 and mask.dtype == np.uint16


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(patients=2, sites=1, slices=3, height=32, width=32)
    a = write_demo_dataset(tmp_path / "a", seed=7, **kwargs)
    b = write_demo_dataset(tmp_path / "b", seed=7, **kwargs)
    c = write_demo_dataset(tmp_path / "c", seed=8, **kwargs)
    assert digest(a) == digest(b) and digest(a) != digest(c)


def test_field_is_brightfield_like_and_learnable():
    stack, labels = synthesize_field(np.random.default_rng(0), slices=7, height=96, width=96)
    assert labels.max() >= 10  # a cluster of many cells
    assert 0.1 < (labels > 0).mean() < 0.8  # an organoid on a background
    # cells come and go along z: each lives around its own focal depth
    assert len({tuple(np.unique(s)) for s in labels}) > 1
    # membranes (pixels next to another label) are darker than cell interiors
    semantic = instance_to_semantic(labels, 1).astype(bool)
    assert stack[semantic[2]].mean() < stack[semantic[1]].mean()
    assert stack.std() > 0


def test_cli_writes_and_reports(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo-data", str(tmp_path / "d"), "--patients", "2", "--sites", "2",
              "--slices", "3", "--height", "32", "--width", "32", "--seed", "1"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "4 fields of view" in out and "8 TIFF files" in out and str(tmp_path / "d") in out
    assert len(discover_fields(tmp_path / "d")) == 4


def test_cli_refuses_a_non_empty_folder_and_bad_values(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo-data", str(tmp_path / "d")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "d") in err and "not empty" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo-data", str(tmp_path / "e"), "--patients", "0"])
    assert exit_info.value.code == 2 and "--patients 0" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(3))
def test_cells_are_3d_objects_consistent_through_the_stack(seed):
    """Each label of a synthesized field is one cell: one 3-D connected object (6-connected),
    on consecutive slices, with the same outline on every slice it spans; and cells span
    several slices, so the fields exercise 3-D instances."""
    from scipy import ndimage

    _, labels = synthesize_field(np.random.default_rng(seed), 7, 64, 64)
    spans = []
    for label in np.unique(labels[labels > 0]):
        cell = labels == label
        _, pieces = ndimage.label(cell)
        assert pieces == 1, f"cell {label} is {pieces} separate objects"
        zs = np.flatnonzero(cell.any(axis=(1, 2)))
        assert np.array_equal(zs, np.arange(zs[0], zs[-1] + 1)), f"cell {label} skips a slice"
        assert all(np.array_equal(cell[z], cell[zs[0]]) for z in zs)
        spans.append(len(zs))
    assert min(spans) >= 2 and np.mean(spans) >= 3
