"""DeepFill v2's own objective (Yu et al., ICCV 2019): the generator loss of the official v2.0.0 code and
:class:`GatedConvObjective`, which trains with it and the SN-PatchGAN discriminator in ``recipes/train.py``
(``losses.objective: gatedconv-gan``)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn as nn

from kdinpaint.losses.adversarial import discriminator_loss
from kdinpaint.masking import check_mask, composite
from kdinpaint.train.objective import TrainingObjective, merge_weights

from .model import SNPatchGANDiscriminator

__all__ = ["gatedconv_loss", "GC_LOSS_WEIGHTS", "GatedConvObjective"]


def gatedconv_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    coarse: torch.Tensor | None = None,
    discriminator: nn.Module | None = None,
) -> torch.Tensor:
    """``L_G = mean|y - x_1| + mean|y - x_2| - mean D(x_2 ⊙ M + y ⊙ (1 - M), M)``: DeepFill v2's generator loss.

    From the official v2.0.0 code: ``inpaint_model.py`` ``build_graph_with_losses`` (``ae_loss`` = L1 over
    the whole image of both stages times ``l1_loss_alpha``; ``g_loss`` = ``gan_loss_alpha`` times the
    hinge generator loss of neuralgym's ``gan_hinge_loss``, on the composited image with the mask as a
    fourth channel, ``gan_with_mask: True``) and ``inpaint.yml`` (``l1_loss_alpha: 1``, ``gan_loss_alpha:
    1``, ``gan: sngan``). Its discriminator step is ``½ mean relu(1 - D(y)) + ½ mean relu(1 + D(fake))``,
    i.e. :func:`kdinpaint.losses.adversarial.discriminator_loss` with ``"hinge"`` on
    :class:`SNPatchGANDiscriminator` scores; both networks use Adam, lr 1e-4, betas (0.5, 0.999).

    Args:
        pred: refined prediction ``x_2`` ``(B, 3, H, W)`` in ``[-1, 1]`` (not composited).
        target: ground truth ``y``, same shape.
        mask: ``(B or 1, 1, H, W)``, 1 = hole; builds the discriminator's fake ``x_2 ⊙ M + y ⊙ (1 - M)``.
        coarse: the coarse prediction ``x_1`` (``model(image, mask, return_coarse=True)[1]``); ``None``
            drops its L1 term.
        discriminator: scores ``(B, N)`` for ``(image, mask)``, e.g. :class:`SNPatchGANDiscriminator`;
            ``None`` drops the adversarial term.

    Returns:
        A scalar tensor (the official weights, all 1, applied).
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must be (B, 3, H, W) of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    mask = check_mask(mask, target).to(pred.dtype)
    loss = (target - pred).abs().mean()
    if coarse is not None:
        if coarse.shape != target.shape:
            raise ValueError(f"coarse must have the target's shape {tuple(target.shape)}, got {tuple(coarse.shape)}")
        loss = loss + (target - coarse).abs().mean()
    if discriminator is not None:
        loss = loss - discriminator(composite(pred, target, mask), mask).mean()  # gradients reach the holes only
    return loss


#: DeepFill v2's generator weights (``inpaint.yml``: ``l1_loss_alpha`` on both stages, ``gan_loss_alpha``)
GC_LOSS_WEIGHTS: dict[str, float] = {"l1": 1.0, "coarse_l1": 1.0, "adv": 1.0}


class GatedConvObjective(TrainingObjective):
    """DeepFill v2's own training objective: :func:`gatedconv_loss`'s terms and the SN-PatchGAN discriminator.

    Generator: ``{"l1": mean|y - x_2|, "coarse_l1": mean|y - x_1|, "adv": -mean D(x_2 ⊙ M + y ⊙ (1 - M), M)}``
    times :data:`GC_LOSS_WEIGHTS` (the sum is :func:`gatedconv_loss`), reading the discriminator in eval
    mode (its spectral norms then leave ``weight_u`` unchanged, so the loss changes no state). Discriminator
    ``"patchgan"``: the hinge loss ``½ mean relu(1 - D(y, M)) + ½ mean relu(1 + D(fake, M))`` on the composited
    fake with the mask as a fourth channel (``gan_with_mask``), real and fake in one forward as the official
    ``pos_neg`` batch (one power iteration per step).

    Args:
        cnum: the discriminator's base width (official 64).
        channel_order: the channel order of the discriminator's weights; as the generator's (``bgr``).
        weights: overrides of :data:`GC_LOSS_WEIGHTS` (0 switches a term off).

    The student is called with ``return_coarse=True`` and returns ``(refined, coarse)``; the prediction is
    ``refined`` (index 0). Official optimiser, for the recipe: Adam lr 1e-4, betas (0.5, 0.999) for both.
    """

    call_kwargs = MappingProxyType({"return_coarse": True})
    output_key = 0

    def __init__(self, cnum: int = 64, channel_order: str = "bgr", weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights = merge_weights(GC_LOSS_WEIGHTS, weights, "DeepFill v2")
        self.discriminators["patchgan"] = SNPatchGANDiscriminator(4, cnum, channel_order=channel_order)

    @staticmethod
    def _split(output: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output)):
            raise TypeError(
                "GatedConvObjective needs the model's (refined, coarse) output (call it with return_coarse=True), "
                f"got {type(output).__name__}"
            )
        return output[0], output[1]

    def generator_loss(
        self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The weighted terms of :func:`gatedconv_loss` on ``output = (refined, coarse)`` and their ``"total"``."""
        refined, coarse = self._split(output)
        if refined.shape != target.shape or coarse.shape != target.shape:
            raise ValueError(
                f"refined {tuple(refined.shape)} and coarse {tuple(coarse.shape)} must have the target's shape {tuple(target.shape)}"
            )
        mask = check_mask(mask, target).to(refined.dtype)  # once: each check reads a value back to the host
        w = self.weights
        terms = {"l1": w["l1"] * (target - refined).abs().mean()}  # gatedconv_loss's L1 terms, written out
        if w["coarse_l1"]:
            terms["coarse_l1"] = w["coarse_l1"] * (target - coarse).abs().mean()
        if w["adv"]:
            with self.discriminators_frozen():
                terms["adv"] = -w["adv"] * self.discriminators["patchgan"](composite(refined, target, mask), mask).mean()
        terms["total"] = sum(terms.values())  # type: ignore[assignment]
        return terms

    def discriminator_loss(
        self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"patchgan": hinge D loss, "total": the same}`` on the detached refined output."""
        refined, _ = self._split(output)
        mask = check_mask(mask, target).to(target.dtype).expand(target.shape[0], -1, -1, -1)
        fake = composite(refined.detach(), target, mask)
        scores = self.discriminators["patchgan"](torch.cat([target, fake]), torch.cat([mask, mask]))  # (2B, N)
        real_scores, fake_scores = scores.chunk(2)
        loss = discriminator_loss(real_scores, fake_scores, "hinge")
        return {"patchgan": loss, "total": loss}
