"""Whole-stack prediction speed: batched blended tiles (nf1prov.inference.predict_stack) against
a plain loop that runs one tile at a time, in the same process on the same model and stack.

    .venv/bin/python benchmarks/bench_predict.py [--size 512] [--slices 16] [--width 8]

Prints megapixels (input slice pixels) per second of both and their ratio. Defaults: a
512 x 512 x 16 uint16 stack (``--size 1024`` for the full 1024 x 1024 x 16 case, about 2 minutes
on 2 CPU cores), a width-8 UNet, 3 input slices, 64-pixel tiles with 50 % overlap (the demo
config's crop size), CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from models.unet import UNet
from nf1prov.inference import (
    blend_window,
    normalise,
    predict_stack,
    slice_windows,
    tile_grid,
)


def one_tile_at_a_time(model, stack, *, input_slices, tile_size, overlap):
    """The plain loop: same tiles and blending, one forward pass per tile, no batching."""
    depth, height, width = stack.shape
    image = normalise(stack)
    windows = slice_windows(depth, input_slices)
    grid = tile_grid(height, width, tile_size, overlap)
    (top, bottom), (left, right) = grid.pad
    padded = np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="reflect")
    weight = blend_window(tile_size)
    out = np.zeros((3, depth, *grid.padded_shape), np.float32)
    norm = np.zeros(grid.padded_shape, np.float32)
    for y, x in grid.origins:
        norm[y:y + tile_size, x:x + tile_size] += weight
    with torch.inference_mode():
        for z in range(depth):
            for y, x in grid.origins:
                tile = torch.from_numpy(np.ascontiguousarray(
                    padded[windows[z], y:y + tile_size, x:x + tile_size]))[None]
                prob = torch.sigmoid(model(tile))[0].numpy()
                out[:, z, y:y + tile_size, x:x + tile_size] += prob * weight
    out /= norm
    return out[:, :, top:top + height, left:left + width]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = UNet(3, 3, args.width).eval()
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 65535, (args.slices, args.size, args.size), dtype=np.uint16)
    megapixels = stack.size / 1e6
    overlap = args.tile // 2
    print(f"stack {stack.shape} uint16, UNet width {args.width}, tiles {args.tile} px, "
          f"overlap {overlap}, torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    ours = predict_stack(model, stack, input_slices=3, tile_size=args.tile, overlap=overlap,
                         batch_size=args.batch_size, device="cpu")
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    plain = one_tile_at_a_time(model, stack, input_slices=3, tile_size=args.tile,
                               overlap=overlap)
    t_plain = time.perf_counter() - start
    assert np.allclose(ours, plain, atol=1e-4), "the two paths disagree"
    print(f"batched tiles (batch {args.batch_size}): {megapixels / t_ours:8.3f} MP/s "
          f"({t_ours:.1f} s)")
    print(f"one tile at a time:          {megapixels / t_plain:8.3f} MP/s ({t_plain:.1f} s)")
    print(f"ratio batched / one-at-a-time: {t_plain / t_ours:.2f}x")


if __name__ == "__main__":
    main()
