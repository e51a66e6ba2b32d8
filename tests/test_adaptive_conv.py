"""adaptive_conv (Eq. 6) against torchvision's deformable convolution, and the blocks built on it."""

import pytest
import torch
from torchvision.ops import deform_conv2d

from kdinpaint.blocks import AdaptiveConv, CompletionBlock, build_completion_blocks
from kdinpaint.masking import mask_at
from kdinpaint.ops import adaptive_conv


def _inputs(B, C, H, W, K, seed=0, spread=2.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    kernel = torch.randn(B, K * K, H, W, generator=g)
    # fractional offsets, large enough that some taps fall outside the image (zero padding)
    offset = torch.randn(B, 2 * K * K, H, W, generator=g) * spread
    return x, kernel, offset


@pytest.mark.parametrize("B,C,H,W,K", [(2, 5, 9, 7, 3), (1, 3, 6, 11, 5), (2, 4, 8, 8, 1)])
def test_forward_and_gradients_match_deform_conv2d(B, C, H, W, K):
    x, kernel, offset = _inputs(B, C, H, W, K)
    leaves = [t.clone().requires_grad_() for t in (x, kernel, offset)]
    oracle = [t.clone().requires_grad_() for t in (x, kernel, offset)]
    out = adaptive_conv(*leaves)
    ref = deform_conv2d(oracle[0], oracle[2], torch.ones(C, 1, K, K), padding=K // 2, mask=oracle[1])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(ref, oracle, grad)
    for name, a, b in zip(("x", "kernel", "offset"), ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("B,C,H,W,K", [(3, 4, 7, 7, 3), (2, 3, 5, 6, 5), (2, 3, 8, 8, 3)])
@pytest.mark.parametrize("offsets", ["zero", "integer"])
def test_integer_sample_positions_take_deform_conv2ds_one_sided_gradient(B, C, H, W, K, offsets):
    # at exactly integer positions (a fresh completion block has zero offsets) bilinear interpolation has a kink;
    # both backward forms must take torchvision's side (the cell floor() picks) at every pixel, in float64
    g = torch.Generator().manual_seed(B * 100 + H)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    kernel = torch.randn(B, K * K, H, W, generator=g, dtype=torch.float64)
    offset = torch.zeros(B, 2 * K * K, H, W, dtype=torch.float64)
    if offsets == "integer":
        offset = torch.randint(-2, 3, offset.shape, generator=g).double()
    grad = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    oracle = [t.clone().requires_grad_() for t in (x, kernel, offset)]
    ref = deform_conv2d(oracle[0], oracle[2], torch.ones(C, 1, K, K, dtype=torch.float64), padding=K // 2, mask=oracle[1])
    theirs = torch.autograd.grad(ref, oracle, grad)
    for create_graph in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, kernel, offset)]
        out = adaptive_conv(*leaves)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        ours = torch.autograd.grad(out, leaves, grad, create_graph=create_graph)
        for name, a, b in zip(("x", "kernel", "offset"), ours, theirs):
            torch.testing.assert_close(a.detach(), b, atol=1e-12, rtol=1e-12,
                                       msg=lambda m: f"grad of {name} (create_graph={create_graph}): {m}")


def test_gradient_graph_form_equals_the_kernel_form():
    # with create_graph=True the backward differentiates the gather form; its values equal grid_sample's kernel
    x, kernel, offset = _inputs(2, 3, 7, 9, 3, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, kernel, offset)]
    out = adaptive_conv(*leaves)
    grad = torch.randn_like(out)
    plain = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    graphed = torch.autograd.grad(out, leaves, grad, create_graph=True)
    assert all(g.grad_fn is not None for g in graphed)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_second_derivatives_match_finite_differences():
    # gradgradcheck: central differences of the (create_graph) gradient in float64; offsets keep every tap
    # off the integer grid, where bilinear interpolation has kinks
    x, kernel, offset = (t.double() for t in _inputs(1, 2, 5, 4, 3, seed=2, spread=1.5))
    offset = offset + 0.37 * (offset.frac().abs() < 0.05)
    leaves = [t.clone().requires_grad_() for t in (x, kernel, offset)]
    assert torch.autograd.gradgradcheck(adaptive_conv, leaves, eps=1e-6, atol=1e-5)


def test_second_derivatives_when_kernel_and_offset_depend_on_x():
    # as in a completion block: kernel and offset are predicted from x, so every path must be counted once
    g = torch.Generator().manual_seed(3)
    w_ker = torch.randn(9, 2, 3, 3, generator=g, dtype=torch.float64) * 0.5
    w_off = torch.randn(18, 2, 3, 3, generator=g, dtype=torch.float64) * 0.3

    def block(x):
        return adaptive_conv(x, torch.nn.functional.conv2d(x, w_ker, padding=1), torch.nn.functional.conv2d(x, w_off, padding=1) + 0.41)

    x = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)
    # gradgradcheck differentiates the create_graph gradient numerically, so first check that gradient itself
    out = block(x)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (plain,) = torch.autograd.grad(out, x, grad, retain_graph=True)
    (graphed,) = torch.autograd.grad(out, x, grad, create_graph=True)
    torch.testing.assert_close(graphed.detach(), plain)
    assert torch.autograd.gradgradcheck(block, (x,), eps=1e-6, atol=1e-5)



