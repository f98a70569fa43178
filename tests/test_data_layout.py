"""Every way real data goes wrong gives an error that names the file."""

import re
import shutil

import numpy as np
import pytest
import tifffile

from nf1prov.data.layout import DataError, discover_fields, is_held_out, validate_fields
from nf1prov.data.synthetic import write_demo_dataset


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template") / "data"
    write_demo_dataset(root, patients=3, sites=2, slices=5, height=48, width=48, seed=1)
    return root


@pytest.fixture
def data(tmp_path, dataset_template):
    root = tmp_path / "data"
    shutil.copytree(dataset_template, root)
    return root


def first_field(root):
    return discover_fields(root)[0]


def test_discovers_pairs_and_holds_out_by_name(data):
    fields = discover_fields(data)
    assert len(fields) == 6 and fields == sorted(fields, key=lambda f: f.fov_id)
    assert all(f.image_path.is_file() and f.mask_path.is_file() for f in fields)
    kept = discover_fields(data, holdout_patients=["NF0014"])
    assert {f.patient for f in kept} == {"NF0016_T1", "NF0018_T6"}
    assert is_held_out("NF0014_T1", ["NF0014"]) and not is_held_out("NF00140", ["NF0014"])
    validate_fields(fields, input_slices=3, crop_size=32)


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        discover_fields(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No patient folders under .*empty"):
        discover_fields(tmp_path / "empty")


def test_everything_held_out(data):
    with pytest.raises(DataError, match="No fields of view left"):
        discover_fields(data, holdout_patients=["NF0014", "NF0016", "NF0018"])


def test_missing_mask_names_it(data):
    field = first_field(data)
    field.mask_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(field.mask_path))):
        discover_fields(data)


def test_missing_image_names_it(data):
    field = first_field(data)
    field.image_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(field.image_path))):
        discover_fields(data)


def test_truncated_tiff_names_it(data):
    field = first_field(data)
    content = field.image_path.read_bytes()
    field.image_path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=re.escape(str(field.image_path)) + ".*(truncated|read)"):
        validate_fields(discover_fields(data), 3, 32)


def test_unreadable_tiff_names_it(data):
    field = first_field(data)
    field.mask_path.write_bytes(b"this is not a tiff")
    with pytest.raises(DataError, match="Cannot read TIFF " + re.escape(str(field.mask_path))):
        validate_fields(discover_fields(data), 3, 32)


def test_shape_mismatch_names_both(data):
    field = first_field(data)
    tifffile.imwrite(field.mask_path, np.zeros((5, 40, 48), dtype=np.uint16))
    with pytest.raises(DataError, match="Shape mismatch.*" + re.escape(str(field.mask_path))):
        validate_fields(discover_fields(data), 3, 32)


def test_non_integer_mask_names_it(data):
    field = first_field(data)
    tifffile.imwrite(field.mask_path, np.zeros((5, 48, 48), dtype=np.float32))
    with pytest.raises(DataError, match=re.escape(str(field.mask_path)) + ".*integer"):
        validate_fields(discover_fields(data), 3, 32)


def test_too_few_slices_for_window(data):
    field = first_field(data)
    with pytest.raises(DataError, match=re.escape(str(field.image_path)) + ".*5 slices"):
        validate_fields(discover_fields(data), 7, 32)


def test_image_smaller_than_crop(data):
    field = first_field(data)
    with pytest.raises(DataError, match=re.escape(str(field.image_path)) + ".*smaller than"):
        validate_fields(discover_fields(data), 3, 64)


def test_float_image_names_it(data):
    field = first_field(data)
    tifffile.imwrite(field.image_path, np.zeros((5, 48, 48), dtype=np.float32))
    with pytest.raises(DataError, match=re.escape(str(field.image_path)) + ".*unsigned"):
        validate_fields(discover_fields(data), 3, 32)


def test_multichannel_stack_names_it(data):
    field = first_field(data)
    tifffile.imwrite(field.image_path, np.zeros((5, 48, 48, 3), dtype=np.uint8),
                     photometric="rgb")
    with pytest.raises(DataError, match=re.escape(str(field.image_path)) + ".*single-channel"):
        validate_fields(discover_fields(data), 3, 32)


def test_truncated_after_the_header_names_it(data):
    # Only the last bytes are cut: the header and the pixel data of the first slices survive.
    field = first_field(data)
    content = field.mask_path.read_bytes()
    field.mask_path.write_bytes(content[:-100])
    with pytest.raises(DataError, match=re.escape(str(field.mask_path)) + ".*truncated"):
        validate_fields(discover_fields(data), 3, 32)


def test_patient_folder_without_fields(tmp_path):
    (tmp_path / "data" / "NF0016_T1" / "zstack_images").mkdir(parents=True)
    with pytest.raises(DataError, match="NF0016_T1 hold no <well>-<site> folders"):
        discover_fields(tmp_path / "data")


def test_badly_named_field_folder(data):
    field = first_field(data)
    bad = field.image_path.parents[1] / "C4_1"
    bad.mkdir()
    (bad / "C4_1_TRANS.tif").write_bytes(field.image_path.read_bytes())
    masks = field.mask_path.parents[1] / "C4_1"
    masks.mkdir()
    (masks / "cell_mask.tiff").write_bytes(field.mask_path.read_bytes())
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*<well>-<site>"):
        discover_fields(data)
