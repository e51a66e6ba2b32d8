"""StructureFlow's own generator loss (Ren et al., ICCV 2019), from the official ``model_config.yaml``.

L1 on the texture output and the structure, LSGAN adversarial terms, the sampling-correctness loss on the
appearance flow, and VGG19 style / perceptual terms; :func:`structureflow_loss` combines them with the
official weights :data:`SF_LOSS_WEIGHTS`. :class:`StructureFlowObjective` adds the two discriminators and
their LSGAN loss, as ``recipes/train.py`` trains with them (the loss ``"structureflow"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdinpaint.losses.style import perceptual_loss, style_loss
from kdinpaint.losses.vgg import VGGFeatures
from kdinpaint.masking import check_mask, masked
from kdinpaint.ops.gaussian_resample import gaussian_resample
from kdinpaint.train.objective import TrainingObjective, merge_weights

from .model import StructureFlowOutput
from .networks import MultiScaleDiscriminator

__all__ = [
    "SF_LOSS_WEIGHTS",
    "SF_STYLE_LAYERS",
    "SF_PERCEPTUAL_LAYERS",
    "SF_CORRECTNESS_LAYER",
    "StructureFlowVGG",
    "StructureFlowObjective",
    "lsgan_discriminator_loss",
    "sampling_correctness_loss",
    "structureflow_loss",
]


#: the official generator loss weights (``model_config.yaml``: STRUCTURE_L1, STRUCTURE_ADV_GEN, FLOW_L1,
#: FLOW_ADV_GEN, FLOW_CORRECTNESS, VGG_STYLE, VGG_CONTENT; the last two only in stage 3, the joint model)
SF_LOSS_WEIGHTS: dict[str, float] = {
    "structure_l1": 4.0, "structure_adv": 1.0, "l1": 5.0, "adv": 1.0, "correctness": 0.25, "style": 250.0,
    "perceptual": 0.1,
}
SF_STYLE_LAYERS = ("relu2_2", "relu3_4", "relu4_4", "relu5_2")
SF_PERCEPTUAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
SF_CORRECTNESS_LAYER = "relu3_1"

FeatureFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


class StructureFlowVGG(nn.Module):
    """VGG19 features as StructureFlow's losses read them: the [-1, 1] image goes into the network as it is
    (the official ``VGG19`` on torchvision weights, no ImageNet normalisation).

    ``forward(x (B, 3, H, W) in [-1, 1]) -> {layer: (B, C_l, H_l, W_l)}`` for :data:`SF_STYLE_LAYERS`,
    :data:`SF_PERCEPTUAL_LAYERS` (which hold the correctness layer ``relu3_1``). ``weights`` /
    ``allow_random`` as :class:`kdinpaint.losses.vgg.VGGFeatures`. Frozen; gradients reach ``x``.
    """

    def __init__(self, weights: str | os.PathLike[str] | None = "vgg19.tv_in1k", allow_random: bool = False) -> None:
        super().__init__()
        layers = tuple(dict.fromkeys(SF_PERCEPTUAL_LAYERS + SF_STYLE_LAYERS))
        self.features = VGGFeatures("vgg19", layers, weights=weights, allow_random=allow_random, input_norm="none")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(2 * x - 1)  # VGGFeatures maps [-1, 1] to [0, 1] first; this undoes it


def sampling_correctness_loss(
    target_features: torch.Tensor,
    input_features: torch.Tensor,
    flow: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Sampling correctness: ``L_c = 1/N sum_{j in M} exp(-mu(v'_j, v_j) / (mu_max_j + eps))`` (StructureFlow's
    texture-generator loss, official ``PerceptualCorrectness``).

    ``v_j``: the target (ground-truth) feature at position ``j``; ``v'_j``: the input (corrupted image)
    features warped by the flow with Gaussian sampling (K = 4, sigma = 2) at ``j``; ``mu``: cosine
    similarity over channels; ``mu_max_j = max_i mu(v^in_i, v_j)`` over every input position ``i``; ``N``:
    the number of hole positions (plus ``eps``), summed over the batch. As the official loss: the mask is
    resized to the feature grid by nearest sampling and the flow by adaptive average pooling (an identity
    for VGG ``relu3_1`` on the 1/4 grid of the flow).

    Args:
        target_features, input_features: ``(B, C, h, w)``, e.g. VGG19 ``relu3_1`` of the ground truth and of
            ``ground_truth * (1 - mask)``.
        flow: ``(B, 2, h', w')`` in pixels (the texture generator's flow).
        mask: ``(B, 1, H, W)``, 1 = hole.

    Returns a non-negative scalar (``e^-1`` where the warped feature matches as well as the best input
    position); exactly 0 when there is no hole. Memory grows as ``B (h w)^2`` (the ``mu_max`` table), as in
    the official loss.
    """
    if target_features.shape != input_features.shape or target_features.dim() != 4:
        raise ValueError(
            f"target_features {tuple(target_features.shape)} and input_features {tuple(input_features.shape)} "
            "must be (B, C, h, w) features of the same layer"
        )
    if flow.dim() != 4 or flow.shape[:2] != (target_features.shape[0], 2):
        raise ValueError(f"flow must be (B, 2, h, w) with B = {target_features.shape[0]}, got {tuple(flow.shape)}")
    b, c, h, w = target_features.shape
    m = F.interpolate(mask.to(target_features.dtype), size=(h, w), mode="nearest").reshape(b, -1)  # (B, hw)
    flow = F.adaptive_avg_pool2d(flow, (h, w))
    tgt = target_features.reshape(b, c, h * w)  # (B, C, N)
    inp = input_features.reshape(b, c, h * w)
    cos_all = torch.bmm(  # (B, N_in, N_target)
        (inp / (inp.norm(dim=1, keepdim=True) + eps)).transpose(1, 2), tgt / (tgt.norm(dim=1, keepdim=True) + eps)
    )
    cos_max = cos_all.amax(dim=1)  # (B, N): the best match of each target position anywhere in the input
    warped = gaussian_resample(input_features, flow, 4, 2.0).reshape(b, c, h * w)
    cos = F.cosine_similarity(warped, tgt, dim=1)  # (B, N)
    loss_map = torch.exp(-cos / (cos_max + eps))
    return (loss_map * m).sum() / (m.sum() + eps)


