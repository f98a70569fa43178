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


# --- data.fields: training on a chosen set of fields of view -----------------------------------


def test_select_fields_keeps_the_listed_fields_in_discovery_order(data):
    from nf1prov.data.layout import discover_training_fields, select_fields

    fields = discover_fields(data)
    ids = [fields[3].fov_id, fields[0].fov_id]
    assert select_fields(fields, ids) == [fields[0], fields[3]]
    assert select_fields(fields, []) == fields
    config = {"holdout_patients": ["NF0014"], "fields": []}
    assert discover_training_fields(data, config) == discover_fields(data, ["NF0014"])
    kept = [f.fov_id for f in discover_fields(data, ["NF0014"])][:2]
    assert [f.fov_id for f in discover_training_fields(data, config | {"fields": kept})] == kept


def test_select_fields_names_the_missing_ids(data):
    from nf1prov.data.layout import discover_training_fields, select_fields

    fields = discover_fields(data)
    with pytest.raises(DataError, match=rf"1 field\(s\) of view not found under {data}.*"
                                        r"NF0099/A1-1\. .*data\.fields"):
        select_fields(fields, [fields[0].fov_id, "NF0099/A1-1"], data)
    held = next(f.fov_id for f in fields if f.patient.startswith("NF0014"))
    with pytest.raises(DataError, match=rf"held out by data.holdout_patients\): {held}\."):
        discover_training_fields(data, {"holdout_patients": ["NF0014"], "fields": [held]})


def test_prepare_data_trains_on_the_listed_fields_only(data, tmp_path):
    from nf1prov.config import defaults
    from nf1prov.data.splits import split_fields
    from nf1prov.train.trainer import prepare_data

    config = defaults()
    config["data"].update(holdout_patients=[], crop_size=32, crop_stride=16,
                          split_fractions=[0.6, 0.4, 0.0])
    every = discover_fields(data)
    chosen = [f.fov_id for f in every[1:5]]
    config["data"]["fields"] = chosen
    prepared = prepare_data(config, data, tmp_path / "cache")
    assert sorted(prepared.manifest["fov_id"]) == chosen
    # The split is that of the listed fields alone (what `reproduce` relies on).
    expected = split_fields([f for f in every if f.fov_id in chosen], [0.6, 0.4, 0.0])
    assert {s: [f.fov_id for f in fs] for s, fs in prepared.splits.items()} == {
        s: [f.fov_id for f in fs] for s, fs in expected.items()}
