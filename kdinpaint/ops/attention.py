"""Softmax attention ``softmax(q k^T) v`` (Eq. 7-8): a fused kernel where one exists, dense batched matrices
where the affinity fits, block by block over the query rows otherwise; never an ``N×N`` affinity.

Pixel attention over ``N`` positions has an ``N×N`` affinity: at H/2 of a 256×256 image ``N = 16384`` and
one affinity is 1 GiB per image in float32; at H/2 of a 512×512 photo, 16 GiB. The paths (one result, up to
float rounding; ``python recipes/bench_ops.py attention`` times them against the previous kernels):

* **fused** (no autograd): ``scaled_dot_product_attention``'s flash kernel, ``O(N)`` memory on the CPU and on
  CUDA. It needs queries and keys as wide as the values, so narrower ones are zero-padded (zeros add nothing
  to ``q . k``): the first product grows, but one fused pass over the affinity is still faster than separate
  products, exponential and sums while the values are at most :data:`FUSED_MAX_WIDTH` wide on the CPU (at
  256 channels the padded product cost more than it saved). Only where torch picks a memory-bounded kernel for
  those shapes, never its math fallback (which would store ``N×N``).
* **dense** (autograd, ``B × rows × N`` at most :data:`DENSE_ELEMENTS`): the forward and an ordinary backward
  by the fused kernel; when a graph of the gradient is being built (Algorithm 1's Reverse-HG differentiates it
  once more), or without a fused kernel, the plain ``softmax(q k^T) @ v`` differentiated by autograd, in
  chunks of :data:`CHUNK_ELEMENTS` affinity entries (a handful of batched matrices per call: chunks that fit
  the CPU's cache ran the double backward 1.3-2x faster than one big matrix, and nothing is recomputed).
* **blocked** (larger, or ``rows`` / ``forward_rows`` given): :func:`kdinpaint.ops.rowwise.rowwise`, every pass
  block by block over the query rows, ``O(rows × N)`` transient memory even differentiated twice. The
  forward blocks hold :data:`FORWARD_BLOCK_ELEMENTS` affinity entries (one intermediate alive), the
  differentiated ones :data:`BLOCK_ELEMENTS` (about ten alive).

Traced, the blocked forward runs with functional operators (``torch.compile``, and ``torch.export`` within
:func:`blocked_export`, as the ONNX export does: its blocks one ``scan``), so an exported graph has the same bounded
memory under any runtime; a plain ``torch.export`` without gradients records the fused node, which torch runs
with the same memory-bounded kernel as eager (the main job's network at 256×256: its program 3× eager instead of 7×).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F

from kdinpaint.ops.rowwise import exporting, rowwise

__all__ = [
    "affinity", "softmax_attention", "row_index", "gather_rows", "scatter_rows", "BLOCK_ELEMENTS", "FORWARD_BLOCK_ELEMENTS",
    "DENSE_ELEMENTS", "CHUNK_ELEMENTS", "FUSED_MAX_WIDTH", "block_rows", "chunked", "blocked_export",
]

#: affinity entries of one block of rows, whole batch: 2**20 floats = 4 MiB (a block keeps about ten such
#: intermediates alive while it is differentiated)
BLOCK_ELEMENTS = 1 << 20
#: affinity entries of one forward block, whole batch: 2**24 floats = 64 MiB (one such buffer alive); fewer,
#: larger blocks keep the CPU's matrix products efficient (64-row blocks at N = 16384 took several times longer)
FORWARD_BLOCK_ELEMENTS = 1 << 24
#: affinity entries (``B × rows × N``) up to which a differentiated attention takes the dense path: 2**24 floats,
#: 64 MiB per kind of intermediate (the main job's 64×64 crops at batch 16 need at most 2**24, at H/2)
DENSE_ELEMENTS = 1 << 24
#: affinity entries of one chunk of the dense path: 2**21 floats = 8 MiB
CHUNK_ELEMENTS = 1 << 21
#: widest values (and queries) the fused kernel takes on the CPU (CUDA: any)
FUSED_MAX_WIDTH = 128
#: fewest rows per block (fewer make the Python loop the cost)
MIN_BLOCK_ROWS = 32


def block_rows(batch: int, n_keys: int, rows: int | None = None, elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block: ``rows`` if given, else as many as fit ``elements`` entries of
    ``batch × rows × n_keys``, at least :data:`MIN_BLOCK_ROWS`."""
    return max(1, rows if rows is not None else max(MIN_BLOCK_ROWS, elements // max(1, batch * n_keys)))


def chunked(fn, row_inputs, shared_inputs, rows: int) -> torch.Tensor:
    """``fn(*row_inputs, *shared_inputs)`` over chunks of ``rows`` rows (dimension 1) concatenated, under plain
    autograd (see :func:`kdinpaint.ops.rowwise.rowwise` for ``fn``'s contract). One call when they all fit."""
    R = row_inputs[0].shape[1]
    if R <= rows:
        return fn(*row_inputs, *shared_inputs)
    return torch.cat([fn(*(x[:, i : i + rows] for x in row_inputs), *shared_inputs) for i in range(0, R, rows)], 1)


def affinity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. (7): ``r_ij = softmax_j(q_i . k_j)``, no scaling. ``(B, N_q, C) x (B, N_k, C) -> (B, N_q, N_k)``,
    rows sum to 1."""
    return torch.softmax(q @ k.transpose(1, 2), dim=-1)


def row_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions where ``keep`` ``(B, N)`` (bool) is true, padded per sample: ``index`` ``(B, R)`` and
    ``valid`` ``(B, R)``, with ``R`` the largest count of the batch (at least 1). The padding entries are the
    first positions where ``keep`` is false (distinct from the kept ones and from each other; position 0 when
    all are kept), so a sample's entries never repeat a position and may be scattered back."""
    count = keep.sum(1)
    R = max(int(count.max()), 1) if keep.numel() else 1
    # a stable sort puts the kept positions first, in raster order
    index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :R]
    valid = torch.arange(R, device=keep.device).unsqueeze(0) < count.unsqueeze(1)
    return index, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, N, C)`` -> ``(B, R, C)``, the rows at ``index`` ``(B, R)``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, N, C)`` with the rows at ``index`` ``(B, R)`` (distinct per sample) replaced by ``rows``
    ``(B, R, C)``; differentiable in both."""
    return x.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rows)


def _rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return affinity(q, k) @ v


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


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T) v`` by ``scaled_dot_product_attention`` (scale 1), queries and keys zero-padded to the
    values' width (or the values to theirs; the extra output columns are dropped)."""
    c, C = q.shape[-1], v.shape[-1]
    if c < C:
        q, k = F.pad(q, (0, C - c)), F.pad(k, (0, C - c))
    elif C < c:
        v = F.pad(v, (0, c - C))
    # the flash kernel needs rows of contiguous channels (a (B, N, C) view of a (B, C, H, W) map has not):
    # without them torch takes the math fallback, which stores the rows x N affinity
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)
    return out[..., :C] if C < c else out


