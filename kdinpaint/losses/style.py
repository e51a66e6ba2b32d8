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

from kdinpaint.masking import at_least_fp32, check_mask, composite
from kdinpaint.losses.vgg import InputNorm, VGGFeatures

__all__ = [
    "gram_matrix", "style_loss", "perceptual_loss", "StylePreset", "STYLE_PRESETS", "TargetFeatures", "VGGStyleLoss"
]


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix normalised by the feature size: ``G = F Fᵀ / (C H W)``.

    ``features``: ``(B, C, H, W)``; returns ``(B, C, C)``. Computed in float32 at least (a half-precision
    Gram underflows).
    """
    if features.dim() != 4:
        raise ValueError(f"gram_matrix expects (B, C, H, W) features, got {tuple(features.shape)}")
    b, c, h, w = features.shape
    f = at_least_fp32(features.reshape(b, c, h * w))  # (B, C, HW)
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


@dataclass(frozen=True)
class TargetFeatures:
    """What :class:`VGGStyleLoss` computes from the target alone (no gradient), to reuse across calls.

    ``perceptual``: ``{layer: (B, C_l, H_l, W_l)}`` VGG features of the target at the perceptual layers;
    ``grams``: ``{layer: (B, C_l, C_l)}`` Gram matrices at the style layers, of the target itself
    (``style_region="image"``) or of the hole-only target ``target ⊙ M`` (``"hole"``, so they hold only
    for the mask they were computed with).
    """

    perceptual: dict[str, torch.Tensor]
    grams: dict[str, torch.Tensor]


class VGGStyleLoss(nn.Module):
    """Style and perceptual losses of a preset, owning a frozen :class:`VGGFeatures`.

    ``forward(pred, target, mask)`` with images ``(B, 3, H, W)`` in [-1, 1] and mask ``(B, 1, H, W)``
    (1 = hole) returns ``{"style": scalar, "perceptual": scalar}``, unweighted; multiply by
    ``preset.style_weight`` / ``preset.perceptual_weight`` or by your own ``lambda_s`` (150 in the paper).

    * ``edgeconnect``: style on ``pred ⊙ M`` vs ``target ⊙ M``; perceptual on ``pred`` vs ``target``.
    * ``pconv``: both terms on ``pred`` and on the composite, each vs ``target``, summed.

    ``weights`` / ``allow_random`` are passed to :class:`VGGFeatures` (no weights and no permission is
    an error). The VGG network is built once for the union of the preset's layers.

    The target's VGG passes do not depend on ``pred``: when several predictions are compared with one
    target and mask (several terms of one training step), compute them once with :meth:`target_features`
    and pass the result as ``forward(..., target_features=...)``; the losses are the same values.
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

    @staticmethod
    def _hole_only(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # EdgeConnect zeroes the known region in [0, 1] space before VGG: x ⊙ M there is ((x+1)/2) ⊙ M.
        return (((x + 1) / 2) * mask) * 2 - 1

    @torch.no_grad()
    def target_features(self, target: torch.Tensor, mask: torch.Tensor) -> TargetFeatures:
        """The target's side of :meth:`forward`, computed once without gradients.

        ``target``: ``(B, 3, H, W)`` in [-1, 1]; ``mask``: ``(B, 1, H, W)``, 1 = hole. Pass the result to
        ``forward`` with the same target and mask.
        """
        check_mask(mask, target)
        p = self.preset
        f_target = self.vgg(target)
        f_style = self.vgg(self._hole_only(target, mask)) if p.style_region == "hole" else f_target
        return TargetFeatures(
            perceptual=self._select(f_target, p.perceptual_layers),
            grams={n: gram_matrix(f_style[n]) for n in p.style_layers},
        )

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        target_features: TargetFeatures | None = None,
    ) -> dict[str, torch.Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        check_mask(mask, pred)
        p = self.preset
        t = self.target_features(target, mask) if target_features is None else target_features
        self._check_target_features(t)
        # Each branch lists the prediction's feature sets that are compared with the target's.
        if p.style_region == "hole":
            style_sets = [self.vgg(self._hole_only(pred, mask))]
            perceptual_sets = [self.vgg(pred)]
        else:
            style_sets = perceptual_sets = [self.vgg(pred), self.vgg(composite(pred, target, mask))]
        pw = list(p.perceptual_layer_weights) or None
        style = sum(self._style_vs_grams(f, t.grams) for f in style_sets)
        perc = sum(perceptual_loss(self._select(f, p.perceptual_layers), t.perceptual, pw) for f in perceptual_sets)
        return {"style": style, "perceptual": perc}  # type: ignore[dict-item]

    def _style_vs_grams(self, feats: dict[str, torch.Tensor], grams: dict[str, torch.Tensor]) -> torch.Tensor:
        """:func:`style_loss` against precomputed target Gram matrices."""
        total = 0
        for n in self.preset.style_layers:
            g = gram_matrix(feats[n])
            if g.shape != grams[n].shape:
                raise ValueError(
                    f"target Gram matrix at {n} is {tuple(grams[n].shape)} but the prediction's is {tuple(g.shape)}; "
                    "compute target_features from the same target and mask as the prediction"
                )
            total = total + F.l1_loss(g, grams[n])
        return total  # type: ignore[return-value]

    def _check_target_features(self, t: object) -> None:
        p = self.preset
        if not isinstance(t, TargetFeatures):
            raise TypeError(f"target_features must come from VGGStyleLoss.target_features, got {type(t).__name__}")
        if set(t.grams) != set(p.style_layers) or set(t.perceptual) != set(p.perceptual_layers):
            raise ValueError(
                f"target_features hold layers {sorted(t.grams)} / {sorted(t.perceptual)}, this loss uses "
                f"{sorted(p.style_layers)} / {sorted(p.perceptual_layers)}; "
                "compute them with this module's target_features"
            )
