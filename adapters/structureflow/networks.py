"""StructureFlow's networks (Ren et al., ICCV 2019) with the official module tree, so that the released
``latest_net_s_gen.pth`` / ``latest_net_f_gen.pth`` / ``latest_net_*_dis.pth`` load with ``strict=True``:
the structure reconstructor, the texture generator (flow column + convolution column with Gaussian
resampling) and the two-scale discriminator. The toolkit-facing models are in :mod:`.model`, the adapter in
:mod:`kdinpaint_adapters.structureflow`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdinpaint.layers import legacy_spectral_norm
from kdinpaint.ops.gaussian_resample import GaussianResample2d

__all__ = [
    "ColumnLayerNorm",
    "ConvBlock",
    "TransConvBlock",
    "ResBlock",
    "ResBlocks",
    "StructureReconstructor",
    "FlowColumn",
    "ConvColumn",
    "TextureGenerator",
    "MultiScaleDiscriminator",
    "init_weights",
]

# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class ColumnLayerNorm(nn.Module):
    """Layer norm of each sample over (C, H, W) with per-channel affine ``weight``/``bias`` of shape (C, 1, 1).

    Equal to ``GroupNorm(1, C)``; kept as its own module for the official parameter shapes.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 1, self.weight.flatten(), self.bias.flatten(), self.eps)


_NORMS = {"in": lambda c: nn.InstanceNorm2d(c), "ln": ColumnLayerNorm, "none": None}
_ACTS = {"relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh, "none": None}


def _make(table: dict, name: str | type[nn.Module], kind: str, *args: int) -> nn.Module | None:
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name(*args)
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)} or pass an nn.Module class")
    factory = table[name]
    return None if factory is None else factory(*args)