@functools.lru_cache(maxsize=64)
def _flash_available(device: torch.device, dtype: torch.dtype, width: int, grad: bool) -> bool:
    """Whether ``scaled_dot_product_attention`` takes a memory-bounded kernel (flash, memory-efficient, cuDNN)
    for one head of ``width`` channels on this device and dtype, not its math fallback (which stores
    ``N×N``). Asked of torch once per setting, on tiny tensors."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.zeros(1, 1, 4, width, device=device, dtype=dtype, requires_grad=grad)
        choice = torch._fused_sdp_choice(q, q, q, None, 0.0, False, scale=1.0)
        return SDPBackend(choice) not in (SDPBackend.MATH, SDPBackend.ERROR)
    except Exception:  # noqa: BLE001 - a torch without the query: take the paths that never rely on it
        return False


_BLOCKED_EXPORT = False  # set by :func:`blocked_export` (ONNX): an exported graph computes attention block by block


@contextlib.contextmanager
def blocked_export() -> Iterator[None]:
    """Within it, ``torch.export`` records attention as the blocked product (:func:`_rows_traced` in a ``scan``),
    not as ``scaled_dot_product_attention``: for graphs another runtime will run (ONNX), where the fused node
    would become a dense ``N×N`` product."""
    global _BLOCKED_EXPORT
    before, _BLOCKED_EXPORT = _BLOCKED_EXPORT, True
    try:
        yield
    finally:
        _BLOCKED_EXPORT = before


def _can_fuse(q: torch.Tensor, v: torch.Tensor, grad: bool) -> bool:
    """The fused kernel is used: a memory-bounded kernel exists and it is the faster one here; traced, only by
    ``torch.export`` without gradients outside :func:`blocked_export` (the program runs it with torch, which picks
    the same memory-bounded kernel), never by ``torch.compile`` or the ONNX exporter."""
    width = max(q.shape[-1], v.shape[-1])
    if q.device.type == "cpu" and width > FUSED_MAX_WIDTH:
        return False
    if _tracing():
        if grad or _BLOCKED_EXPORT or not exporting() or torch.onnx.is_in_onnx_export():
            return False
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with unset_fake_temporarily(), disable_proxy_modes_tracing():  # asked on real tiny tensors, not recorded
            return _flash_available(torch.device(q.device.type, q.device.index), q.dtype, width, grad)
    return _flash_available(q.device, q.dtype, width, grad)


class _Dense(torch.autograd.Function):
    """The fused kernel forward; its own backward (recomputed), or the chunked differentiable form when a graph
    of the gradient is built (the fused backward has no derivative)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        return _fused(q, k, v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the gradient will be differentiated again
            with torch.enable_grad():
                # aliases: partial derivatives only, still connected to the inputs' history
                q, k, v = (t.view_as(t) for t in (q, k, v))
                out = chunked(_rows, (q,), (k, v), _chunk_rows(k))
            inputs = [t for t, n in zip((q, k, v), need) if n]
            grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True, allow_unused=True))
        else:
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), need)]
            with torch.enable_grad():
                out = _fused(*leaves)
            grads = iter(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad, allow_unused=True))
        return tuple(next(grads) if n else None for n in need)


