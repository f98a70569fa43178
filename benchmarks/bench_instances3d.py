"""Speed and memory of 3-D instances (`PostProcess(dims=3)`) against per-slice ones (dims 2,
today's labels) on a stack of Z x SIZE x SIZE probabilities.

    .venv/bin/python benchmarks/bench_instances3d.py [--slices 32] [--size 1024] [--cell 24]

The probabilities are made from a known 3-D truth: two layers of touching cells (a Voronoi
tessellation of random seeds, about CELL pixels across), the lower layer on slices 0..Z/2-1 and
the upper one, tessellated anew, above it (so every cell of the upper layer starts where cells
of other footprints end), each cell on a random run of its layer's slices; their one-hot
classes (`instance_to_semantic`, boundary 2 px) are blurred and noised like a model's output.
Both segmentations take the same parameters (seed and foreground thresholds 0.5, min size 10);
each is timed (best of --repeat) with its peak of traced memory (NumPy's arrays, through
``tracemalloc``), and both are scored against the truth as 3-D objects (3-D IoU, F1 at 0.5) and
per slice. One process, one thread: the watershed and linking are single-threaded.

The last line is ``RESULT slices=... size=... per_slice_s=... cells3d_s=... ratio=...`` for
scripts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import tracemalloc

import numpy as np


def truth(rng: np.random.Generator, slices: int, size: int, cell: float) -> np.ndarray:
    """(Z, SIZE, SIZE) uint32 labels: two layers of touching cells (see the module docstring)."""
    from scipy import ndimage

    labels = np.zeros((slices, size, size), np.uint32)
    half = slices // 2
    count = 0
    for first, last in ((0, half), (half, slices)):
        seeds = np.zeros((size, size), bool)
        seeds.flat[rng.choice(size * size, int(size * size / cell**2), replace=False)] = True
        _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
        ids = np.zeros((size, size), np.uint32)
        ids[seeds] = np.arange(1, seeds.sum() + 1) + count
        layer = ids[iy, ix]
        count = int(layer.max())
        start = rng.integers(first, last, size=count + 1)  # each cell's first and last slice
        stop = np.minimum(start + rng.integers(1, last - first + 1, size=count + 1), last)
        z = np.arange(slices)[:, None, None]
        present = (z >= start[layer][None]) & (z < stop[layer][None])
        labels = np.where(present, layer[None], labels)
    return labels


def model_like(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 (3, Z, H, W) probabilities: one-hot classes, blurred in x-y, plus noise."""
    from scipy import ndimage

    from nf1prov.data.semantic import instance_to_semantic

    prob = instance_to_semantic(labels, 2).astype(np.float32)
    ndimage.gaussian_filter(prob, (0, 0, 1, 1), output=prob)
    prob += rng.normal(0, 0.05, prob.shape).astype(np.float32)
    return np.clip(prob, 0, 1, out=prob)


def timed(function, repeat: int):
    """(result, best seconds, peak traced MB of one call)."""
    best = float("inf")
    for _ in range(repeat):
        tracemalloc.start()
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result, best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cell", type=float, default=24.0, help="cell diameter (pixels)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    import scipy
    import skimage

    from nf1prov import __version__
    from nf1prov.segment.evaluate import instance_counts, instance_scores
    from nf1prov.segment.instances import PostProcess

    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
          f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs visible "
          f"({len(os.sched_getaffinity(0))} usable); python {platform.python_version()}, numpy "
          f"{np.__version__}, scipy {scipy.__version__}, scikit-image {skimage.__version__}, "
          f"nf1prov {__version__}")
    rng = np.random.default_rng(0)
    mask = truth(rng, args.slices, args.size, args.cell)
    prob = model_like(mask, rng)
    print(f"stack: {args.slices} x {args.size} x {args.size}, {len(np.unique(mask)) - 1} true "
          f"cells; probabilities {prob.nbytes / 2**20:.0f} MB (float32)")
    flat = PostProcess(0.5, 0.5, 10)
    cells = flat.replace(dims=3)
    cells.segment(prob[:, :2, :64, :64])  # imports and first calls before any timing
    rows = {}
    for name, params in (("per slice (dims 2, today)", flat), ("3-D cells (dims 3)", cells)):
        labels, seconds, peak = timed(lambda p=params: p.segment(prob, 1.0), args.repeat)
        scores3d = instance_scores(instance_counts(mask, labels, per_slice=False))
        scores2d = instance_scores(instance_counts(mask, labels))
        rows[name] = seconds
        print(f"{name}: {seconds:.2f} s, peak {peak:.0f} MB traced beyond the probabilities; "
              f"{int(labels.max())} objects; 3-D F1@0.5 {scores3d['instance_f1']:.3f}, "
              f"per-slice F1@0.5 {scores2d['instance_f1']:.3f}")
    per_slice, cells3d = rows.values()
    print(f"3-D linking adds {cells3d - per_slice:.2f} s ({cells3d / per_slice:.2f}x the "
          "per-slice time)")
    print(f"RESULT slices={args.slices} size={args.size} per_slice_s={per_slice:.2f} "
          f"cells3d_s={cells3d:.2f} ratio={cells3d / per_slice:.2f}")


if __name__ == "__main__":
    main()
