"""Adaptive convolution, Eq. (6) of the paper.

``y_j = sum_k V_{j,k} * x[j + p_k + Delta_{j,k}]``: every output pixel ``j`` has its own ``K*K`` kernel
weights ``V`` and ``2*K*K`` offsets ``Delta``, shared by all channels, and reads ``x`` with bilinear
interpolation (zero outside the image).

This equals ``torchvision.ops.deform_conv2d(x, offset, ones(C, 1, K, K), padding=K // 2, mask=kernel)``
(a depthwise deformable convolution with all-one weights whose modulation mask is the kernel), which is
the test oracle. Here all ``K*K`` taps are sampled in one batched ``grid_sample`` call and reduced with one
multiply-sum, which is several times faster than the oracle (``python recipes/bench_ops.py`` prints the ratio).

Second derivatives (Reverse-HG differentiates through the theta gradient) are the expensive part of
``grid_sample``: its double backward is a slow composite. The backward pass therefore has two forms: the
ordinary one calls ``grid_sample``'s own backward kernel, and when a graph of the gradient is being built
(``create_graph=True``) it differentiates an equivalent formulation that reads the four bilinear corners
with ``gather`` (whose derivatives are ``scatter_add`` and ``gather`` again), about 3x cheaper to
differentiate twice on CPU.

At exactly integer sampling positions (zero or integer offsets: every fresh completion block) bilinear
interpolation has a kink, and the offset gradient is the one-sided derivative towards the next pixel, as
``deform_conv2d`` takes it (``floor`` of the position picks the cell). ``grid_sample`` finds the cell from
normalised coordinates; normalised by the image size, an integer position came back from them on either side
of the integer by round-off, so the side varied from pixel to pixel. Normalised by a power of two instead
(the input zero-padded on the right and bottom up to one), integer positions are represented and recovered
exactly, whatever order grid_sample's arithmetic takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["adaptive_conv", "check_adaptive_conv_args"]

_TAP_CACHE: dict[tuple, torch.Tensor] = {}


def check_adaptive_conv_args(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor) -> int:
    """Validate shapes and return the kernel size ``K``."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    if kernel.dim() != 4 or kernel.shape[0] != B or kernel.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"kernel must be (B, K*K, H, W) = ({B}, K*K, {H}, {W}), got {tuple(kernel.shape)}")
    taps = kernel.shape[1]
    K = int(round(taps**0.5))
    if K * K != taps or K % 2 == 0:
        raise ValueError(f"kernel has {taps} channels; it must be K*K for an odd K (9 for K=3, 25 for K=5)")
    if offset.shape != (B, 2 * taps, H, W):
        raise ValueError(
            f"offset must be (B, 2*K*K, H, W) = {(B, 2 * taps, H, W)} with (dy, dx) per tap, got {tuple(offset.shape)}"
        )
    return K


def _power_of_two(n: int) -> int:
    """The smallest power of two >= ``n``: the size grid_sample's coordinates are normalised by."""
    return 1 << (n - 1).bit_length()


def _cache_key(*key: object) -> tuple | None:
    """The cache key of a constant tensor, ``None`` while traced (torch.compile, torch.export: the tensor would be
    a fake one). Tensors made under ``inference_mode`` cannot enter an autograd-tracked computation later
    (training after an evaluation, an export), so they are cached apart."""
    from torch._guards import detect_fake_mode

    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return None
    return (*key, torch.is_inference_mode_enabled())


