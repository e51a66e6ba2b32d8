"""Tiny inpainting networks for the tests (a few thousand parameters, any size divisible by 8), and helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyUNet(nn.Module):
    """A three-level encoder-decoder called as ``model(image, mask)``; levels ``down1..down3``."""

    def __init__(self, width: int = 8, norm: bool = False):
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, stride, 1)]
            if norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers)

        self.stem = block(4, w)
        self.down1 = block(w, w, 2)
        self.down2 = block(w, 2 * w, 2)
        self.down3 = block(2 * w, 4 * w, 2)
        self.up3 = block(4 * w + 2 * w, 2 * w)
        self.up2 = block(2 * w + w, w)
        self.up1 = block(w + w, w)
        self.head = nn.Conv2d(w, 3, 3, 1, 1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(torch.cat([image * (1 - mask), mask], 1))
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        y = self.up3(torch.cat([F.interpolate(x3, scale_factor=2.0), x2], 1))
        y = self.up2(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
        y = self.up1(torch.cat([F.interpolate(y, scale_factor=2.0), x0], 1))
        return torch.tanh(self.head(y))


LEVELS = ["down1", "down2", "down3"]


def batch(b: int = 2, size: int = 32, seed: int = 0, hole: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [-1, 1] and rectangular hole masks, deterministic."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, size, size)
    if hole:
        for i in range(b):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            mask[i, :, y : y + size // 3 + i, x : x + size // 3] = 1
    return image, mask


class TinyAttentionUNet(TinyUNet):
    """TinyUNet with pixel attention (Eq. 7-8) on the decoder feature at 1/4 resolution, ``att``."""

    def __init__(self, width: int = 8, norm: bool = False):
        super().__init__(width, norm)
        from kdinpaint.pixel_attention import PixelAttention

        self.att = PixelAttention(2 * width, qk_channels=4)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(torch.cat([image * (1 - mask), mask], 1))
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        y = self.att(self.up3(torch.cat([F.interpolate(x3, scale_factor=2.0), x2], 1)))
        y = self.up2(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
        y = self.up1(torch.cat([F.interpolate(y, scale_factor=2.0), x0], 1))
        return torch.tanh(self.head(y))


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with every floating-point tensor of its state (parameters and buffers) drawn from N(0, 1):
    generic values, e.g. for weights saved in an official layout and loaded back."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return module


def loss_case(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prediction (requiring grad), a target in [-1, 1] and two rectangular holes: inputs for loss tests."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    pred = (torch.rand(2, 3, size, size, generator=g) * 2 - 1).requires_grad_()
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 4:20, 6:26] = 1
    mask[1, :, 10:30, 2:14] = 1
    return pred, target, mask
