"""Pixel attention with inspectable affinities, Eq. (7)-(8) of the paper.

``p_ij = f_Q(d_i)^T f_K(d_j)``, ``r_ij = softmax_j(p_ij)`` (the paper's Eq. 7 writes the sum over ``i``;
Eq. 8 sums ``r_ij d_j`` over ``j``, so the softmax runs over keys ``j``: a typo we correct), and
``a_i = sum_j r_ij d_j``: the values are the input feature itself (no value projection) and there is no
residual, exactly Eq. (8). No ``1/sqrt(d)`` scaling either: the paper has none.

Two submodules make the affinity reachable by forward hooks without changing the result:

* ``qk`` (:class:`QueryKey`) returns ``(q, k)``, each ``(B, N, C_qk)``; attention transfer hooks it and
  computes only the hole rows of the affinity (:func:`kdinpaint.losses.attention_transfer.attention_transfer`);
* ``affinity`` (:class:`Affinity`) returns the full ``(B, N, N)`` matrix ``r``. It only runs when something
  hooks it; otherwise the module calls :func:`kdinpaint.ops.attention.softmax_attention` (a fused kernel, a
  dense batched matrix where it fits, blocks of query rows beyond), which never materialises ``N×N``: not at
  inference, not in training, not when Algorithm 1 differentiates it twice.

With ``refine_holes`` and a mask, only the query rows in the holes are computed: the output is
``d + M ⊙ g ⊙ (a - d)``, so ``a`` outside the holes is multiplied by zero; those rows take ``a = d`` instead,
the same result for a fraction (the hole ratio) of the work. The hole rows of the batch are gathered, padded
to the largest count, into one call. Traced (``torch.compile``, ``torch.export``,
ONNX) every row is computed, since the hole rows are data-dependent.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from kdinpaint.masking import mask_at
from kdinpaint.ops.attention import _tracing, affinity, gather_rows, row_index, scatter_rows, softmax_attention

__all__ = ["PixelAttention", "QueryKey", "Affinity"]


class QueryKey(nn.Module):
    """``f_Q`` and ``f_K`` of Eq. (7): 1×1 convolutions. ``(B, C, H, W) -> ((B, N, C_qk), (B, N, C_qk))``."""

    def __init__(self, channels: int, qk_channels: int):
        super().__init__()
        self.f_q = nn.Conv2d(channels, qk_channels, 1)
        self.f_k = nn.Conv2d(channels, qk_channels, 1)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = rearrange(self.f_q(d), "b c h w -> b (h w) c")
        k = rearrange(self.f_k(d), "b c h w -> b (h w) c")
        return q, k


class Affinity(nn.Module):
    """Eq. (7): ``r = softmax_j(q k^T)``, ``(B, N, C) x (B, N, C) -> (B, N, N)``, rows sum to 1."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return affinity(q, k)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class PixelAttention(nn.Module):
    """Eq. (7)-(8) on a decoder feature ``d``: ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        channels: ``C`` of the input feature.
        qk_channels: width of queries and keys (default ``max(8, C // 8)``).
        refine_holes: return ``d + M ⊙ g ⊙ (a - d)`` instead of ``a``: the attention output enters at the
            holes only (``M``, the mask max-pooled to the feature size, passed as ``forward(d, mask)``; the
            whole map when no mask is given) through a per-channel gate ``g`` that starts at zero, so known
            features are kept and a fresh module is the identity. The paper (§3.2): the attention "finds the
            feature similarity of the holes with rest of the image, and then refines the holes by taking a
            weighted sum of the similar features". ``False`` (default): ``a`` itself, Eq. (8) as written.
    """

    def __init__(self, channels: int, qk_channels: int | None = None, refine_holes: bool = False):
        super().__init__()
        self.channels = channels
        self.qk = QueryKey(channels, qk_channels or max(8, channels // 8))
        self.affinity = Affinity()
        self.refine_holes = refine_holes
        if refine_holes:
            self.gate = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, d: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``d``: ``(B, C, H, W)``; ``mask``: ``(B, 1, H_img, W_img)`` with 1 = hole (used with ``refine_holes``)."""
        if not self.refine_holes:
            return self._attend(d)
        m = None if mask is None else mask_at(mask, d.shape[-2:]).to(d.dtype)  # (B or 1, 1, H, W)
        a = self._attend(d, m)
        change = self.gate * (a - d)  # (B, C, H, W)
        return d + (change if m is None else change * m)

    def _attend(self, d: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (8), ``a`` as ``(B, C, H, W)``; with ``rows`` (``(B or 1, 1, H, W)``) only where it is non-zero,
        ``a = d`` elsewhere."""
        B, C, H, W = d.shape
        q, k = self.qk(d)  # (B, N, C_qk) each
        v = rearrange(d, "b c h w -> b (h w) c")
        if _hooked(self.affinity):
            a = self.affinity(q, k) @ v  # (B, N, N) @ (B, N, C)
        elif rows is None or _tracing():  # never materialises N×N, not even differentiated twice; scale 1 as the paper
            a = softmax_attention(q, k, v)
        else:  # the hole rows of the whole batch, padded to the largest count: one call, no loop over samples
            keep = rows.expand(B, 1, H, W).flatten(1) != 0  # (B, N)
            index, valid = row_index(keep)  # (B, R) each; padding rows are distinct rows outside the holes
            attended = softmax_attention(gather_rows(q, index), k, v)  # (B, R, C)
            # rows outside the holes keep a = d (they are multiplied by M = 0 afterwards)
            attended = torch.where(valid.unsqueeze(-1), attended, gather_rows(v, index))
            a = scatter_rows(v, index, attended)  # (B, N, C)
        return rearrange(a, "b (h w) c -> b c h w", h=H, w=W)
