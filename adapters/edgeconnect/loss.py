"""EdgeConnect's own objective for its inpainting stage G2 (Nazeri et al., ICCV-W 2019): the loss terms and
their official weights (``src/models.py`` ``InpaintingModel.process``, ``config.yml.example``), and
:class:`EdgeConnectObjective`, which trains with them and with EdgeConnect's own discriminator in
``recipes/train.py`` (``losses.objective: edgeconnect-gan``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable

import torch

from kdinpaint.losses.adversarial import GanLoss, discriminator_loss, generator_adv_loss
from kdinpaint.losses.style import VGGStyleLoss
from kdinpaint.masking import check_mask
from kdinpaint.train.objective import TrainingObjective, merge_weights

from .conventions import to_unit
from .weights import build_edgeconnect_discriminator

__all__ = ["EC_LOSS_WEIGHTS", "edgeconnect_loss_terms", "edgeconnect_loss", "EdgeConnectObjective"]

EC_LOSS_WEIGHTS: dict[str, float] = {"l1": 1.0, "adversarial": 0.1, "perceptual": 0.1, "style": 250.0}
"""``config.yml.example``: ``L1_LOSS_WEIGHT: 1``, ``INPAINT_ADV_LOSS_WEIGHT: 0.1``,
``CONTENT_LOSS_WEIGHT: 0.1``, ``STYLE_LOSS_WEIGHT: 250``."""


def _logits(scores: Any) -> torch.Tensor:
    # (scores, features) of EdgeConnect's Discriminator or kdinpaint's PatchDiscriminator: the last feature
    # is the pre-sigmoid map whatever use_sigmoid says; a bare tensor is taken as logits
    if isinstance(scores, (tuple, list)):
        feats = scores[1] if len(scores) > 1 else None
        return feats[-1] if isinstance(feats, (tuple, list)) and feats else scores[0]
    return scores


def edgeconnect_loss_terms(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    vgg: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    discriminator: Callable[[torch.Tensor], Any] | None = None,
    gan_loss: str = "nsgan",
) -> dict[str, torch.Tensor]:
    """``l1 = mean|ŷ - y| / mean(M)``, ``adversarial = L_G(D(ŷ))``, ``perceptual``, ``style``: the unweighted
    terms of EdgeConnect's inpainting-stage loss (``src/models.py`` ``InpaintingModel.process``).

    Computed in EdgeConnect's ``[0, 1]`` range (so the official weights :data:`EC_LOSS_WEIGHTS` apply
    unchanged): ``l1`` is ``nn.L1Loss`` over all pixels divided by the hole fraction of the batch (plain L1
    when the batch has no hole, where the official division is by zero). ``adversarial`` feeds the raw,
    uncomposited prediction to ``discriminator`` in ``[0, 1]`` (EdgeConnect's
    :class:`~kdinpaint_adapters.edgeconnect.model.Discriminator`, or any callable returning logits or
    ``(scores, features)``, whose last feature is the logit map) and applies
    :func:`kdinpaint.losses.adversarial.generator_adv_loss` (``nsgan`` = BCE against "real", as configured).
    ``vgg``: :class:`kdinpaint.losses.style.VGGStyleLoss` with the ``edgeconnect`` preset (VGG19; perceptual
    on relu1_1..relu5_1 of ``ŷ`` vs ``y``, style on relu2_2, relu3_4, relu4_4, relu5_2 of ``ŷ ⊙ M`` vs
    ``y ⊙ M``) or any callable returning ``{"style", "perceptual"}``. Terms whose network is ``None`` are absent.

    Args:
        pred: G2's raw output ``(B, 3, H, W)`` in ``[-1, 1]`` (not composited).
        target: ground truth, same shape, in ``[-1, 1]``.
        mask: ``(B or 1, 1, H, W)``, 1 = hole.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"pred and target must be (B, 3, H, W) of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    mask = check_mask(mask, target).to(pred.dtype)
    hole = mask.mean()
    l1 = 0.5 * (pred - target).abs().mean()  # [-1, 1] differences are twice EdgeConnect's [0, 1] ones
    terms = {"l1": l1 / torch.where(hole > 0, hole, torch.ones_like(hole))}
    if discriminator is not None:
        logits = _logits(discriminator(to_unit(pred)))
        terms["adversarial"] = generator_adv_loss(logits, gan_loss)  # type: ignore[arg-type]
    if vgg is not None:
        preset = getattr(vgg, "preset", None)
        if preset is not None and getattr(preset, "arch", "vgg19") != "vgg19":
            raise ValueError(
                f"EdgeConnect's perceptual and style losses use VGG19 (VGGStyleLoss('edgeconnect')), got a "
                f"{preset.arch} preset"
            )
        out = vgg(pred, target, mask)
        terms["perceptual"], terms["style"] = out["perceptual"], out["style"]
    return terms


