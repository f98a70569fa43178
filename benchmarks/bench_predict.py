"""Whole-stack prediction speed against the peer: `nf1prov.segment.predict.predict_stack` against
MONAI's `sliding_window_inference` (gaussian blending), in the same process, on the same model,
stack, tile size, overlap and batch size.

MONAI is a benchmark-only dependency (nf1prov does not need it):

    .venv/bin/pip install monai==1.6.1
    .venv/bin/python benchmarks/bench_predict.py [--case small|full|both] [--device cpu|cuda]

Cases (both by default):
  small  an 8 x 1024 x 1024 uint16 stack, a width-16 UNet, 3 input slices, 256-pixel tiles
         overlapping by 128, batch 8 (configs/cpu.toml's width);
  full   the full-scale model of configs/default.toml: width 64, 512-pixel tiles overlapping by
         256, batch 8, on --full-slices slices (1 on a CPU, where one slice takes about a minute).

Both sides start from the uint16 stack and end with float32 (3, Z, H, W) sigmoid probabilities
on the host: MONAI gets the normalised 3-slice windows as a (Z, 3, H, W) batch and
``sigmoid(model(x))`` as its predictor, which is what a MONAI user would write; on CUDA both run
under float16 autocast. MONAI runs the model as given; nf1prov runs its inference copy (batch
norm folded, channels-last) and its own tiling. Each case prints MP/s (input slice pixels per
second) of both, the ratio nf1prov / MONAI, and how far each is from a single whole-slice pass
of the same model (the reference the tiling is tested against; --no-reference skips it).
Timings alternate between the two, after a warm-up of each; the best of --repeats is taken.
The last line of each case is ``RESULT case=... device=... nf1prov_mps=... monai_mps=...
ratio=...`` for scripts (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import ndimage

from models.unet import UNet
from nf1prov.segment.predict import normalise, predict_stack, slice_windows

CASES = {  # name: (UNet width, tile, overlap, batch, slices)
    "small": (16, 256, 128, 8, 8),
    "full": (64, 512, 256, 8, 1),
}


def smooth_stack(slices: int, size: int) -> np.ndarray:
    """A uint16 (Z, size, size) stack with structure at the scale of a few pixels, so that the
    probabilities vary in space and the agreement figures mean something."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((slices, size, size), np.float32), (0, 2, 2))
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 65535).astype(np.uint16)


def random_unet(width: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet(3, 3, width).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # outputs that vary strongly in space, as a trained model's
    return model.to(device)


def monai_predict(model, stack, *, tile, overlap, batch, device) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    image = normalise(stack)
    inputs = torch.from_numpy(image[slice_windows(len(stack), 3)]).to(device)
    autocast = torch.autocast("cuda", enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        prob = sliding_window_inference(
            inputs, roi_size=(tile, tile), sw_batch_size=batch,
            predictor=lambda x: torch.sigmoid(model(x).float()), overlap=overlap / tile,
            mode="gaussian")
    return prob.float().permute(1, 0, 2, 3).cpu().numpy()


def ours_predict(model, stack, *, tile, overlap, batch, device) -> np.ndarray:
    return predict_stack(model, stack, input_slices=3, tile_size=tile, overlap=overlap,
                         batch_size=batch, device=device)


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def run_case(name: str, args, device) -> None:
    width, tile, overlap, batch, slices = CASES[name]
    if name == "full" and args.full_slices:
        slices = args.full_slices
    stack = smooth_stack(slices, args.size)
    model = random_unet(width, device)
    options = dict(tile=tile, overlap=overlap, batch=batch, device=device)
    megapixels = stack.size / 1e6
    print(f"\n[{name}] stack {stack.shape} uint16, UNet width {width}, tiles {tile} px, "
          f"overlap {overlap}, batch {batch}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    warm = stack[:1, : tile + tile // 2, : tile + tile // 2]
    for fn in (monai_predict, ours_predict):
        fn(model, warm, **options)
    times: dict[str, list[float]] = {"monai": [], "ours": []}
    for _ in range(args.repeats):
        monai, seconds = timed(monai_predict, model, stack, **options)
        times["monai"].append(seconds)
        ours, seconds = timed(ours_predict, model, stack, **options)
        times["ours"].append(seconds)
    monai_mps = megapixels / min(times["monai"])
    ours_mps = megapixels / min(times["ours"])
    print(f"MONAI sliding_window_inference: {monai_mps:8.3f} MP/s ({min(times['monai']):.1f} s)")
    print(f"nf1prov predict_stack:          {ours_mps:8.3f} MP/s ({min(times['ours']):.1f} s)")
    print(f"ratio nf1prov / MONAI: {ours_mps / monai_mps:.2f}x; "
          f"max |nf1prov - MONAI| = {np.abs(ours - monai).max():.4f}")
    if not args.no_reference:
        whole = predict_stack(model, stack, input_slices=3, tile_size=None, device=device)
        for label, prob in (("MONAI", monai), ("nf1prov", ours)):
            difference = np.abs(prob - whole)
            print(f"{label:>7} vs one whole-slice pass: max {difference.max():.4f}, "
                  f"mean {difference.mean():.2e}")
    print(f"RESULT case={name} device={device.type} nf1prov_mps={ours_mps:.3f} "
          f"monai_mps={monai_mps:.3f} ratio={ours_mps / monai_mps:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024, help="slice height and width")
    parser.add_argument("--full-slices", type=int, default=0,
                        help="slices of the full case (default 1 on a CPU, 8 on CUDA)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the whole-slice pass the agreement is measured against")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.full_slices and device.type == "cuda":
        args.full_slices = 8
    try:
        import monai  # noqa: F401
    except ImportError:
        raise SystemExit("bench_predict.py compares with MONAI: pip install monai==1.6.1 "
                         "(a benchmark-only dependency)") from None
    for name in CASES if args.case == "both" else [args.case]:
        run_case(name, args, device)


if __name__ == "__main__":
    main()
