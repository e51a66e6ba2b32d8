"""Gaussian sampling (StructureFlow's Resample2d) against a naive per-pixel re-computation.

The oracle below follows the CUDA kernel's description pixel by pixel: window of K x K taps at
floor(s) + k, k = -(K/2-1)..K/2, Gaussian weights of the unclamped taps, values at clamped taps, normalised
sum. It is written without separability, flat indexing or any code of the implementation, and autograd
through it gives the reference gradients (floor is piecewise constant, so its gradient is 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from kdinpaint.ops import gaussian_resample as exported
from kdinpaint.ops.gaussian_resample import GaussianResample2d, gaussian_resample


def naive_resample(features, flow, K, sigma, d=1, truncate_weights=False):
    """Per-pixel loop. With ``truncate_weights`` the weights use the fractional part by truncation (the
    CUDA input-gradient kernel), which only the input-gradient oracle needs."""
    B, C, Hi, Wi = features.shape
    _, _, H, W = flow.shape
    ks = torch.arange(-(K // 2 - 1), K // 2 + 1, dtype=torch.long) * d  # (K,)
    out = torch.zeros(B, C, H, W, dtype=features.dtype)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                sx = x + flow[b, 0, y, x]
                sy = y + flow[b, 1, y, x]
                x0, y0 = math.floor(float(sx.detach())), math.floor(float(sy.detach()))
                px, py = x0 + ks, y0 + ks  # unclamped taps
                if truncate_weights:  # the window is the same; the weights move with trunc instead of floor
                    sx = sx - (math.trunc(float(sx.detach())) - x0)
                    sy = sy - (math.trunc(float(sy.detach())) - y0)
                w = torch.exp(-((px[None, :] - sx) ** 2 + (py[:, None] - sy) ** 2) / (2 * sigma**2))  # (Ky, Kx)
                patch = features[b][:, py.clamp(0, Hi - 1)[:, None], px.clamp(0, Wi - 1)[None, :]]  # (C, Ky, Kx)
                out[b, :, y, x] = (patch * w).sum((1, 2)) / w.sum()
    return out


FLOWS = {
    "small": lambda g, shape: torch.randn(shape, generator=g, dtype=torch.float64) * 0.7,
    "large_out_of_border": lambda g, shape: torch.randn(shape, generator=g, dtype=torch.float64) * 6,
    "far_outside": lambda g, shape: torch.full(shape, -40.0, dtype=torch.float64)
    + torch.rand(shape, generator=g, dtype=torch.float64),
    "integer": lambda g, shape: torch.randint(-3, 4, shape, generator=g).to(torch.float64),
}


@pytest.mark.parametrize("K,sigma", [(4, 2.0), (16, 4.0)])
@pytest.mark.parametrize("flow_kind", sorted(FLOWS))
def test_forward_and_gradients_match_naive(K, sigma, flow_kind):
    g = torch.Generator().manual_seed(K * 7 + len(flow_kind))
    feats = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    flow = FLOWS[flow_kind](g, (2, 2, 4, 6)).requires_grad_()
    grad_out = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)

    out = gaussian_resample(feats, flow, K, sigma)
    ref = naive_resample(feats, flow, K, sigma)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    g_feats, g_flow = torch.autograd.grad(out, (feats, flow), grad_out)
    r_feats, r_flow = torch.autograd.grad(ref, (feats, flow), grad_out)
    torch.testing.assert_close(g_feats, r_feats, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_flow, r_flow, rtol=1e-10, atol=1e-12)


def test_dilation_and_other_output_grid():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    flow = (torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    out = gaussian_resample(feats, flow, 4, 1.5, dilation=2)
    ref = naive_resample(feats, flow, 4, 1.5, d=2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    # create_graph=True takes the backward's out-of-place branch (the one double backward differentiates)
    ours = torch.autograd.grad(out, (feats, flow), go, create_graph=True)
    for a, b in zip(ours, torch.autograd.grad(ref, (feats, flow), go)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


def test_cuda_input_gradient_quirk():
    """input_grad='cuda': gradient of features = scatter of the truncation-weighted window (the kernel's
    backward); same forward and flow gradient; equal to 'exact' when no sample point is negative."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    flow = (torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    go = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
    out = gaussian_resample(feats, flow, 4, 2.0, input_grad="cuda")
    torch.testing.assert_close(out, gaussian_resample(feats, flow, 4, 2.0), rtol=0, atol=0)
    g_feats, g_flow = torch.autograd.grad(out, (feats, flow), go)
    # oracle: the kernel's input gradient is linear in the features with the truncation weights
    quirk = naive_resample(feats, flow.detach(), 4, 2.0, truncate_weights=True)
    (r_feats,) = torch.autograd.grad(quirk, (feats,), go)
    torch.testing.assert_close(g_feats, r_feats, rtol=1e-10, atol=1e-12)
    (exact_feats,) = torch.autograd.grad(gaussian_resample(feats, flow, 4, 2.0), (feats,), go)
    assert not torch.allclose(g_feats, exact_feats)  # the case samples beyond the top/left border
    (r_flow,) = torch.autograd.grad(naive_resample(feats, flow, 4, 2.0), (flow,), go)
    torch.testing.assert_close(g_flow, r_flow, rtol=1e-10, atol=1e-12)

    positive = (torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    a = torch.autograd.grad(gaussian_resample(feats, positive, 4, 2.0, input_grad="cuda"), feats, go)[0]
    b = torch.autograd.grad(gaussian_resample(feats, positive, 4, 2.0), feats, go)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_not_bilinear_and_identity_flow_is_a_blur():
    """Zero flow = normalised Gaussian blur with the asymmetric window (hand-computed 1-D weights)."""
    feats = torch.zeros(1, 1, 1, 9, dtype=torch.float64)
    feats[0, 0, 0, 4] = 1.0
    out = gaussian_resample(feats, torch.zeros(1, 2, 1, 9, dtype=torch.float64), 4, 2.0)
    # at x=4: taps x = 3..6 (k = -1..2), rows all clamp to 0 -> weight of the impulse among the 4 x-taps
    w = [math.exp(-(k**2) / 8) for k in (-1, 0, 1, 2)]
    assert out[0, 0, 0, 4].item() == pytest.approx(w[1] / sum(w), rel=1e-12)
    # at x=2: taps 1..4, impulse at k=+2
    assert out[0, 0, 0, 2].item() == pytest.approx(w[3] / sum(w), rel=1e-12)
    # at x=6: taps 5..8 do not reach x=4 (window is K/2-1 to the left)
    assert out[0, 0, 0, 6].item() == 0.0


def test_gradcheck_and_gradgradcheck_float64():
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # keep sample points away from integers, where floor jumps and finite differences are meaningless
    flow = (torch.randint(-3, 3, (1, 2, 3, 4), generator=g) + 0.2 + 0.6 * torch.rand(1, 2, 3, 4, generator=g))
    flow = flow.to(torch.float64).requires_grad_()
    fn = lambda f, fl: gaussian_resample(f, fl, 4, 2.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (feats, flow), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (feats, flow), eps=1e-6, atol=1e-6)
    # second derivatives also equal the naive oracle's (meta-learning differentiates through the backward)
    go = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    hvps = []
    for f in (fn, lambda a, b: naive_resample(a, b, 4, 2.0)):
        (gf,) = torch.autograd.grad(f(feats, flow), (flow,), go, create_graph=True)
        hvps.append(torch.autograd.grad((gf * v).sum(), (feats, flow)))
    for a, b in zip(*hvps):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_dtypes_module_and_float32_matches_float64():
    assert exported is gaussian_resample
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 4, 8, 8, generator=g)
    flow = torch.randn(1, 2, 8, 8, generator=g) * 2
    ref = gaussian_resample(feats.double(), flow.double(), 16, 4.0)
    out32 = gaussian_resample(feats, flow, 16, 4.0)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    out_bf16 = gaussian_resample(feats.bfloat16(), flow, 16, 4.0)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.double(), ref, rtol=2e-2, atol=2e-2)
    module = GaussianResample2d(16, 4.0)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    torch.testing.assert_close(module(feats, flow), out32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features=torch.zeros(1, 2, 4, 4), flow=torch.zeros(1, 3, 4, 4)), "flow must have shape"),
        (dict(features=torch.zeros(2, 2, 4, 4), flow=torch.zeros(1, 2, 4, 4)), "batch size"),
        (dict(features=torch.zeros(2, 4, 4), flow=torch.zeros(1, 2, 4, 4)), "features must have shape"),
        (dict(features=torch.zeros(1, 2, 4, 4), flow=torch.zeros(1, 2, 4, 4), kernel_size=5), "even int"),
        (dict(features=torch.zeros(1, 2, 4, 4), flow=torch.zeros(1, 2, 4, 4), sigma=0.0), "sigma"),
        (dict(features=torch.zeros(1, 2, 4, 4), flow=torch.zeros(1, 2, 4, 4), input_grad="x"), "input_grad"),
    ],
)
def test_bad_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_resample(**kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        gaussian_resample(torch.zeros(1, 2, 4, 4, dtype=torch.long), torch.zeros(1, 2, 4, 4))
