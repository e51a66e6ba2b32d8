"""The structure image of StructureFlow: Relative Total Variation smoothing (``tsmooth``) in PyTorch.

The official pipeline smooths every ground-truth image offline with Relative Total Variation (Xu, Yan, Xia,
Jia, "Structure Extraction from Texture via Relative Total Variation", SIGGRAPH Asia 2012), the authors'
MATLAB ``tsmooth(I, 0.015, 3, 0.001, 3)``. :func:`rtv_structure` is that algorithm: each iteration computes
the RTV weights in PyTorch and solves the sparse system ``(Id + lambda L_w) S = I`` (``L_w`` the weighted
4-neighbour Laplacian), either exactly with a sparse LU factorisation (``solver="direct"``, SciPy, on the
CPU; SciPy comes with scikit-image) or with Jacobi-preconditioned conjugate gradients, matrix-free, batched,
on the tensor's device (``solver="cg"``; hundreds of iterations, so fast on a GPU only). ``"auto"`` picks
direct on CPU. The official script solves with ``pcg`` at a loose relative residual of 0.1 when MATLAB has
``ichol`` and exactly (``A \\ b``) otherwise; we compute the exact solution (or to ``tol``), so structure
images may differ slightly from files made with the ``pcg`` branch. With a ``mask`` it is the authors'
mask-aware variant (gradients inside the hole ignored), recommended for real images where the ground truth
is unknown.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kdinpaint.masking import check_mask

__all__ = ["rtv_structure"]


def _forward_diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x[i+1] - x[i]`` along ``dim`` (-1: x, -2: y), 0 at the last index (MATLAB ``diff`` + ``padarray post``)."""
    d = torch.diff(x, dim=dim)
    pad = (0, 1) if dim == -1 else (0, 0, 0, 1)
    return F.pad(d, pad)


