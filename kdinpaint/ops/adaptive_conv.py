"""Adaptive convolution, Eq. (6) of the paper.

``y_j = sum_k V_{j,k} * x[j + p_k + Delta_{j,k}]``: every output pixel ``j`` has its own ``K*K`` kernel
weights ``V`` and ``2*K*K`` offsets ``Delta``, shared by all channels, and reads ``x`` with bilinear
interpolation (zero outside the image).

This equals ``torchvision.ops.deform_conv2d(x, offset, ones(C, 1, K, K), padding=K // 2, mask=kernel)``
(a depthwise deformable convolution with all-one weights whose modulation mask is the kernel), which is
the test oracle.

How it is computed: a sparse matrix. Every output pixel reads ``4 K*K`` input pixels (the bilinear corners of
its taps) with weights ``V_{j,k} × (bilinear weight)``, the same for all channels, so ``y = S(V, Delta) x``
with ``S`` a ``(B·H·W) × (B·H·W)`` matrix of ``4 K*K`` entries per row. With the channels last, applying ``S``
is an embedding bag (``embedding_bag`` with per-sample weights: one weighted sum of ``4 K*K`` rows of ``C``
floats per pixel), which runs near the memory's speed; no ``(B, C, K*K, H, W)`` tensor of samples exists.
The weights and corner indices come from ``V`` and ``Delta`` by elementwise operations (autograd
differentiates those). The backward pass needs two more products with the same pattern: ``S^T g`` (an
embedding bag over the transposed pattern, built once per call by a sort) and ``<g_j, x_i>`` at every entry
(a sampled matrix product). The three products are each other's derivatives, so the
gradient is built from them again when Algorithm 1's Reverse-HG differentiates it (``create_graph=True``):
second derivatives at the cost of first ones. ``python recipes/bench_ops.py adaptive_conv`` times it against
``nn.Conv2d`` of the same channels and kernel and against ``deform_conv2d``.

Out-of-image corners (zero padding) and non-finite positions read a zero row appended to the input, with
their weights: the output is unchanged (zero), a non-finite weight makes its pixel non-finite (a diverged
training shows in the loss), and no gradient reaches a real pixel from it.

At exactly integer sampling positions (zero or integer offsets: every fresh completion block) bilinear
interpolation has a kink, and the offset gradient is the one-sided derivative towards the next pixel, as
``deform_conv2d`` takes it (``floor`` of the position picks the cell).

Traced (``torch.compile``, ``torch.export``, ONNX) the forward is ``grid_sample`` over all taps instead, a
graph every runtime has (normalised by power-of-two sides so that integer positions are exact).
"""

from __future__ import annotations

import warnings

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


# ---- the sampling pattern and its three products ----------------------------------------------------
_PAD = 2  # zero rows and columns around the input's table: top / left 2, bottom / right 2


class _Pattern:
    """Which input pixels every output pixel reads. The input is a table of rows in ``(b, y, x)`` order over a
    zero border of :data:`_PAD` pixels on every side (``(B, H + 4, W + 4)`` rows; positions beyond the border
    are clamped into it); ``first`` ``(M, T)`` is the row of each tap's top-left bilinear corner for the
    ``M = B·H·W`` output pixels, and the other three corners are that row plus ``corner_shifts``. ``index``
    ``(M·T·4,)``: all entries, ``(tap, corner)`` within each output row. The transposed pattern (taps grouped
    by the row of their top-left corner) is built on first use, by sorting ``M·T`` keys."""

    def __init__(self, first: torch.Tensor, shape: tuple[int, int, int]):
        B, H, W = shape
        self.shape, self.first = shape, first
        self.rows, self.taps = first.shape
        self.width = W + 2 * _PAD
        self.table_rows = B * (H + 2 * _PAD) * self.width
        self.corner_shifts = (0, 1, self.width, self.width + 1)
        shifts = torch.tensor(self.corner_shifts, device=first.device, dtype=first.dtype)
        self.index = (first.unsqueeze(-1) + shifts).reshape(-1)  # (M·T·4,)
        self.per_row = 4 * self.taps
        self.offsets = torch.arange(0, self.rows * self.per_row, self.per_row, device=first.device, dtype=first.dtype)
        self._transposed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def crow(self) -> torch.Tensor:
        """The row starts of the pattern as a CSR matrix (``offsets`` and the total)."""
        return torch.cat([self.offsets, self.offsets.new_tensor([self.index.numel()])])

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order, source, offsets)``: the ``M·T`` taps sorted by the row of their top-left corner, the output
        row of each, and where each table row's taps start (one bag per table row, most of them empty)."""
        if self._transposed is None:
            keys = self.first.reshape(-1)
            order = torch.argsort(keys, stable=True)
            counts = torch.bincount(keys, minlength=self.table_rows)
            source = torch.div(order, self.taps, rounding_mode="floor").to(keys.dtype)
            self._transposed = (order, source, (torch.cumsum(counts, 0) - counts).to(keys.dtype))
        return self._transposed


