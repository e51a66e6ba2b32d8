"""The layers of DeepFill v2 in the official TensorFlow numerics: TF ``"SAME"`` padding, the gated convolution,
its x2 up-convolution and neuralgym's spectral-normalised convolution of the SN-PatchGAN discriminator.

State-dict keys equal those of the converted official weights (``<layer>.conv.weight``,
``<layer>.conv.conv.weight`` for up-convolutions, ``conv_sn.weight`` / ``conv_sn.weight_u`` in the
discriminator).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdinpaint.layers import get_act_layer

__all__ = ["tf_same_pad", "GatedConv2d", "GatedUpConv2d", "SNConv2d"]


def tf_same_pad(x: torch.Tensor, kernel_size: int, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    """Zero-pad ``x`` (``(B, C, H, W)``) as TensorFlow's ``padding="SAME"`` would before a convolution.

    The output of the following unpadded convolution has ``ceil(H / stride)`` rows. When the total
    padding is odd the extra row/column goes after (bottom/right), e.g. ``0`` before and ``1`` after for
    a ``3 x 3`` stride-2 convolution on an even size.
    """
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        out = -(-size // stride)
        effective = (kernel_size - 1) * dilation + 1
        total = max((out - 1) * stride + effective - size, 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    return F.pad(x, pads)


class GatedConv2d(nn.Module):
    """Gated convolution with TF "SAME" padding: ``act(features) * sigmoid(gates)``.

    One convolution produces ``2 * out_channels`` channels, the first half features and the second
    half gates (the split order of the official weights). With ``gated=False`` it is a plain
    convolution to ``out_channels`` followed by ``act_layer`` (the official output layers use
    ``act_layer=None``). Input ``(B, in_channels, H, W)``, output ``(B, out_channels, ceil(H/s), ceil(W/s))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        act_layer: str | type[nn.Module] | None = "elu",
        gated: bool = True,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.gated = gated
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        conv_out = 2 * out_channels if gated else out_channels
        # Stride 1 with an odd kernel: TF "SAME" is symmetric, so the convolution pads by itself (no copy).
        self._self_pad = stride == 1 and kernel_size % 2 == 1
        padding = dilation * (kernel_size - 1) // 2 if self._self_pad else 0
        self.conv = nn.Conv2d(in_channels, conv_out, kernel_size, stride=stride, padding=padding, dilation=dilation)
        self.act = nn.Identity() if act_layer is None else get_act_layer(act_layer)()
        # TF defaults of the official tf.layers.conv2d: Glorot-uniform kernel, zero bias.
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x if self._self_pad else tf_same_pad(x, self.kernel_size, self.stride, self.dilation))
        if not self.gated:
            return self.act(x)
        features, gates = x.split(self.out_channels, dim=1)
        return self.act(features) * torch.sigmoid(gates)


class GatedUpConv2d(nn.Module):
    """x2 nearest upsampling then a 3x3 gated convolution (official ``gen_deconv``).

    TF's ``align_corners`` nearest x2 upsampling picks source row ``floor(i / 2)``, exactly PyTorch's
    ``nearest`` mode. Keys: ``<name>.conv.conv.weight``.
    """

    def __init__(self, in_channels: int, out_channels: int, act_layer: str | type[nn.Module] | None = "elu") -> None:
        super().__init__()
        self.conv = GatedConv2d(in_channels, out_channels, 3, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SNConv2d(nn.Conv2d):
    """Convolution with spectral normalisation; keys ``weight``, ``bias`` and the buffer ``weight_u`` (O, 1).

    ``sigma`` comes from one power iteration started at ``weight_u`` (neuralgym ``kernel_spectral_norm``);
    ``weight_u`` is updated in training mode only and the power iteration is not differentiated
    (``torch.nn.utils.spectral_norm`` semantics; TF also back-propagates through it). The stored
    ``weight`` is never modified: the normalised weight is computed for each call.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, eps: float = 1e-12
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.eps = eps
        self.register_buffer("weight_u", F.normalize(torch.randn(self.out_channels, 1), dim=0, eps=eps))

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight.view(self.out_channels, -1)  # (O, I*k*k)
        with torch.no_grad():
            v = F.normalize(w.t() @ self.weight_u, dim=0, eps=self.eps)  # (I*k*k, 1)
            u = F.normalize(w @ v, dim=0, eps=self.eps)  # (O, 1)
            if self.training:
                self.weight_u.copy_(u)
        sigma = (u.t() @ w @ v).squeeze()
        return self.weight / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)
