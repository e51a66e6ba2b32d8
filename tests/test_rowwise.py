"""Blockwise, twice-differentiable row computations (kdinpaint.ops.rowwise) and the attention built on them,
against the naive full-matrix computations written here."""

from __future__ import annotations

import pytest
import torch

from kdinpaint.losses.attention_transfer import attention_transfer
from kdinpaint.ops.attention import softmax_attention
from kdinpaint.ops.rowwise import rowwise


def naive_attention(q, k, v):
    return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v


def _qkv(B=2, N=10, c=3, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, w, generator=g, dtype=dtype).requires_grad_() for w in (c, c, C)]


def _second_order(f, inputs):
    """d/d inputs of |d/d inputs sum(f^3)|^2: a second derivative through f's backward pass."""
    out = f(*inputs)
    first = torch.autograd.grad((out**3).sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum((g**2).sum() for g in first), inputs)


@pytest.mark.parametrize("rows", [1, 3, 10, 64])
def test_attention_and_both_derivatives_equal_the_full_matrix(rows):
    q, k, v = _qkv()
    ours = lambda *a: softmax_attention(*a, rows=rows)  # noqa: E731
    _check_against_naive(ours, q, k, v)


def test_fused_backward_path_equals_the_full_matrix():
    # the ordinary backward through the recomputed fused kernel (the default on CUDA), blocks for the second
    from kdinpaint.ops.attention import _fused, _rows

    q, k, v = _qkv(seed=3)
    _check_against_naive(lambda *a: rowwise(_rows, a[:1], a[1:], 3, kernel=_fused, fused_backward=True), q, k, v)


