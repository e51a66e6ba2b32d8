"""Style (Gram) and perceptual losses on VGG features, with the ``pconv`` and ``edgeconnect`` presets.

``R_style`` of the paper's Eq. (11) is "the standard style loss"; the paper does not pin a variant, so
two documented presets reproduce the two lineages:

=============== ========================================= ========================================
preset          ``pconv`` (partial conv, RFR, MMagic)       ``edgeconnect`` (EdgeConnect, RN)
=============== ========================================= ========================================
backbone        VGG16                                     VGG19
style layers    pool1, pool2, pool3                       relu2_2, relu3_4, relu4_4, relu5_2
perceptual      pool1, pool2, pool3                       relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
input           [0, 1] with ImageNet mean/std             [0, 1], not normalised
style applied   output and composite, full image          output ⊙ M vs target ⊙ M (hole only)
weights         style 120, perceptual 0.05                style 250, perceptual 0.1
=============== ========================================= ========================================

Sources: ``NVIDIA/partialconv`` ``models/loss.py`` and ``jingyuanli001/RFR-Inpainting`` ``model.py``
(pool1-3, 120 / 0.05); ``knazeri/edge-connect`` ``src/loss.py``, ``src/models.py`` and
``config.yml.example`` (layers, ``style_loss(outputs * masks, images * masks)``, ``STYLE_LOSS_WEIGHT:
250``, ``CONTENT_LOSS_WEIGHT: 0.1``). The weights are documented defaults the caller applies (the paper
itself uses ``lambda_s = 150``); the loss functions return unweighted sums.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdinpaint.masking import check_mask, composite
from kdinpaint.losses.vgg import InputNorm, VGGFeatures

__all__ = ["gram_matrix", "style_loss", "perceptual_loss", "StylePreset", "STYLE_PRESETS", "VGGStyleLoss"]


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix normalised by the feature size: ``G = F Fᵀ / (C H W)``.

    ``features``: ``(B, C, H, W)``; returns ``(B, C, C)``. Computed in float32 at least (a half-precision
    Gram underflows).
    """
    if features.dim() != 4:
        raise ValueError(f"gram_matrix expects (B, C, H, W) features, got {tuple(features.shape)}")
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)  # (B, C, HW)
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)  # (B, C, C)