@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_offset_gives_nan_at_its_pixel_and_no_index_error(bad):
    # a diverged offset must reach the loss as NaN, so that the divergence guard (or the hypergradient's
    # non-finite check) can skip the step; the create_graph backward once cast a NaN position to int64's
    # minimum and crashed with "index out of bounds"
    x, kernel, offset = _inputs(1, 2, 5, 6, 3, seed=4)
    clean = adaptive_conv(x, kernel, offset)
    offset[0, 0, 2, 3] = bad  # tap 0's dy at pixel (2, 3)
    leaves = [t.clone().requires_grad_() for t in (x, kernel, offset)]
    out = adaptive_conv(*leaves)
    hit = torch.zeros(1, 1, 5, 6, dtype=torch.bool)
    hit[0, 0, 2, 3] = True
    assert torch.equal(~torch.isfinite(out), hit.expand_as(out))  # only the pixel that read the bad tap
    torch.testing.assert_close(out[~hit.expand_as(out)], clean[~hit.expand_as(clean)])
    grad = torch.randn_like(out)
    plain = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    graphed = torch.autograd.grad(out, leaves, grad, create_graph=True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5, equal_nan=True)
    grad_x, grad_kernel, grad_offset = (g.detach() for g in graphed)
    assert bool(torch.isfinite(grad_x).all())  # the bad tap reads no pixel
    assert (~torch.isfinite(grad_kernel)).nonzero().tolist() == [[0, 0, 2, 3]]
    bad_offsets = (~torch.isfinite(grad_offset)).nonzero().tolist()
    assert bad_offsets and all(c in (0, 1) and (h, w) == (2, 3) for _, c, h, w in bad_offsets)

def test_autocast_computes_in_float32():
    x, kernel, offset = _inputs(1, 3, 6, 6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adaptive_conv(x.bfloat16(), kernel.bfloat16(), offset.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, adaptive_conv(x.bfloat16().float(), kernel.bfloat16().float(), offset.bfloat16().float()))


def test_zero_offsets_are_a_plain_per_pixel_filter():
    # hand-computed case: K=3, zero offsets, kernel picks the right-hand neighbour (tap (0, +1) = index 5)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    kernel = torch.zeros(1, 9, 4, 4)
    kernel[:, 5] = 1
    out = adaptive_conv(x, kernel, torch.zeros(1, 18, 4, 4))
    expected = torch.tensor([[1.0, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0], [13, 14, 15, 0]])
    torch.testing.assert_close(out[0, 0], expected)


def test_integer_offset_moves_the_tap():
    # offset (dy, dx) = (1, 0) on the centre tap reads the pixel below
    x = torch.arange(16.0).view(1, 1, 4, 4)
    kernel = torch.zeros(1, 9, 4, 4)
    kernel[:, 4] = 1
    offset = torch.zeros(1, 18, 4, 4)
    offset[:, 8] = 1.0  # tap 4's dy
    out = adaptive_conv(x, kernel, offset)
    expected = torch.cat([x[0, 0, 1:], torch.zeros(1, 4)])
    torch.testing.assert_close(out[0, 0], expected)


def test_bad_shapes_are_named():
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="K\\*K"):
        adaptive_conv(x, torch.zeros(1, 8, 4, 4), torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="offset"):
        adaptive_conv(x, torch.zeros(1, 9, 4, 4), torch.zeros(1, 9, 4, 4))
    with pytest.raises(ValueError, match="kernel"):
        adaptive_conv(x, torch.zeros(1, 9, 5, 4), torch.zeros(1, 18, 4, 4))


