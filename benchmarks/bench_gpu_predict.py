"""Whole-stack prediction speed on CUDA against the CPU: `nf1prov.segment.predict.predict_stack`
with the same model (a random UNet) on the same uint16 stack, in one process.

    python benchmarks/bench_gpu_predict.py [--slices 8] [--size 1024] [--width 16]
                                           [--tile 512] [--cpu-slices 2]

Prints megapixels (input slice pixels) per second on cuda and cpu and their ratio, and the
largest difference between the two devices' probabilities (CUDA runs under autocast, float16).
The CPU times only the first ``--cpu-slices`` slices of the stack (a rate per slice: every slice
costs the same), so that it stays short; 0 times the whole stack. Without CUDA only the CPU line
is printed. The last line is ``RESULT cuda_mps=... cpu_mps=... ratio=... max_abs_diff=...``
(``nan`` for what was not measured), for scripts (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from models.unet import UNet
from nf1prov.segment.predict import predict_stack


def timed(model, stack, device, args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    prob = predict_stack(model, stack, input_slices=3, tile_size=args.tile,
                         overlap=args.tile // 2, batch_size=args.batch_size, device=device)
    return prob, time.perf_counter() - start  # predict_stack returns host arrays: synchronised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpu-slices", type=int, default=2,
                        help="slices the CPU predicts (0: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet(3, 3, args.width).eval()
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 65535, (args.slices, args.size, args.size), dtype=np.uint16)
    cpu_stack = stack[:args.cpu_slices] if args.cpu_slices > 0 else stack
    print(f"stack {stack.shape} uint16, UNet width {args.width}, tiles {args.tile} px, overlap "
          f"{args.tile // 2}, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")

    cuda_mps = diff = float("nan")
    prob_gpu = None
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        model.to(gpu)
        timed(model, stack[:1], gpu, args)  # warm-up: CUDA context, cuDNN algorithm choice
        prob_gpu, seconds = timed(model, stack, gpu, args)
        cuda_mps = stack.size / 1e6 / seconds
        print(f"cuda ({torch.cuda.get_device_name(0)}): {cuda_mps:9.2f} MP/s "
              f"({stack.size / 1e6:.1f} MP in {seconds:.2f} s)")
    else:
        print("cuda: skipped (torch.cuda.is_available() is False)")

    cpu = torch.device("cpu")
    model.to(cpu)
    prob_cpu, seconds = timed(model, cpu_stack, cpu, args)
    cpu_mps = cpu_stack.size / 1e6 / seconds
    print(f"cpu:  {cpu_mps:9.2f} MP/s ({cpu_stack.size / 1e6:.1f} MP, {len(cpu_stack)} of "
          f"{len(stack)} slices, in {seconds:.2f} s)")
    if prob_gpu is not None:
        diff = float(np.abs(prob_gpu[:, :len(cpu_stack)] - prob_cpu).max())
        print(f"cuda / cpu: {cuda_mps / cpu_mps:.1f}x; max |p_cuda - p_cpu| = {diff:.2e} "
              "(float16 autocast on CUDA)")
    print(f"RESULT cuda_mps={cuda_mps:.3f} cpu_mps={cpu_mps:.3f} "
          f"ratio={cuda_mps / cpu_mps:.2f} max_abs_diff={diff:.3g}")


if __name__ == "__main__":
    main()
