import numpy as np
import pytest
import tifffile
import torch

from nf1prov.data.dataset import CropDataset, crop_starts, pad_to_multiple
from nf1prov.data.layout import DataError, discover_fields
from nf1prov.data.manifest import build_manifest, compare_manifest
from nf1prov.data.semantic import instance_to_semantic
from nf1prov.data.splits import assign_split, fov_hash, split_fields
from nf1prov.data.synthetic import write_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("d") / "data"
    write_demo_dataset(root, patients=3, sites=2, slices=5, height=48, width=40, seed=3)
    return root


def test_crop_starts_cover_the_extent():
    assert crop_starts(48, 32, 32).tolist() == [0, 16]
    assert crop_starts(64, 32, 32).tolist() == [0, 32]
    assert crop_starts(32, 32, 8).tolist() == [0]


def test_pad_to_multiple():
    a = np.arange(2 * 17 * 33, dtype=np.uint16).reshape(2, 17, 33)
    padded = pad_to_multiple(a)
    assert padded.shape == (2, 32, 48) and padded.dtype == np.uint16
    np.testing.assert_array_equal(padded[:, :17, :33], a)


def test_samples_shapes_normalisation_and_targets(data, tmp_path):
    fields = discover_fields(data)
    ds = CropDataset(fields, input_slices=3, crop_size=32, crop_stride=32, boundary_thickness=2,
                     cache_dir=tmp_path / "cache")
    # 6 fields x 3 centre slices (z=1..3) x 2 rows (48 px) x 2 cols (40 px)
    assert len(ds) == 6 * 3 * 2 * 2
    image, target, index = ds[len(ds) - 1]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert target.dtype == torch.float32 and target.shape == (3, 32, 32)
    meta = ds.meta(index)
    field = next(f for f in fields if f.patient == meta["patient"] and f.well == meta["well"]
                 and f.site == meta["site"])
    stack = tifffile.imread(field.image_path)
    z, y, x = meta["z"], meta["y"], meta["x"]
    assert (z, y, x) == (3, 16, 8)
    expected = stack[z - 1:z + 2, y:y + 32, x:x + 32].astype(np.float32) / 65535
    np.testing.assert_allclose(image.numpy(), expected)
    semantic = instance_to_semantic(tifffile.imread(field.mask_path), 2)
    np.testing.assert_array_equal(target.numpy(), semantic[:, z, y:y + 32, x:x + 32])
    assert len({ds.meta(i)["sample_id"] for i in range(len(ds))}) == len(ds)


def test_each_tiff_is_decoded_once_then_cached_on_disk(data, tmp_path):
    fields = discover_fields(data)
    ds = CropDataset(fields, 3, 32, 32, 2, cache_dir=tmp_path / "cache")
    for i in range(len(ds)):
        ds[i]
    assert ds.cache.decodes == 2 * len(fields)  # one image + one mask per field, not per crop
    again = CropDataset(fields, 3, 32, 32, 2, cache_dir=tmp_path / "cache")
    for i in range(len(again)):
        again[i]
    assert again.cache.decodes == 0  # another process reuses the .npy memory maps
    # A rewritten TIFF (new mtime/size) is decoded afresh.
    tifffile.imwrite(fields[0].image_path, tifffile.imread(fields[0].image_path)[:, :, ::-1])
    third = CropDataset(fields, 3, 32, 32, 2, cache_dir=tmp_path / "cache")
    third[0]
    assert third.cache.decodes == 1


def test_split_is_pinned():
    ids = [f"NF00{p}_T1/C{w}-{s}" for p in (14, 16, 18, 21) for w in (2, 4) for s in (1, 2)]
    got = {i: assign_split(i, (0.8, 0.1, 0.1)) for i in ids}
    assert fov_hash("NF0014_T1/C4-1") == 0x89EA57C30915F51E
    assert got == PINNED


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


def test_small_dataset_still_validates(data, caplog):
    fields = discover_fields(data)[:2]
    splits = split_fields(fields, (0.8, 0.1, 0.1))
    assert len(splits["val"]) >= 1 and len(splits["train"]) >= 1
    with pytest.raises(DataError, match="Only 1 field of view"):
        split_fields(fields[:1])


def test_manifest_hashes_and_compare(data, tmp_path):
    fields = discover_fields(data)
    manifest = build_manifest(split_fields(fields), cache_dir=tmp_path / "cache")
    assert len(manifest) == len(fields) and manifest["image_sha256"].str.len().eq(64).all()
    assert compare_manifest(manifest, data) == []
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(data, copy)
    mask = copy / fields[1].mask_path.relative_to(data)
    tifffile.imwrite(mask, np.zeros((5, 48, 40), dtype=np.uint16))
    problems = compare_manifest(manifest, copy)
    assert problems == [f"content differs: {mask}"]
