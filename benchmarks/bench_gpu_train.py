"""Training speed of the UNet on the GPU: samples per second of one training step (forward,
class-weighted BCE, backward, Adam) for each numeric setting, and the model FLOPs utilisation.

    python benchmarks/bench_gpu_train.py [--batch-size 8] [--crop 512] [--width 64]
                                         [--warmup 5] [--steps 10] [--repeats 3]
                                         [--settings eager-fp32,amp-bf16,...] [--device cuda]
    python benchmarks/bench_gpu_train.py --device cpu --width 4 --crop 64 --steps 2  # a check

Settings, each on a fresh, identically seeded network (the step of `nf1prov.train.trainer`:
autocast around the forward pass only, the loss in float32, Adam with betas (0.5, 0.999)):

- ``eager-fp32``: no autocast. On CUDA the convolutions use TF32 tensor cores when
  ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default), so its MFU is against TF32;
- ``amp-bf16``: autocast to bfloat16, no gradient scaling;
- ``amp-fp16``: autocast to float16 with a GradScaler: what the trainer does on CUDA today
  (on the CPU it trains in float32: ``eager-fp32``);
- ``compile-amp``: ``torch.compile`` of the network, channels-last network and input, under
  the faster of the two AMP dtypes just measured (its GradScaler when that is float16);
- ``compile-fp32``: the same without autocast.

Each setting runs ``--warmup`` steps first (CUDA context, cuDNN's algorithm choice, the
compilation), then ``--repeats`` timed runs of ``--steps`` steps, each between two device
synchronisations; the fastest run counts. The batch is synthetic and already on the device:
this is the device's step rate, not the data loader's.

FLOPs per sample: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward
pass of one crop, on the meta device (no memory, no arithmetic): the convolutions, about three
times the forward pass (the first convolution needs no input gradient). MFU = FLOPs per sample x
samples/s / the card's peak dense TFLOP/s for the setting's dtype (`PEAK_TFLOPS`, from NVIDIA's
data sheets, half their "with sparsity" figures), looked up by ``torch.cuda.get_device_name()``;
"unknown card" (and no MFU) for a card not in the table and for the CPU.

Settings the device cannot do are skipped with the reason (no bfloat16 on the card, no Triton or
C++ compiler for torch.compile, out of memory, a failure in the warm-up). Prints a header (date,
machine, GPU, versions), one line per setting (samples/s, ratio to eager fp32 and to the
trainer's setting today, MFU, peak memory on CUDA) and last ``RESULT best=... ...`` for scripts
(benchmarks/gpu_check.sh). Exit 1 when no setting could be measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.unet import UNet
from nf1prov.train.loss import WeightedBCELoss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_demo, beside this file
from bench_demo import cpu_model, load_average  # noqa: E402

CLASSES = 3
LABEL_WIDTH = 48  # the report's first column
INPUT_SLICES = 3  # configs/default.toml: data.input_slices
CROP_MARGIN = 2  # data.crop_margin: the loss ignores the crop's edge, as in the trainer

# Peak dense TFLOP/s per dtype ("tf32": fp32 convolutions on tensor cores), from NVIDIA's data
# sheets (dense: half the "with sparsity" figure). Matched against torch.cuda.get_device_name()
# in order: more specific names first ("H100 NVL" before "H100", "L40S" before "L4").
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (r"H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"GH200|H100|H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"V100-PCIE", {"fp32": 14.0, "fp16": 112.0}),
    (r"V100", {"fp32": 15.7, "fp16": 125.0}),  # SXM2
    (r"\bT4\b", {"fp32": 8.1, "fp16": 65.0}),
]


@dataclass(frozen=True)
class Setting:
    key: str  # for --settings and the RESULT line
    dtype: torch.dtype | None  # autocast dtype; None: float32, no autocast
    compiled: bool = False  # torch.compile, channels-last network and input

    def label(self, device: torch.device) -> str:
        numbers = {None: "fp32", torch.bfloat16: "AMP bf16",
                   torch.float16: "AMP fp16 + GradScaler"}[self.dtype]
        if self.dtype is None and tf32_convs(device):
            numbers = "fp32 (TF32 convs)"
        return f"compile + channels-last, {numbers}" if self.compiled else f"eager {numbers}"


EAGER = [Setting("eager-fp32", None), Setting("amp-bf16", torch.bfloat16),
         Setting("amp-fp16", torch.float16)]
KEYS = [s.key for s in EAGER] + ["compile-amp", "compile-fp32"]


@dataclass
class Measured:
    setting: Setting
    samples_per_s: float | None = None
    skipped: str = ""  # why it was not measured
    compile_s: float | None = None  # the warm-up's first step (the compilation)
    peak_memory_gib: float | None = None


# --------------------------------------------------------------------------------------------
# FLOPs and peaks
# --------------------------------------------------------------------------------------------

def training_flops_per_sample(width: int, crop: int) -> int:
    """FLOPs of one training sample: one forward and backward pass of one crop, counted by
    FlopCounterMode on the meta device."""
    with torch.device("meta"):
        # eval: batch norm's FLOPs are not counted, and one crop at a 1-pixel bottom would not
        # pass batch norm in training mode
        model = UNet(INPUT_SLICES, CLASSES, width).eval()
        image = torch.empty(1, INPUT_SLICES, crop, crop)
    with FlopCounterMode(display=False) as counter:
        model(image).sum().backward()
    return counter.get_total_flops()


def trainer_today(device: torch.device) -> str:
    """The setting `nf1prov.train.trainer` trains with on ``device`` today: autocast (float16)
    with a GradScaler on CUDA, float32 elsewhere."""
    return "amp-fp16" if device.type == "cuda" else "eager-fp32"


def tf32_convs(device: torch.device) -> bool:
    """Float32 convolutions run on TF32 tensor cores (CUDA, compute capability 8.0 or later,
    and cuDNN's TF32 switch on: PyTorch's default)."""
    return (device.type == "cuda" and torch.backends.cudnn.allow_tf32
            and torch.cuda.get_device_capability(device)[0] >= 8)


def peak_table(gpu_name: str) -> dict[str, float] | None:
    """The card's peak dense TFLOP/s by dtype, or None for a card not in `PEAK_TFLOPS`."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            return peaks
    return None