def style_loss(
    pred_features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    target_features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> torch.Tensor:
    """Style loss: ``sum_l mean |G(φ_l(pred)) - G(φ_l(target))|`` over the given layers.

    ``*_features``: matching dicts (or sequences) of ``(B, C_l, H_l, W_l)`` activations. The mean runs
    over the ``B × C_l × C_l`` Gram entries (``nn.L1Loss`` as in EdgeConnect and partial conv). Returns a
    scalar, unweighted.
    """
    pairs = _pairs(pred_features, target_features)
    return sum(F.l1_loss(gram_matrix(p), gram_matrix(t)) for p, t in pairs)  # type: ignore[return-value]


def perceptual_loss(
    pred_features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    target_features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    layer_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Perceptual loss: ``sum_l w_l mean |φ_l(pred) - φ_l(target)|`` (``w_l = 1`` unless given).

    Shapes as in :func:`style_loss`. Returns a scalar, unweighted by the global perceptual weight.
    """
    pairs = _pairs(pred_features, target_features)
    if layer_weights is None:
        layer_weights = [1.0] * len(pairs)
    if len(layer_weights) != len(pairs):
        raise ValueError(f"{len(layer_weights)} layer weights for {len(pairs)} layers")
    return sum(w * F.l1_loss(p, t) for w, (p, t) in zip(layer_weights, pairs))  # type: ignore[return-value]


Features = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _pairs(a: Features, b: Features) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("pred and target features must both be dicts or both be sequences")
    if isinstance(a, Mapping):
        if set(a) != set(b):  # type: ignore[arg-type]
            raise ValueError(f"feature layers differ: {sorted(a)} vs {sorted(b)}")  # type: ignore[arg-type]
        pairs = [(a[k], b[k]) for k in a]  # type: ignore[index]
    else:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} pred feature maps but {len(b)} target feature maps")
        pairs = list(zip(a, b))
    if not pairs:
        raise ValueError("no feature maps given")
    for p, t in pairs:
        if p.shape != t.shape:
            raise ValueError(f"feature shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return pairs


@dataclass(frozen=True)
class StylePreset:
    """What a style/perceptual recipe computes; see the module table."""

    arch: str
    style_layers: tuple[str, ...]
    perceptual_layers: tuple[str, ...]
    input_norm: InputNorm
    style_region: str  # "hole": pred ⊙ M vs target ⊙ M; "image": pred and composite vs target
    style_weight: float
    perceptual_weight: float
    perceptual_layer_weights: tuple[float, ...] = field(default=())


STYLE_PRESETS: dict[str, StylePreset] = {
    "pconv": StylePreset(
        arch="vgg16",
        style_layers=("pool1", "pool2", "pool3"),
        perceptual_layers=("pool1", "pool2", "pool3"),
        input_norm="imagenet",
        style_region="image",
        style_weight=120.0,
        perceptual_weight=0.05,
    ),
    "edgeconnect": StylePreset(
        arch="vgg19",
        style_layers=("relu2_2", "relu3_4", "relu4_4", "relu5_2"),
        perceptual_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
        input_norm="none",
        style_region="hole",
        style_weight=250.0,
        perceptual_weight=0.1,
    ),
}


class VGGStyleLoss(nn.Module):
    """Style and perceptual losses of a preset, owning a frozen :class:`VGGFeatures`.

    ``forward(pred, target, mask)`` with images ``(B, 3, H, W)`` in [-1, 1] and mask ``(B, 1, H, W)``
    (1 = hole) returns ``{"style": scalar, "perceptual": scalar}``, unweighted; multiply by
    ``preset.style_weight`` / ``preset.perceptual_weight`` or by your own ``lambda_s`` (150 in the paper).

    * ``edgeconnect``: style on ``pred ⊙ M`` vs ``target ⊙ M``; perceptual on ``pred`` vs ``target``.
    * ``pconv``: both terms on ``pred`` and on the composite, each vs ``target``, summed.

    ``weights`` / ``allow_random`` are passed to :class:`VGGFeatures` (no weights and no permission is
    an error). The VGG network is built once for the union of the preset's layers.
    """

    def __init__(
        self,
        preset: str | StylePreset = "edgeconnect",
        *,
        weights: str | os.PathLike[str] | None = None,
        allow_random: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(preset, str):
            if preset not in STYLE_PRESETS:
                raise ValueError(f"unknown style preset {preset!r}; known: {sorted(STYLE_PRESETS)}")
            preset = STYLE_PRESETS[preset]
        if preset.style_region not in ("hole", "image"):
            raise ValueError(f"style_region must be 'hole' or 'image', got {preset.style_region!r}")
        self.preset = preset
        layers = tuple(dict.fromkeys(preset.style_layers + preset.perceptual_layers))
        self.vgg = VGGFeatures(
            preset.arch, layers, weights=weights, allow_random=allow_random, input_norm=preset.input_norm
        )

    def _select(self, feats: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {n: feats[n] for n in names}

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        check_mask(mask, pred)
        p = self.preset
        pw = list(p.perceptual_layer_weights) or None
        with torch.no_grad():
            f_target = self.vgg(target)
        if p.style_region == "hole":
            # EdgeConnect zeroes the known region in [0, 1] space before VGG: x ⊙ M there is ((x+1)/2) ⊙ M.
            to_vgg = lambda x: (((x + 1) / 2) * mask) * 2 - 1  # noqa: E731
            f_pred_h = self.vgg(to_vgg(pred))
            with torch.no_grad():
                f_target_h = self.vgg(to_vgg(target))
            f_pred = self.vgg(pred)
            style = style_loss(self._select(f_pred_h, p.style_layers), self._select(f_target_h, p.style_layers))
            perc = perceptual_loss(
                self._select(f_pred, p.perceptual_layers), self._select(f_target, p.perceptual_layers), pw
            )
        else:
            f_pred = self.vgg(pred)
            f_comp = self.vgg(composite(pred, target, mask))
            style = style_loss(self._select(f_pred, p.style_layers), self._select(f_target, p.style_layers))
            style = style + style_loss(self._select(f_comp, p.style_layers), self._select(f_target, p.style_layers))
            perc = perceptual_loss(
                self._select(f_pred, p.perceptual_layers), self._select(f_target, p.perceptual_layers), pw
            )
            perc = perc + perceptual_loss(
                self._select(f_comp, p.perceptual_layers), self._select(f_target, p.perceptual_layers), pw
            )
        return {"style": style, "perceptual": perc}
