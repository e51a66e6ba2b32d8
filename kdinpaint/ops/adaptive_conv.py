"""Adaptive convolution, Eq. (6) of the paper.

``y_j = sum_k V_{j,k} * x[j + p_k + Delta_{j,k}]``: every output pixel ``j`` has its own ``K*K`` kernel
weights ``V`` and ``2*K*K`` offsets ``Delta``, shared by all channels, and reads ``x`` with bilinear
interpolation (zero outside the image).

This equals ``torchvision.ops.deform_conv2d(x, offset, ones(C, 1, K, K), padding=K // 2, mask=kernel)``
(a depthwise deformable convolution with all-one weights whose modulation mask is the kernel), which is
the test oracle. Here all ``K*K`` taps are sampled in one batched ``grid_sample`` call and reduced with one
multiply-sum, which is several times faster than the oracle (``python recipes/bench_ops.py`` prints the ratio).
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


def _base_grid(K: int, H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sampling positions without offsets, in grid_sample's normalised (x, y) units: ``(K*K, H, W, 2)``."""
    key = (K, H, W, device, dtype)
    grid = _TAP_CACHE.get(key)
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
        # align_corners=False: pixel i sits at normalised (2 i + 1) / size - 1
        gx = ((2 * px + 1) / W - 1).expand(-1, H, W)
        gy = ((2 * py + 1) / H - 1).expand(-1, H, W)
        grid = torch.stack((gx, gy), dim=-1)
        if len(_TAP_CACHE) > 64:
            _TAP_CACHE.clear()
        _TAP_CACHE[key] = grid
    return grid


def adaptive_conv(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Eq. (6): per-pixel kernels and offsets shared by all channels.

    Args:
        x: ``(B, C, H, W)`` input feature.
        kernel: ``(B, K*K, H, W)`` per-pixel tap weights, taps in row-major order.
        offset: ``(B, 2*K*K, H, W)`` per-pixel ``(dy, dx)`` for each tap, in pixels
            (``torchvision.ops.deform_conv2d``'s layout).

    Returns:
        ``(B, C, H, W)``; stride 1, dilation 1, zero padding.
    """
    K = check_adaptive_conv_args(x, kernel, offset)
    B, C, H, W = x.shape
    T = K * K
    dtype = x.dtype
    base = _base_grid(K, H, W, x.device, dtype)  # (T, H, W, 2)
    off = offset.view(B, T, 2, H, W).to(dtype)
    # pixel offsets -> normalised units; grid_sample wants (x, y), the offsets are (dy, dx)
    scale = torch.tensor([2.0 / W, 2.0 / H], device=x.device, dtype=dtype)
    grid = base.unsqueeze(0) + off.flip(2).permute(0, 1, 3, 4, 2) * scale  # (B, T, H, W, 2)
    grid = grid.reshape(B, T * H, W, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(B, C, T, H, W)
    # (B, C, T, H, W) x (B, 1, T, H, W) summed over the taps
    return (sampled * kernel.to(dtype).unsqueeze(1)).sum(2)
