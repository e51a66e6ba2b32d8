"""The meta-networks Psi of the paper: gamma (Eq. 2), rho (Eq. 2), phi (Eq. 3) and t (Eq. 9).

They read the auxiliary network's (teacher's) features, exist only during training, and are updated by the
bilevel scheme of Algorithm 1 (:mod:`kdinpaint.train.bilevel`), never by the ordinary optimiser step on theta.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureTransform", "ChannelWeights", "PixelWeights"]


class FeatureTransform(nn.Module):
    """gamma of Eq. (2): a convolution from the teacher's width to the student's.

    Initialised to the identity when the widths match, otherwise to an orthogonal projection, so at the
    start the student is pulled towards the teacher's own feature. Shapes: ``(B, C_t, h, w) -> (B, C_s, h, w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            centre = self.conv.weight[:, :, kernel_size // 2, kernel_size // 2]  # (C_s, C_t), a view
            if in_channels == out_channels:
                centre.copy_(torch.eye(out_channels))
            else:
                nn.init.orthogonal_(centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ChannelWeights(nn.Module):
    """rho of Eq. (2) and phi of Eq. (3): non-negative channel weights summing to 1.

    A two-layer MLP on the globally average-pooled feature, ending in a softmax over channels. The last
    layer starts at zero, so the weights start uniform (``1 / C``). Shapes: ``(B, C_in, h, w) -> (B, C_out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(16, in_channels // 4)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))  # (B, C_in)
        return torch.softmax(self.fc2(self.act(self.fc1(pooled))), dim=1)


class PixelWeights(nn.Module):
    """t of Eq. (9): one convolution and a sigmoid on the teacher's decoder feature, a weight in (0, 1) per pixel.

    Shapes: ``(B, C, h, w) -> (B, 1, h, w)``. Starts at 0.5 everywhere (zero weights and bias).
    """

    def __init__(self, in_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))