def _gaussian_blur_zero(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with zero padding, MATLAB ``conv2(conv2(im, g, 'same'), g', 'same')`` with
    ``g = fspecial('gaussian', [1, bitor(round(5 sigma), 1)], sigma)``. ``(B, C, H, W) -> (B, C, H, W)``."""
    size = int(math.floor(5 * sigma + 0.5)) | 1  # MATLAB round: half away from zero
    half = (size - 1) / 2
    t = torch.arange(size, dtype=x.dtype, device=x.device) - half
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    g = torch.where(g < torch.finfo(torch.float64).eps * g.max(), torch.zeros_like(g), g)
    g = g / g.sum()
    r = size // 2
    H, W = x.shape[-2:]
    # a sum of shifted copies: float64 depthwise conv2d is a slow path on CPU
    xp = F.pad(x, (r, r))
    x = sum(g[k] * xp[..., k : k + W] for k in range(size))
    xp = F.pad(x, (0, 0, r, r))
    return sum(g[k] * xp[..., k : k + H, :] for k in range(size))


def _rtv_weights(x: torch.Tensor, mask: torch.Tensor | None, sigma: float, sharpness: float):
    """The RTV smoothness weights ``(wx, wy)``, each ``(B, 1, H, W)``, for the edge to the right / below."""
    C = x.shape[1]
    fx, fy = _forward_diff(x, -1), _forward_diff(x, -2)
    if mask is not None:  # the authors' mask-aware variant: no gradient evidence inside the hole
        keep = (mask <= 0).to(x.dtype)
        fx, fy = fx * keep, fy * keep
    wto = 1 / (torch.sqrt(fx * fx + fy * fy).sum(1, keepdim=True) / C).clamp_min(sharpness)
    blurred = _gaussian_blur_zero(x, sigma)
    gfx, gfy = _forward_diff(blurred, -1), _forward_diff(blurred, -2)
    wx = wto / (gfx.abs().sum(1, keepdim=True) / C).clamp_min(1e-3)
    wy = wto / (gfy.abs().sum(1, keepdim=True) / C).clamp_min(1e-3)
    wx[..., -1] = 0
    wy[..., -1, :] = 0
    return wx, wy


def _laplacian_system(wx: torch.Tensor, wy: torch.Tensor, lam: float):
    """``x -> (Id + lam L) x`` for the weighted 4-neighbour graph Laplacian ``L`` and its diagonal."""
    ex, ey = lam * wx[..., :-1], lam * wy[..., :-1, :]  # coupling to the right / lower neighbour

    def apply(x: torch.Tensor) -> torch.Tensor:
        fx = ex * (x[..., 1:] - x[..., :-1])  # flux across each vertical edge
        fy = ey * (x[..., 1:, :] - x[..., :-1, :])
        out = x.clone()
        out[..., :-1] -= fx
        out[..., 1:] += fx
        out[..., :-1, :] -= fy
        out[..., 1:, :] += fy
        return out

    diag = torch.ones_like(wx)
    diag[..., :-1] += ex
    diag[..., 1:] += ex
    diag[..., :-1, :] += ey
    diag[..., 1:, :] += ey
    return apply, diag


def _pcg(apply, diag: torch.Tensor, b: torch.Tensor, x0: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Jacobi-preconditioned conjugate gradients for every (B, C) image system at once."""
    dims = (-2, -1)
    x = x0.clone()
    r = b - apply(x)
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(dims, keepdim=True)
    bnorm = b.square().sum(dims, keepdim=True).sqrt().clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((r.square().sum(dims, keepdim=True).sqrt() <= tol * bnorm).all()):
            break
        Ap = apply(p)
        alpha = rz / (p * Ap).sum(dims, keepdim=True).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * Ap
        z = r / diag
        rz_new = (r * z).sum(dims, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return x


def _direct_solve(wx: torch.Tensor, wy: torch.Tensor, lam: float, rhs: torch.Tensor) -> torch.Tensor:
    """Exact solve of ``(Id + lam L) x = rhs`` per image with SciPy's sparse LU; float64 CPU tensors."""
    import scipy.sparse as sp  # lazy: only this solver needs SciPy
    import scipy.sparse.linalg as spl

    B, C, H, W = rhs.shape
    N = H * W
    out = torch.empty_like(rhs)
    for b in range(B):  # one factorisation per image, shared by its channels
        ex = (lam * wx[b, 0]).reshape(-1).numpy()  # edge k -- k+1 (0 in the last column)
        ey = (lam * wy[b, 0]).reshape(-1).numpy()  # edge k -- k+W (0 in the last row)
        diag = 1 + ex + ey
        diag[1:] += ex[:-1]
        diag[W:] += ey[:-W]
        A = sp.diags([diag, -ex[:-1], -ex[:-1], -ey[:-W], -ey[:-W]], [0, 1, -1, W, -W], shape=(N, N), format="csc")
        solve = spl.factorized(A)
        for c in range(C):
            out[b, c] = torch.from_numpy(solve(rhs[b, c].reshape(-1).numpy())).view(H, W)
    return out


def rtv_structure(
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    lam: float = 0.015,
    sigma: float = 3.0,
    sharpness: float = 0.001,
    iterations: int = 3,
    solver: Literal["auto", "direct", "cg"] = "auto",
    tol: float = 1e-6,
    max_cg_iter: int = 3000,
) -> torch.Tensor:
    """The structure image of StructureFlow: RTV smoothing (``tsmooth``) of ``image``.

    Args:
        image: ``(B, 3, H, W)`` (any channel count works) in [-1, 1].
        mask: optional ``(B, 1, H, W)``, 1 = hole: the mask-aware variant (gradients in the hole ignored).
        lam, sigma, sharpness, iterations: RTV parameters; defaults are the official
            ``tsmooth(I, 0.015, 3, 0.001, 3)`` (the texture scale ``sigma`` halves each iteration, >= 0.5).
        solver: ``"direct"`` (exact, SciPy, CPU), ``"cg"`` (batched on the tensor's device) or ``"auto"``
            (direct for CPU tensors, cg otherwise).
        tol, max_cg_iter: relative residual and iteration cap of each conjugate-gradient solve.

    Returns:
        ``(B, C, H, W)`` in [-1, 1] (clipped, as the official 8-bit files are), image dtype. Computed in
        float64; not differentiable (call it under ``no_grad`` or on data).
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.dim() != 4:
        raise ValueError("image must be a float tensor (B, C, H, W) in [-1, 1]")
    if image.shape[-1] < 2 or image.shape[-2] < 2:
        raise ValueError(f"rtv_structure needs at least 2x2 pixels, got {tuple(image.shape[-2:])}")
    if mask is not None:
        check_mask(mask, image)
    if solver not in ("auto", "direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    direct = solver == "direct" or (solver == "auto" and image.device.type == "cpu")
    if not (lam > 0 and sigma > 0 and sharpness > 0 and iterations >= 1):
        raise ValueError("rtv_structure needs lam, sigma, sharpness > 0 and iterations >= 1")
    with torch.no_grad():
        device = torch.device("cpu") if direct else image.device
        rhs = (image.to(device, torch.float64) + 1) / 2  # tsmooth works on [0, 1] intensities
        m = None if mask is None else mask.to(device, torch.float64)
        x, s = rhs, float(sigma)
        for _ in range(iterations):
            wx, wy = _rtv_weights(x, m, s, sharpness)
            if direct:  # tsmooth halves lambda once at the start
                x = _direct_solve(wx, wy, lam / 2, rhs)
            else:
                apply, diag = _laplacian_system(wx, wy, lam / 2)
                x = _pcg(apply, diag, rhs, x, tol, max_cg_iter)
            s = max(s / 2, 0.5)
        return (x.clamp(0, 1) * 2 - 1).to(image.device, image.dtype)
