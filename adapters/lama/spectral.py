"""The real 2-D Fourier transform pair of LaMa's Fourier units, in two interchangeable forms.

``"fft"`` calls ``torch.fft.rfft2`` / ``irfft2`` (what LaMa runs). ``"matmul"`` computes the same orthonormal
transforms as products with cosine and sine bases (a real DFT as matrix multiplication): no complex tensor
and no FFT operator in the graph, so any exporter or runtime that multiplies matrices runs it (ONNX
without the DFT operator, TorchScript's legacy ONNX path, mobile runtimes). The two agree to float
rounding; the matmul form costs ``O(H W (H + W))`` per channel instead of ``O(H W log(H W))``, which at
LaMa's 1/8 resolution is small next to its 1x1 convolutions.

Both take ``x`` of shape ``(..., H, W)`` and give the half spectrum as two real tensors ``(re, im)`` of shape
``(..., H, W // 2 + 1)``; the inverse takes them back to ``(..., H, W)``. Normalisation is ``"ortho"``
(``1 / sqrt(H W)`` each way), LaMa's ``fft_norm``. The inverse is ``torch.fft.irfft2``'s: a full inverse
DFT along H, then a complex-to-real one along W that ignores the imaginary parts of the DC and Nyquist
columns (the spectra reaching it are not Hermitian after the Fourier unit's convolution, so the order matters).
"""

from __future__ import annotations

import math

import torch

__all__ = ["DFT_MODES", "rdft2", "irdft2"]

DFT_MODES = ("fft", "matmul")


def _check_mode(mode: str) -> None:
    if mode not in DFT_MODES:
        raise ValueError(f"dft must be one of {list(DFT_MODES)}, got {mode!r}")


def _bases(n: int, m: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``2 pi j k / n`` for ``j < n``, ``k < m``, each ``(n, m)``.

    ``j k`` is reduced modulo ``n`` in integers and the angles are taken in float64, so every entry is exact
    to float rounding whatever the size.
    """
    j = torch.arange(n, device=device, dtype=torch.int64)
    k = torch.arange(m, device=device, dtype=torch.int64)
    angle = (torch.outer(j, k) % n).to(torch.float64) * (2 * math.pi / n)  # (n, m)
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def rdft2(x: torch.Tensor, mode: str = "fft") -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal 2-D real DFT over the last two axes: ``(..., H, W)`` -> ``(re, im)``, each ``(..., H, W//2 + 1)``.

    Computed in float32 at least (``torch.fft`` has no bfloat16 on the CPU, and half precision would cost
    LaMa's global branch its accuracy); the results keep that dtype.
    """
    _check_mode(mode)
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if mode == "fft":
        spec = torch.fft.rfft2(x, norm="ortho")
        return spec.real, spec.imag
    H, W = x.shape[-2:]
    cw, sw = _bases(W, W // 2 + 1, x.device, x.dtype)  # (W, Wf)
    ch, sh = _bases(H, H, x.device, x.dtype)  # (H, H), symmetric
    a_re, a_im = x @ cw, -(x @ sw)  # along W: (..., H, Wf)
    scale = 1.0 / math.sqrt(H * W)
    re = (ch @ a_re + sh @ a_im) * scale  # along H: e^{-i theta} = cos - i sin
    im = (ch @ a_im - sh @ a_re) * scale
    return re, im


def irdft2(re: torch.Tensor, im: torch.Tensor, size: tuple[int, int], mode: str = "fft") -> torch.Tensor:
    """Inverse of :func:`rdft2` (``torch.fft.irfft2(re + i im, s=size, norm="ortho")``): ``(..., H, W)``.

    ``re``, ``im``: ``(..., H, W // 2 + 1)`` with ``(H, W) = size``; computed in float32 at least.
    """
    _check_mode(mode)
    if re.dtype in (torch.float16, torch.bfloat16):
        re, im = re.float(), im.float()
    H, W = size
    if mode == "fft":
        return torch.fft.irfft2(torch.complex(re, im), s=(H, W), norm="ortho")
    wf = W // 2 + 1
    if re.shape[-2:] != (H, wf):
        raise ValueError(f"irdft2 expects a half spectrum of shape (..., {H}, {wf}) for size {size}, got {tuple(re.shape)}")
    ch, sh = _bases(H, H, re.device, re.dtype)
    b_re, b_im = ch @ re - sh @ im, ch @ im + sh @ re  # inverse along H: e^{+i theta} = cos + i sin
    cw, sw = _bases(W, wf, re.device, re.dtype)  # (W, Wf)
    # complex-to-real along W: every column counts twice (it stands for its mirror image) except DC and Nyquist
    twice = torch.full((wf,), 2.0, device=re.device, dtype=re.dtype)
    twice[0] = 1.0
    if W % 2 == 0:
        twice[-1] = 1.0
    y = b_re @ (cw * twice).transpose(0, 1) - b_im @ (sw * twice).transpose(0, 1)  # (..., H, W)
    return y * (1.0 / math.sqrt(H * W))
