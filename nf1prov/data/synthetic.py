"""`nf1prov demo-data`: a synthetic NF1 organoid dataset in the upstream layout.

Each field of view holds one or two organoid-shaped clusters of touching cells (a Voronoi
tessellation of random seeds inside a blobby outline) on a textured background. Every cell
spans a few z-slices around its own focal depth; brightfield-like intensities give cells
textured interiors and darker membranes, each cell is blurred by its distance from its own
focal plane (faint out-of-focus ghosts just beyond its extent), and camera noise is added.
Everything is vectorised NumPy/SciPy; the default dataset takes well under a second.
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


def _separate_pieces(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, parent): a Voronoi cell that a bend of the outline cuts in two is two cells, so
    each 4-connected piece after a cell's first gets a new label (n + 1, n + 2, ...); ``parent``
    maps every label to the cell it was cut from (so pieces share its depth and brightness)."""
    from skimage.measure import label as connected_pieces

    pieces = connected_pieces(labels, background=0, connectivity=1)
    cell_of_piece = np.zeros(pieces.max() + 1, np.intp)
    cell_of_piece[pieces] = labels
    first_piece = np.full(int(labels.max()) + 1, len(cell_of_piece))
    np.minimum.at(first_piece, cell_of_piece, np.arange(len(cell_of_piece)))
    extra = first_piece[cell_of_piece] != np.arange(len(cell_of_piece))
    new_label = np.where(extra, len(first_piece) - 1 + np.cumsum(extra), cell_of_piece)
    parent = np.concatenate([np.arange(len(first_piece)), cell_of_piece[extra]])
    return new_label[pieces].astype(labels.dtype), parent


# Gaussian blur (pixels) of a cell seen `d` slices away from its own focal depth is
# BLUR_SIGMAS[min(round(d / FOCUS_STEP), last)]: sharp in its own plane, softer away from it.
BLUR_SIGMAS = (0.5, 0.8, 1.1, 1.5, 2.2)
FOCUS_STEP = 1.0


def synthesize_field(rng: np.random.Generator, slices: int, height: int,
                     width: int) -> tuple[np.ndarray, np.ndarray]:
    """One field of view: (Z, H, W) uint16 brightfield stack and (Z, H, W) uint16 labels.

    Every cell is a column of one 2-D Voronoi cell (a connected piece of it, where the outline
    cuts one in two) through the consecutive slices within ``extent`` of its own focal depth (so
    labels change with z; each label is one 3-D object). In slice k a cell is drawn with texture
    and a dark membrane, blurred by its distance |k - depth| from focus; a cell just above or below
    slice k shows as a faint, strongly blurred ghost without membrane (label 0 there), as
    out-of-focus cells do in brightfield.
    """
    cell_size = max(6.0, min(height, width) / 10)
    labels_2d = _cells(rng, _organoid_outline(rng, height, width), cell_size)
    n_cells = int(labels_2d.max())
    labels_2d, parent = _separate_pieces(labels_2d)
    depth = rng.uniform(0, slices - 1, size=n_cells + 1)[parent]
    extent = rng.uniform(1.5, 3.5, size=n_cells + 1)[parent]
    z = np.arange(slices, dtype=np.float64)[:, None, None]
    defocus = np.abs(z - depth[labels_2d][None])  # (Z, H, W) slices from the cell's own focus
    in_cell = (labels_2d > 0)[None]
    present = in_cell & (defocus <= extent[labels_2d][None])
    ghost = in_cell & ~present & (defocus <= extent[labels_2d][None] + 1.5)
    labels = np.where(present, labels_2d[None], 0).astype(np.uint16)

    membrane = boundary_mask(labels, thickness=1)
    texture = _smooth_noise(rng, (height, width), sigma=1.0)[None]
    background = 0.55 + 0.03 * _smooth_noise(rng, (height, width), sigma=height / 8)[None]
    brightness = rng.uniform(0.62, 0.72, size=n_cells + 1)[parent][labels_2d][None]
    image = np.broadcast_to(background, labels.shape).copy()
    image = np.where(ghost, background + 0.4 * (brightness - background), image)
    image = np.where(present, brightness + 0.04 * texture, image)
    image = np.where(membrane, 0.30, image)

    # Per-pixel blur level: a cell's own defocus; background takes a middle level.
    level = np.clip(np.rint(defocus / FOCUS_STEP), 0, len(BLUR_SIGMAS) - 1).astype(np.intp)
    # Present cells keep a visible membrane (level <= 3); ghosts are always the blurriest.
    level = np.where(present, np.minimum(level, 3), np.where(ghost, 4, 2))
    blurred = np.stack([ndimage.gaussian_filter(image, (0, sigma, sigma))
                        for sigma in BLUR_SIGMAS])  # (levels, Z, H, W)
    image = np.take_along_axis(blurred, level[None], axis=0)[0]
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