def peak_key(setting: Setting, tf32: bool) -> str:
    if setting.dtype is None:
        return "tf32" if tf32 else "fp32"
    return "bf16" if setting.dtype == torch.bfloat16 else "fp16"


def mfu(flops_per_sample: int, samples_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops_per_sample * samples_per_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------
# what the device can do
# --------------------------------------------------------------------------------------------

def cannot(setting: Setting, device: torch.device) -> str:
    """Why ``device`` cannot run ``setting`` ("" when it can, as far as one can tell before)."""
    if setting.dtype is not None and not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for {device.type}"
    if (setting.dtype == torch.bfloat16 and device.type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        return "the card has no bfloat16 (compute capability below 8.0)"
    if setting.compiled:
        return compiler_missing(device)
    return ""


def compiler_missing(device: torch.device) -> str:
    if sys.platform == "win32":
        return "torch.compile is not supported here (Windows)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "torch.compile needs Triton for CUDA; it is not installed"
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
    return ""


# --------------------------------------------------------------------------------------------
# the training step and its timing
# --------------------------------------------------------------------------------------------

def training_step(setting: Setting, args, device: torch.device) -> Callable[[], None]:
    """One step of the trainer's loop for ``setting`` on a fresh network and a fixed batch."""
    torch.manual_seed(0)
    model = UNet(INPUT_SLICES, CLASSES, args.width).to(device)
    image = torch.randn(args.batch_size, INPUT_SLICES, args.crop, args.crop, device=device)
    target = (torch.rand(args.batch_size, CLASSES, args.crop, args.crop, device=device)
              < 1 / CLASSES).float()
    if setting.compiled:
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    network = torch.compile(model) if setting.compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=setting.dtype == torch.float16)
    criterion = WeightedBCELoss(torch.full((CLASSES,), 1 / CLASSES), alpha=0.9).to(device)
    m = CROP_MARGIN

    def step() -> None:
        with torch.autocast(device.type, dtype=setting.dtype or torch.float32,
                            enabled=setting.dtype is not None):
            logits = network(image)
        loss, _ = criterion(logits[..., m:-m, m:-m], target[..., m:-m, m:-m], update=True)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setting: Setting, args, device: torch.device) -> Measured:
    """Warm up, then the fastest of ``args.repeats`` timed runs of ``args.steps`` steps."""
    result = Measured(setting)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = training_step(setting, args, device)
        start = time.perf_counter()
        step()
        synchronise(device)
        result.compile_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            step()
        best = float("inf")
        for _ in range(args.repeats):
            synchronise(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronise(device)
            best = min(best, time.perf_counter() - start)
    except torch.OutOfMemoryError:
        result.skipped = (f"out of memory at batch size {args.batch_size}: lower --batch-size "
                          "or --crop")
    except Exception as error:  # noqa: BLE001 - a setting that fails is reported, not fatal
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        result.skipped = f"failed in its warm-up: {type(error).__name__}: {first_line}"
    else:
        result.samples_per_s = args.batch_size * args.steps / best
        if device.type == "cuda":
            result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        release(setting, device)
    return result


def release(setting: Setting, device: torch.device) -> None:
    """Free what one setting left behind, so that the next starts from the same state."""
    if setting.compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_settings(keys: list[str], args, device: torch.device) -> list[Measured]:
    """Measure the settings of ``keys`` in `KEYS` order; ``compile-amp`` takes the faster of the
    AMP dtypes measured before it (bfloat16 when neither was)."""
    results: list[Measured] = []
    for key in [k for k in KEYS if k in keys]:
        setting = resolve_setting(key, results)
        if isinstance(setting, Measured):  # skipped before it could start
            results.append(setting)
            print(result_line(setting, results, args, device), flush=True)
            continue
        reason = cannot(setting, device)
        result = Measured(setting, skipped=reason) if reason else measure(setting, args, device)
        results.append(result)
        print(result_line(result, results, args, device), flush=True)
    return results


def resolve_setting(key: str, results: list[Measured]) -> Setting | Measured:
    if key == "compile-fp32":
        return Setting(key, None, compiled=True)
    if key != "compile-amp":
        return next(s for s in EAGER if s.key == key)
    amp = [r for r in results if r.setting.dtype is not None and r.samples_per_s]
    if amp:
        fastest = max(amp, key=lambda r: r.samples_per_s)
        return Setting(key, fastest.setting.dtype, compiled=True)
    tried = [r for r in results if r.setting.dtype is not None]
    if tried:  # both AMP dtypes were tried and neither ran
        return Measured(Setting(key, torch.bfloat16, compiled=True),
                        skipped="neither AMP dtype ran on this device")
    return Setting(key, torch.bfloat16, compiled=True)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------

def header_lines(args, device: torch.device, flops: int) -> list[str]:
    now = datetime.datetime.now(datetime.UTC)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [
        f"# bench_gpu_train {now:%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.node()}, {cpu_model()}, {os.cpu_count()} CPUs, load average "
        f"{load_average()} (1/5/15 min)",
        f"GPU: {gpu}; device {device}",
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda or 'none'}, cuDNN {cudnn or 'none'}, "
        f"{torch.get_num_threads()} torch CPU threads",
        f"UNet width {args.width}, {INPUT_SLICES} input slices, {args.crop}-px crops, batch "
        f"{args.batch_size}; {args.warmup} warm-up steps, best of {args.repeats} x "
        f"{args.steps} steps",
        f"FLOPs per sample (forward + backward): {flops / 1e9:.2f} GFLOP",
        f"peak: {peak_text(device)}",
        f"vs today: against {trainer_today(device)}, what nf1prov.train.trainer does on "
        f"{device.type} today",
        f"{'setting':<{LABEL_WIDTH}}{'samples/s':>10} {'vs fp32':>8} {'vs today':>9} "
        f"{'MFU':>7}  notes",
    ]


