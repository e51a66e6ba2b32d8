"""A stop-gradient for regression targets that Reverse-HG can still differentiate through.

Self-distillation (Eq. 3) regresses a shallower feature onto the deeper one, which is the target and gets no
gradient from the term: ``target(x)`` is ``x.detach()`` for every ordinary backward. But an SGD step built on
that gradient is still a function of the target's value, which moves with theta and Psi; Algorithm 1
differentiates through such steps. Inside :func:`differentiate_targets` (used by
:meth:`kdinpaint.train.bilevel.MetaLearner.hypergradient` for its outer backward) the same node passes gradients
through, so the hypergradient is the exact derivative of the unrolled steps.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["target", "differentiate_targets"]

_THROUGH = False


class _Target(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad if _THROUGH else None


def target(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a regression target: no gradient in ordinary backward passes (like ``x.detach()``)."""
    return _Target.apply(x) if x.requires_grad else x


@contextlib.contextmanager
def differentiate_targets() -> Iterator[None]:
    """Within this block, backward passes go through :func:`target` nodes (for differentiating SGD steps)."""
    global _THROUGH
    previous, _THROUGH = _THROUGH, True
    try:
        yield
    finally:
        _THROUGH = previous
