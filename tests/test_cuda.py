"""The CUDA path: device choice, an AMP training step, prediction on the GPU against the CPU.

Marked `cuda` and skipped where `torch.cuda.is_available()` is False. On a GPU machine:
`python -m pytest -m cuda tests/test_cuda.py` (benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.unet import UNet

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def smooth_stack(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), (0, 2, 2))
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 65535).astype(np.uint16)


def test_auto_device_is_cuda():
    from nf1prov.devices import pick_device
    from nf1prov.train.trainer import resolve_device

    assert pick_device("auto").type == "cuda"
    assert pick_device(None).type == "cuda"
    assert pick_device("cuda").type == "cuda"
    assert resolve_device("auto").type == "cuda"


def test_amp_training_steps_on_cuda(data_root, tmp_path):
    """The trainer's own epoch loop (autocast + GradScaler) on real synthetic crops."""
    from nf1prov.config import defaults
    from nf1prov.train.loss import WeightedBCELoss
    from nf1prov.train.trainer import prepare_data, run_epoch, sample_class_weights

    config = defaults()
    config["data"].update(holdout_patients=[], input_slices=3, crop_size=32, crop_stride=16,
                          split_fractions=[0.6, 0.4, 0.0])
    data = prepare_data(config, data_root, tmp_path / "cache")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = UNet(3, 3, 4).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler("cuda")
    weights = sample_class_weights(data.train, 8, 0, config["data"]["crop_margin"])
    criterion = WeightedBCELoss(weights, alpha=0.9).to(device)
    loader = torch.utils.data.DataLoader(data.train, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0),
                                         pin_memory=True)
    # GradScaler skips the steps whose float16 gradients overflow (its first scale is 2**16):
    # enough batches that some steps are taken.
    scores = run_epoch("train", model, loader, criterion, device, True, 2, 12, "cuda",
                       optimizer=optimizer, scaler=scaler)
    assert math.isfinite(scores["train_loss"]) and scores["train_loss"] > 0
    assert all(math.isfinite(v) for v in scores.values())
    assert all(p.is_cuda for p in model.parameters())
    assert criterion.weights.is_cuda
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert any(changed), "no optimiser step was taken (every step skipped by GradScaler?)"
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # A forward pass under autocast gives float16 logits; the loss stays float32.
    image, target, _ = next(iter(loader))
    with torch.autocast("cuda"):
        logits = model(image.to(device))
    assert logits.dtype == torch.float16
    loss, _ = criterion(logits, target.to(device))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)

    val = run_epoch("val", model, torch.utils.data.DataLoader(data.val, batch_size=4), criterion,
                    device, True, 2, 4, "cuda")
    assert math.isfinite(val["val_loss"])


@pytest.mark.parametrize("tile_size", [32, None])
def test_predict_stack_on_cuda_agrees_with_cpu(tile_size):
    from nf1prov.segment.predict import predict_stack

    torch.manual_seed(0)
    model = UNet(3, 3, 4).eval()
    with torch.no_grad():
        model.head.weight.mul_(5.0)  # outputs that vary, not all near 0.5
    stack = smooth_stack((4, 72, 56))
    cpu = predict_stack(model, stack, input_slices=3, tile_size=tile_size, batch_size=4,
                        device="cpu")
    gpu = predict_stack(model.to("cuda"), stack, input_slices=3, tile_size=tile_size,
                        batch_size=4)  # the model's device: CUDA, under autocast
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape == (3, 4, 72, 56)
    assert np.isfinite(gpu).all()
    # float16 autocast: probabilities agree to ~1e-3, class maps almost everywhere
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)
    assert np.abs(gpu - cpu).mean() < 2e-3
    assert (gpu.argmax(0) == cpu.argmax(0)).mean() > 0.98
