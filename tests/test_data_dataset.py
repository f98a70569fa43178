import numpy as np
import pytest
import tifffile
import torch

from nf1prov.data.dataset import CropDataset, crop_starts
from nf1prov.data.layout import DataError, discover_fields
from nf1prov.data.semantic import instance_to_semantic
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


def test_crops_cover_every_pixel_of_every_slice(data, tmp_path):
    fields = discover_fields(data)[:2]
    ds = CropDataset(fields, input_slices=3, crop_size=32, crop_stride=24, boundary_thickness=2,
                     cache_dir=tmp_path / "cache")
    covered = np.zeros((len(fields), 5, 48, 40), dtype=bool)
    for i in range(len(ds)):
        m = ds.meta(i)
        index = next(k for k, f in enumerate(fields) if f.patient == m["patient"]
                     and f.well == m["well"] and f.site == m["site"])
        covered[index, m["z"], m["y"]:m["y"] + 32, m["x"]:m["x"] + 32] = True
    assert covered[:, 1:4].all()  # every pixel of every predictable centre slice
    assert not covered[:, [0, 4]].any()  # windows of 3 slices never centre on the ends
    assert sorted({ds.meta(i)["y"] for i in range(len(ds))}) == [0, 16]  # last row edge-aligned


def test_dataloader_with_worker_processes(data, tmp_path):
    from torch.utils.data import DataLoader

    ds = CropDataset(discover_fields(data)[:2], 3, 32, 32, 2, cache_dir=tmp_path / "cache")
    batches = list(DataLoader(ds, batch_size=8, num_workers=2, shuffle=False))
    images = torch.cat([b[0] for b in batches])
    indices = torch.cat([b[2] for b in batches])
    assert images.shape == (len(ds), 3, 32, 32) and indices.tolist() == list(range(len(ds)))
    np.testing.assert_array_equal(images[5].numpy(), ds[5][0].numpy())


def test_crop_larger_than_the_image_names_the_file(data, tmp_path):
    field = discover_fields(data)[0]
    with pytest.raises(DataError, match=str(field.image_path) + ".*smaller than a 64x64 crop"):
        CropDataset([field], 3, 64, 64, 2, cache_dir=tmp_path / "cache")


def test_meta_sample_id_is_stable_across_instances(data, tmp_path):
    fields = discover_fields(data)
    a = CropDataset(fields, 3, 32, 32, 2, cache_dir=tmp_path / "a")
    b = CropDataset(list(fields), 3, 32, 32, 2, cache_dir=tmp_path / "b")
    assert [a.meta(i) for i in range(len(a))] == [b.meta(i) for i in range(len(b))]
    assert a.meta(0)["sample_id"] == f"{fields[0].patient}_{fields[0].well}-{fields[0].site}" \
        "_z001_y00000_x00000"
