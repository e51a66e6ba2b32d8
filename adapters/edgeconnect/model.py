"""EdgeConnect's networks (Nazeri, Ng, Joseph, Qureshi, Ebrahimi, ICCV Workshops 2019, arXiv:1901.00212;
official code knazeri/edge-connect) and the two toolkit-facing models built from them.

Two generators of one skeleton (7x7 stem, two stride-2 convolutions, 8 dilated residual blocks at 1/4
resolution, two transposed convolutions, 7x7 head; instance norm without affine or running stats
everywhere): the edge generator ``G1`` completes a Canny edge map, the inpainting generator ``G2`` paints
RGB guided by it. The module trees reproduce the official ones index for index, so the released
``EdgeModel_gen.pth`` / ``InpaintingModel_gen.pth`` (and ``*_dis.pth``) load with ``strict=True``
(:mod:`.weights`): spectral norm is the legacy ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``,
``weight_u``, ``weight_v``; in eval mode the stored ``u``, ``v`` give ``W = W_orig / (u^T W_orig v)``), and
the discriminator's ``features`` is an alias of ``conv1`` (both appear in its state_dict).

One deliberate difference: activations are not in-place (the official ``ReLU(True)``), so a forward hook
that keeps a norm layer's output is not overwritten by the next ReLU. Outputs are identical.

Toolkit entry points (images in ``[-1, 1]``, mask 1 = hole; conventions in :mod:`.conventions`):
:class:`EdgeConnect` (both stages, EC) and :class:`EdgeConnectInpaint` (``G2`` alone with a zero edge
channel, EC#). Both keep the generator under the submodule ``inpaint``, so encoder levels are
``inpaint.encoder.3`` (64 ch, 1/1), ``inpaint.encoder.6`` (128 ch, 1/2) and ``inpaint.encoder.9``
(256 ch, 1/4) in both. Both pad any size to a multiple of 4 themselves and crop back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from kdinpaint.layers import legacy_spectral_norm
from kdinpaint.padding import crop_top_left, pad_bottom_right

from .canny import canny
from .conventions import (
    EC_SIZE_MULTIPLE,
    check_inputs,
    edge_generator_input,
    from_unit,
    inpaint_generator_input,
    rgb_to_gray,
    to_unit,
)

__all__ = [
    "ResnetBlock",
    "EdgeGenerator",
    "InpaintGenerator",
    "Discriminator",
    "EdgeConnect",
    "EdgeConnectInpaint",
]

_logger = logging.getLogger(__name__)


def _sn(module: nn.Module, use_spectral_norm: bool) -> nn.Module:
    return legacy_spectral_norm(module) if use_spectral_norm else module


def _init_normal(module: nn.Module, gain: float = 0.02) -> None:
    """The official initialisation: conv weights ~ N(0, gain), biases 0 (``weight_orig`` under spectral norm)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(getattr(m, "weight_orig", m.weight), 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResnetBlock(nn.Module):
    """``x + [pad(d), conv3x3(d), IN, ReLU, pad(1), conv3x3, IN](x)``, no activation after the sum.

    Under spectral norm the two convolutions have no bias (as in the official code). ``(B, C, H, W)`` in and out.
    """

    def __init__(self, dim: int, dilation: int = 1, use_spectral_norm: bool = False) -> None:
        super().__init__()
        bias = not use_spectral_norm
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(dilation),
            _sn(nn.Conv2d(dim, dim, 3, padding=0, dilation=dilation, bias=bias), use_spectral_norm),
            nn.InstanceNorm2d(dim, track_running_stats=False),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            _sn(nn.Conv2d(dim, dim, 3, padding=0, bias=bias), use_spectral_norm),
            nn.InstanceNorm2d(dim, track_running_stats=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class _EncoderResDecoder(nn.Module):
    """The skeleton shared by both generators; subclasses choose channels, spectral norm and the output map."""

    def __init__(self, in_chans: int, out_chans: int, residual_blocks: int, use_spectral_norm: bool) -> None:
        super().__init__()
        sn = use_spectral_norm
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3),
            _sn(nn.Conv2d(in_chans, 64, 7, padding=0), sn),
            nn.InstanceNorm2d(64, track_running_stats=False),
            nn.ReLU(),  # encoder.3: level 0, 64 x H x W
            _sn(nn.Conv2d(64, 128, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(128, track_running_stats=False),
            nn.ReLU(),  # encoder.6: level 1, 128 x H/2 x W/2
            _sn(nn.Conv2d(128, 256, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(256, track_running_stats=False),
            nn.ReLU(),  # encoder.9: level 2, 256 x H/4 x W/4
        )
        self.middle = nn.Sequential(*[ResnetBlock(256, 2, use_spectral_norm=sn) for _ in range(residual_blocks)])
        self.decoder = nn.Sequential(
            _sn(nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(128, track_running_stats=False),
            nn.ReLU(),
            _sn(nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.ReflectionPad2d(3),
            nn.Conv2d(64, out_chans, 7, padding=0),
        )
        # timm-style description of the encoder levels (module path relative to this generator)
        self.feature_info = [
            {"module": "encoder.3", "num_chs": 64, "reduction": 1},
            {"module": "encoder.6", "num_chs": 128, "reduction": 2},
            {"module": "encoder.9", "num_chs": 256, "reduction": 4},
        ]
        _init_normal(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation output ``(B, out_chans, H, W)`` of an input ``(B, in_chans, H, W)``, H and W multiples of 4."""
        return self.decoder(self.middle(self.encoder(x)))


class EdgeGenerator(_EncoderResDecoder):
    """G1: ``(B, 3, H, W)`` ``[gray with white holes, edges outside holes, mask]`` -> ``(B, 1, H, W)`` edge
    probability in ``(0, 1)`` (sigmoid). Spectral norm on every conv except the last, as released."""

    def __init__(self, residual_blocks: int = 8, use_spectral_norm: bool = True) -> None:
        super().__init__(3, 1, residual_blocks, use_spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class InpaintGenerator(_EncoderResDecoder):
    """G2: ``(B, 4, H, W)`` ``[RGB in [0, 1] with white holes, edge map]`` -> ``(B, 3, H, W)`` RGB in ``[0, 1]``
    (``(tanh + 1) / 2``). No spectral norm, as released."""

    def __init__(self, residual_blocks: int = 8, use_spectral_norm: bool = False) -> None:
        super().__init__(4, 3, residual_blocks, use_spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.logits(x)) + 1) / 2


class Discriminator(nn.Module):
    """70x70 PatchGAN of both stages: ``(B, in_channels, H, W)`` -> ``(B, 1, H/8 - 2, W/8 - 2)`` scores and the
    five activations (for the feature-matching loss). ``in_channels`` is 2 (gray, edge) for G1 and 3 (RGB) for G2.
    ``features`` is the same module as ``conv1`` (the official alias; both names are in the state_dict)."""

    def __init__(self, in_channels: int, use_sigmoid: bool = True, use_spectral_norm: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.use_sigmoid = use_sigmoid
        sn, bias = use_spectral_norm, not use_spectral_norm

        def block(cin: int, cout: int, stride: int, act: bool = True) -> nn.Sequential:
            layers: list[nn.Module] = [_sn(nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=bias), sn)]
            if act:
                layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers)

        self.conv1 = block(in_channels, 64, 2)
        self.features = self.conv1
        self.conv2 = block(64, 128, 2)
        self.conv3 = block(128, 256, 2)
        self.conv4 = block(256, 512, 1)
        self.conv5 = block(512, 1, 1, act=False)
        _init_normal(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = conv(x)
            feats.append(x)
        out = torch.sigmoid(x) if self.use_sigmoid else x
        return out, feats


# ----------------------------------------------------------------------------------------------------------
# Toolkit-facing models
# ----------------------------------------------------------------------------------------------------------


class EdgeConnect(nn.Module):
    """EC, both stages, called with toolkit ``(image, mask)`` alone.

    ``forward(image, mask)``: ``image`` ``(B, 3, H, W)`` in ``[-1, 1]``, ``mask`` ``(B, 1, H, W)`` (1 = hole), any
    H, W >= 9. Steps: ``[0, 1]`` RGB, gray (rgb2gray), Canny (``sigma``) with the hole excluded, G1 on the
    masked gray / edges / mask, the edge map for G2 = ``G1 * m + canny * (1 - m)`` (``merge_edges=True``, as in
    the official training; ``False`` feeds G1's raw map as the official ``test()`` does), G2, crop.
    ``detach_edges=True`` (default) stops gradients into G1 as in the official stage-3 training (G1 then runs
    without autograd).
    Returns G2's raw output ``(B, 3, H, W)`` in ``[-1, 1]``, **not** composited (the toolkit composites with
    :func:`kdinpaint.masking.composite`). ``return_edges=True`` also returns ``(edges fed to G2, canny)``, both
    ``(B, 1, H, W)`` in ``[0, 1]``.
    """

    def __init__(
        self,
        residual_blocks: int = 8,
        sigma: float = 2.0,
        merge_edges: bool = True,
        detach_edges: bool = True,
    ) -> None:
        super().__init__()
        self.edge = EdgeGenerator(residual_blocks)
        self.inpaint = InpaintGenerator(residual_blocks)
        self.sigma = sigma
        self.merge_edges = merge_edges
        self.detach_edges = detach_edges

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, return_edges: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_inputs(image, mask)
        size = image.shape[-2:]
        mask = mask.to(image.dtype).expand(image.shape[0], 1, *size)
        x01 = to_unit(image)
        gray = rgb_to_gray(x01)  # (B, 1, H, W)
        # Canny in float32 at least: half precision would move pixels across the thresholds
        cdt = torch.promote_types(gray.dtype, torch.float32)
        edges = canny(gray.to(cdt), self.sigma, hole=mask).to(gray.dtype)
        g1_input = pad_bottom_right(edge_generator_input(gray, edges, mask), EC_SIZE_MULTIPLE)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_edges):  # no graph for a frozen G1
            pred = crop_top_left(self.edge(g1_input), size)
        edge_map = pred * mask + edges * (1 - mask) if self.merge_edges else pred
        if self.detach_edges:
            edge_map = edge_map.detach()
        g2_input = pad_bottom_right(inpaint_generator_input(x01, edge_map, mask), EC_SIZE_MULTIPLE)
        out = crop_top_left(self.inpaint(g2_input), size)
        out = from_unit(out)
        return (out, edge_map, edges) if return_edges else out


class EdgeConnectInpaint(nn.Module):
    """EC#: the inpainting generator alone, its edge channel fed **zeros** (kept, not dropped, so released
    ``InpaintingModel_gen.pth`` weights still load).

    ``forward(image, mask)``: ``(B, 3, H, W)`` in ``[-1, 1]`` and ``(B, 1, H, W)`` (1 = hole) -> G2's raw output
    ``(B, 3, H, W)`` in ``[-1, 1]``, not composited. With an all-zero mask it is the autoencoder teacher.

    ``load_state_dict`` also takes the ``state_dict()`` of a two-stage :class:`EdgeConnect`: removing the edge
    stage is what EC# means, so its ``edge.*`` entries are dropped (logged) and G2's are loaded strictly.
    """

    def __init__(self, residual_blocks: int = 8) -> None:
        super().__init__()
        self.inpaint = InpaintGenerator(residual_blocks)
        self.register_load_state_dict_pre_hook(_drop_edge_stage)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_inputs(image, mask)
        size = image.shape[-2:]
        mask = mask.to(image.dtype).expand(image.shape[0], 1, *size)
        x01 = to_unit(image)
        x = inpaint_generator_input(x01, torch.zeros_like(mask), mask)
        return from_unit(crop_top_left(self.inpaint(pad_bottom_right(x, EC_SIZE_MULTIPLE)), size))


def _drop_edge_stage(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # load_state_dict pre-hook of EdgeConnectInpaint: a two-stage EC state_dict initialises EC# with its G2
    edge = [k for k in state_dict if k.startswith(prefix + "edge.")]
    if edge and any(k.startswith(prefix + "inpaint.") for k in state_dict):
        for key in edge:
            del state_dict[key]
        _logger.info("EdgeConnectInpaint: dropped the %d edge-stage entries of a two-stage state_dict", len(edge))