def _base_grid(K: int, H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sampling positions without offsets, in grid_sample's normalised (x, y) units of a
    ``(_power_of_two(H), _power_of_two(W))`` input: ``(K*K, H, W, 2)``."""
    key = _cache_key(K, H, W, device, dtype)
    grid = _TAP_CACHE.get(key) if key is not None else None
    if grid is None:
        r = K // 2
        dy, dx = torch.meshgrid(
            torch.arange(-r, r + 1, device=device, dtype=dtype),
            torch.arange(-r, r + 1, device=device, dtype=dtype),
            indexing="ij",
        )  # taps row-major, as deform_conv2d
        ys = torch.arange(H, device=device, dtype=dtype)
        xs = torch.arange(W, device=device, dtype=dtype)
        py = ys.view(1, H, 1) + dy.reshape(-1, 1, 1)  # (K*K, H, 1)
        px = xs.view(1, 1, W) + dx.reshape(-1, 1, 1)  # (K*K, 1, W)
        # align_corners=False: pixel i sits at normalised (2 i + 1) / size - 1, exact for a power-of-two size
        gx = ((2 * px + 1) / _power_of_two(W) - 1).expand(-1, H, W)
        gy = ((2 * py + 1) / _power_of_two(H) - 1).expand(-1, H, W)
        grid = torch.stack((gx, gy), dim=-1)
        if key is not None:
            if len(_TAP_CACHE) > 64:
                _TAP_CACHE.clear()
            _TAP_CACHE[key] = grid
    return grid


def _pixel_scale(H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pixels -> grid_sample's normalised units of the padded input, ``(2 / W', 2 / H')`` in (x, y) order
    (``W' = _power_of_two(W)``); cached like the base grid."""
    key = _cache_key("scale", H, W, device, dtype)
    scale = _TAP_CACHE.get(key) if key is not None else None
    if scale is None:
        scale = torch.tensor([2.0 / _power_of_two(W), 2.0 / _power_of_two(H)], device=device, dtype=dtype)
        if key is not None:
            if len(_TAP_CACHE) > 64:
                _TAP_CACHE.clear()
            _TAP_CACHE[key] = scale
    return scale


def _grid(K: int, offset: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Sampling positions with offsets, ``(B, K*K*H, W, 2)`` in grid_sample's normalised (x, y) units."""
    B, _, H, W = shape
    T = K * K
    base = _base_grid(K, H, W, offset.device, dtype)  # (T, H, W, 2)
    off = offset.view(B, T, 2, H, W).to(dtype)
    # pixel offsets -> normalised units; grid_sample wants (x, y), the offsets are (dy, dx)
    scale = _pixel_scale(H, W, offset.device, dtype)
    grid = base.unsqueeze(0) + off.flip(2).permute(0, 1, 3, 4, 2) * scale  # (B, T, H, W, 2)
    return grid.reshape(B, T * H, W, 2)


def _padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` zero-padded on the right and bottom to power-of-two sides (itself when they already are)."""
    H, W = x.shape[-2:]
    pad_h, pad_w = _power_of_two(H) - H, _power_of_two(W) - W
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _gather_form(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor, K: int) -> torch.Tensor:
    """Eq. (6) with explicit bilinear corners: the same values as the grid_sample form, built from
    ``gather``, products and sums only, so that autograd differentiates it twice cheaply."""
    B, C, H, W = x.shape
    T, r, dt = K * K, K // 2, x.dtype
    taps = torch.arange(-r, r + 1, device=x.device, dtype=dt)
    ky, kx = taps.repeat_interleave(K).view(1, T, 1, 1), taps.repeat(K).view(1, T, 1, 1)  # row-major taps
    off = offset.view(B, T, 2, H, W)
    py = torch.arange(H, device=x.device, dtype=dt).view(1, 1, H, 1) + ky + off[:, :, 0]  # (B, T, H, W)
    px = torch.arange(W, device=x.device, dtype=dt).view(1, 1, 1, W) + kx + off[:, :, 1]
    y0, x0 = torch.floor(py.detach()), torch.floor(px.detach())
    fy, fx = py - y0, px - x0
    flat = x.reshape(B, C, H * W)
    out = x.new_zeros(B, C, H, W)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)  # zero padding; False at NaN
            # a tap outside reads pixel 0 with weight 0; so does one at a NaN position, whose index would cast to
            # int64's minimum (out of bounds): a diverged offset gives NaN gradients, as the kernel form, not a crash
            index = torch.where(inside, yy * W + xx, torch.zeros_like(yy)).long().view(B, 1, T * H * W)
            corner = torch.gather(flat, 2, index.expand(B, C, T * H * W)).view(B, C, T, H, W)
            weight = torch.where(inside, wy * wx * kernel, torch.zeros_like(kernel))  # (B, T, H, W)
            out = out + (corner * weight.unsqueeze(1)).sum(2)
    return out


class _AdaptiveConv(torch.autograd.Function):
    """grid_sample forward; backward by grid_sample's kernel, or twice-differentiable by the gather form."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor, K: int) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        grid = _grid(K, offset, x.shape, x.dtype)
        sampled = F.grid_sample(_padded(x), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        ctx.save_for_backward(x, kernel, offset, grid, sampled)
        ctx.K = K
        return (sampled.view(B, C, K * K, H, W) * kernel.unsqueeze(1)).sum(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, kernel, offset, grid, sampled = ctx.saved_tensors
        K, need = ctx.K, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself will be differentiated
            with torch.enable_grad():
                # aliases: partial derivatives only (kernel and offset are usually functions of x), still
                # connected to the inputs' history for the second derivative
                x, kernel, offset = (t.view_as(t) for t in (x, kernel, offset))
                y = _gather_form(x, kernel, offset, K)
            inputs = [t for t, n in zip((x, kernel, offset), need) if n]
            grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True, allow_unused=True))
            return (*(next(grads) if n else None for n in need), None)
        B, C, H, W = x.shape
        T = K * K
        grad_kernel = (grad.unsqueeze(2) * sampled.view(B, C, T, H, W)).sum(1) if need[1] else None
        grad_x = grad_offset = None
        if need[0] or need[2]:
            grad_sampled = (grad.unsqueeze(2) * kernel.unsqueeze(1)).view(B, C, T * H, W)
            grad_x, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                grad_sampled, _padded(x), grid, 0, 0, False, [need[0], need[2]]
            )  # bilinear, zeros padding, align_corners=False
            if need[0] and grad_x.shape[-2:] != (H, W):
                grad_x = grad_x[..., :H, :W]
            if need[2]:
                scale = _pixel_scale(H, W, x.device, x.dtype)
                grad_offset = (grad_grid.view(B, T, H, W, 2) * scale).flip(-1).permute(0, 1, 4, 2, 3).reshape(B, 2 * T, H, W)
        return grad_x if need[0] else None, grad_kernel, grad_offset, None


def adaptive_conv(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Eq. (6): per-pixel kernels and offsets shared by all channels.

    Args:
        x: ``(B, C, H, W)`` input feature.
        kernel: ``(B, K*K, H, W)`` per-pixel tap weights, taps in row-major order.
        offset: ``(B, 2*K*K, H, W)`` per-pixel ``(dy, dx)`` for each tap, in pixels
            (``torchvision.ops.deform_conv2d``'s layout).

    Returns:
        ``(B, C, H, W)``; stride 1, dilation 1, zero padding. Differentiable (twice) in all three inputs.
        Under autocast it computes in float32 (as ``grid_sample`` does) and returns float32.
        A non-finite offset or kernel weight (a diverged training) makes the pixels that use it non-finite, and their
        gradients, in both backward forms; it raises nothing, so that the loss shows it and the divergence
        guard (``train.guard``) skips the step.
    """
    K = check_adaptive_conv_args(x, kernel, offset)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return adaptive_conv(x.float(), kernel.float(), offset.float())
    dtype = x.dtype
    return _AdaptiveConv.apply(x, kernel.to(dtype), offset.to(dtype), K)
