"""Decoded stacks cached as .npy memory maps, so each TIFF is decoded once, not once per crop.

Entries are keyed by the file's resolved path, size and mtime (and the boundary thickness for
targets, the method for per-slice normalisation ranges): editing or replacing a TIFF makes a
new entry. Writes go to a temp file and are renamed into place, so two trainings sharing a
cache never read a half-written entry. `sha256_file` hashes a file's content the same way (the
split manifest's hashes, the sidecar `predict` writes), streamed, remembered when given a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from nf1prov.data.inputs import slice_ranges
from nf1prov.data.semantic import instance_to_semantic


def file_key(path: Path, *extra: object) -> str:
    """Hex key of (resolved path, size, mtime_ns, *extra)."""
    stat = path.stat()
    text = "\0".join(map(str, (path.resolve(), stat.st_size, stat.st_mtime_ns, *extra)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def sha256_file(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of a file's bytes; remembered under cache_dir/hashes keyed by path+size+mtime."""
    path = Path(path)
    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / "hashes" / f"{file_key(path)}.json"
        if entry.exists():
            return json.loads(entry.read_text())["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")  # unique per writer
        tmp.write_text(json.dumps({"path": str(path), "sha256": value}))
        tmp.replace(entry)
    return value


def read_tiff(path: Path) -> np.ndarray:
    """Decode a TIFF stack to (Z, H, W) (a 2-D image becomes one slice)."""
    import tifffile

    array = tifffile.imread(path)
    return array[None] if array.ndim == 2 else array


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StackCache:
    """Memory-mapped decoded images and semantic targets under ``cache_dir``.

    ``decodes`` counts TIFF decodes done by this object (a cache hit decodes nothing).
    """

    def __init__(self, cache_dir: Path | str) -> None:
        self.cache_dir = Path(cache_dir)
        self.decodes = 0
        self._open: dict[Path, np.ndarray] = {}  # cache entry -> its memory map
        self._requests: dict[tuple, np.ndarray] = {}  # (kind, source path, ...) -> memory map

    def _load(self, entry: Path, build) -> np.ndarray:
        if entry in self._open:
            return self._open[entry]
        if not entry.exists():
            _atomic_save(entry, build())
        try:
            array = np.load(entry, mmap_mode="r")
        except (OSError, ValueError, EOFError):  # damaged entry (e.g. disk trouble): rebuild
            _atomic_save(entry, build())
            array = np.load(entry, mmap_mode="r")
        self._open[entry] = array
        return array

    def _decode(self, path: Path) -> np.ndarray:
        self.decodes += 1
        return read_tiff(path)

    def image(self, path: Path) -> np.ndarray:
        """(Z, H, W) stack in the file's own dtype, memory-mapped."""
        path = Path(path)
        request = ("image", path)
        if request not in self._requests:  # stat the file once per process, not once per crop
            entry = self.cache_dir / "images" / f"{file_key(path)}.npy"
            self._requests[request] = self._load(entry, lambda: self._decode(path))
        return self._requests[request]

    def ranges(self, path: Path, normalisation: str) -> np.ndarray:
        """float32 (2, Z): offset and scale of each slice of the stack at ``path``
        (`nf1prov.data.inputs.slice_ranges`), cached beside the stack."""
        path = Path(path)
        request = ("ranges", path, normalisation)
        if request not in self._requests:
            entry = self.cache_dir / "ranges" / f"{file_key(path, normalisation)}.npy"
            self._requests[request] = self._load(
                entry, lambda: np.stack(slice_ranges(self.image(path), normalisation)))
        return self._requests[request]

    def semantic(self, mask_path: Path, boundary_thickness: float) -> np.ndarray:
        """(3, Z, H, W) uint8 one-hot target of an instance mask, memory-mapped."""
        mask_path = Path(mask_path)
        request = ("semantic", mask_path, boundary_thickness)
        if request not in self._requests:
            key = file_key(mask_path, f"thickness={boundary_thickness}")
            entry = self.cache_dir / "targets" / f"{key}.npy"
            self._requests[request] = self._load(
                entry, lambda: instance_to_semantic(self._decode(mask_path), boundary_thickness)
            )
        return self._requests[request]

    def __getstate__(self):  # DataLoader workers reopen the memory maps themselves
        return {"cache_dir": self.cache_dir, "decodes": 0, "_open": {}, "_requests": {}}
