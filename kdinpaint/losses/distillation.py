"""Encoder distillation terms of the paper, as pure functions (the caller owns the meta-networks).

Both are normalised by the number of hole positions they sum over (batch × hole pixels at the level), so
the weight ``lambda_d`` does not depend on image size, and both are exactly 0 (never NaN) when the batch has
no hole. They are computed in at least float32 whatever the features' dtype.
"""

from __future__ import annotations

import torch

from kdinpaint.losses._target import target as as_target
from kdinpaint.masking import at_least_fp32, mask_at

__all__ = ["cross_distillation", "self_distillation"]


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
