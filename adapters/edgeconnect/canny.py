"""Canny edges as ``skimage.feature.canny`` computes them, batched in torch: the edge maps EdgeConnect reads.

EdgeConnect (Nazeri et al., ICCV-W 2019) computes edges with Canny, ``sigma = 2`` and skimage's default
thresholds (0.1 / 0.2 of the gradient magnitude of a ``[0, 1]`` image), with the hole **excluded** (the
``mask`` argument of ``skimage.feature.canny`` set to the known region), as the official test-time dataset
code does, so nothing of the hole leaks into the edge map.

:func:`canny` is a batched re-implementation (any device, any float dtype, no gradient) of
``skimage.feature.canny`` with its defaults (``mode='constant'``): Gaussian smoothing normalised by the
smoothed mask, Sobel gradients, bilinear non-maximum suppression inside the eroded mask, hysteresis by
8-connected propagation from strong pixels. Run in float64 it agrees with skimage to rounding; in float32
a few pixels whose magnitude sits on a threshold may flip (tested against skimage on photographs of
``skimage.data``). We chose torch over calling skimage per image so that the two-stage model runs
batched on any device without a round trip through NumPy on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["canny"]


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter with truncate=4: radius = int(4 * sigma + 0.5), normalised taps.
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / sigma**2 * x * x)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _separable(x: torch.Tensor, k: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Correlate ``(N, 1, H, W)`` with ``k`` along H, then along W (scipy's axis order)."""
    r = k.numel() // 2
    if pad_mode == "constant":
        x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
        return F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    # 1-pixel 'replicate' equals scipy's 'reflect' (half-sample symmetric) for a radius-1 kernel
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=pad_mode), k.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode=pad_mode), k.view(1, 1, 1, -1))


def _sobel(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``scipy.ndimage.sobel(x, axis)`` on ``(N, 1, H, W)``; ``axis`` 0 = rows (H), 1 = columns (W)."""
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    s = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    if axis == 0:
        x = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), d.view(1, 1, 3, 1))
        return F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), s.view(1, 1, 1, 3))
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), d.view(1, 1, 1, 3))
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), s.view(1, 1, 3, 1))


def _nms(isobel: torch.Tensor, jsobel: torch.Tensor, mag: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bilinear non-maximum suppression of skimage; returns a bool map of local maxima inside ``valid``."""
    H, W = mag.shape[-2:]
    mp = F.pad(mag, (1, 1, 1, 1))  # border pixels are never valid, so the pad value is never compared

    def at(di: int, dj: int) -> torch.Tensor:  # magnitude at (row + di, col + dj)
        return mp[..., 1 + di : 1 + di + H, 1 + dj : 1 + dj + W]

    ai, aj = isobel.abs(), jsobel.abs()
    # same sign of both gradients (a zero counts as negative) -> neighbours along the main diagonal
    same = (isobel > 0) == (jsobel > 0)
    # which gradient dominates; ties go to the column gradient when signs agree, to the row one otherwise
    row_major = torch.where(same, ai > aj, ai >= aj)
    num = torch.where(row_major, aj, ai)
    den = torch.where(row_major, ai, aj)
    w = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    n1_1 = torch.where(row_major, torch.where(same, at(1, 0), at(-1, 0)), at(0, 1))
    n2_1 = torch.where(row_major, torch.where(same, at(-1, 0), at(1, 0)), at(0, -1))
    n1_2 = torch.where(same, at(1, 1), at(-1, 1))
    n2_2 = torch.where(same, at(-1, -1), at(1, -1))
    c_plus = (n1_2 * w + n1_1 * (1.0 - w)) <= mag
    c_minus = (n2_2 * w + n2_1 * (1.0 - w)) <= mag
    return valid & c_plus & c_minus


@torch.no_grad()
def canny(
    gray: torch.Tensor,
    sigma: float = 2.0,
    low_threshold: float = 0.1,
    high_threshold: float = 0.2,
    hole: torch.Tensor | None = None,
) -> torch.Tensor:
    """Canny edges of a batch of grayscale images, as ``skimage.feature.canny`` computes them.

    ``gray``: ``(B, 1, H, W)`` float in ``[0, 1]`` (float64 reproduces skimage to rounding).
    ``hole``: optional ``(B, 1, H, W)`` toolkit mask (1 = hole); the hole is excluded from smoothing and
    from the result, i.e. skimage's ``mask`` argument is ``hole == 0``. Without it the whole image is used
    (skimage's ``mask=None``). Thresholds are absolute, for a ``[0, 1]`` image (skimage's defaults).
    Returns ``(B, 1, H, W)`` in ``gray``'s dtype with values in {0, 1}. No gradient flows.
    """
    if gray.dim() != 4 or gray.shape[1] != 1:
        raise ValueError(f"canny expects grayscale images of shape (B, 1, H, W), got {tuple(gray.shape)}")
    if not gray.is_floating_point():
        raise TypeError(f"canny expects a float image in [0, 1], got dtype {gray.dtype}; convert with x.float() / 255")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (EdgeConnect uses 2), got {sigma}")
    if high_threshold < low_threshold:
        raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")
    known = torch.ones_like(gray) if hole is None else (hole.to(gray.dtype) == 0).to(gray.dtype).expand_as(gray)

    # masked Gaussian: smooth the known pixels only and renormalise by the smoothed mask (the bleed-over)
    k = _gaussian_kernel(sigma, gray.dtype, gray.device)
    bleed = _separable(known, k, "constant") + torch.finfo(gray.dtype).eps
    smoothed = _separable(gray * known, k, "constant") / bleed
    # a pixel is valid if its whole 3x3 neighbourhood is known and inside the image
    valid = -F.max_pool2d(F.pad(-known, (1, 1, 1, 1), value=0.0), 3, stride=1) > 0.5

    isobel, jsobel = _sobel(smoothed, 0), _sobel(smoothed, 1)
    mag = torch.sqrt(isobel * isobel + jsobel * jsobel)
    low = _nms(isobel, jsobel, mag, valid & (mag >= max(low_threshold, 1e-14)))

    # hysteresis: keep the 8-connected components of `low` that contain a strong pixel
    edges = low & (mag >= high_threshold)
    low_f = low.to(gray.dtype)
    while True:
        grown = edges
        for _ in range(8):
            grown = (F.max_pool2d(grown.to(gray.dtype), 3, stride=1, padding=1) * low_f) > 0
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(gray.dtype)