def edgeconnect_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    vgg: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    discriminator: Callable[[torch.Tensor], Any] | None = None,
    gan_loss: str = "nsgan",
) -> torch.Tensor:
    """``L_G2 = 1 · mean|ŷ - y| / mean(M) + 0.1 · L_adv + 0.1 · L_perc + 250 · L_style``: EdgeConnect's
    inpainting-stage generator loss with the weights of its ``config.yml.example`` (the ICCV-W paper's).

    The terms are those of :func:`edgeconnect_loss_terms` (same arguments); a term whose network is ``None``
    is left out. Its discriminator step (``InpaintingModel.process``) is ``½ (BCE(D(y), 1) + BCE(D(ŷ), 0))``
    on uncomposited ``[0, 1]`` images: :func:`kdinpaint.losses.adversarial.discriminator_loss` with ``nsgan``
    on the logits; both networks use Adam (lr 1e-4, betas (0, 0.9)), D at 0.1× the generator's lr.
    Returns a scalar tensor.
    """
    terms = edgeconnect_loss_terms(pred, target, mask, vgg=vgg, discriminator=discriminator, gan_loss=gan_loss)
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    return sum((EC_LOSS_WEIGHTS[k] * v for k, v in terms.items()), zero)


class EdgeConnectObjective(TrainingObjective):
    """EdgeConnect's inpainting-stage training, for ``recipes/train.py`` (``losses.objective: edgeconnect-gan``).

    Generator: ``{"l1", "adversarial", "perceptual", "style"}`` of :func:`edgeconnect_loss_terms`, each times
    :data:`EC_LOSS_WEIGHTS` (their sum is :func:`edgeconnect_loss`), with EdgeConnect's own 70×70 PatchGAN
    :class:`~kdinpaint_adapters.edgeconnect.model.Discriminator` (3 channels, spectral norm) read in eval mode. As in
    ``InpaintingModel.process``, the discriminator sees the raw, uncomposited prediction in ``[0, 1]``; its
    step minimises ``½ (BCE(D(y), 1) + BCE(D(ŷ), 0))`` (``nsgan``, on logits) or the same pair for ``lsgan`` /
    ``hinge``. Official optimiser, for the recipe: Adam, betas (0, 0.9), discriminator at 0.1× the lr.

    Args:
        vgg: VGG19 weights for the perceptual and style terms (timm name or local file), as
            :class:`kdinpaint.losses.style.VGGStyleLoss` with the ``edgeconnect`` preset.
        allow_random_vgg: build the VGG with random weights when none are given (tests only).
        gan_loss: ``nsgan`` (EdgeConnect's default), ``lsgan`` or ``hinge``.
        discriminator_weights: the released ``InpaintingModel_dis.pth`` (or its folder) to start from.
        weights: overrides of :data:`EC_LOSS_WEIGHTS` (0 switches a term off).
    """

    def __init__(
        self,
        vgg: str | os.PathLike[str] | None = "vgg19.tv_in1k",
        allow_random_vgg: bool = False,
        gan_loss: GanLoss = "nsgan",
        discriminator_weights: str | os.PathLike[str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.weights = merge_weights(EC_LOSS_WEIGHTS, weights, "EdgeConnect")
        self.gan_loss = gan_loss
        uses_vgg = bool(self.weights["perceptual"] or self.weights["style"])
        self.vgg = VGGStyleLoss("edgeconnect", weights=vgg, allow_random=allow_random_vgg) if uses_vgg else None
        self.discriminators["inpaint"] = build_edgeconnect_discriminator("inpaint", discriminator_weights)
        if discriminator_weights is None:  # released weights carry settled u, v
            self.settle_spectral_norms(torch.zeros(1, 3, 32, 32))

    def generator_loss(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms on G2's raw prediction ``output`` ``(B, 3, H, W)`` in [-1, 1], and their ``"total"``."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"EdgeConnectObjective needs G2's prediction (a tensor), got {type(output).__name__}")
        w = self.weights
        with self.discriminators_frozen():
            terms = edgeconnect_loss_terms(
                output, target, mask, vgg=self.vgg,
                discriminator=self.discriminators["inpaint"] if w["adversarial"] else None, gan_loss=self.gan_loss,
            )
        out = {k: w[k] * v for k, v in terms.items() if w[k]}
        out["total"] = sum(out.values())  # type: ignore[assignment]
        return out

    def discriminator_loss(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"inpaint": D loss, "total": the same}``: real ground truth against the detached raw prediction."""
        disc = self.discriminators["inpaint"]
        real = _logits(disc(to_unit(target)))
        fake = _logits(disc(to_unit(output.detach())))
        loss = discriminator_loss(real, fake, self.gan_loss)
        return {"inpaint": loss, "total": loss}
