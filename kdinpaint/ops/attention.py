"""Softmax attention ``softmax(q k^T) v`` (Eq. 7-8) that never stores the ``N×N`` affinity: not at
inference, not in training, not when differentiated twice.

Pixel attention over ``N`` positions has an ``N×N`` affinity: at H/2 of a 256×256 image ``N = 16384`` and
one affinity is 1 GiB per image in float32; at H/2 of a 512×512 photo, 16 GiB. Whether
``scaled_dot_product_attention`` stores it depends on the kernel torch picks (on the CPU, queries/keys narrower
than the values take the math fallback, which does), so nothing here relies on it: every pass runs block by
block over the query rows (:func:`kdinpaint.ops.rowwise.rowwise`), ``O(rows × N)`` transient memory. The
forward blocks hold :data:`FORWARD_BLOCK_ELEMENTS` affinity entries (one intermediate alive), the
differentiated ones :data:`BLOCK_ELEMENTS` (about ten alive).

Without autograd on the CPU a block is computed in place (:func:`_rows_inplace`): ``exp(q k^T - max)`` in one
buffer, then its product with ``v`` divided by the row sums, which skips softmax's own division pass over the
``rows × N`` block (the normalisation is applied to the ``rows × C`` result instead): the same softmax, up to
float rounding. On CUDA a block is one ``scaled_dot_product_attention`` call (a fused kernel where one fits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdinpaint.ops.rowwise import rowwise

__all__ = ["affinity", "softmax_attention", "BLOCK_ELEMENTS", "FORWARD_BLOCK_ELEMENTS", "block_rows"]

#: affinity entries of one block of rows, whole batch: 2**20 floats = 4 MiB (a block keeps about ten such
#: intermediates alive while it is differentiated)
BLOCK_ELEMENTS = 1 << 20
#: affinity entries of one forward block, whole batch: 2**24 floats = 64 MiB (one such buffer alive); fewer,
#: larger blocks keep the CPU's matrix products efficient (64-row blocks at N = 16384 took several times longer)
FORWARD_BLOCK_ELEMENTS = 1 << 24
#: fewest rows per block (fewer make the Python loop the cost)
MIN_BLOCK_ROWS = 32


def block_rows(batch: int, n_keys: int, rows: int | None = None, elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block: ``rows`` if given, else as many as fit ``elements`` entries of
    ``batch × rows × n_keys``, at least :data:`MIN_BLOCK_ROWS`."""
    return max(1, rows if rows is not None else max(MIN_BLOCK_ROWS, elements // max(1, batch * n_keys)))


def affinity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. (7): ``r_ij = softmax_j(q_i . k_j)``, no scaling. ``(B, N_q, C) x (B, N_k, C) -> (B, N_q, N_k)``,
    rows sum to 1."""
    return torch.softmax(q @ k.transpose(1, 2), dim=-1)


def _rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return affinity(q, k) @ v


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)


def _rows_inplace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`_rows` without autograd, one ``rows × N`` buffer: ``(exp(s - max) @ v) / sum exp(s - max)``."""
    s = torch.bmm(q, k.transpose(1, 2))  # (B, rows, N)
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    total = s.sum(-1, keepdim=True)  # (B, rows, 1), >= 1 (the row maximum contributes exp(0))
    return torch.bmm(s, v).div_(total)  # (B, rows, C)


def _rows_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`_rows_inplace`'s arithmetic without in-place operations (traced graphs): the same rounding as eager."""
    s = torch.bmm(q, k.transpose(1, 2))  # (B, rows, N)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.bmm(e, v) / e.sum(-1, keepdim=True)


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool((compiler is not None and compiler.is_compiling()) or torch.onnx.is_in_onnx_export())


def _kernel(device: torch.device):
    """The forward kernel of a block: functional while traced (torch.compile, torch.export, ONNX), fused SDPA
    on CUDA, in place elsewhere (the forward pass records no graph: rowwise differentiates ``_rows`` there)."""
    if _tracing():
        return _rows_traced
    return _fused if device.type == "cuda" else _rows_inplace


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rows: int | None = None, forward_rows: int | None = None
) -> torch.Tensor:
    """``a_i = sum_j softmax_j(q_i . k_j) v_j`` (no scaling, as the paper).

    Args:
        q: ``(B, N_q, C_qk)`` queries (all ``N`` positions, or some of them); k: ``(B, N, C_qk)`` keys;
            v: ``(B, N, C)`` values (``C`` may differ from ``C_qk``).
        rows: query rows per block in the backward passes (default :func:`block_rows`).
        forward_rows: query rows per block in the forward pass (default: :data:`FORWARD_BLOCK_ELEMENTS`
            affinity entries).

    Returns ``(B, N_q, C)``, differentiable twice in ``q, k, v``; ``O(rows × N)`` transient memory in every
    pass (one block when traced with a dynamic ``N``).
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q must be (B, N_q, C_qk), k (B, N, C_qk) and v (B, N, C), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, N = k.shape[:2]
    if isinstance(N, torch.SymInt) or isinstance(B, torch.SymInt):  # a traced dynamic size: one block
        back, fwd = block_rows(1, 1, 1), q.shape[1]
    else:
        back = block_rows(B, N, rows)
        fwd = block_rows(B, N, forward_rows, FORWARD_BLOCK_ELEMENTS)
    return rowwise(_rows, (q,), (k, v), back, kernel=_kernel(q.device), forward_rows=fwd)
