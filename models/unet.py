"""The upstream UNet segmenter (DESIGN 4).

Input (N, in_channels, H, W) float32 with H and W multiples of 16; output (N, num_classes, H, W)
logits. Widths are base_width * (1, 2, 4, 8, 16); base_width is 64 upstream, small for CPU tests.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    # No conv bias: the batch norm that follows has its own.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Down(nn.Module):
    """A 3x3 conv to ``out_channels``, then a stride-2 3x3 conv: half resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels)
        self.down = conv_bn_relu(out_channels, out_channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv(x))


class Up(nn.Module):
    """Bilinear x2 upsampling, concatenation with the skip, two 3x3 convs to ``out_channels``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels),
            conv_bn_relu(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3, base_width: int = 64) -> None:
        super().__init__()
        w = base_width
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_width = base_width
        self.stem = nn.Sequential(conv_bn_relu(in_channels, w), conv_bn_relu(w, w))
        self.encoders = nn.ModuleList(
            [Down(w, 2 * w), Down(2 * w, 4 * w), Down(4 * w, 8 * w), Down(8 * w, 16 * w)]
        )
        self.decoders = nn.ModuleList(
            [Up(16 * w, 8 * w, 8 * w), Up(8 * w, 4 * w, 4 * w), Up(4 * w, 2 * w, 2 * w),
             Up(2 * w, w, w)]
        )
        self.head = nn.Conv2d(w, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for encoder in self.encoders:
            skips.append(encoder(skips[-1]))
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)
