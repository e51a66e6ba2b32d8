"""Softmax attention ``softmax(q k^T) v`` (Eq. 7-8) that never stores the ``N×N`` affinity, not even when
differentiated twice.

Pixel attention over ``N`` positions has an ``N×N`` affinity: at H/2 of a 256×256 image ``N = 16384`` and
one affinity is 1 GiB per image in float32. ``scaled_dot_product_attention`` does not store it in the
forward pass, but an ordinary backward graph does, and Algorithm 1's Reverse-HG differentiates the backward
pass once more: several ``N×N`` matrices per attention call and unrolled step. Here the forward pass is the
fused kernel and both derivatives run block by block over the query rows (:func:`kdinpaint.ops.rowwise.rowwise`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdinpaint.ops.rowwise import rowwise

__all__ = ["affinity", "softmax_attention", "BLOCK_ELEMENTS", "block_rows"]

#: affinity entries of one block of rows, whole batch: 2**20 floats = 4 MiB (a block keeps about ten such
#: intermediates alive while it is differentiated)
BLOCK_ELEMENTS = 1 << 20
#: fewest rows per block (fewer make the Python loop the cost)
MIN_BLOCK_ROWS = 32


def block_rows(batch: int, n_keys: int, rows: int | None = None) -> int:
    """Rows per block: ``rows`` if given, else as many as fit :data:`BLOCK_ELEMENTS` entries of
    ``batch × rows × n_keys``, at least :data:`MIN_BLOCK_ROWS`."""
    return max(1, rows if rows is not None else max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, batch * n_keys)))


def affinity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. (7): ``r_ij = softmax_j(q_i . k_j)``, no scaling. ``(B, N_q, C) x (B, N_k, C) -> (B, N_q, N_k)``,
    rows sum to 1."""
    return torch.softmax(q @ k.transpose(1, 2), dim=-1)


def _rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return affinity(q, k) @ v


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rows: int | None = None) -> torch.Tensor:
    """``a_i = sum_j softmax_j(q_i . k_j) v_j`` (no scaling, as the paper).

    Args:
        q, k: ``(B, N, C_qk)`` queries and keys; v: ``(B, N, C)`` values (``C`` may differ from ``C_qk``).
        rows: query rows per block in the backward passes (default :func:`block_rows`).

    Returns ``(B, N, C)``: one ``scaled_dot_product_attention`` call, differentiable twice in ``q, k, v``
    with ``O(rows × N)`` transient memory.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q and k must be (B, N, C_qk) of one shape and v (B, N, C), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    return rowwise(_rows, (q,), (k, v), block_rows(k.shape[0], k.shape[1], rows), whole=_fused)
