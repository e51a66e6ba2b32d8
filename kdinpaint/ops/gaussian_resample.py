"""Gaussian sampling: StructureFlow's appearance-flow resampler, in pure PyTorch.

StructureFlow (Ren et al., ICCV 2019) warps encoder features with a predicted flow through a custom CUDA
op ("Gaussian sampling", ``Resample2d``). It is **not** bilinear sampling: every output pixel is a
normalised Gaussian-weighted average of a ``K x K`` window of input pixels around the flow-displaced point.
The official network uses ``K = 16, sigma = 4`` and ``K = 4, sigma = 2`` on the same features.

For an output pixel ``(x, y)`` of the flow's grid:

* sample point ``sx = x + flow[0, y, x]``, ``sy = y + flow[1, y, x]`` (pixels of the input grid, no
  normalisation; channel 0 is horizontal);
* taps ``px = floor(sx) + k * d`` for ``k = -(K/2 - 1), ..., K/2`` (likewise ``py``), so the window holds
  ``K/2`` taps at or left of the point and ``K/2`` right of it;
* weight ``w = exp(-((px - sx)^2 + (py - sy)^2) / (2 sigma^2))`` from the *unclamped* tap coordinates;
* value ``F[clamp(py, 0, Hi-1), clamp(px, 0, Wi-1)]`` (border replication);
* output ``sum(w * value) / sum(w)``; a zero sum divides by ``1e-8`` instead, as the kernel does.

The gradient with respect to the flow treats ``floor`` as constant, which is what the hand-written CUDA
backward computes. For the input gradient the CUDA kernel has a quirk: it takes the fractional part of the
sample point by truncation instead of ``floor``, so where a sample point has a negative coordinate (beyond
the top or left border) its input gradient uses a window of weights shifted by one pixel.
``input_grad="exact"`` (default) gives the true gradient of the forward; ``input_grad="cuda"`` reproduces
the kernel's.

The work is a loop over the ``K^2`` taps, each one gather of a ``(P, C)`` block for all pixels at once
(never a loop over pixels; small per-tap blocks stay in cache and measured faster than one big gather), and a custom autograd function keeps only the inputs and the output for the backward, like the
CUDA op, so memory does not grow with ``K^2``. The backward is written in differentiable operations, so
second derivatives (meta-learning through an SF network) work too.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["gaussian_resample", "GaussianResample2d"]

_EPS = 1e-8  # the CUDA kernel's SAFE_DIV: a zero denominator is replaced by this
_INPUT_GRADS = ("exact", "cuda")


def _check(features: torch.Tensor, flow: torch.Tensor, kernel_size: int, sigma: float, dilation: int, input_grad: str) -> None:
    for name, t in (("features", features), ("flow", flow)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
    if features.dim() != 4:
        raise ValueError(f"features must have shape (B, C, Hi, Wi), got {tuple(features.shape)}")
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(
            f"flow must have shape (B, 2, H, W) (channel 0 horizontal, 1 vertical, in pixels), got {tuple(flow.shape)}"
        )
    if features.shape[0] != flow.shape[0]:
        raise ValueError(f"features have batch size {features.shape[0]} but the flow has {flow.shape[0]}")
    if features.device != flow.device:
        raise ValueError(f"features are on {features.device} but the flow is on {flow.device}; move both to one device")
    _check_options(kernel_size, sigma, dilation, input_grad)


def _check_options(kernel_size: int, sigma: float, dilation: int, input_grad: str = "exact") -> None:
    if not isinstance(kernel_size, int) or kernel_size < 2 or kernel_size % 2:
        raise ValueError(f"kernel_size must be an even int >= 2 (the official op uses 16 and 4), got {kernel_size!r}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (the official op uses 4 for K=16 and 2 for K=4), got {sigma!r}")
    if input_grad not in _INPUT_GRADS:
        raise ValueError(f"input_grad must be one of {_INPUT_GRADS}, got {input_grad!r}")


def _axis_taps(
    coord: torch.Tensor, size: int, kernel_size: int, sigma: float, dilation: int, truncate: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Taps along one axis for sample coordinates ``coord`` of any shape ``S``.

    Returns ``(index, weight, offset)``, each ``S + (K,)``: the clamped integer tap index into an axis of
    ``size`` pixels, the unnormalised 1-D Gaussian weight, and ``tap - coord`` (unclamped). With
    ``truncate`` the fractional part is taken by truncation toward zero (the CUDA input-gradient quirk).
    """
    K = kernel_size
    base = torch.floor(coord)
    frac = coord - (torch.trunc(coord) if truncate else base)
    steps = torch.arange(-(K // 2 - 1), K // 2 + 1, device=coord.device)  # (K,)
    # offset of each tap from the sample point; the kernel forms it as fx*d + alpha, which is -offset exactly
    offset = (steps * dilation).to(coord.dtype) - frac.unsqueeze(-1)  # S + (K,)
    weight = torch.exp(-(offset * offset) / (2 * sigma * sigma))
    # clamping the base first keeps huge flows from overflowing int64 without changing any clamped tap
    base = base.clamp(-(K * dilation) - 1, size + K * dilation).long().unsqueeze(-1)
    index = (base + steps * dilation).clamp(0, size - 1)
    return index, weight, offset


def _setup(features: torch.Tensor, flow: torch.Tensor, kernel_size: int, sigma: float, dilation: int,
           truncate: bool = False):
    """Per-axis taps of every output pixel, flattened over (B, H, W) as P pixels.

    Returns ``rowbase, col, wx, wy, ox, oy``, each ``(K, P)`` (tap-major, so one tap is a contiguous row):
    the flat row offset ``b*Hi*Wi + iy*Wi`` of each window row, the clamped column of each window column,
    the 1-D weights and the tap offsets per axis. Tap ``(ky, kx)`` reads row ``rowbase[ky] + col[kx]`` of
    the features viewed as ``(B*Hi*Wi, C)``.
    """
    B, _, Hi, Wi = features.shape
    H, W = flow.shape[-2:]
    K = kernel_size
    xs = torch.arange(W, device=flow.device, dtype=flow.dtype) + flow[:, 0]  # (B, H, W)
    ys = torch.arange(H, device=flow.device, dtype=flow.dtype).unsqueeze(-1) + flow[:, 1]
    ix, wx, ox = _axis_taps(xs, Wi, K, sigma, dilation, truncate)  # (B, H, W, K) each
    iy, wy, oy = _axis_taps(ys, Hi, K, sigma, dilation, truncate)
    batch = (torch.arange(B, device=flow.device) * (Hi * Wi)).view(B, 1, 1, 1)
    rowbase = batch + iy * Wi
    return tuple(t.reshape(-1, K).t().contiguous() for t in (rowbase, ix, wx, wy, ox, oy))


def _channels_last_rows(features: torch.Tensor) -> torch.Tensor:
    B, C, Hi, Wi = features.shape
    # contiguous rows: for B = 1 the reshape alone would be a view with channel stride Hi*Wi, and gathering
    # strided rows is ten times slower
    return features.permute(0, 2, 3, 1).contiguous().view(B * Hi * Wi, C)  # (B*Hi*Wi, C)


def _to_grid(rows: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
    return rows.view(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / torch.where(den == 0, torch.full_like(den, _EPS), den)


def _taps(kernel_size: int):
    # one small gather per tap: P rows of C values stay in cache, unlike one big (P, K, C) gather
    return ((ky, kx) for ky in range(kernel_size) for kx in range(kernel_size))


def _forward(features, flow, kernel_size, sigma, dilation):
    B = features.shape[0]
    H, W = flow.shape[-2:]
    rowbase, col, wx, wy, _, _ = _setup(features, flow, kernel_size, sigma, dilation)
    rows = _channels_last_rows(features)
    acc = torch.zeros(rowbase.shape[1], rows.shape[1], dtype=rows.dtype, device=rows.device)  # (P, C)
    for ky, kx in _taps(kernel_size):
        tap = rows.index_select(0, rowbase[ky] + col[kx])  # (P, C)
        acc.addcmul_(tap, (wy[ky] * wx[kx]).unsqueeze(-1))
    total = wy.sum(0).unsqueeze(-1) * wx.sum(0).unsqueeze(-1)  # (P, 1), the separable sum of all K^2 weights
    return _to_grid(_safe_div(acc, total), B, H, W)


class _GaussianResample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, flow, kernel_size, sigma, dilation, input_grad):
        ctx.conf = (kernel_size, sigma, dilation, input_grad)
        out = _forward(features, flow, kernel_size, sigma, dilation)
        ctx.save_for_backward(features, flow, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, flow, out = ctx.saved_tensors
        K, sigma, dilation, input_grad = ctx.conf
        B, C, Hi, Wi = features.shape
        H, W = flow.shape[-2:]
        rowbase, col, wx, wy, ox, oy = _setup(features, flow, K, sigma, dilation)
        total = wy.sum(0).unsqueeze(-1) * wx.sum(0).unsqueeze(-1)  # (P, 1)
        g = _channels_last_rows(grad_out)  # (P, C)
        # in-place accumulation only when no graph of the backward is being built (double backward)
        inplace = not torch.is_grad_enabled()
        grad_features = grad_flow = None

        if ctx.needs_input_grad[0]:
            gwx, gwy, gtotal = wx, wy, total
            if input_grad == "cuda":
                _, _, gwx, gwy, _, _ = _setup(features, flow, K, sigma, dilation, truncate=True)
                gtotal = gwy.sum(0).unsqueeze(-1) * gwx.sum(0).unsqueeze(-1)
            scale = _safe_div(g, gtotal)  # (P, C)
            grad_rows = torch.zeros(B * Hi * Wi, C, dtype=g.dtype, device=g.device)
            for ky, kx in _taps(K):
                contrib = scale * (gwy[ky] * gwx[kx]).unsqueeze(-1)  # (P, C)
                index = rowbase[ky] + col[kx]
                grad_rows = grad_rows.index_add_(0, index, contrib) if inplace else grad_rows.index_add(0, index, contrib)
            grad_features = _to_grid(grad_rows, B, Hi, Wi)

        if ctx.needs_input_grad[1]:
            # d out / d s = sum_taps w * (tap - s) / sigma^2 * (F_tap - out) / sum(w), per axis
            # sum_taps w * offset * <g, F_tap> = <g, sum_taps (w * offset) F_tap>: accumulate the weighted taps
            rows = _channels_last_rows(features)
            acc_x = torch.zeros_like(g)  # (P, C)
            acc_y = torch.zeros_like(g)
            for ky, kx in _taps(K):
                tap = rows.index_select(0, rowbase[ky] + col[kx])  # (P, C)
                w = wy[ky] * wx[kx]
                if inplace:
                    acc_x.addcmul_(tap, (w * ox[kx]).unsqueeze(-1))
                    acc_y.addcmul_(tap, (w * oy[ky]).unsqueeze(-1))
                else:
                    acc_x = acc_x + tap * (w * ox[kx]).unsqueeze(-1)
                    acc_y = acc_y + tap * (w * oy[ky]).unsqueeze(-1)
            dots_x = (g * acc_x).sum(-1)  # (P,)
            dots_y = (g * acc_y).sum(-1)
            g_out = (g * _channels_last_rows(out)).sum(-1)  # (P,): <g, out>
            mom_x = wy.sum(0) * (wx * ox).sum(0)  # sum_taps w * offset_x
            mom_y = wx.sum(0) * (wy * oy).sum(0)
            den = total.squeeze(-1) * (sigma * sigma)
            gx = _safe_div(dots_x - g_out * mom_x, den)
            gy = _safe_div(dots_y - g_out * mom_y, den)
            grad_flow = torch.stack((gx, gy), -1).view(B, H, W, 2).permute(0, 3, 1, 2)
        return grad_features, grad_flow, None, None, None, None


def gaussian_resample(
    features: torch.Tensor,
    flow: torch.Tensor,
    kernel_size: int = 16,
    sigma: float = 4.0,
    dilation: int = 1,
    *,
    input_grad: Literal["exact", "cuda"] = "exact",
) -> torch.Tensor:
    """Warp ``features`` by ``flow`` with StructureFlow's Gaussian sampling (see the module docstring).

    Args:
        features: ``(B, C, Hi, Wi)`` float tensor, any range.
        flow: ``(B, 2, H, W)`` displacement in pixels of the input grid; channel 0 is ``x`` (horizontal),
            channel 1 ``y``. Output pixel ``(x, y)`` samples around ``(x + flow_x, y + flow_y)``.
        kernel_size: even window size ``K`` (official: 16 with ``sigma=4``, 4 with ``sigma=2``).
        sigma: Gaussian standard deviation in pixels.
        dilation: spacing of the taps (official: 1).
        input_grad: ``"exact"`` for the true gradient w.r.t. ``features``; ``"cuda"`` to reproduce the
            official kernel's truncation quirk for sample points beyond the top/left border.

    Returns:
        ``(B, C, H, W)`` in the features' dtype. Half-precision inputs are computed in float32.
    """
    _check(features, flow, kernel_size, sigma, dilation, input_grad)
    dtype = torch.promote_types(torch.promote_types(features.dtype, flow.dtype), torch.float32)
    out = _GaussianResample.apply(
        features.to(dtype), flow.to(dtype), kernel_size, float(sigma), dilation, input_grad
    )
    return out.to(features.dtype)


class GaussianResample2d(nn.Module):
    """:func:`gaussian_resample` as a module (no parameters), so that hooks can capture its output.

    ``forward(features (B, C, Hi, Wi), flow (B, 2, H, W)) -> (B, C, H, W)``.
    """

    def __init__(
        self, kernel_size: int = 16, sigma: float = 4.0, dilation: int = 1, input_grad: Literal["exact", "cuda"] = "exact"
    ) -> None:
        super().__init__()
        _check_options(kernel_size, sigma, dilation, input_grad)
        self.kernel_size = kernel_size
        self.sigma = float(sigma)
        self.dilation = dilation
        self.input_grad = input_grad

    def forward(self, features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return gaussian_resample(
            features, flow, self.kernel_size, self.sigma, self.dilation, input_grad=self.input_grad
        )

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma:g}, dilation={self.dilation}"
