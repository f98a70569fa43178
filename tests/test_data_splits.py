"""Stable splits by field of view: same on every machine and Python version (DESIGN 4)."""

import logging
from pathlib import Path

import pytest

from nf1prov.data.layout import DataError, FieldOfView
from nf1prov.data.splits import assign_split, fov_hash, hash_position, split_fields

# Computed once with fov_hash = first 8 bytes of SHA-256, big-endian; these must never change
# across machines or Python versions, or old models' splits stop being reproducible.
PINNED = {
    "NF0014_T1/C2-1": "test", "NF0014_T1/C2-2": "train", "NF0014_T1/C4-1": "train",
    "NF0014_T1/C4-2": "train", "NF0016_T1/C2-1": "val", "NF0016_T1/C2-2": "train",
    "NF0016_T1/C4-1": "train", "NF0016_T1/C4-2": "test", "NF0018_T1/C2-1": "train",
    "NF0018_T1/C2-2": "train", "NF0018_T1/C4-1": "train", "NF0018_T1/C4-2": "train",
    "NF0021_T1/C2-1": "train", "NF0021_T1/C2-2": "train", "NF0021_T1/C4-1": "train",
    "NF0021_T1/C4-2": "train",
}


def field(fov_id: str, root: Path = Path("/data")) -> FieldOfView:
    patient, name = fov_id.split("/")
    well, site = name.split("-")
    return FieldOfView(patient, well, site,
                       root / patient / "zstack_images" / name / f"{name}_TRANS.tif",
                       root / patient / "segmentation_masks" / name / "cell_mask.tiff")


def test_split_is_pinned():
    assert fov_hash("NF0014_T1/C4-1") == 0x89EA57C30915F51E
    assert {i: assign_split(i, (0.8, 0.1, 0.1)) for i in PINNED} == PINNED
    splits = split_fields([field(i) for i in PINNED], (0.8, 0.1, 0.1))
    assert {f.fov_id: name for name, fs in splits.items() for f in fs} == PINNED


def test_hash_is_64_bit_and_position_in_unit_interval():
    values = [fov_hash(i) for i in PINNED]
    assert all(0 <= v < 2**64 for v in values) and len(set(values)) == len(values)
    assert all(0 <= hash_position(i) < 1 for i in PINNED)


def test_split_does_not_depend_on_order_or_other_fields():
    ids = list(PINNED)
    forward = split_fields([field(i) for i in ids])
    backward = split_fields([field(i) for i in reversed(ids)])
    assert {k: sorted(f.fov_id for f in v) for k, v in forward.items()} == \
        {k: sorted(f.fov_id for f in v) for k, v in backward.items()}


def test_few_fields_still_get_a_validation_field_and_the_log_says_so(caplog):
    # Two training-hashed fields: the one nearest the validation range [0.8, 0.9) moves.
    ids = ["NF0018_T1/C2-1", "NF0021_T1/C4-2"]
    assert {assign_split(i) for i in ids} == {"train"}
    nearest = max(ids, key=hash_position)
    with caplog.at_level(logging.WARNING, logger="nf1prov.data.splits"):
        splits = split_fields([field(i) for i in ids])
    assert [f.fov_id for f in splits["val"]] == [nearest]
    assert len(splits["train"]) == 1 and splits["test"] == []
    assert nearest in caplog.text and "validation" in caplog.text


def test_nearest_field_comes_from_test_when_it_is_nearer(caplog):
    ids = ["NF0014_T1/C2-1", "NF0016_T1/C4-2", "NF0014_T1/C2-2"]  # test, test, train
    splits = split_fields([field(i) for i in ids])
    nearest = min((i for i in ids if assign_split(i) == "test"), key=hash_position)
    distance_test = hash_position(nearest) - 0.9
    distance_train = 0.8 - hash_position("NF0014_T1/C2-2")
    expected = nearest if distance_test < distance_train else "NF0014_T1/C2-2"
    assert [f.fov_id for f in splits["val"]] == [expected]
    assert splits["train"], "training is never left empty"


def test_one_field_of_view_is_an_error_naming_the_root():
    with pytest.raises(DataError, match=r"Only 1 field of view found under /data\b"):
        split_fields([field("NF0014_T1/C4-1")])
    with pytest.raises(DataError, match="Only 0 field"):
        split_fields([])
