"""Reconstruction losses: GMCNN's spatially-varying (confidence-driven) L1 and plain masked L1.

``R_recon`` of the paper's Eq. (11) is the spatially-varying reconstruction loss of GMCNN (Wang et al.,
"Image Inpainting via Generative Multi-column Convolutional Neural Networks", NeurIPS 2018). Its weight
map gives hole pixels near known pixels more weight than pixels deep inside a large hole.

Numbers checked against the official code, ``shepnerd/inpainting_gmcnn`` @ 08eb38f (2022-03-01):

* ``pytorch/model/layer.py`` ``ConfidenceDrivenMaskLayer(size=65, sigma=1.0/40, iters=7)`` with a
  ``GaussianBlurLayer(size, sigma, pad=32)`` using reflection padding: 65×65 kernel, 7 passes, known
  pixels reset to 1 after each pass, the result multiplied by the hole mask;
* ``pytorch/util/utils.py`` ``gauss_kernel``: 1-D weights are differences of the standard-normal CDF at
  ``size + 1`` points spaced evenly over ``±(sigma + (2 sigma + 1) / size / 2)``, the 2-D kernel is the
  element-wise square root of their outer product, normalised to sum 1. With ``sigma = 1/40`` the span is
  only ±0.033 standard deviations, so the kernel is a box filter to 5e-4 (max/min = 1.0005);
* ``pytorch/model/net.py``: ``L1Loss(completed * W, gt * W) / mean(M)`` with ``lambda_rec = 1.4`` and a
  known-region term ``L1(pred * (1-M), gt * (1-M)) / mean(1-M)`` with ``lambda_ae = 1.2``
  (``pytorch/options/train_options.py``);
* ``tensorflow/net/ops.py`` ``priority_loss_mask(mask, hsize=64, sigma=1/40, iters=7)``: the TF variant
  uses a 64×64 kernel and zero ``SAME`` padding.

All functions follow :mod:`kdinpaint.masking` (images ``(B, C, H, W)``, mask ``(B, 1, H, W)``, 1 = hole).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kdinpaint.masking import check_mask, masked_mean

__all__ = [
    "GMCNN_KERNEL_SIZE",
    "GMCNN_SIGMA",
    "GMCNN_ITERATIONS",
    "GMCNN_LAMBDA_REC",
    "GMCNN_LAMBDA_AE",
    "gmcnn_kernel1d",
    "confidence_weight",
    "spatially_varying_l1",
    "masked_l1",
    "check_pair",
]

GMCNN_KERNEL_SIZE = 65
"""Side of the propagation kernel (PyTorch release; the TF release uses 64)."""
GMCNN_SIGMA = 1.0 / 40
"""The nominal "sigma" of GMCNN's kernel builder (in units of the kernel's half-span, not pixels)."""
GMCNN_ITERATIONS = 7
"""Number of blur-and-reset passes."""
GMCNN_LAMBDA_REC = 1.4
"""GMCNN's weight for the confidence-driven hole term (the paper's Eq. (11) uses lambda_r = 1 instead)."""
GMCNN_LAMBDA_AE = 1.2
"""GMCNN's weight for the known-region L1 term."""

KernelName = Literal["box", "gmcnn"]
PaddingName = Literal["reflect", "zeros"]