def _table(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B·(H + 4)·(W + 4), C)``: the pixels as rows, channels last, in a zero border."""
    B, C, H, W = x.shape
    table = x.new_zeros(B, H + 2 * _PAD, W + 2 * _PAD, C)
    table[:, _PAD : _PAD + H, _PAD : _PAD + W] = _channels_last(x)
    return table.view(-1, C)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> a contiguous ``(B, H, W, C)`` (torch's channels-last conversion: its fast kernel)."""
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _pixel_rows(g: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> a contiguous ``(B·H·W, C)``."""
    return _channels_last(g).reshape(-1, g.shape[1])


def _image(rows: torch.Tensor, shape: tuple[int, int, int], border: int = 0) -> torch.Tensor:
    """``rows`` ``(B·(H + 2 border)·(W + 2 border), C)`` without the border, as a contiguous ``(B, C, H, W)``."""
    B, H, W = shape
    C = rows.shape[1]
    rows = rows.view(B, H + 2 * border, W + 2 * border, C)[:, border : border + H, border : border + W]
    if B == 1:  # a plain 2-D transpose takes torch's blocked copy, about twice as fast on the CPU
        return rows[0].reshape(H * W, C).t().contiguous().view(1, C, H, W)
    return rows.reshape(B, H * W, C).transpose(1, 2).contiguous().view(B, C, H, W)


def _apply(p: _Pattern, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y = S x``: ``y_j = sum_e w_{j,e} x[index_{j,e}]``, ``(B, C, H, W)``."""
    out = torch.ops.aten._embedding_bag_forward_only(_table(x), p.index, p.offsets, False, 0, False, w.reshape(-1))[0]
    return _image(out, p.shape)


def _apply_t(p: _Pattern, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``S^T g``: every pixel gets the weighted sum of the output rows that read it, ``(B, C, H, W)``; one
    embedding bag per corner over the transposed taps, shifted into place."""
    order, source, offsets = p.transposed()
    rows = _pixel_rows(g)
    w = torch.index_select(w.reshape(p.rows * p.taps, 4), 0, order).t().contiguous()  # (4, M·T), transposed order
    out = rows.new_zeros(p.table_rows + p.corner_shifts[-1], rows.shape[1])
    for corner, shift in enumerate(p.corner_shifts):
        part = torch.ops.aten._embedding_bag_forward_only(rows, source, offsets, False, 0, False, w[corner])[0]
        out[shift : shift + p.table_rows] += part
    return _image(out[: p.table_rows], p.shape, _PAD)


def _dot(p: _Pattern, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d_{j,e} = <g_j, x[index_{j,e}]>`` over the channels, ``(B·H·W, 4 T)``: the product ``g x^T`` sampled at
    the pattern's entries (``sampled_addmm`` of a CSR matrix; 2-7x faster than embedding bag's per-sample
    weight gradient, one dot per entry)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        pattern = torch.sparse_csr_tensor(p.crow, p.index, g.new_zeros(p.index.numel()), size=(p.rows, p.table_rows),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, _pixel_rows(g), _table(x).t(), beta=0.0).values().view(p.rows, p.per_row)


class _Apply(torch.autograd.Function):
    """``y = S(w) x``; ``dw = dot(g, x)``, ``dx = S(w)^T g``."""

    @staticmethod
    def forward(ctx, p: _Pattern, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.p = p
        ctx.save_for_backward(w, x)
        return _apply(p, w, x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        w, x = ctx.saved_tensors
        need = ctx.needs_input_grad
        return None, _Dot.apply(ctx.p, g, x) if need[1] else None, _ApplyT.apply(ctx.p, w, g) if need[2] else None


class _ApplyT(torch.autograd.Function):
    """``z = S(w)^T g``; ``dw = dot(g, dz)``, ``dg = S(w) dz``."""

    @staticmethod
    def forward(ctx, p: _Pattern, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.p = p
        ctx.save_for_backward(w, g)
        return _apply_t(p, w, g)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):  # type: ignore[override]
        w, g = ctx.saved_tensors
        need = ctx.needs_input_grad
        return None, _Dot.apply(ctx.p, g, dz) if need[1] else None, _Apply.apply(ctx.p, w, dz) if need[2] else None


class _Dot(torch.autograd.Function):
    """``d = dot(g, x)``; ``dg = S(dd) x``, ``dx = S(dd)^T g``."""

    @staticmethod
    def forward(ctx, p: _Pattern, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.p = p
        ctx.save_for_backward(g, x)
        return _dot(p, g, x)

    @staticmethod
    def backward(ctx, dd: torch.Tensor):  # type: ignore[override]
        g, x = ctx.saved_tensors
        need = ctx.needs_input_grad
        return None, _Apply.apply(ctx.p, dd, x) if need[1] else None, _ApplyT.apply(ctx.p, dd, g) if need[2] else None


def _taps(K: int, H: int, W: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions without offsets, ``(H, 1, K*K)`` rows and ``(1, W, K*K)`` columns, taps row-major."""
    r = K // 2
    taps = torch.arange(-r, r + 1, device=device, dtype=dtype)
    ky, kx = taps.repeat_interleave(K), taps.repeat(K)  # (K*K,) row-major, as deform_conv2d
    ys = torch.arange(H, device=device, dtype=dtype).view(H, 1, 1) + ky
    xs = torch.arange(W, device=device, dtype=dtype).view(1, W, 1) + kx
    return ys, xs


def _pattern(kernel: torch.Tensor, offset: torch.Tensor, K: int) -> tuple[_Pattern, torch.Tensor]:
    """The pattern of Eq. (6) and its weights ``(B·H·W, 4 K*K)`` (entries ``(tap, corner)``), differentiable in
    ``kernel`` and ``offset``."""
    B, T, H, W = kernel.shape
    ys, xs = _taps(K, H, W, kernel.device, kernel.dtype)
    off = offset.view(B, T, 2, H, W).permute(0, 3, 4, 1, 2).contiguous()  # (B, H, W, T, 2): pixels, then taps
    py = ys + off[..., 0]  # (B, H, W, T)
    px = xs + off[..., 1]
    with torch.no_grad():
        y0, x0 = torch.floor(py), torch.floor(px)
        # clamped into the zero border (both corners of a far position land in it); NaN reads the border too
        yi = torch.nan_to_num(y0, nan=-_PAD).clamp_(-_PAD, H).to(torch.int32)
        xi = torch.nan_to_num(x0, nan=-_PAD).clamp_(-_PAD, W).to(torch.int32)
        width = W + 2 * _PAD
        base = (torch.arange(B, device=kernel.device, dtype=torch.int32) * ((H + 2 * _PAD) * width)).view(B, 1, 1, 1)
        first = (base + (yi + _PAD) * width + (xi + _PAD)).view(B * H * W, T)
    fy, fx = py - y0, px - x0
    v = kernel.permute(0, 2, 3, 1).contiguous()  # (B, H, W, T)
    a, b = (1 - fy) * v, fy * v
    weights = torch.stack((a * (1 - fx), a * fx, b * (1 - fx), b * fx), -1)  # (B, H, W, T, 4)
    return _Pattern(first, (B, H, W)), weights.reshape(B * H * W, 4 * T)


# ---- the traced form --------------------------------------------------------------------------------
def _power_of_two(n: int) -> int:
    """The smallest power of two >= ``n``: the size grid_sample's coordinates are normalised by."""
    return 1 << (n - 1).bit_length()


def _grid_sample_form(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor, K: int) -> torch.Tensor:
    """Eq. (6) by one ``grid_sample`` over all taps, for traced graphs. Normalised by a power of two (the input
    zero-padded on the right and bottom up to one), integer positions are represented exactly."""
    B, C, H, W = x.shape
    T, r, dt = K * K, K // 2, x.dtype
    taps = torch.arange(-r, r + 1, device=x.device, dtype=dt)
    ky, kx = taps.repeat_interleave(K).view(1, T, 1, 1), taps.repeat(K).view(1, T, 1, 1)
    off = offset.view(B, T, 2, H, W)
    py = torch.arange(H, device=x.device, dtype=dt).view(1, 1, H, 1) + ky + off[:, :, 0]  # (B, T, H, W)
    px = torch.arange(W, device=x.device, dtype=dt).view(1, 1, 1, W) + kx + off[:, :, 1]
    Hp, Wp = _power_of_two(H), _power_of_two(W)
    # align_corners=False: pixel i sits at normalised (2 i + 1) / size - 1, exact for a power-of-two size
    grid = torch.stack(((2 * px + 1) / Wp - 1, (2 * py + 1) / Hp - 1), -1).reshape(B, T * H, W, 2)
    padded = F.pad(x, (0, Wp - W, 0, Hp - H)) if (Hp, Wp) != (H, W) else x
    sampled = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled.view(B, C, T, H, W) * kernel.unsqueeze(1)).sum(2)


def _tracing() -> bool:
    from torch._guards import detect_fake_mode

    return bool(torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or detect_fake_mode() is not None)


def adaptive_conv(x: torch.Tensor, kernel: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Eq. (6): per-pixel kernels and offsets shared by all channels.

    Args:
        x: ``(B, C, H, W)`` input feature.
        kernel: ``(B, K*K, H, W)`` per-pixel tap weights, taps in row-major order.
        offset: ``(B, 2*K*K, H, W)`` per-pixel ``(dy, dx)`` for each tap, in pixels
            (``torchvision.ops.deform_conv2d``'s layout).

    Returns:
        ``(B, C, H, W)``; stride 1, dilation 1, zero padding. Differentiable (twice) in all three inputs.
        Under autocast it computes in float32 and returns float32.
        A non-finite offset or kernel weight (a diverged training) makes the pixels that use it non-finite, and their
        gradients, in both backward forms; it raises nothing, so that the loss shows it and the divergence
        guard (``train.guard``) skips the step.
    """
    K = check_adaptive_conv_args(x, kernel, offset)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return adaptive_conv(x.float(), kernel.float(), offset.float())
    dtype = x.dtype
    kernel, offset = kernel.to(dtype), offset.to(dtype)
    if _tracing():
        return _grid_sample_form(x, kernel, offset, K)
    pattern, weights = _pattern(kernel, offset, K)
    return _Apply.apply(pattern, weights, x)
