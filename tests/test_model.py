"""The UNet against DESIGN 4: parameter count from the layer formula, shapes, registry."""

import pytest
import torch

from models import ARCHITECTURES
from models.unet import UNet


def expected_unet_parameters(in_channels: int, width: int, classes: int = 3) -> int:
    """Parameters of the DESIGN 4 UNet, counted from the layer list (not from the module)."""

    def conv_bn(i: int, o: int) -> int:  # 3x3 conv without bias + batch norm (weight, bias)
        return 9 * i * o + 2 * o

    w = width
    total = conv_bn(in_channels, w) + conv_bn(w, w)  # full-resolution stem
    for i, o in [(w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 16 * w)]:
        total += conv_bn(i, o) + conv_bn(o, o)  # 3x3 conv, then stride-2 3x3 conv
    for i, skip, o in [(16 * w, 8 * w, 8 * w), (8 * w, 4 * w, 4 * w), (4 * w, 2 * w, 2 * w),
                       (2 * w, w, w)]:
        total += conv_bn(i + skip, o) + conv_bn(o, o)  # after upsampling + concatenation
    total += w * classes + classes  # 1x1 head with bias
    return total


def test_parameter_count_width_64_three_slices():
    model = UNet(in_channels=3, num_classes=3, base_width=64)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_unet_parameters(3, 64)
    assert count == 31_384_963  # the formula's value, written out as a tripwire


def test_batch_norm_follows_every_3x3_conv_and_only_the_head_has_a_bias():
    model = UNet(in_channels=1, base_width=4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 2 + 4 * 2 + 4 * 2 + 1
    assert len(norms) == len(convs) - 1
    assert [c.bias is not None for c in convs] == [False] * (len(convs) - 1) + [True]
    strides = [c.stride[0] for c in convs]
    assert strides.count(2) == 4


@pytest.mark.parametrize("side", [(16, 16), (32, 48), (64, 16)])
def test_shape_preserved_for_sides_multiple_of_16(side):
    model = UNet(in_channels=3, num_classes=3, base_width=4).eval()
    x = torch.randn(2, 3, *side)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, *side)
    assert y.dtype == torch.float32


def test_architectures_lookup_builds_the_unet():
    cls = ARCHITECTURES["unet"]
    assert cls is UNet
    model = cls(in_channels=5, num_classes=3, base_width=4)
    assert model.stem[0][0].in_channels == 5
    assert model.head.out_channels == 3
