"""Row-separable computations differentiated (twice) block by block, storing no intermediate.

Attention over ``N`` positions and the attention-transfer loss (Eq. 9) both compute, for each query row, a
function of that row and of all ``N`` keys: an ``N``-wide intermediate per row, ``rows × N`` in all. Autograd
keeps it for the backward pass, and Algorithm 1's Reverse-HG, which differentiates the backward pass once
more, keeps several more. :func:`rowwise` instead stores only the inputs: its backward pass walks the rows in
blocks, recomputing one block's intermediates under autograd and taking that block's vector-Jacobian
product; the backward pass is itself a function of the same kind, so its derivative walks the blocks again
(recompute, gradient with ``create_graph``, then the product with the incoming gradients). A block's row
outputs depend only on its own rows and on the shared inputs, so row gradients are blockwise and shared
gradients are sums over blocks: the result is exact. Transient memory: one block's intermediates.

Third derivatives are not supported (the second one is computed from detached copies).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["rowwise"]

RowFn = Callable[..., torch.Tensor]


def _slices(tensors: Sequence[torch.Tensor], n_rows: int, block: slice) -> list[torch.Tensor]:
    return [t[:, block] if i < n_rows else t for i, t in enumerate(tensors)]


def _leaves(tensors: Sequence[torch.Tensor], n_rows: int, block: slice) -> list[torch.Tensor]:
    return [t.detach().requires_grad_() for t in _slices(tensors, n_rows, block)]


def _scatter(out: list[torch.Tensor], grads: Sequence[torch.Tensor | None], n_rows: int, block: slice) -> None:
    for i, g in enumerate(grads):
        if g is None:
            continue
        if i < n_rows:
            out[i][:, block] = g
        else:
            out[i] += g


class _RowwiseBackward(torch.autograd.Function):
    """``(grad_out, *tensors) -> grads of tensors``, blockwise; differentiable once more, blockwise."""

    @staticmethod
    def forward(ctx, fn, block_rows, n_rows, grad_out, *tensors):  # type: ignore[override]  # noqa: ANN001
        ctx.save_for_backward(grad_out, *tensors)
        ctx.fn, ctx.block_rows, ctx.n_rows = fn, block_rows, n_rows
        grads = [torch.zeros_like(t) for t in tensors]
        for i in range(0, grad_out.shape[1], block_rows):
            block = slice(i, i + block_rows)
            leaves = _leaves(tensors, n_rows, block)
            with torch.enable_grad():
                out = fn(*leaves)
            _scatter(grads, torch.autograd.grad(out, leaves, grad_out[:, block], allow_unused=True), n_rows, block)
        return tuple(grads)

    @staticmethod
    def backward(ctx, *upstream):  # type: ignore[override]  # noqa: ANN001, ANN205
        grad_out, *tensors = ctx.saved_tensors
        fn, block_rows, n_rows = ctx.fn, ctx.block_rows, ctx.n_rows
        upstream = [torch.zeros_like(t) if u is None else u for u, t in zip(upstream, tensors)]
        grads = [torch.zeros_like(t) for t in tensors]
        grad_grad_out = torch.zeros_like(grad_out)
        for i in range(0, grad_out.shape[1], block_rows):
            block = slice(i, i + block_rows)
            leaves = _leaves(tensors, n_rows, block)
            g_leaf = grad_out[:, block].detach().requires_grad_()
            with torch.enable_grad():
                out = fn(*leaves)
                first = torch.autograd.grad(out, leaves, g_leaf, create_graph=True, allow_unused=True)
                product = sum(
                    ((u[:, block] if j < n_rows else u) * f).sum() for j, (u, f) in enumerate(zip(upstream, first)) if f is not None
                )
            if not isinstance(product, torch.Tensor) or not product.requires_grad:
                continue
            second = torch.autograd.grad(product, [*leaves, g_leaf], allow_unused=True)
            _scatter(grads, second[:-1], n_rows, block)
            if second[-1] is not None:
                grad_grad_out[:, block] = second[-1]
        return (None, None, None, grad_grad_out, *grads)


def exporting() -> bool:
    """Whether ``torch.export`` is tracing the caller (``False`` on a torch without ``torch.compiler.is_exporting``)."""
    compiler = getattr(torch, "compiler", None)
    return bool(getattr(compiler, "is_exporting", lambda: False)())


def _blockwise(fn: RowFn, tensors: Sequence[torch.Tensor], n_rows: int, block_rows: int) -> torch.Tensor:
    """``fn`` over the whole rows, one block of ``block_rows`` rows at a time (one call when they all fit)."""
    rows = tensors[0].shape[1]
    if isinstance(rows, torch.SymInt) or rows <= block_rows:  # a traced dynamic size cannot be split into blocks
        return fn(*tensors)
    if exporting():
        return _scanned(fn, tensors, n_rows, block_rows)
    return torch.cat([fn(*_slices(tensors, n_rows, slice(i, i + block_rows))) for i in range(0, rows, block_rows)], 1)


def _scanned(fn: RowFn, tensors: Sequence[torch.Tensor], n_rows: int, block_rows: int) -> torch.Tensor:
    """:func:`_blockwise` for ``torch.export`` (and ONNX, which converts its programs): the whole blocks as one
    ``scan`` over them (a graph holds ``fn`` once, not once per block: at 512×512 the decoder attention's 256
    blocks had tripled the ONNX graph), the remainder as one more call."""
    from torch._higher_order_ops.scan import scan

    rows = tensors[0].shape[1]
    count, rest = divmod(rows, block_rows)
    whole = count * block_rows
    # (B, count * block, ...) -> (count, B, block, ...): scan walks the leading dimension
    xs = [t[:, :whole].unflatten(1, (count, block_rows)).transpose(0, 1) for t in tensors[:n_rows]]
    shared = list(tensors[n_rows:])

    def step(carry: torch.Tensor, blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return carry + 1, fn(*blocks, *shared)  # the carry is a counter (scan's body may not return an input)

    ys = scan(step, torch.zeros((), device=tensors[0].device), xs)[1]
    out = ys.transpose(0, 1).flatten(1, 2)  # (B, whole, ...)
    if rest:
        out = torch.cat([out, fn(*_slices(tensors, n_rows, slice(whole, rows)))], 1)
    return out


class _Rowwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, kernel, fused_backward, block_rows, forward_rows, n_rows, *tensors):  # type: ignore[override]  # noqa: ANN001
        ctx.save_for_backward(*tensors)
        ctx.fn, ctx.block_rows, ctx.n_rows = fn, block_rows, n_rows
        ctx.kernel = kernel if fused_backward else None
        return _blockwise(kernel or fn, tensors, n_rows, forward_rows)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]  # noqa: ANN001, ANN205
        tensors = ctx.saved_tensors
        if ctx.kernel is not None and not torch.is_grad_enabled():
            # an ordinary backward pass (no graph of it is built): differentiate the fused ``kernel`` block by
            # block, faster than ``fn`` where it has a fused backward kernel (attention on CUDA); per block, so
            # that a kernel that does materialise its intermediates (a math fallback) stays bounded too
            grads = [torch.zeros_like(t) for t in tensors]
            for i in range(0, grad_out.shape[1], ctx.block_rows):
                block = slice(i, i + ctx.block_rows)
                leaves = _leaves(tensors, ctx.n_rows, block)
                with torch.enable_grad():
                    out = ctx.kernel(*leaves)
                _scatter(grads, torch.autograd.grad(out, leaves, grad_out[:, block], allow_unused=True), ctx.n_rows, block)
        else:
            grads = _RowwiseBackward.apply(ctx.fn, ctx.block_rows, ctx.n_rows, grad_out, *tensors)
        return (None, None, None, None, None, None, *grads)


def rowwise(
    fn: RowFn,
    row_inputs: Sequence[torch.Tensor],
    shared_inputs: Sequence[torch.Tensor],
    block_rows: int,
    kernel: RowFn | None = None,
    fused_backward: bool | None = None,
    forward_rows: int | None = None,
) -> torch.Tensor:
    """``fn(*row_inputs, *shared_inputs)``, differentiable twice without keeping ``fn``'s intermediates.

    Args:
        fn: a pure function whose output's rows (dimension 1) depend only on the same rows of the
            ``row_inputs`` and on all of the ``shared_inputs``; called on blocks of ``block_rows`` rows.
        row_inputs: ``(B, R, ...)`` tensors, rows on dimension 1 (at least one).
        shared_inputs: tensors every row reads.
        block_rows: rows per block in the backward passes.
        kernel: computes ``fn``'s output for a block faster (a fused kernel such as
            ``scaled_dot_product_attention``, or an in-place one that only works without autograd); used for
            the forward pass instead of ``fn``.
        fused_backward: let ordinary backward passes (no graph of them built) differentiate ``kernel`` block
            by block instead of ``fn``: faster where ``kernel`` has a fused backward kernel. Default: on CUDA
            tensors. (On CPU ``fn``'s blocks took the same time for pixel attention and less memory.)
        forward_rows: rows per block in the forward pass (default ``block_rows``): the forward keeps one
            block's intermediates alive, not ten, so its blocks may be larger.

    Returns ``fn``'s output ``(B, R, ...)``, computed block by block in every mode (with or without
    gradients), so no ``R × N`` intermediate ever exists; only a traced dynamic row count (``torch.export``
    with dynamic shapes) runs as one block.
    """
    if not row_inputs:
        raise ValueError("rowwise needs at least one row input")
    tensors = (*row_inputs, *shared_inputs)
    block_rows = max(1, int(block_rows))
    forward_rows = block_rows if forward_rows is None else max(1, int(forward_rows))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _blockwise(kernel or fn, tensors, len(row_inputs), forward_rows)
    if fused_backward is None:
        fused_backward = tensors[0].is_cuda
    return _Rowwise.apply(fn, kernel, bool(fused_backward and kernel is not None), block_rows, forward_rows, len(row_inputs), *tensors)