def _lsgan_generator(logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``mean_scales mean (D(fake) - 1)^2``: SF's LSGAN on raw logits (no sigmoid), averaged over D scales."""
    logits = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not logits:
        raise ValueError("no discriminator logits given")
    return sum(F.mse_loss(t, torch.ones_like(t)) for t in logits) / len(logits)  # type: ignore[return-value]


def structureflow_loss(
    pred: torch.Tensor | StructureFlowOutput,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    structure: torch.Tensor | None = None,
    structure_target: torch.Tensor | None = None,
    flow: torch.Tensor | None = None,
    vgg: FeatureFn | None = None,
    fake_logits: Sequence[torch.Tensor] | None = None,
    structure_fake_logits: Sequence[torch.Tensor] | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """StructureFlow's generator loss, ``4 |s - S|_1 + L_adv(s) + 5 |out - gt|_1 + L_adv(out) + 0.25 L_c
    + 250 L_style(out ⊙ M, gt ⊙ M) + 0.1 L_perc(out, gt)`` (official ``model_config.yaml`` and
    ``src/models.py``; the style and perceptual terms are those of its stage 3, the joint model).

    ``|.|_1`` is the mean absolute error over every pixel (``nn.L1Loss``, hole and known alike); ``L_adv``
    the LSGAN generator term on raw logits, averaged over the two discriminator scales
    (:class:`MultiScaleDiscriminator`); ``L_c`` :func:`sampling_correctness_loss` on VGG19 ``relu3_1`` of
    ``gt`` and ``gt ⊙ (1 - M)``; ``L_style`` / ``L_perc`` :func:`kdinpaint.losses.style.style_loss` on
    :data:`SF_STYLE_LAYERS` and :func:`kdinpaint.losses.style.perceptual_loss` on
    :data:`SF_PERCEPTUAL_LAYERS` (Gram normalised by ``C h w``, as the official ones).

    Args:
        pred: the texture generator's output ``(B, 3, H, W)`` in [-1, 1], or a :class:`StructureFlowOutput`
            (``forward(..., return_all=True)``), which also supplies ``structure``, ``structure_target`` and
            ``flow`` unless they are given.
        target: the ground truth ``(B, 3, H, W)`` in [-1, 1]; ``mask``: ``(B, 1, H, W)``, 1 = hole.
        structure, structure_target: the reconstructor's output and the smoothed ground truth (SF, SF*).
        flow: ``(B, 2, H/4, W/4)``, for the correctness term.
        vgg: ``image -> {layer: features}`` (e.g. :class:`StructureFlowVGG`) for the correctness, style and
            perceptual terms.
        fake_logits, structure_fake_logits: discriminator logits of ``out`` / ``s`` (lists over scales).
        weights: overrides of :data:`SF_LOSS_WEIGHTS` (0 skips a term).

    Returns ``{term: weighted scalar, ..., "total": sum}``; a term appears when its inputs are given and its
    weight is non-zero (``l1`` always). Features of the ground truth are computed without gradient.
    """
    w = merge_weights(SF_LOSS_WEIGHTS, weights, "StructureFlow")
    if isinstance(pred, StructureFlowOutput):
        structure = pred.structure if structure is None else structure
        structure_target = pred.structure_target if structure_target is None else structure_target
        flow = pred.flow if flow is None else flow
        pred = pred.image
    if not isinstance(pred, torch.Tensor) or pred.shape != target.shape:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred {got} and target {tuple(target.shape)} must be images of the same shape")
    mask = check_mask(mask, target).to(target.dtype)
    out: dict[str, torch.Tensor] = {"l1": w["l1"] * F.l1_loss(pred, target)}
    if w["structure_l1"] and structure is not None and structure_target is not None:
        out["structure_l1"] = w["structure_l1"] * F.l1_loss(structure, structure_target)
    if w["adv"] and fake_logits is not None:
        out["adv"] = w["adv"] * _lsgan_generator(fake_logits)
    if w["structure_adv"] and structure_fake_logits is not None:
        out["structure_adv"] = w["structure_adv"] * _lsgan_generator(structure_fake_logits)
    if vgg is not None:
        with torch.no_grad():
            gt_feats = vgg(target)
        if w["correctness"] and flow is not None:
            with torch.no_grad():
                in_feats = vgg(masked(target, mask))
            layer = SF_CORRECTNESS_LAYER
            out["correctness"] = w["correctness"] * sampling_correctness_loss(gt_feats[layer], in_feats[layer], flow, mask)
        if w["style"]:
            with torch.no_grad():
                gt_hole = vgg(target * mask)
            pred_hole = vgg(pred * mask)
            out["style"] = w["style"] * style_loss(
                {k: pred_hole[k] for k in SF_STYLE_LAYERS}, {k: gt_hole[k] for k in SF_STYLE_LAYERS}
            )
        if w["perceptual"]:
            pred_feats = vgg(pred)
            out["perceptual"] = w["perceptual"] * perceptual_loss(
                {k: pred_feats[k] for k in SF_PERCEPTUAL_LAYERS}, {k: gt_feats[k] for k in SF_PERCEPTUAL_LAYERS}
            )
    out["total"] = sum(out.values())  # type: ignore[assignment]
    return out


def lsgan_discriminator_loss(
    real_logits: Sequence[torch.Tensor] | torch.Tensor, fake_logits: Sequence[torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    """``mean_scales ((D(real) - 1)^2 + D(fake)^2) / 2`` (means over elements): SF's LSGAN discriminator loss
    on raw logits, real label 1, fake label 0, averaged over the discriminator scales (official
    ``update_flow`` / ``update_structure``). Lists over scales, or one tensor; a non-negative scalar."""
    real = [real_logits] if isinstance(real_logits, torch.Tensor) else list(real_logits)
    fake = [fake_logits] if isinstance(fake_logits, torch.Tensor) else list(fake_logits)
    if not real or len(real) != len(fake):
        raise ValueError(f"give as many real as fake logits (one per scale), got {len(real)} and {len(fake)}")
    terms = [(F.mse_loss(r, torch.ones_like(r)) + F.mse_loss(f, torch.zeros_like(f))) / 2 for r, f in zip(real, fake)]
    return sum(terms) / len(terms)  # type: ignore[return-value]


class StructureFlowObjective(TrainingObjective):
    """StructureFlow's own training objective: :func:`structureflow_loss` and its discriminators.

    Discriminators (:class:`MultiScaleDiscriminator`, two scales, spectral norm): ``"texture"`` (the official
    ``f_dis``) scores the texture output against the ground truth; ``"structure"`` (``s_dis``) the
    reconstructed structure against its smoothed target. As the official ``update_flow`` /
    ``update_structure``, each sees the *raw* output (not composited with the known pixels). SF trains the
    two stages separately and fine-tunes the texture stage on the reconstructor's output (stage 3, no
    ``s_dis``); here both stages train end to end on both stages' losses, so SF and SF* keep ``s_dis``
    (``structure_discriminator=False`` drops it, as the official stage 3). SF# has no structure stage and
    needs ``structure_discriminator=False``.

    The generator loss reads the discriminators in eval mode (:meth:`discriminators_frozen`: their
    spectral norms do no power iteration there, so it changes no state; the discriminator step does one
    per call, as the official training, and
    :meth:`~kdinpaint.objective.TrainingObjective.settle_spectral_norms` settles them at construction). The
    discriminator loss is :func:`lsgan_discriminator_loss` per discriminator; ``"total"`` is
    their sum (the two networks have separate parameters, so this equals two separate steps).

    Args:
        weights: overrides of :data:`SF_LOSS_WEIGHTS` (0 switches a term off).
        vgg: VGG19 weights for the correctness, style and perceptual terms (timm name or local file, see
            :class:`StructureFlowVGG`); not built when those three weights are 0.
        allow_random_vgg: random VGG weights (tests and demos only: the VGG terms then mean nothing).
        structure_discriminator: build ``s_dis`` (SF, SF*); ``False`` for SF#.
        discriminator_dim: channels of the discriminators' first layer (official 64).

    The student is called with ``return_all=True`` and returns a :class:`StructureFlowOutput`; the
    prediction is its ``image`` (index 0).
    """

    call_kwargs = MappingProxyType({"return_all": True})
    output_key = 0

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        vgg: str | os.PathLike[str] | None = "vgg19.tv_in1k",
        allow_random_vgg: bool = False,
        structure_discriminator: bool = True,
        discriminator_dim: int = 64,
    ) -> None:
        super().__init__()
        self.weights = merge_weights(SF_LOSS_WEIGHTS, weights, "StructureFlow")
        uses_vgg = any(self.weights[k] for k in ("correctness", "style", "perceptual"))
        self.vgg = StructureFlowVGG(vgg, allow_random=allow_random_vgg) if uses_vgg else None
        self.discriminators["texture"] = MultiScaleDiscriminator(discriminator_dim)
        if structure_discriminator:
            self.discriminators["structure"] = MultiScaleDiscriminator(discriminator_dim)
        self.settle_spectral_norms(torch.zeros(1, 3, 32, 32))  # legacy spectral norm: see the method

    def _check(self, output: object) -> StructureFlowOutput:
        if not isinstance(output, StructureFlowOutput):
            raise TypeError(
                f"StructureFlowObjective needs the model's StructureFlowOutput (call it with return_all=True), "
                f"got {type(output).__name__}"
            )
        if output.structure_target is None and "structure" in self.discriminators:
            raise ValueError(
                "the model has no structure stage (SF#) but the objective has a structure discriminator, which "
                "would never train: set losses.objective_kwargs {structure_discriminator: false}"
            )
        return output

    def generator_loss(self, output: StructureFlowOutput, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """:func:`structureflow_loss` on ``output`` with the discriminators' logits of its image (and structure)."""
        output = self._check(output)
        with self.discriminators_frozen():
            fake = self.discriminators["texture"](output.image) if self.weights["adv"] else None
            s_fake = None
            if "structure" in self.discriminators and self.weights["structure_adv"]:
                s_fake = self.discriminators["structure"](output.structure)
        return structureflow_loss(
            output, target, mask, vgg=self.vgg, fake_logits=fake, structure_fake_logits=s_fake, weights=self.weights
        )

    def discriminator_loss(self, output: StructureFlowOutput, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"texture": LSGAN(f_dis; gt, out), ["structure": LSGAN(s_dis; S, s)], "total": sum}`` on detached
        outputs; the fake batch goes first, as in the official step."""
        output = self._check(output)
        d = self.discriminators
        fake = d["texture"](output.image.detach())
        out = {"texture": lsgan_discriminator_loss(d["texture"](target), fake)}
        if "structure" in d:
            fake = d["structure"](output.structure.detach())
            out["structure"] = lsgan_discriminator_loss(d["structure"](output.structure_target), fake)
        out["total"] = sum(out.values())  # type: ignore[assignment]
        return out