def gmcnn_kernel1d(size: int = GMCNN_KERNEL_SIZE, sigma: float = GMCNN_SIGMA) -> torch.Tensor:
    """The 1-D factor of GMCNN's "Gaussian" kernel, float64 ``(size,)``, summing to 1.

    GMCNN builds its 2-D kernel as ``sqrt(outer(d, d))`` normalised, where ``d`` are differences of the
    standard-normal CDF over ``size + 1`` evenly spaced points on ``±(sigma + delta / 2)`` with
    ``delta = (2 sigma + 1) / size``. Since ``sqrt(outer(d, d)) = outer(sqrt d, sqrt d)``, the kernel is
    separable with factor ``sqrt(d) / sum(sqrt(d))``, which this returns.
    """
    if size < 1:
        raise ValueError(f"kernel size must be a positive integer, got {size}")
    delta = (2 * sigma + 1.0) / size
    x = torch.linspace(-sigma - delta / 2, sigma + delta / 2, size + 1, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    factor = torch.diff(cdf).clamp_min(0).sqrt()
    return factor / factor.sum()


def _blur(x: torch.Tensor, k1d: torch.Tensor, padding: PaddingName) -> torch.Tensor:
    """Separable same-size blur of ``(B, 1, H, W)`` by the outer product of ``k1d`` with itself."""
    size = k1d.numel()
    lo, hi = (size - 1) // 2, size // 2  # an even kernel pads one more on the right/bottom, like TF "SAME"
    mode = "reflect" if padding == "reflect" else "constant"
    kh = k1d.view(1, 1, size, 1)
    kw = k1d.view(1, 1, 1, size)
    x = F.conv2d(F.pad(x, (0, 0, lo, hi), mode=mode), kh)
    return F.conv2d(F.pad(x, (lo, hi, 0, 0), mode=mode), kw)


def confidence_weight(
    mask: torch.Tensor,
    *,
    kernel_size: int = GMCNN_KERNEL_SIZE,
    iterations: int = GMCNN_ITERATIONS,
    kernel: KernelName = "gmcnn",
    sigma: float = GMCNN_SIGMA,
    padding: PaddingName = "reflect",
) -> torch.Tensor:
    """GMCNN's confidence map ``W`` for the hole pixels of ``mask``.

    ``C_0 = 1 - M``; for ``i = 1..n``: ``W_i = (K * C_{i-1}) ⊙ M``, ``C_i = W_i + (1 - M)``; returns ``W_n``.

    ``mask``: float ``(B, 1, H, W)`` in {0, 1}, 1 = hole. Returns ``(B, 1, H, W)`` in [0, 1], exactly 0 on
    known pixels, no gradient (a pure function of the mask). ``kernel="gmcnn"`` replicates GMCNN's kernel
    builder, ``"box"`` is a uniform mean filter (GMCNN's kernel differs from it by < 0.06 %). Defaults are
    GMCNN's PyTorch release (65, 7 passes, reflection padding); its TF release is ``kernel_size=64,
    padding="zeros"``. Reflection padding needs ``H, W > kernel_size // 2``.

    A sample whose mask is all hole has no known pixel to draw confidence from (its weight would be 0
    everywhere and the loss silently 0), so it is refused.
    """
    check_mask(mask)
    if kernel not in ("box", "gmcnn"):
        raise ValueError(f"kernel must be 'box' or 'gmcnn', got {kernel!r}")
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    H, W = mask.shape[-2:]
    if padding == "reflect" and min(H, W) <= kernel_size // 2:
        raise ValueError(
            f"reflection padding of {kernel_size // 2} needs an image larger than that, got {H}x{W}; "
            "pass a smaller kernel_size or padding='zeros'"
        )
    full = mask.flatten(1).min(1).values == 1
    if bool(full.any()):
        idx = full.nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"mask of sample(s) {idx} is all hole: nothing is known to propagate confidence from; "
            "check the mask polarity (1 = hole) or drop such samples"
        )
    dtype = mask.dtype if mask.dtype in (torch.float32, torch.float64) else torch.float32
    if kernel == "gmcnn":
        k1d = gmcnn_kernel1d(kernel_size, sigma)
    else:
        k1d = torch.full((kernel_size,), 1.0 / kernel_size, dtype=torch.float64)
    k1d = k1d.to(device=mask.device, dtype=dtype)
    hole = mask.detach().to(dtype)
    known = 1 - hole
    with torch.no_grad():
        conf = known
        weight = torch.zeros_like(hole)
        for _ in range(iterations):
            weight = _blur(conf, k1d, padding) * hole
            conf = weight + known
    return weight


def spatially_varying_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    **weight_kwargs: object,
) -> torch.Tensor:
    """GMCNN's confidence-driven reconstruction loss (``R_recon`` of Eq. (11)).

    ``R_recon = sum(W ⊙ |pred - target|) / (C * sum(M))`` with ``W = confidence_weight(M)``.

    This equals GMCNN's ``mean(|W ⊙ (completed - gt)|) / mean(M)`` (W is 0 outside the hole, so the raw
    prediction and the composite give the same value and gradient). ``pred``, ``target``: ``(B, C, H, W)``,
    any range (toolkit images are in [-1, 1]); ``mask``: ``(B, 1, H, W)``, 1 = hole. ``weight``: a
    precomputed confidence map (to share it between several terms); otherwise it is computed with
    ``weight_kwargs`` passed to :func:`confidence_weight`. Returns a scalar, exactly 0 when no pixel is a
    hole.
    """
    check_pair(pred, target)
    check_mask(mask, pred)
    if not bool(mask.any()):
        return (pred * 0).sum()
    if weight is None:
        weight = confidence_weight(mask, **weight_kwargs)  # type: ignore[arg-type]
    elif weight.shape != mask.shape:
        raise ValueError(f"weight must have the mask's shape {tuple(mask.shape)}, got {tuple(weight.shape)}")
    diff = (pred - target).abs() * weight.to(pred.dtype)
    count = mask.to(pred.dtype).expand_as(pred).sum()
    return diff.sum() / count


def masked_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    region: Literal["hole", "known", "all"] = "hole",
) -> torch.Tensor:
    """Mean absolute error over a region: ``sum(R ⊙ |pred - target|) / (C * sum(R))``.

    ``R`` is ``M`` (``region="hole"``), ``1 - M`` (``"known"``, GMCNN's ``L_ae``) or 1 (``"all"``).
    Shapes as in :func:`spatially_varying_l1`. Exactly 0 when the region is empty.
    """
    check_pair(pred, target)
    check_mask(mask, pred)
    if region == "hole":
        r = mask.to(pred.dtype)
    elif region == "known":
        r = 1 - mask.to(pred.dtype)
    elif region == "all":
        return (pred - target).abs().mean()
    else:
        raise ValueError(f"region must be 'hole', 'known' or 'all', got {region!r}")
    return masked_mean((pred - target).abs(), r)


def check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``pred`` and ``target`` are ``(B, C, H, W)`` images of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(pred.shape)}")
