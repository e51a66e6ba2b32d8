"""A small three-level U-Net for inpainting (the network of the ``tiny-unet`` adapter).

Network: ``(masked image, mask)`` -> stem (full resolution) -> ``enc1`` (1/2) -> ``enc2`` (1/4) ->
``enc3`` (1/8) -> decoder with skip connections -> ``tanh`` image in [-1, 1]. The encoder levels of the
paper (Eq. 2, 3, 5) are the outputs of ``enc1``, ``enc2``, ``enc3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdinpaint.layers import ConvAct, LayerLike
from kdinpaint.masking import masked

__all__ = ["TinyInpaintUNet", "tiny_unet"]


class TinyInpaintUNet(nn.Module):
    """A three-level U-Net called as ``model(image, mask)``.

    Args:
        width: channels of the first level (levels have ``width``, ``2 width``, ``4 width``).
        act_layer: activation, a name (``"elu"``, ``"relu"``, ``"leaky_relu"``, ``"gelu"``) or a class.

    Shapes: image ``(B, 3, H, W)`` in [-1, 1], mask ``(B, 1, H, W)`` with 1 = hole, ``H`` and ``W``
    divisible by 8; returns the prediction ``(B, 3, H, W)`` in [-1, 1] (not composited with the input).
    """

    def __init__(self, width: int = 16, act_layer: LayerLike = "elu"):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        w = width
        self.stem = ConvAct(4, w, act_layer=act_layer)
        self.enc1 = ConvAct(w, w, 2, act_layer)
        self.enc2 = ConvAct(w, 2 * w, 2, act_layer)
        self.enc3 = ConvAct(2 * w, 4 * w, 2, act_layer)
        self.dec3 = ConvAct(4 * w + 2 * w, 2 * w, act_layer=act_layer)
        self.dec2 = ConvAct(2 * w + w, w, act_layer=act_layer)
        self.dec1 = ConvAct(w + w, w, act_layer=act_layer)
        self.head = nn.Conv2d(w, 3, 3, 1, 1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] % 8 or image.shape[-2] % 8:
            raise ValueError(f"TinyInpaintUNet needs H and W divisible by 8, got {tuple(image.shape[-2:])}; pad the input")
        x0 = self.stem(torch.cat([masked(image, mask), mask], 1))  # (B, w, H, W)
        x1 = self.enc1(x0)  # (B, w, H/2, W/2)
        x2 = self.enc2(x1)  # (B, 2w, H/4, W/4)
        x3 = self.enc3(x2)  # (B, 4w, H/8, W/8)
        y = self.dec3(torch.cat([F.interpolate(x3, scale_factor=2.0), x2], 1))  # (B, 2w, H/4, W/4)
        y = self.dec2(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))  # (B, w, H/2, W/2)
        y = self.dec1(torch.cat([F.interpolate(y, scale_factor=2.0), x0], 1))  # (B, w, H, W)
        return torch.tanh(self.head(y))


def tiny_unet(width: int = 16, act_layer: LayerLike = "elu") -> TinyInpaintUNet:
    """Build the student (and, with fresh weights, the teacher) of the ``tiny-unet`` adapter."""
    return TinyInpaintUNet(width=width, act_layer=act_layer)
