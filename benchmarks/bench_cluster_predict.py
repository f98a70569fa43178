"""Issue 29 item 9: a screen of 64 small stacks, `nf1prov predict` serial against `--workers 2`
(a local Dask cluster of two worker processes), on this machine.

The model is a random width-8 UNet of configs/demo.toml's shape (3 input slices, 64-pixel tiles)
saved as the model folder `nf1prov checkout` leaves; the stacks are 3 x 256 x 256 uint16. Each
run is the whole command as a user runs it, in a fresh process and a fresh output folder:
serial with its default threads (the usable CPUs), the cluster with its default (usable CPUs //
2 per worker). Printed per run: wall seconds, stacks/s over the whole command, and stacks/s
once running (from the first stack's line to the last: without start-up, model loading and the
cluster's start); then the ratios cluster / serial. Runs alternate serial, cluster, cluster,
serial, ...; the best of --rounds each.

    python benchmarks/bench_cluster_predict.py [--rounds 1] [--stacks 64]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_demo import child_env, machine_line, timed, versions  # noqa: E402

SHAPE = (3, 256, 256)
WIDTH, TILE = 8, 64  # configs/demo.toml


def write_screen(root: Path, stacks: int) -> tuple[Path, Path]:
    """(model folder, input folder) under ``root``."""
    import tifffile
    import torch
    from scipy import ndimage

    from models.unet import UNet
    from nf1prov import weights
    from nf1prov.config import defaults, to_toml

    torch.manual_seed(0)
    model = UNet(3, 3, WIDTH).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # probabilities that vary in space: cells to label
    weights.save(model, root / "checkout" / "model")
    config = defaults()
    config["data"].update(crop_size=TILE, input_slices=3)
    config["model"]["base_width"] = WIDTH
    (root / "checkout" / "config").mkdir()
    (root / "checkout" / "config" / "config.toml").write_text(to_toml(config))
    rng = np.random.default_rng(0)
    for n in range(stacks):
        image = ndimage.gaussian_filter(rng.random(SHAPE, np.float32), (0, 2, 2))
        image = (image - image.min()) / (image.max() - image.min())
        folder = root / "screen" / f"P{n % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"s{n:03d}.tif", (image * 65535).astype(np.uint16))
    return root / "checkout" / "model", root / "screen"


def run(name: str, model: Path, screen: Path, root: Path, stacks: int,
        extra: list[str]) -> tuple[float, float]:
    """(wall seconds, stacks/s once running) of one `nf1prov predict`."""
    out = root / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "nf1prov", "predict", str(model), str(screen), "-o",
               str(out), "--no-progress", *extra]
    result = timed(command, root, child_env(), root / f"{name}.log")
    done = [t for t, line in result.lines if " cells -> " in line]
    assert len(done) == stacks, result.lines[-5:]
    steady = (len(done) - 1) / (done[-1] - done[0]) if done[-1] > done[0] else float("nan")
    return result.wall, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stacks", type=int, default=64)
    args = parser.parse_args()
    from nf1prov.threads import usable_cpus

    print(machine_line())
    print(versions())
    print(f"{args.stacks} stacks of {' x '.join(map(str, SHAPE))} uint16, UNet width {WIDTH}, "
          f"tiles of {TILE}; {usable_cpus()} usable CPU(s)")
    runs = {"serial": [], "workers 2": []}
    options = {"serial": [], "workers 2": ["--workers", "2"]}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        root = Path(tmp)
        model, screen = write_screen(root, args.stacks)
        order = ["serial", "workers 2"]
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                wall, steady = run(name.replace(" ", "-"), model, screen, root, args.stacks,
                                   options[name])
                runs[name].append((wall, steady))
                print(f"  round {r + 1} {name:9s}: {wall:6.1f} s, "
                      f"{args.stacks / wall:5.2f} stacks/s whole, {steady:5.2f} once running",
                      flush=True)
    best = {name: (min(w for w, _ in values), max(s for _, s in values))
            for name, values in runs.items()}
    for name, (wall, steady) in best.items():
        print(f"{name:9s}: {wall:6.1f} s, {args.stacks / wall:5.2f} stacks/s whole command, "
              f"{steady:5.2f} stacks/s once running")
    (serial_wall, serial_steady), (cluster_wall, cluster_steady) = best.values()
    print(f"RESULT stacks={args.stacks} serial_stacks_per_s={args.stacks / serial_wall:.2f} "
          f"workers2_stacks_per_s={args.stacks / cluster_wall:.2f} "
          f"ratio_whole={serial_wall / cluster_wall:.2f} "
          f"ratio_running={cluster_steady / serial_steady:.2f}")


if __name__ == "__main__":
    main()
