"""Distillation terms as pure functions (the caller owns the meta-networks): the paper's encoder terms and
an output term.

Each is normalised by the number of hole positions it sums over (batch × hole pixels at the level), so the
weight ``lambda_d`` does not depend on image size, and each is exactly 0 (never NaN) when the batch has no
hole. They are computed in at least float32 whatever the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdinpaint.losses._target import target as as_target
from kdinpaint.masking import at_least_fp32, mask_at, masked_mean

__all__ = ["cross_distillation", "self_distillation", "output_distillation", "output_distillation_terms"]


def _weighted_hole_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pred, target = at_least_fp32(pred), at_least_fp32(target)
    m = mask_at(mask, pred.shape[-2:]).to(pred.dtype)  # (B, 1, h, w)
    sq = (pred - target).pow(2) * m  # (B, C, h, w); M is binary, so (x ⊙ M)^2 = x^2 ⊙ M
    per_channel = sq.sum(dim=(2, 3))  # (B, C)
    # m.sum() counts hole positions; with none the numerator is an exact 0
    return (per_channel * at_least_fp32(weights)).sum() / m.sum().clamp_min(1.0)


def cross_distillation(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Eq. (2): ``sum_c rho_c(x*_l) * ||(x_l - gamma(x*_l))_c ⊙ M||^2``, per hole position.

    Args:
        student: ``x_l``, the student's level-``l`` feature ``(B, C, h, w)``.
        teacher: ``gamma(x*_l)``, the teacher's feature already mapped by gamma, ``(B, C, h, w)``.
        weights: ``rho(x*_l)``, ``(B, C)``, non-negative, summing to 1 over channels.
        mask: ``(B, 1, H, W)``, 1 = hole; max-pooled to ``(h, w)``.
    """
    return _weighted_hole_error(student, teacher, weights, mask)


def self_distillation(
    aligned: torch.Tensor, deeper: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Eq. (3): ``sum_c phi_c * ||(f_l(x_l) - x_{l+1})_c ⊙ M||^2``, per hole position.

    The deeper feature ``x_{l+1}`` is the target and gets no gradient from this term (it is detached for
    ordinary backward passes; see :mod:`kdinpaint.losses._target` for why not with ``.detach()``).

    Args:
        aligned: ``f_l(x_l)``, the shallower feature mapped to the deeper one's shape, ``(B, C, h, w)``.
        deeper: ``x_{l+1}``, ``(B, C, h, w)``.
        weights: ``phi(...)``, ``(B, C)``, non-negative, summing to 1 over channels.
        mask: ``(B, 1, H, W)``, 1 = hole; max-pooled to ``(h, w)``.
    """
    return _weighted_hole_error(aligned, as_target(deeper), weights, mask)


def output_distillation_terms(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, scales: int = 1
) -> list[torch.Tensor]:
    """The L1 between two predictions in the holes at ``scales`` resolutions, one term per resolution.

    Term ``k`` (``k = 0 .. scales - 1``) is ``||(P_k(y) - P_k(y*)) ⊙ M_k||_1 / (C |M_k|)``: ``P_k`` averages
    ``2^k x 2^k`` cells (full size, 1/2, 1/4, 1/8 ...), ``M_k`` is the max-pool of the mask over the same cells
    (a cell is a hole if any pixel in it is) and ``|M_k|`` counts its hole cells, so each term is a mean per
    hole cell and channel. The teacher is a constant target (no gradient flows into it).

    Args:
        student: the student's prediction ``y``, ``(B, C, H, W)``.
        teacher: the teacher's prediction ``y*``, the same shape.
        mask: ``(B or 1, 1, H, W)``, 1 = hole.
        scales: how many resolutions, ``>= 1``; ``H`` and ``W`` must be at least ``2^(scales - 1)``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student prediction {tuple(student.shape)} and teacher prediction {tuple(teacher.shape)} differ")
    if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
        raise ValueError(f"scales must be an int >= 1 (1: full size only), got {scales!r}")
    coarsest = 2 ** (scales - 1)
    if min(student.shape[-2:]) < coarsest:
        raise ValueError(
            f"{scales} output scales average {coarsest}x{coarsest} cells, but the prediction is only "
            f"{tuple(student.shape[-2:])} (H, W); lower output_scales or train on larger images"
        )
    student, teacher = at_least_fp32(student), at_least_fp32(teacher).detach()
    mask = mask.to(student.dtype)
    terms = []
    for k in range(scales):
        f = 2**k
        s, t, m = (student, teacher, mask) if f == 1 else (F.avg_pool2d(student, f), F.avg_pool2d(teacher, f), F.max_pool2d(mask, f))
        terms.append(masked_mean((s - t).abs(), m))  # (B, C, H/f, W/f) against (B, 1, H/f, W/f)
    return terms


def output_distillation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, scales: int = 1) -> torch.Tensor:
    """Output distillation in the holes at every decoder resolution (MI-GAN's multi-scale L1):
    ``sum_k ||(P_k(y) - P_k(y*)) ⊙ M_k||_1 / (C |M_k|)`` over ``k < scales``, the sum of
    :func:`output_distillation_terms`. ``scales=1`` is the plain L1 in the holes per hole pixel and channel."""
    return torch.stack(output_distillation_terms(student, teacher, mask, scales)).sum()