def _chunk_rows(k: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, k.shape[0] * k.shape[1]))


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rows: int | None = None, forward_rows: int | None = None
) -> torch.Tensor:
    """``a_i = sum_j softmax_j(q_i . k_j) v_j`` (no scaling, as the paper).

    Args:
        q: ``(B, N_q, C_qk)`` queries (all ``N`` positions, or some of them); k: ``(B, N, C_qk)`` keys;
            v: ``(B, N, C)`` values (``C`` may differ from ``C_qk``).
        rows: query rows per block in the backward passes; given, the blocked path is taken whatever the size
            (default: :func:`block_rows`, used above :data:`DENSE_ELEMENTS`).
        forward_rows: query rows per block in the forward pass; given, the forward runs in such blocks
            (default: the fused kernel where there is one, else :data:`FORWARD_BLOCK_ELEMENTS` entries).

    Returns ``(B, N_q, C)``, differentiable twice in ``q, k, v``; no ``N_q × N`` affinity above
    :data:`DENSE_ELEMENTS` entries is ever stored (one block when traced with a dynamic ``N``).
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q must be (B, N_q, C_qk), k (B, N, C_qk) and v (B, N, C), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, N = k.shape[:2]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    dynamic = isinstance(N, torch.SymInt) or isinstance(B, torch.SymInt) or isinstance(q.shape[1], torch.SymInt)
    if dynamic:  # a traced dynamic size: one block
        back, fwd = block_rows(1, 1, 1), q.shape[1]
    else:
        default = rows is None and forward_rows is None
        fuse = default and _can_fuse(q, v, grad)
        if fuse and not grad:
            return _fused(q, k, v)
        if default and grad and B * q.shape[1] * N <= DENSE_ELEMENTS:
            return _Dense.apply(q, k, v) if fuse else chunked(_rows, (q,), (k, v), _chunk_rows(k))
        back = block_rows(B, N, rows)
        fwd = block_rows(B, N, forward_rows, FORWARD_BLOCK_ELEMENTS)
    if _tracing():
        kernel = _rows_traced
    elif forward_rows is None and _can_fuse(q, v, False):
        kernel = _fused
    else:
        kernel = _rows_inplace
    fused_backward = kernel is _fused and _can_fuse(q, v, True)
    return rowwise(_rows, (q,), (k, v), back, kernel=kernel, fused_backward=fused_backward, forward_rows=fwd)
