"""benchmarks/bench_gpu_train.py on the CPU: its FLOP count, its MFU arithmetic and its report
(the GPU figures themselves come from benchmarks/gpu_check.sh on a CUDA machine)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.unet import UNet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def convolution_flops(width: int, crop: int) -> tuple[int, int]:
    """(all convolutions' forward FLOPs, the first one's) of one crop, from the output shapes:
    2 x output pixels x out channels x in channels x kernel area."""
    flops = []

    def count(conv: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        kernel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        flops.append(2 * output[0].numel() * kernel)

    model = UNet(3, 3, width)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, crop, crop))
    return sum(flops), flops[0]


def test_training_flops_and_mfu(bench):
    forward, first = convolution_flops(4, 32)
    # backward: a weight gradient for every convolution, an input gradient for all but the first
    assert bench.training_flops_per_sample(4, 32) == 3 * forward - first
    assert bench.mfu(10**12, 250.0, 989.4) == pytest.approx(250 / 989.4)
    h100 = bench.peak_table("NVIDIA H100 80GB HBM3")
    assert h100["bf16"] == 989.4 and h100["tf32"] == 494.7
    assert bench.peak_table("NVIDIA H100 PCIe")["fp16"] == 756.0
    assert bench.peak_table("NVIDIA L40S")["bf16"] == 362.1  # not the L4's
    assert bench.peak_table("NVIDIA A100-SXM4-80GB")["tf32"] == 156.0  # not the A10's
    assert "bf16" not in bench.peak_table("Tesla T4")
    assert bench.peak_table("Some Future GPU") is None


def test_cpu_run_prints_a_line_per_setting(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no C++ compiler: torch.compile is skipped
    monkeypatch.delenv("CXX", raising=False)
    code = bench.main(["--device", "cpu", "--width", "4", "--crop", "32", "--batch-size", "1",
                       "--warmup", "1", "--steps", "1", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert any(line.startswith("FLOPs per sample") for line in lines)
    table = lines[[i for i, line in enumerate(lines) if line.startswith("setting")][0] + 1:]
    labels = [line[:bench.LABEL_WIDTH].strip() for line in table[:5]]
    assert labels[:3] == ["eager fp32", "eager AMP bf16", "eager AMP fp16 + GradScaler"]
    assert labels[3].startswith("compile + channels-last, AMP ")  # the faster AMP dtype
    assert labels[4] == "compile + channels-last, fp32"
    figures = [line[bench.LABEL_WIDTH:].split() for line in table[:3]]
    assert figures[0][1:4] == ["1.00x", "1.00x", "n/a"]  # eager fp32: the trainer's CPU setting
    assert all(float(f[0]) > 0 for f in figures)
    for line in table[3:5]:
        assert "skipped: torch.compile on the CPU needs a C++ compiler" in line
    assert table[5].startswith("RESULT best=") and len(table) == 6
