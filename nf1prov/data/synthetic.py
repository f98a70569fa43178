"""`nf1prov demo-data`: a synthetic NF1 organoid dataset in the upstream layout.

Each field of view holds one or two organoid-shaped clusters of touching cells (a Voronoi
tessellation of random seeds inside a blobby outline) on a textured background. Every cell
spans a few z-slices around its own depth; brightfield-like intensities give cells textured
interiors and darker membranes, slices are defocused with distance from the focal plane, and
camera noise is added. Everything is vectorised; the default dataset takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from nf1prov.data.layout import IMAGE_DIR, IMAGE_SUFFIX, MASK_DIR, MASK_NAME
from nf1prov.data.semantic import boundary_mask

PATIENT_NAMES = ("NF0014_T1", "NF0016_T1", "NF0018_T6", "NF0021_T1", "NF0030_T1", "NF0031_T1",
                 "NF0035_T1", "NF0040_T1")
WELLS = ("C4", "D2", "E5", "F3", "G7", "B6")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def _organoid_outline(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) bool: one or two blobby ellipses covering about a third of the image."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    outline = np.zeros((height, width), dtype=bool)
    wobble = _smooth_noise(rng, (height, width), sigma=min(height, width) / 10)
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.22, 0.35) * height, rng.uniform(0.22, 0.35) * width
        radius = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        outline |= radius + 0.12 * wobble < 1
    return outline


def _cells(rng: np.random.Generator, outline: np.ndarray, cell_size: float) -> np.ndarray:
    """(H, W) int32 labels: Voronoi cells of random seeds, kept inside the outline."""
    inside = np.flatnonzero(outline)
    count = max(2, int(len(inside) / (cell_size**2)))
    seeds = np.zeros(outline.shape, dtype=bool)
    seeds.flat[rng.choice(inside, size=min(count, len(inside)), replace=False)] = True
    seed_labels = np.zeros(outline.shape, dtype=np.int32)
    seed_labels[seeds] = np.arange(1, seeds.sum() + 1)
    # Each pixel takes the label of its nearest seed (a Voronoi tessellation).
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    return np.where(outline, seed_labels[iy, ix], 0)


def synthesize_field(rng: np.random.Generator, slices: int, height: int,
                     width: int) -> tuple[np.ndarray, np.ndarray]:
    """One field of view: (Z, H, W) uint16 brightfield stack and (Z, H, W) uint16 labels."""
    cell_size = max(6.0, min(height, width) / 10)
    labels_2d = _cells(rng, _organoid_outline(rng, height, width), cell_size)
    n_cells = int(labels_2d.max())
    # Each cell lives in a few slices around its own depth.
    depth = rng.uniform(0, slices - 1, size=n_cells + 1)
    extent = rng.uniform(1.5, 3.5, size=n_cells + 1)
    z = np.arange(slices)[:, None, None]
    present = np.abs(z - depth[labels_2d][None]) <= extent[labels_2d][None]
    labels = np.where(present & (labels_2d > 0)[None], labels_2d[None], 0).astype(np.uint16)

    membrane = boundary_mask(labels, thickness=1)
    texture = _smooth_noise(rng, (height, width), sigma=1.0)[None]
    background = 0.55 + 0.03 * _smooth_noise(rng, (height, width), sigma=height / 8)[None]
    brightness = rng.uniform(0.62, 0.72, size=n_cells + 1)[labels]
    image = np.where(labels > 0, brightness + 0.04 * texture, background)
    image = np.where(membrane, 0.30, image)
    # Defocus grows with distance from the focal plane in the middle of the stack.
    focus = (slices - 1) / 2
    for k in range(slices):
        image[k] = ndimage.gaussian_filter(image[k], 0.4 + 0.35 * abs(k - focus))
    image = image + 0.02 * rng.standard_normal(image.shape)
    stack = np.clip(image * 60000, 0, 65535).astype(np.uint16)
    return stack, labels


def write_demo_dataset(root: Path | str, patients: int = 5, sites: int = 3, slices: int = 7,
                       height: int = 128, width: int = 128, seed: int = 0) -> list[Path]:
    """Write ``patients`` × ``sites`` fields of view under ``root``; returns the files written.

    The first patient is NF0014_T1 (the configs' holdout patient). Deterministic for ``seed``.
    """
    import tifffile

    if not 1 <= patients <= len(PATIENT_NAMES):
        raise ValueError(f"patients must be 1..{len(PATIENT_NAMES)}, not {patients}")
    if not 1 <= sites <= 9:
        raise ValueError(f"sites must be 1..9, not {sites}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = []
    for p in range(patients):
        patient = PATIENT_NAMES[p]
        for s in range(sites):
            name = f"{WELLS[(p + s) % len(WELLS)]}-{s + 1}"
            stack, labels = synthesize_field(rng, slices, height, width)
            image_path = root / patient / IMAGE_DIR / name / f"{name}{IMAGE_SUFFIX}"
            mask_path = root / patient / MASK_DIR / name / MASK_NAME
            for path, array in ((image_path, stack), (mask_path, labels)):
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, array)
                written.append(path)
    return written
