"""Blocks the paper adds to the inpainting network (theta): adaptive convolution and the completion block.

* :class:`AdaptiveConv` — Eq. (6): two convolutions predict, per pixel, ``K*K`` kernel weights (``f_ker``)
  and ``2*K*K`` offsets (``f_off``) from the input, applied to every channel by
  :func:`kdinpaint.ops.adaptive_conv`. Offsets start at zero, so the block first looks at the plain
  ``K×K`` neighbourhood and learns where else to look. Kernel weights and offsets are soft-clamped,
  ``L tanh(v / L)`` (``kernel_limit`` 1, ``offset_limit`` 3 pixels by default; ``None`` is Eq. (6) as
  written, see :class:`AdaptiveConv`).
* :class:`GlobalLocalFusion` — Eq. (10): attention and adaptive convolution mixed per pixel (PGL).
* :class:`CompletionBlock` — Eq. (5): ``x + adaptive_conv(x) ⊙ M``, updating only the holes. Its kernel
  predictor starts at zero, so a freshly attached block is the identity and the model's output is unchanged
  until training moves it (the zero-initialised-residual trick); this is our choice, the paper is silent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdinpaint.masking import mask_at
from kdinpaint.ops import adaptive_conv

__all__ = ["AdaptiveConv", "CompletionBlock", "GlobalLocalFusion", "build_completion_blocks", "build_fusions"]

_CPU_CONV_BLOCK = 16  # output channels oneDNN computes in one block on an AVX-512 CPU


class AdaptiveConv(nn.Module):
    """Per-pixel kernels and offsets predicted from the input and shared by all channels (Eq. 6).

    Args:
        channels: input (= output) channels ``C``.
        kernel_size: ``K`` of the adaptive kernel (odd).
        predictor_kernel_size: kernel size of the two predictor convolutions.
        zero_kernel: start the kernel predictor at zero (the block outputs 0 until trained).
        kernel_limit: soft bound of every kernel weight, ``V = L tanh(f_ker(x) / L)``; ``None``: unbounded.
        offset_limit: soft bound of every offset in pixels, ``Δ = L tanh(f_off(x) / L)``; ``None``: unbounded.

    Why the bounds (not in the paper, whose ``V = f_ker(x')`` is a plain convolution): the kernel is linear
    in the input it is applied to, so the output is quadratic in it, and in a residual block
    ``x + y(x) ⊙ M`` that is a feedback loop. Unbounded, it ran away in training: kernel weights grew to
    hundreds and offsets to 600-2000 pixels on 16×16 features within a few steps, and the features and the
    distillation terms after them blew up (the reference network, Adam at 2e-3 and 3e-3). Offsets also drift
    far beyond the feature map in long stable runs (a 99th percentile of 24 pixels on 8×8 features after
    3000 steps), where they sample only the zero padding. ``L tanh(v / L)`` has slope 1 at 0: a fresh block is
    exactly the plain form, and small values almost so.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        predictor_kernel_size: int = 3,
        zero_kernel: bool = False,
        kernel_limit: float | None = 1.0,
        offset_limit: float | None = 3.0,
    ):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        for name, limit in (("kernel_limit", kernel_limit), ("offset_limit", offset_limit)):
            if limit is not None and not limit > 0:
                raise ValueError(f"{name} must be > 0 or None (unbounded), got {limit}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.kernel_limit, self.offset_limit = kernel_limit, offset_limit
        taps = kernel_size * kernel_size
        pad = predictor_kernel_size // 2
        self.f_ker = nn.Conv2d(channels, taps, predictor_kernel_size, padding=pad)
        self.f_off = nn.Conv2d(channels, 2 * taps, predictor_kernel_size, padding=pad)
        nn.init.zeros_(self.f_off.weight)
        nn.init.zeros_(self.f_off.bias)
        if zero_kernel:
            nn.init.zeros_(self.f_ker.weight)
            nn.init.zeros_(self.f_ker.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x)[0]

    def forward_with(self, x: torch.Tensor, extra: nn.Conv2d | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(adaptive_conv(x), extra(x))``: the kernel and offset predictors (and ``extra``, a convolution of ``x``
        with the same kernel size, padding and stride 1, e.g. PGL's ``f_w``) run as one convolution, whose output
        channels are theirs side by side; ``extra``'s output is ``None`` when none is given."""
        if x.shape[1] != self.channels:
            raise ValueError(f"AdaptiveConv built for {self.channels} channels got a {x.shape[1]}-channel input")
        convs = [self.f_ker, self.f_off] + ([extra] if extra is not None else [])
        if extra is not None and (extra.kernel_size, extra.padding, extra.stride, extra.dilation, extra.groups) != (
            self.f_ker.kernel_size, self.f_ker.padding, (1, 1), (1, 1), 1
        ):
            convs = convs[:2]  # a convolution of another shape runs apart
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs])
        if x.device.type == "cpu" and weight.shape[0] > _CPU_CONV_BLOCK:
            # oneDNN computes output channels in blocks of 16; past one block, a 16-channel input took the slower
            # algorithm (28 outputs: 6.5 ms against twice 1.3 ms at 16×16×32×32), so the channels run in halves
            half = -(-weight.shape[0] // 2)
            out = torch.cat([F.conv2d(x, w, b, padding=self.f_ker.padding) for w, b in zip(weight.split(half), bias.split(half))], 1)
        else:
            out = F.conv2d(x, weight, bias, padding=self.f_ker.padding)  # (B, T + 2T [+ extra], H, W)
        parts = out.split([c.out_channels for c in convs], 1)
        ker, off = _soft_clamp(parts[0], self.kernel_limit), _soft_clamp(parts[1], self.offset_limit)
        other = parts[2] if len(parts) > 2 else (extra(x) if extra is not None else None)
        return adaptive_conv(x, ker, off), other

    def extra_repr(self) -> str:
        return f"kernel_limit={self.kernel_limit}, offset_limit={self.offset_limit}"


def _soft_clamp(v: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``limit * tanh(v / limit)``: ``v`` near 0, never beyond ``±limit``; ``v`` itself when ``limit`` is None."""
    return v if limit is None else limit * torch.tanh(v / limit)


class CompletionBlock(nn.Module):
    """Eq. (5): ``x_l = x'_l + f_ada-conv(x'_l) ⊙ M``, with ``M`` max-pooled to the feature size.

    ``conv`` may be shared between blocks (the paper shares the predictors across completion blocks).
    Shapes: ``x`` ``(B, C, h, w)``, ``mask`` ``(B, 1, H, W)`` with 1 = hole -> ``(B, C, h, w)``.
    """

    def __init__(self, conv: AdaptiveConv):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask_at(mask, x.shape[-2:]).to(x.dtype)
        return x + self.conv(x) * m


def build_completion_blocks(
    channels: list[int],
    kernel_size: int = 3,
    share_predictors: bool = True,
    kernel_limit: float | None = 1.0,
    offset_limit: float | None = 3.0,
) -> nn.ModuleDict:
    """One :class:`CompletionBlock` per site (keys ``"0"``, ``"1"``, ...), widths ``channels``.

    With ``share_predictors`` all blocks of one width use the same :class:`AdaptiveConv` (the paper's shared
    kernel and offset predictors); the kernel predictors start at zero, so every block starts as the identity.
    ``kernel_limit`` / ``offset_limit``: the soft bounds of :class:`AdaptiveConv`.
    """
    blocks = nn.ModuleDict()
    shared: dict[int, AdaptiveConv] = {}
    for i, c in enumerate(channels):
        conv = shared.get(c) if share_predictors else None
        if conv is None:
            conv = shared[c] = AdaptiveConv(c, kernel_size, zero_kernel=True, kernel_limit=kernel_limit, offset_limit=offset_limit)
        blocks[str(i)] = CompletionBlock(conv)
    return blocks


class GlobalLocalFusion(nn.Module):
    """PGL, Eq. (10): ``O = f_att(D) ⊙ W + f_ada-conv(D) ⊙ (1 - W)``, ``W = sigmoid(f_w(D))``.

    Wraps an attention module through a forward hook: ``D`` is the module's input, ``f_att(D)`` its output.
    ``f_w`` is a single 3×3 convolution starting at zero (``W = 0.5``: an even mix); the local branch is an
    :class:`AdaptiveConv`. Shapes: ``d``, ``att`` ``(B, C, h, w) -> (B, C, h, w)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, kernel_limit: float | None = 1.0, offset_limit: float | None = 3.0):
        super().__init__()
        self.channels = channels
        self.f_w = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.f_w.weight)
        nn.init.zeros_(self.f_w.bias)
        self.local = AdaptiveConv(channels, kernel_size, kernel_limit=kernel_limit, offset_limit=offset_limit)

    def forward(self, d: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        if att.shape != d.shape:
            raise ValueError(
                f"global-local fusion needs the attention output to have its input's shape: input {tuple(d.shape)}, "
                f"output {tuple(att.shape)}; wrap a module whose output matches its input"
            )
        local, logit = self.local.forward_with(d, self.f_w)  # f_w, f_ker and f_off as one convolution of D
        w = torch.sigmoid(logit)  # (B, 1, h, w)
        return att * w + local * (1 - w)


def build_fusions(
    channels: list[int], kernel_size: int = 3, kernel_limit: float | None = 1.0, offset_limit: float | None = 3.0
) -> nn.ModuleDict:
    """One :class:`GlobalLocalFusion` per fusion site (keys ``"0"``, ``"1"``, ...); limits: :class:`AdaptiveConv`."""
    return nn.ModuleDict(
        {str(i): GlobalLocalFusion(c, kernel_size, kernel_limit, offset_limit) for i, c in enumerate(channels)}
    )
