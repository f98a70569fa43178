"""Quality of cells as 3-D objects: a model trained with configs/cpu.toml against the classical
baseline, on a held-out tile of a 3-D nuclei stack with 3-D instance labels.

The data: the 3-D nuclei stack the StarDist package ships for its tests
(`stardist/data/images/img3d.tif`, 31 x 61 x 57 uint16, and `mask3d.tif`, 51 nuclei labelled in
3-D; package licence BSD-3-Clause), fetched from PyPI with pip as `bench_quality.py` fetches its
2-D image (the wheel unpacked, never installed; cached, never committed). StarDist's own loader
(`stardist.data.test_image_nuclei_3d`) calls it "synthetic nuclei": no larger 3-D nuclei stack
with 3-D instance labels ships in a package on PyPI that we found, so this is the stack a
benchmark here can fetch, and its figures stand for rendered nuclei, not a microscope's.

The stack is cut into 2 x 2 x-y tiles of the whole depth, each a (Z, H, W) field of view in the
upstream layout (DESIGN 3.5) whose labels are renumbered 1..N (a nucleus cut by a tile edge
keeps one label through the slices of its tile): 3 to train on (nf1prov's split takes the
validation field from them), 1 held out as patient HOLDOUT. Each TIFF states its voxel size
(ImageJ calibration: x-y 1 µm, z `Z_RATIO` µm), so prediction reads the stack's z / x-y ratio
from the file.

What runs is what a user runs, in a throwaway git workspace with its own sqlite store
(`bench_quality.train_and_evaluate`):

    nf1prov train --config configs/cpu.toml --data-root DATA --set data.holdout_patients=...
                  --set data.crop_size=16 --set data.crop_stride=8
    nf1prov evaluate CODENAME --baseline

and the table is read back from the holdout metrics `evaluate` logs to the model's run: per-slice
instance F1 / AP (`holdout_instance_*`, each slice's cross-section an object) and 3-D instance
precision / recall / F1 at IoU 0.5 and AP over 0.5:0.95 with 3-D IoU (`holdout_instance3d_*`),
model against baseline. The tiles are 28-31 pixels wide, so the crops are 16 pixels (the
smallest the config allows; configs/cpu.toml's 64 do not fit), every 8.

    python benchmarks/bench_quality3d.py [--set KEY=VALUE ...] [--keep DIR] [--cache DIR]
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
from bench_quality import arguments, train_and_evaluate, wheel_arrays

MEMBERS = {"image": "stardist/data/images/img3d.tif", "mask": "stardist/data/images/mask3d.tif",
           "licence": "stardist-0.9.1.dist-info/LICENSE.txt"}
GRID = (2, 2)  # x-y tiles (rows, columns), each the whole depth
HOLDOUT_TILES = {(1, 1)}
HOLDOUT = "HOLDOUT"
Z_RATIO = 2.0  # z step / x-y pixel size the TIFFs state: the nuclei's median extent is 15 x 14
# pixels in y, x and 7 slices in z (the stack itself states no voxel size)
CROPS = ["data.crop_size=16", "data.crop_stride=8"]


def fetch(cache: Path) -> tuple[dict[str, np.ndarray], str]:
    """StarDist's 3-D nuclei stack and its 3-D instance labels, (31, 61, 57) each, and a line
    naming where they come from."""
    arrays, source = wheel_arrays(cache, MEMBERS)
    mask = arrays["mask"]
    cells = np.unique(mask[mask > 0])
    depth = np.array([len(np.unique(np.nonzero(mask == c)[0])) for c in cells])
    described = (f"{source}: {MEMBERS['image']} {arrays['image'].shape} "
                 f"{arrays['image'].dtype}, {len(cells)} nuclei labelled in 3-D "
                 f"(median z-extent {np.median(depth):g} slices)")
    print(f"data: {described}")
    return arrays, described


def write_dataset(arrays: dict[str, np.ndarray], root: Path) -> None:
    """``GRID`` fields of view, (Z, h, w) each: patient TRAIN and HOLDOUT (``HOLDOUT_TILES``)."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    image, mask = arrays["image"], arrays["mask"]
    rows = np.linspace(0, image.shape[1], GRID[0] + 1).astype(int)
    cols = np.linspace(0, image.shape[2], GRID[1] + 1).astype(int)
    calibration = {"resolution": (1.0, 1.0), "imagej": True,
                   "metadata": {"spacing": Z_RATIO, "unit": "um", "axes": "ZYX"}}
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            patient = HOLDOUT if (r, c) in HOLDOUT_TILES else "TRAIN"
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
    args = arguments(__doc__.split("\n\n")[0])
    started = datetime.datetime.now(datetime.UTC)
    arrays, source = fetch(args.cache)
    base = args.keep or Path(tempfile.mkdtemp(prefix="nf1prov-quality3d-"))
    try:
        data = base / "data"
        write_dataset(arrays, data)
        overrides = [f"data.holdout_patients=[\"{HOLDOUT}\"]", *CROPS, *args.overrides]
        trained = train_and_evaluate(base, data, args.config, overrides)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{started:%Y-%m-%d %H:%M} UTC on {platform.node()} ({platform.machine()}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}); {versions()}")
    print(f"data: {source}")
    report(trained, args.config, overrides)


ROWS = [("Dice inner-cell", "dice_inner-cell"),
        ("per-slice instance F1 (IoU 0.5)", "instance_f1"),
        ("per-slice AP (IoU 0.5:0.95)", "instance_ap"),
        ("3-D precision (IoU 0.5)", "instance3d_precision"),
        ("3-D recall (IoU 0.5)", "instance3d_recall"),
        ("3-D instance F1 (IoU 0.5)", "instance3d_f1"),
        ("3-D AP (IoU 0.5:0.95)", "instance3d_ap")]


def report(trained, config: str, overrides: list[str]) -> None:
    metrics, params = trained.metrics, trained.params
    print(f"\nmodel {trained.codename}: {config} {' '.join('--set ' + o for o in overrides)}")
    print(f"trained {int(metrics.get('epochs_run', 0))} epochs in {trained.train_seconds:.0f} s "
          f"(best epoch {int(metrics.get('best_epoch', 0))}); 3-D instance parameters chosen "
          "on validation: " + (", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in
                                         sorted(params.items())
                                         if k.startswith("instances3d.")) or "none logged"))
    rows, cols = GRID
    print(f"\n| held-out tile ({len(HOLDOUT_TILES)} of {rows} x {cols}) | model | baseline | "
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
