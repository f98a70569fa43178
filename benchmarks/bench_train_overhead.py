"""Trainer overhead: a plain PyTorch training loop vs nf1prov's epoch loop on the same batches.

Both loops train the same UNet (same initial weights) on the same in-memory batches. The plain
loop is forward, 2-pixel margin trim, class-weighted BCE, backward, Adam step. Ours
(`trainer.run_epoch`) adds what the trainer does per batch: the EMA class-weight update,
on-device metric sums, a tqdm bar, and the once-per-epoch metric computation. Repeats alternate
between the two so machine noise hits both alike; the median of each is compared.

    python benchmarks/bench_train_overhead.py [--batches 20] [--repeats 5] [--width 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from models.unet import UNet
from nf1prov.train.loss import WeightedBCELoss
from nf1prov.train.trainer import run_epoch


def make_batches(n: int, batch_size: int, slices: int, size: int) -> list:
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        image = torch.rand(batch_size, slices, size, size, generator=g)
        labels = (image[:, slices // 2] * 3).long().clamp(max=2)  # (N, H, W) in {0, 1, 2}
        target = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
        batches.append((image, target, torch.arange(i * batch_size, (i + 1) * batch_size)))
    return batches


def plain_loop(model, optimizer, batches, weights) -> None:
    model.train()
    for image, target, _ in batches:
        logits = model(image)[..., 2:-2, 2:-2]  # the same 2-pixel crop margin
        target = target[..., 2:-2, 2:-2]
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (weights * bce.mean(dim=(0, 2, 3))).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def ours(model, optimizer, batches, weights) -> None:
    criterion = WeightedBCELoss(weights, alpha=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    run_epoch("train", model, batches, criterion, torch.device("cpu"), False, 2, 0, "bench",
              optimizer=optimizer, scaler=scaler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    batches = make_batches(args.batches, args.batch_size, 3, args.size)
    weights = torch.tensor([0.2, 0.3, 0.5])
    torch.manual_seed(0)
    initial = UNet(in_channels=3, base_width=args.width).state_dict()

    def timed(loop) -> float:
        model = UNet(in_channels=3, base_width=args.width)
        model.load_state_dict(initial)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
        start = time.perf_counter()
        loop(model, optimizer, batches, weights)
        return time.perf_counter() - start

    timed(plain_loop), timed(ours)  # warm-up: allocator, oneDNN kernels
    plain, trainer = [], []
    for _ in range(args.repeats):
        plain.append(timed(plain_loop))
        trainer.append(timed(ours))
    print("plain runs (s):  ", " ".join(f"{x:.3f}" for x in plain))
    print("trainer runs (s):", " ".join(f"{x:.3f}" for x in trainer))
    p, t = statistics.median(plain), statistics.median(trainer)
    print(f"{args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, UNet width "
          f"{args.width}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"plain PyTorch loop: {p:.3f} s")
    print(f"nf1prov trainer:    {t:.3f} s")
    print(f"ratio trainer/plain: {t / p:.3f}")


if __name__ == "__main__":
    main()