def peak_text(device: torch.device) -> str:
    if device.type != "cuda":
        return "unknown card (the CPU): no MFU"
    peaks = peak_table(torch.cuda.get_device_name(device))
    if peaks is None:
        return f"unknown card ({torch.cuda.get_device_name(device)}): no MFU"
    return ", ".join(f"{k} {v:g}" for k, v in peaks.items()) + " TFLOP/s dense"


def result_line(result: Measured, results: list[Measured], args, device: torch.device) -> str:
    label = result.setting.label(device)
    if result.samples_per_s is None:
        return f"{label:<{LABEL_WIDTH}}skipped: {result.skipped}"
    rate = result.samples_per_s
    mfu_value = setting_mfu(result, args, device)
    notes = []
    today = trainer_today(device)
    if result.setting.key == today:
        notes.append("the trainer's setting today")
    if result.setting.compiled:
        notes.append(f"first step {result.compile_s:.1f} s")
    if result.peak_memory_gib is not None:
        notes.append(f"peak memory {result.peak_memory_gib:.1f} GiB")
    return (f"{label:<{LABEL_WIDTH}}{rate:10.2f} {ratio_text(rate, results, 'eager-fp32'):>8} "
            f"{ratio_text(rate, results, today):>9} "
            f"{'n/a' if mfu_value is None else f'{100 * mfu_value:.1f}%':>7}  "
            f"{'; '.join(notes)}").rstrip()


