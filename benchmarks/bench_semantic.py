"""instance_to_semantic against the per-label distance-transform reference (DESIGN 3.6).

Same 1024x1024 slice with about 300 touching cells; checks the outputs are identical and
prints both times and the speed-up. Both are timed the same way: the best of --repeats calls
each, alternating between the two.  Run: python benchmarks/bench_semantic.py [--repeats 2]
(the reference takes about 30-50 s a call on 2 cores)
"""

import argparse
import time

import numpy as np
from scipy import ndimage

from nf1prov.data.semantic import instance_to_semantic


def touching_cells(size: int = 1024, cells: int = 385, seed: int = 0) -> np.ndarray:
    """(1, size, size) int32: a Voronoi tessellation of ``cells`` seeds over 70% of the slice."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), dtype=bool)
    seeds.flat[rng.choice(size * size, cells, replace=False)] = True
    labels = np.zeros((size, size), dtype=np.int32)
    labels[seeds] = np.arange(1, cells + 1)
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    labels = labels[iy, ix]
    yy, xx = np.mgrid[:size, :size]
    labels[np.hypot(yy - size / 2, xx - size / 2) > 0.47 * size] = 0  # background around it
    return labels[None]


def per_label_edt(instance_mask: np.ndarray, thickness: float) -> np.ndarray:
    out = np.zeros((3, *instance_mask.shape), dtype=np.uint8)
    for z, labels in enumerate(instance_mask):
        out[0, z] = labels == 0
        for label in np.unique(labels[labels != 0]):
            cell = labels == label
            distance = ndimage.distance_transform_edt(cell)
            out[2, z][cell & (distance <= thickness)] = 1
            out[1, z][cell & (distance > thickness)] = 1
    return out


def best_of_alternating(functions: dict, repeats: int) -> dict[str, float]:
    """{name: best time in seconds} over ``repeats`` rounds that call each function once."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    labels = touching_cells()
    print(f"slice 1024x1024, {len(np.unique(labels)) - 1} cells, thickness 2")
    expected = per_label_edt(labels, 2)
    np.testing.assert_array_equal(instance_to_semantic(labels, 2), expected)
    best = best_of_alternating({"baseline": lambda: per_label_edt(labels, 2),
                                "ours": lambda: instance_to_semantic(labels, 2)}, args.repeats)
    print(f"per-label EDT reference: {best['baseline'] * 1e3:9.1f} ms   (best of {args.repeats})")
    print(f"instance_to_semantic:    {best['ours'] * 1e3:9.1f} ms   (best of {args.repeats}, "
          "identical output)")
    print(f"speed-up: {best['baseline'] / best['ours']:.0f}x")