def test_completion_block_updates_holes_only():
    torch.manual_seed(0)
    conv = AdaptiveConv(6)
    block = CompletionBlock(conv)
    x = torch.randn(2, 6, 8, 8)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 4:12, 8:20] = 1
    out = block(x, mask)
    m = mask_at(mask, (8, 8))
    expected = x + conv(x) * m  # Eq. (5), naively
    torch.testing.assert_close(out, expected)
    known = m.expand_as(x) == 0
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known])


def test_fresh_completion_block_is_identity_and_learns():
    blocks = build_completion_blocks([4, 8, 4], share_predictors=True)
    assert blocks["0"].conv is blocks["2"].conv and blocks["0"].conv is not blocks["1"].conv
    unshared = build_completion_blocks([4, 4], share_predictors=False)
    assert unshared["0"].conv is not unshared["1"].conv
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    mask = torch.ones(1, 1, 6, 6)
    out = blocks["0"](x, mask)
    assert torch.equal(out, x)
    out.square().sum().backward()
    assert blocks["0"].conv.f_ker.weight.grad.abs().sum() > 0


def test_adaptive_conv_bounds_kernel_and_offsets_by_a_soft_clamp():
    torch.manual_seed(0)
    conv = AdaptiveConv(4, 3, kernel_limit=0.5, offset_limit=2.0)
    with torch.no_grad():  # predictors far beyond the limits, as in a run that ran away
        conv.f_ker.weight.normal_(0, 5.0)
        conv.f_off.weight.normal_(0, 20.0)
    plain = AdaptiveConv(4, 3, kernel_limit=None, offset_limit=None)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 9, 9)
    kernel, offset = plain.f_ker(x), plain.f_off(x)
    assert kernel.abs().max() > 5 and offset.abs().max() > 20
    # the unbounded module is Eq. (6) as written: deform_conv2d with the raw predictions
    ones = torch.ones(4, 1, 3, 3)
    torch.testing.assert_close(plain(x), deform_conv2d(x, offset, ones, padding=1, mask=kernel), atol=1e-4, rtol=1e-4)
    # the bounded one: the same with L * tanh(v / L) of each, within the limits
    bounded_k, bounded_o = 0.5 * torch.tanh(kernel / 0.5), 2.0 * torch.tanh(offset / 2.0)
    assert bounded_k.abs().max() <= 0.5 and bounded_o.abs().max() <= 2.0  # tanh saturates to 1 in float32
    torch.testing.assert_close(conv(x), deform_conv2d(x, bounded_o, ones, padding=1, mask=bounded_k), atol=1e-4, rtol=1e-4)
    assert conv(x).abs().max() <= 9 * 0.5 * x.abs().max()  # K*K taps of weight < 0.5: linear in x, not quadratic
    # near zero the clamp is the identity to first order: a fresh block and small kernels behave as the plain form
    small = torch.full((1,), 1e-3)
    torch.testing.assert_close(0.5 * torch.tanh(small / 0.5), small, atol=1e-8, rtol=1e-5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="kernel_limit must be > 0"):
            AdaptiveConv(4, kernel_limit=bad)


def test_spec_passes_the_bounds_to_every_adaptive_convolution():
    from kdinpaint.spec import CompletionOptions

    blocks = build_completion_blocks([4, 8], kernel_limit=0.25, offset_limit=None)
    assert all(b.conv.kernel_limit == 0.25 and b.conv.offset_limit is None for b in blocks.values())
    assert CompletionOptions().kernel_limit == 1.0 and CompletionOptions().offset_limit == 3.0
    assert CompletionOptions(kernel_limit=None, offset_limit=2).offset_limit == 2.0
    with pytest.raises(ValueError, match="completion.offset_limit must be > 0"):
        CompletionOptions(offset_limit=0)
    with pytest.raises(TypeError, match="completion.kernel_limit must be a number > 0, or null"):
        CompletionOptions(kernel_limit="1")