def setting_mfu(result: Measured, args, device: torch.device) -> float | None:
    if device.type != "cuda" or result.samples_per_s is None:
        return None
    peaks = peak_table(torch.cuda.get_device_name(device))
    peak = peaks and peaks.get(peak_key(result.setting, tf32_convs(device)))
    return mfu(args.flops, result.samples_per_s, peak) if peak else None


def rate_of(results: list[Measured], key: str) -> float | None:
    return next((r.samples_per_s for r in results if r.setting.key == key), None)


def ratio_text(rate: float, results: list[Measured], key: str) -> str:
    base = rate_of(results, key)
    return f"{rate / base:.2f}x" if base else "n/a"


def result_summary(results: list[Measured], args, device: torch.device) -> str:
    """``RESULT best=<key> samples_per_s=... vs_fp32=... vs_today=... mfu=...`` (nan: not
    measured)."""
    measured = [r for r in results if r.samples_per_s]
    if not measured:
        return "RESULT best=none"
    best = max(measured, key=lambda r: r.samples_per_s)
    rate = best.samples_per_s
    fp32, today = rate_of(results, "eager-fp32"), rate_of(results, trainer_today(device))
    value = setting_mfu(best, args, device)
    nan = float("nan")
    return (f"RESULT best={best.setting.key}"
            f"{'-' + peak_key(best.setting, False) if best.setting.key == 'compile-amp' else ''}"
            f" samples_per_s={rate:.2f} vs_fp32={rate / fp32 if fp32 else nan:.2f}"
            f" vs_today={rate / today if today else nan:.2f}"
            f" mfu={nan if value is None else value:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=512, help="crop side, a multiple of 16")
    parser.add_argument("--width", type=int, default=64, help="the UNet's base width")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts")
    parser.add_argument("--settings", default=",".join(KEYS),
                        help=f"comma-separated, of: {', '.join(KEYS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings.split(",")) - set(KEYS))
    if unknown:
        parser.error(f"unknown settings {', '.join(unknown)}: choose among {', '.join(KEYS)}")
    if args.crop % 16 or args.crop <= 2 * CROP_MARGIN:
        parser.error(f"--crop {args.crop}: the UNet needs a multiple of 16")
    if min(args.warmup, args.steps, args.repeats, args.batch_size) < 1:
        parser.error("--warmup, --steps, --repeats and --batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu_train: --device {args.device}, but torch.cuda.is_available() is "
              "False: no CUDA device here (run it with --device cpu and tiny settings, e.g. "
              "--width 4 --crop 64 --steps 2)")
        return 1
    args.flops = training_flops_per_sample(args.width, args.crop)
    print("\n".join(header_lines(args, device, args.flops)), flush=True)
    results = run_settings(args.settings.split(","), args, device)
    print(result_summary(results, args, device))
    return 0 if any(r.samples_per_s for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
