"""A kdinpaint plugin: the ``toy-resnet`` adapter for a small residual inpainting network.

The network stands for "a model someone else wrote": an EdgeConnect-style generator (two strided
convolutions, residual blocks at 1/4 resolution, two transposed convolutions) whose forward takes
``(x, hole)`` rather than ``(image, mask)``. The adapter tells kdinpaint how to call it, which modules end
its encoder levels, how to build its teacher, and how to read an "official" checkpoint whose keys carry a
``generator.`` prefix.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

__all__ = ["ToyResNetInpainter", "checkpoint_filter_fn", "register_adapters"]
__version__ = "0.1.0"


class ResBlock(nn.Module):
    """``x + conv(act(conv(x)))``, shape-preserving ``(B, C, H, W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class ToyResNetInpainter(nn.Module):
    """Called as ``model(x, hole)``: ``x`` the image ``(B, 3, H, W)`` in [-1, 1], ``hole`` ``(B, 1, H, W)``
    with 1 = missing; returns ``(B, 3, H, W)`` in [-1, 1]. ``H`` and ``W`` divisible by 4."""

    def __init__(self, width: int = 16, blocks: int = 2):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(4, w, 5, 1, 2), nn.ReLU())
        self.enc1 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU())  # 1/2
        self.enc2 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU())  # 1/4
        self.middle = nn.Sequential(*[ResBlock(4 * w) for _ in range(blocks)])  # 1/4
        self.dec2 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.ReLU())  # 1/2
        self.dec1 = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU())  # 1/1
        self.head = nn.Conv2d(w, 3, 5, 1, 2)

    def forward(self, x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([x * (1 - hole), hole], 1))
        h = self.middle(self.enc2(self.enc1(h)))
        return torch.tanh(self.head(self.dec1(self.dec2(h))))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official checkpoints store the network under ``generator.``; drop that prefix and other parts."""
    prefix = "generator."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


SPEC = {
    "name": "toy-resnet",
    "description": "example plugin: a small residual inpainting network",
    # the last module at each encoder resolution: 1/2 (enc1) and 1/4 (the residual blocks' output)
    "encoder_levels": ["enc1", "middle"],
    "image_arg": "x",
    "mask_arg": "hole",
    "probe_shape": [1, 3, 32, 32],
    "variants": {"no-cb": {"completion_sites": []}},
}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="toy-resnet",
            spec=SPEC,
            build_student=ToyResNetInpainter,
            description=SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=4,
        )
    )