def _check_against_naive(ours, q, k, v):
    torch.testing.assert_close(ours(q, k, v), naive_attention(q, k, v))
    grad = torch.randn(2, 10, 4, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours(q, k, v), (q, k, v), grad), torch.autograd.grad(naive_attention(q, k, v), (q, k, v), grad)):
        torch.testing.assert_close(a, b)
    for a, b in zip(_second_order(ours, (q, k, v)), _second_order(naive_attention, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_rowwise_matches_finite_differences_twice():
    q, k, v = _qkv(N=7, seed=1)
    f = lambda q, k, v: rowwise(lambda qb, kk, vv: torch.tanh(qb @ kk.transpose(1, 2)) @ vv, (q,), (k, v), 2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_attention_transfer_second_derivatives_equal_the_full_matrix():
    g = torch.Generator().manual_seed(2)
    h = w = 4
    q, k, qt, kt = (torch.randn(2, h * w, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4))
    weights = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    mask[0, :, 2:6, 2:8] = 1
    mask[1, :, 0:4, 0:2] = 1

    def naive(q, k, qt, kt):  # Eq. 9 with full affinities, hole rows selected afterwards
        r, rt = torch.softmax(q @ k.transpose(1, 2), -1), torch.softmax(qt @ kt.transpose(1, 2), -1)
        holes = torch.nn.functional.max_pool2d(mask, 2).flatten(1) > 0.5
        per_row = (rt - r).pow(2).sum(-1) * weights.flatten(1)
        return (per_row * holes).sum() / holes.sum()

    ours = lambda *a: attention_transfer(*a, weights, mask)  # noqa: E731
    torch.testing.assert_close(ours(q, k, qt, kt), naive(q, k, qt, kt))
    a = _second_order(ours, (q, k, qt, kt))
    b = _second_order(naive, (q, k, qt, kt))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_no_full_affinity_is_saved_even_for_second_derivatives():
    # every tensor autograd saves, through the forward and a create_graph backward, is smaller than N×N
    B, N = 1, 64
    q, k, v = _qkv(B=B, N=N, c=2, C=2, dtype=torch.float32)

    def largest_saved(f):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f(q, k, v)
            torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        return max(sizes)

    assert largest_saved(naive_attention) >= B * N * N  # the reference does keep the affinity
    assert largest_saved(lambda *a: softmax_attention(*a, rows=8)) < B * N * N // 4


def test_bad_shapes_are_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must be"):
        softmax_attention(q, k[:, :5], v)
    with pytest.raises(ValueError, match="at least one row input"):
        rowwise(lambda k: k, (), (k,), 2)


def _largest_created(f, *args):
    """The most elements of any tensor an operator creates while ``f(*args)`` runs (forward only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        f(*args)
    return Largest.most


@pytest.mark.parametrize("forward_rows", [1, 3, 7, 64])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_blocks_equal_the_full_matrix(forward_rows, grad):
    # the forward pass in blocks (the in-place kernel without autograd, and inside the differentiable op)
    q, k, v = (t.detach().float().requires_grad_(grad) for t in _qkv(seed=4))
    with torch.set_grad_enabled(grad):
        ours = softmax_attention(q, k, v, rows=4, forward_rows=forward_rows)
    torch.testing.assert_close(ours, naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
    if grad:
        g = torch.randn_like(ours)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(naive_attention(q, k, v), (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["inference", "no_grad", "training"])
def test_no_full_affinity_is_created_in_the_forward_pass(mode):
    # at inference and in an ordinary training forward, no intermediate has N×N entries, whatever
    # scaled_dot_product_attention would pick on this machine
    B, N = 1, 256
    q, k, v = (t.detach().float().requires_grad_(mode == "training") for t in _qkv(B=B, N=N, c=4, C=8))
    context = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "training": torch.enable_grad}[mode]
    with context():
        assert _largest_created(naive_attention, q, k, v) >= B * N * N  # the reference does create it
        assert _largest_created(lambda *a: softmax_attention(*a, forward_rows=16), q, k, v) <= B * 16 * N


@pytest.mark.parametrize("widths", [(3, 8), (8, 8), (8, 3)])
@pytest.mark.parametrize("chunk", [1 << 21, 20])
def test_fused_and_dense_paths_and_both_derivatives_equal_the_full_matrix(widths, chunk, monkeypatch):
    # float32 takes the fused kernel (queries and keys, or values, zero-padded to the wider width) without
    # autograd and for an ordinary backward, and the chunked dense form when the gradient is differentiated
    from kdinpaint.ops import attention

    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)  # 20: chunks of one row
    c, C = widths
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(B=2, N=10, c=c, C=C, seed=5))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        torch.testing.assert_close(softmax_attention(q, k, v).double(), naive_attention(*ref), rtol=1e-5, atol=1e-6)
    out = softmax_attention(q, k, v)
    torch.testing.assert_close(out.double(), naive_attention(*ref), rtol=1e-5, atol=1e-6)
    grad = torch.randn(2, 10, C, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), grad.float())
    theirs = torch.autograd.grad(naive_attention(*ref), ref, grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    for a, b in zip(_second_order(softmax_attention, (q, k, v)), _second_order(naive_attention, ref)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
def test_default_path_creates_no_affinity_for_strided_values(grad):
    # a decoder attention's values are a (B, N, C) view of a (B, C, H, W) map: strided channels must not send the
    # fused kernel to torch's math fallback (which creates the N x N affinity)
    B, C, H, W = 1, 8, 16, 16
    d = torch.randn(B, C, H, W, requires_grad=grad)
    v = d.flatten(2).transpose(1, 2)  # (B, N, C), channels strided
    q, k = (torch.randn(B, H * W, 4, requires_grad=grad) for _ in range(2))
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(softmax_attention(q, k, v), naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
        N = H * W
        if grad:  # the dense path's chunks: at most CHUNK_ELEMENTS entries, never the whole affinity at once
            from kdinpaint.ops import attention

            with pytest.MonkeyPatch.context() as m:
                m.setattr(attention, "CHUNK_ELEMENTS", N * N // 8)
                assert _largest_created(lambda *a: softmax_attention(*a), q, k, v) <= N * N // 8
        else:
            assert _largest_created(lambda *a: softmax_attention(*a), q, k, v) < N * N // 8


@pytest.mark.parametrize("rows", [64, 70])  # whole blocks only, and a remainder block
def test_exported_forward_blocks_are_one_scan_and_equal_the_full_matrix(rows):
    # torch.export (and ONNX, which converts its programs): the blocks are one scan over them, not one copy of
    # the block's graph per block; the result is the full matrix's
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, rows, 8, generator=g), torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 12, generator=g)
    expected = torch.softmax(q @ k.transpose(1, 2), -1) @ v

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return softmax_attention(q, k, v, forward_rows=16)

    program = torch.export.export(Attend(), (q, k, v))
    calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("scan" in c for c in calls) == 1
    bmms = [c for c in calls if "bmm" in c]
    assert len(bmms) == (2 if rows % 16 else 0), calls  # outside the scan: only the remainder block's two products
    torch.testing.assert_close(program.module()(q, k, v), expected, atol=1e-5, rtol=1e-5)
