"""A weight-free smooth fill of the holes, coarse to fine: the harmonic (membrane) interpolant, approximately.

The known pixels are averaged down a pyramid of 2×2 means (each level keeps the fraction of known pixels
under every cell, a normalised convolution), the coarsest level is filled with the mean colour of what is
known, and each finer level starts from the bilinear up-sampling of the level below and relaxes its unknown
cells with ``iterations`` Jacobi sweeps of the Laplace equation (every unknown cell becomes the mean of its
four neighbours; known cells stay fixed). Colour therefore flows into a hole from all of its border at
every scale, and large holes fill in a handful of sweeps per level, not thousands.

``biharmonic_iterations`` refines the fill at every level towards the biharmonic (thin-plate) interpolant, the
one ``skimage.restoration.inpaint_biharmonic`` computes: conjugate-gradient steps on ``sum (Laplacian u)^2``
over the cells with no known pixel under them (the others fixed), each sample and channel its own system.
The harmonic fill is a tent between the borders; the biharmonic one also continues their slopes, and doing it
coarse to fine carries them across large holes in a few steps per level.

Measured on crops of photographs with free-form holes (10-50 %): at 64×64 the harmonic fill (64 sweeps)
scores 0.3-2 dB below skimage's biharmonic fill in PSNR and 100 conjugate-gradient steps bring it to within
0.5 dB of it, above it on some image sets (partly converged, it sits between the two interpolants); at
256×256 (8 crops of four photos) it scored 24.0 dB / SSIM 0.852 against biharmonic's 23.2 / 0.847. The cost
per step is linear in the number of pixels. It has no parameters and no gradient; networks use it to start
the holes from a plausible colour instead of zeros (``ReferenceNet(prefill=True)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["harmonic_fill", "PREFILL_SWEEPS", "PREFILL_BIHARMONIC"]

PREFILL_SWEEPS = 64
"""Jacobi sweeps per level of the fill networks start from (``ReferenceNet(prefill=True)``, baseline ``pyramid``)."""
PREFILL_BIHARMONIC = 100
"""Biharmonic conjugate-gradient steps per level of that fill."""


@torch.no_grad()
def harmonic_fill(
    image: torch.Tensor, mask: torch.Tensor, iterations: int = 64, biharmonic_iterations: int = 0
) -> torch.Tensor:
    """Fill the holes of ``image`` smoothly from their borders; known pixels are returned unchanged.

    Args:
        image: ``(B, C, H, W)``, any range (the fill is a convex combination of known values).
        mask: ``(B, 1, H, W)``, 1 = hole.
        iterations: Jacobi sweeps per pyramid level (0 keeps the up-sampled coarse fill).
        biharmonic_iterations: conjugate-gradient steps towards the biharmonic interpolant afterwards.

    Returns ``(B, C, H, W)``: ``image`` where known, the fill in the holes. A sample with no known pixel is
    filled with zeros.
    """
    if image.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"harmonic_fill needs image (B, C, H, W) and mask (B, 1, H, W) of the same size, got "
            f"{tuple(image.shape)} and {tuple(mask.shape)}"
        )
    if iterations < 0 or biharmonic_iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations} and biharmonic_iterations {biharmonic_iterations}")
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    x, hole = image.to(dtype), mask.to(dtype)
    known = 1 - hole
    levels = [(x * known, known)]  # (weighted sum of known values, fraction known), fine to coarse
    while min(levels[-1][0].shape[-2:]) > 2:
        s, k = levels[-1]
        levels.append((F.avg_pool2d(s, 2, ceil_mode=True), F.avg_pool2d(k, 2, ceil_mode=True)))
    fill = None
    for s, k in reversed(levels):
        value = s / k.clamp_min(1e-12)  # mean of the known pixels under each cell
        if fill is None:
            start = (s.sum((2, 3), keepdim=True) / k.sum((2, 3), keepdim=True).clamp_min(1e-12)).expand_as(s)
        else:
            start = F.interpolate(fill, size=s.shape[-2:], mode="bilinear", align_corners=False)
        cur = k * value + (1 - k) * start  # a partly known cell blends what is known with the coarser fill
        free = (k < 1).to(dtype)
        quarter = free / 4
        for _ in range(iterations):  # every free cell moves to the mean of its 4 neighbours: u + L(u) / 4
            cur = cur + quarter * _laplacian(cur)
        if biharmonic_iterations:  # at every level (the coarse ones carry slopes across a large hole), over
            # the cells with no known pixel under them; partly known cells keep their blend. Conjugate
            # gradients are exact after as many steps as there are cells (in exact arithmetic).
            steps = min(biharmonic_iterations, cur.shape[-2] * cur.shape[-1])
            cur = _biharmonic_refine(cur, (k == 0).to(dtype), steps)
        fill = cur
    return (x * known + fill * hole).to(image.dtype)


def _laplacian(u: torch.Tensor) -> torch.Tensor:
    """The 5-point Laplacian with zero flux at the image border (a replicated border), as the sum of the
    differences to the neighbours: symmetric, so ``hole * L(L(.))`` on hole pixels is symmetric positive
    semi-definite and conjugate gradients apply. Differences of neighbours, not a depthwise 3×3
    convolution: the same values, about twice as fast on a CPU at these sizes."""
    out = torch.zeros_like(u)
    dx = u[..., :, 1:] - u[..., :, :-1]  # (.., H, W - 1)
    dy = u[..., 1:, :] - u[..., :-1, :]  # (.., H - 1, W)
    out[..., :, :-1] += dx
    out[..., :, 1:] -= dx
    out[..., :-1, :] += dy
    out[..., 1:, :] -= dy
    return out


def _biharmonic_refine(u: torch.Tensor, hole: torch.Tensor, steps: int) -> torch.Tensor:
    """Conjugate gradients on ``min_u sum (L u)^2`` over the hole pixels of ``u`` (known pixels fixed),
    started from ``u``; per sample and channel (the sums run over H, W only)."""
    A = lambda v: hole * _laplacian(_laplacian(v))  # noqa: E731 — the normal operator on hole pixels
    r = -A(u)  # residual (minus the gradient) at the start
    p = r
    rr = (r * r).sum((2, 3), keepdim=True)  # (B, C, 1, 1)
    tiny = torch.finfo(u.dtype).tiny
    for _ in range(steps):
        Ap = A(p)
        pAp = (p * Ap).sum((2, 3), keepdim=True)
        alpha = torch.where(pAp > tiny, rr / pAp.clamp_min(tiny), torch.zeros_like(pAp))  # converged: stay
        u = u + alpha * p
        r = r - alpha * Ap
        rr_next = (r * r).sum((2, 3), keepdim=True)
        p = r + rr_next / rr.clamp_min(tiny) * p
        rr = rr_next
    return u