class ConvBlock(nn.Module):
    """Reflection pad -> conv (optionally spectral-normed) -> norm -> activation; attributes as the official
    ``Conv2dBlock`` (``pad``, ``conv``, ``norm``, ``activation``). ``(B, cin, H, W) -> (B, cout, H/stride, W/stride)``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        norm: str | type[nn.Module] = "none",
        act_layer: str | type[nn.Module] = "relu",
        use_sn: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        # registration order as the official block, so state_dict keys come out in the official order
        self.pad = nn.ReflectionPad2d(padding)
        self.norm = _make(_NORMS, norm, "norm", cout)
        self.activation = _make(_ACTS, act_layer, "activation")
        conv = nn.Conv2d(cin, cout, kernel_size, stride, bias=bias)
        self.conv = legacy_spectral_norm(conv) if use_sn else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pad(x))
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)


class TransConvBlock(nn.Module):
    """Transposed conv 6x6 stride 2 (doubles H, W) -> norm -> activation (official ``TransConv2dBlock``)."""

    def __init__(self, cin: int, cout: int, norm: str | type[nn.Module] = "in", act_layer: str = "relu") -> None:
        super().__init__()
        self.transConv = nn.ConvTranspose2d(cin, cout, 6, 2, 2)
        self.norm = _make(_NORMS, norm, "norm", cout)
        self.activation = _make(_ACTS, act_layer, "activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transConv(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)


class ResBlock(nn.Module):
    """``x + conv3x3(relu(conv3x3(x)))``, both convs normed, no spectral norm (attribute ``model``)."""

    def __init__(self, dim: int, norm: str | type[nn.Module] = "in") -> None:
        super().__init__()
        self.model = nn.Sequential(ConvBlock(dim, dim, 3, 1, 1, norm), ConvBlock(dim, dim, 3, 1, 1, norm, "none"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.model(x)


class ResBlocks(nn.Module):
    """``n`` :class:`ResBlock` in a Sequential named ``model`` (official ``ResBlocks``)."""

    def __init__(self, n: int, dim: int, norm: str | type[nn.Module] = "in") -> None:
        super().__init__()
        self.model = nn.Sequential(*[ResBlock(dim, norm) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ImageHead(nn.Module):
    """3x3 conv to RGB with tanh (official ``Get_image``): ``(B, C, H, W) -> (B, 3, H, W)`` in [-1, 1]."""

    def __init__(self, cin: int, cout: int = 3) -> None:
        super().__init__()
        self.conv = ConvBlock(cin, cout, 3, 1, 1, "none", "tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _up() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="nearest")


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------


class StructureReconstructor(nn.Module):
    """The structure reconstructor ``s_gen``: a U-shaped encoder-decoder with additive skips.

    ``forward(x)``: ``x`` ``(B, 7, H, W)`` = [corrupted image (holes 0), masked structure, mask], images in
    [-1, 1], H and W multiples of 8 (16 in the full pipeline). Returns the completed structure
    ``(B, 3, H, W)`` in [-1, 1]. Encoder levels: ``input_layer`` (dim, 1/1), ``down_sample.0`` (2 dim, 1/2),
    ``down_sample.1`` (4 dim, 1/4), ``down_sample.2`` (8 dim, 1/8). Official: dim 64, 4 residual blocks per
    decoder level, instance norm, spectral norm on every conv outside the residual blocks and the skips.
    """

    def __init__(self, dim: int = 64, n_res: int = 4, use_sn: bool = True) -> None:
        super().__init__()
        d, sn = dim, use_sn
        self.down_sample = nn.ModuleList()  # registered first, as in the official class (key order)
        self.up_sample = nn.ModuleList()
        self.content_param = nn.ModuleList()
        self.input_layer = ConvBlock(7, d, 7, 1, 3, "in", use_sn=sn)
        self.down_sample.extend([
            nn.Sequential(ConvBlock(d, 2 * d, 4, 2, 1, "in", use_sn=sn), ConvBlock(2 * d, 2 * d, 5, 1, 2, "in", use_sn=sn)),
            nn.Sequential(ConvBlock(2 * d, 4 * d, 4, 2, 1, "in", use_sn=sn), ConvBlock(4 * d, 4 * d, 5, 1, 2, "in", use_sn=sn)),
            nn.Sequential(ConvBlock(4 * d, 8 * d, 4, 2, 1, "in", use_sn=sn)),
        ])
        self.up_sample.extend(
            nn.Sequential(ResBlocks(n_res, c, "in"), _up(), ConvBlock(c, c // 2, 5, 1, 2, "in", use_sn=sn))
            for c in (8 * d, 4 * d, 2 * d)
        )
        self.content_param.extend(ConvBlock(c, c, 5, 1, 2, "in") for c in (4 * d, 2 * d, d))
        self.image_net = ImageHead(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.input_layer(x)
        x1 = self.down_sample[0](x0)
        x2 = self.down_sample[1](x1)
        x3 = self.down_sample[2](x2)
        u = self.up_sample[0](x3) + self.content_param[0](x2)
        u = self.up_sample[1](u) + self.content_param[1](x1)
        u = self.up_sample[2](u) + self.content_param[2](x0)
        return self.image_net(u)


class FlowColumn(nn.Module):
    """Predicts the appearance flow ``(B, 2, H/4, W/4)`` in pixels of the 1/4 grid (channel 0 = x) from the
    7-channel input; instance norm. Encoder levels ``down_sample_flow.{0..3}`` at 1/2, 1/4, 1/8, 1/16."""

    def __init__(self, dim: int = 64, n_res: int = 2) -> None:
        super().__init__()
        d = dim
        self.down_sample_flow = nn.ModuleList([
            nn.Sequential(ConvBlock(7, d // 2, 7, 1, 3, "in"), ConvBlock(d // 2, d, 4, 2, 1, "in"), ConvBlock(d, d, 5, 1, 2, "in")),
            nn.Sequential(ConvBlock(d, 2 * d, 4, 2, 1, "in"), ConvBlock(2 * d, 2 * d, 5, 1, 2, "in")),
            nn.Sequential(ConvBlock(2 * d, 4 * d, 4, 2, 1, "in"), ConvBlock(4 * d, 4 * d, 5, 1, 2, "in")),
            nn.Sequential(ConvBlock(4 * d, 8 * d, 4, 2, 1, "in"), ConvBlock(8 * d, 8 * d, 5, 1, 2, "in")),
        ])
        self.up_sample_flow = nn.ModuleList([
            nn.Sequential(ResBlocks(n_res, 8 * d, "in"), TransConvBlock(8 * d, 4 * d)),
            nn.Sequential(ConvBlock(8 * d, 4 * d, 5, 1, 2, "in"), ResBlocks(n_res, 4 * d, "in"), TransConvBlock(4 * d, 2 * d)),
        ])
        self.location = nn.Sequential(
            ConvBlock(4 * d, d, 5, 1, 2, "in"), ConvBlock(d, 2, 3, 1, 1, "none", "none", bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.down_sample_flow[0](x)
        f2 = self.down_sample_flow[1](f1)
        f3 = self.down_sample_flow[2](f2)
        f4 = self.down_sample_flow[3](f3)
        u = torch.cat((self.up_sample_flow[0](f4), f3), 1)  # (B, 8d, H/8, W/8)
        u = torch.cat((self.up_sample_flow[1](u), f2), 1)  # (B, 4d, H/4, W/4)
        return self.location(u)


class ConvColumn(nn.Module):
    """Encodes the input to 1/4 and 1/8, warps the 1/4 features by the flow (Gaussian sampling, K=16 and K=4),
    decodes to the image; layer norm. ``forward(x (B, 7, H, W), flow (B, 2, H/4, W/4)) -> (B, 3, H, W)``."""

    def __init__(self, dim: int = 64, n_res: int = 2, input_grad: Literal["exact", "cuda"] = "exact") -> None:
        super().__init__()
        d = dim
        self.down_sample = nn.ModuleList([
            nn.Sequential(
                ConvBlock(7, d // 2, 7, 1, 3, "ln"), ConvBlock(d // 2, d, 4, 2, 1, "ln"), ConvBlock(d, d, 5, 1, 2, "ln"),
                ConvBlock(d, 2 * d, 4, 2, 1, "ln"), ConvBlock(2 * d, 2 * d, 5, 1, 2, "ln"),
            ),
            nn.Sequential(ConvBlock(2 * d, 4 * d, 5, 1, 2, "ln"), ConvBlock(4 * d, 8 * d, 4, 2, 1, "ln")),
        ])
        self.up_sample = nn.ModuleList([
            nn.Sequential(ResBlocks(n_res, 8 * d, "ln"), _up(), ConvBlock(8 * d, 4 * d, 5, 1, 2, "ln")),
            nn.Sequential(
                ConvBlock(8 * d, 4 * d, 5, 1, 2, "ln"), ResBlocks(n_res, 4 * d, "ln"), _up(),
                ConvBlock(4 * d, 2 * d, 5, 1, 2, "ln"), ResBlocks(n_res, 2 * d, "ln"), _up(),
                ConvBlock(2 * d, d, 5, 1, 2, "ln"), ImageHead(d),
            ),
        ])
        self.resample16 = GaussianResample2d(16, 4.0, input_grad=input_grad)
        self.resample4 = GaussianResample2d(4, 2.0, input_grad=input_grad)

    def forward(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        x1 = self.down_sample[0](x)
        x2 = self.down_sample[1](x1)
        warped = torch.cat((self.resample16(x1, flow), self.resample4(x1, flow)), 1)  # (B, 4d, H/4, W/4)
        return self.up_sample[1](torch.cat((self.up_sample[0](x2), warped), 1))


class TextureGenerator(nn.Module):
    """The texture generator ``f_gen`` (official ``FlowGen``): flow column + conv column.

    ``forward(x)``: ``x`` ``(B, 7, H, W)`` = [corrupted image (holes 0), structure, mask], [-1, 1], H and W
    multiples of 16. Returns ``(image (B, 3, H, W) in [-1, 1], flow (B, 2, H/4, W/4))``. Official: dim 64,
    2 residual blocks, no spectral norm. ``input_grad`` is passed to the resamplers.
    """

    def __init__(self, dim: int = 64, n_res: int = 2, input_grad: Literal["exact", "cuda"] = "exact") -> None:
        super().__init__()
        self.flow_column = FlowColumn(dim, n_res)
        self.conv_column = ConvColumn(dim, n_res, input_grad)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flow = self.flow_column(x)
        return self.conv_column(x, flow), flow


class _DownsampleResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_1 = nn.Sequential(
            ConvBlock(cin, cin, 3, 1, 1, act_layer="lrelu", use_sn=True),
            ConvBlock(cin, cout, 3, 1, 1, act_layer="lrelu", use_sn=True),
            nn.AvgPool2d(2, 2),
        )
        self.conv_2 = nn.Sequential(nn.AvgPool2d(2, 2), ConvBlock(cin, cout, 1, 1, 0, act_layer="lrelu", use_sn=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_1(x) + self.conv_2(x)


class _PatchDiscriminator(nn.Module):
    def __init__(self, cin: int = 3, dim: int = 64) -> None:
        super().__init__()
        self.model = nn.Sequential(
            ConvBlock(cin, dim, 4, 2, 1, act_layer="lrelu", use_sn=True),
            _DownsampleResBlock(dim, 2 * dim),
            _DownsampleResBlock(2 * dim, 4 * dim),
            ConvBlock(4 * dim, 1, 1, 1, 0, act_layer="none", use_sn=True, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MultiScaleDiscriminator(nn.Module):
    """The official two-scale discriminator (``s_dis`` / ``f_dis``, same architecture), spectral norm on
    every conv. ``forward(x (B, 3, H, W) in [-1, 1]) -> [logits at 1/8, logits at 1/16]`` (LSGAN targets)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.model_1 = _PatchDiscriminator(3, dim)
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.model_2 = _PatchDiscriminator(3, dim)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.model_1(x), self.model_2(self.down(x))]


def init_weights(module: nn.Module) -> None:
    """The official initialisation (``INIT_TYPE: xavier``): Xavier-normal with gain sqrt(2) for plain conv
    weights, zero biases. Spectral-normed convs keep PyTorch's default ``weight_orig``: the official
    initialiser writes the derived ``weight`` tensor, which the next forward recomputes."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if not hasattr(m, "weight_orig"):
                nn.init.xavier_normal_(m.weight, gain=math.sqrt(2))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
