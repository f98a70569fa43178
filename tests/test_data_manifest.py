"""The split manifest: sizes and content hashes of every file a training used."""

import hashlib
import os
import shutil

import numpy as np
import pytest
import tifffile

from nf1prov.data.layout import discover_fields
from nf1prov.data.manifest import COLUMNS, build_manifest, compare_manifest, sha256_file
from nf1prov.data.splits import split_fields
from nf1prov.data.synthetic import write_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("m") / "data"
    write_demo_dataset(root, patients=2, sites=2, slices=3, height=32, width=32, seed=5)
    return root


def test_manifest_rows_and_hashes(data, tmp_path):
    fields = discover_fields(data)
    splits = split_fields(fields)
    manifest = build_manifest(splits, cache_dir=tmp_path / "cache")
    assert list(manifest.columns) == COLUMNS and len(manifest) == len(fields)
    assert manifest["fov_id"].tolist() == sorted(f.fov_id for f in fields)
    row = manifest.iloc[0]
    image = fields[0].image_path
    assert row["image_path"] == str(image) and row["image_bytes"] == image.stat().st_size
    assert row["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert set(manifest["split"]) <= {"train", "val", "test"}
    assert compare_manifest(manifest, data) == []


def test_hashes_are_cached_by_path_size_and_mtime(data, tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"a" * 1000)
    first = sha256_file(path, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    # Same size and mtime but other bytes: the cache answers (no re-hash of unchanged files).
    stat = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(path, tmp_path / "cache") == first
    assert sha256_file(path) != first  # without a cache the bytes are read
    # A new mtime is a new key: the file is hashed again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert sha256_file(path, tmp_path / "cache") != first


def test_compare_reports_changed_and_missing_files(data, tmp_path):
    fields = discover_fields(data)
    manifest = build_manifest(split_fields(fields))
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    mask = copy / fields[1].mask_path.relative_to(data)
    tifffile.imwrite(mask, np.zeros((3, 32, 32), dtype=np.uint16))
    image = copy / fields[2].image_path.relative_to(data)
    image.unlink()
    assert sorted(compare_manifest(manifest, copy)) == sorted(
        [f"missing: {image}", f"content differs: {mask}"])
