"""Weight-free inpainting baselines: a floor for every table that needs no training.

Each baseline has the signature of a model in toolkit conventions::

    inpaint(image: (B, 3, H, W) in [-1, 1], mask: (B, 1, H, W), 1 = hole) -> (B, 3, H, W) in [-1, 1]

The known pixels of the output equal the input's exactly (the result is composited), so they can
stand in wherever a model is called with ``(image, mask)``: evaluation, the inpaint CLI.

* ``biharmonic``: ``skimage.restoration.inpaint_biharmonic`` (smooth fill solving the biharmonic
  equation per connected hole region; channels independently). Slow on large holes: seconds per
  256² image.
* ``telea`` and ``ns``: OpenCV's ``cv2.inpaint`` with ``INPAINT_TELEA`` (fast marching, Telea 2004)
  or ``INPAINT_NS`` (Navier-Stokes, Bertalmio et al. 2001) on the 8-bit image, radius 3 by default.
  They need the optional extra ``pip install "kdinpaint[cv]"`` (opencv-python-headless).
* ``mean``: every hole pixel gets the per-channel mean of the known pixels (a trivial floor).
* ``pyramid``: :func:`kdinpaint.ops.fill.harmonic_fill` (coarse-to-fine harmonic fill refined towards the
  biharmonic interpolant, in torch, linear in the pixels): the starting point of ``ReferenceNet(prefill=True)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from skimage.restoration import inpaint_biharmonic

from kdinpaint.masking import check_mask, composite
from kdinpaint.ops.fill import PREFILL_BIHARMONIC, PREFILL_SWEEPS, harmonic_fill

__all__ = [
    "BASELINES", "BYTES_PER_PIXEL", "NEEDS_OPENCV", "get_baseline", "baseline_unavailable", "biharmonic",
    "opencv_inpaint", "telea", "navier_stokes", "mean_fill", "pyramid_fill",
]

Inpainter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be a (B, 3, H, W) tensor in [-1, 1], got {getattr(image, 'shape', type(image))}")
    check_mask(mask, image)
    if mask.shape[0] != image.shape[0]:
        mask = mask.expand(image.shape[0], -1, -1, -1)
    full = (mask.flatten(1).min(1).values == 1).nonzero().flatten().tolist()
    if full:
        raise ValueError(
            f"mask of image(s) {full[:5]} is all hole: there is nothing to fill from; "
            "check the mask polarity (1 = hole)"
        )
    return mask


def _to_numpy(image: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    img = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    hole = mask.detach().cpu()[:, 0].numpy() > 0.5  # (B, H, W)
    return img, hole


def _from_numpy(out: np.ndarray, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pred = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).permute(0, 3, 1, 2)
    pred = (pred.clamp(0, 1) * 2 - 1).to(device=image.device, dtype=image.dtype)
    return composite(pred, image, mask.to(image.dtype))


def biharmonic(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biharmonic inpainting (``skimage.restoration.inpaint_biharmonic``); shapes in the module docstring.

    Solved in float64: scikit-image solves in the image's precision, and the system is ill-conditioned enough
    that float32 moves the fill of a 128×128 hole by up to 0.047 (on [0, 1]; 2e-4 for a 32×32 hole)."""
    mask = _check(image, mask)
    img, hole = _to_numpy(image, mask)
    out = np.stack(
        [inpaint_biharmonic(i.astype(np.float64), h, channel_axis=-1) if h.any() else i for i, h in zip(img, hole)]
    )
    return _from_numpy(out, image, mask)


def opencv_inpaint(image: torch.Tensor, mask: torch.Tensor, method: str = "telea", radius: float = 3.0) -> torch.Tensor:
    """OpenCV inpainting, ``method`` ``"telea"`` or ``"ns"``, on the image rounded to 8 bits."""
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "the telea/ns baselines need OpenCV: pip install 'kdinpaint[cv]' (opencv-python-headless)"
        ) from exc
    flags = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
    if method not in flags:
        raise ValueError(f"method must be 'telea' or 'ns', got {method!r}")
    mask = _check(image, mask)
    img, hole = _to_numpy(image, mask)
    outs = []
    for i, h in zip(img, hole):
        u8 = np.round(i * 255).astype(np.uint8)
        outs.append(cv2.inpaint(u8, h.astype(np.uint8) * 255, radius, flags[method]).astype(np.float32) / 255)
    return _from_numpy(np.stack(outs), image, mask)


def telea(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenCV fast-marching inpainting (Telea 2004), radius 3."""
    return opencv_inpaint(image, mask, "telea")


def navier_stokes(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenCV Navier-Stokes inpainting (Bertalmio et al. 2001), radius 3."""
    return opencv_inpaint(image, mask, "ns")


def mean_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hole pixels set to the per-image, per-channel mean of the known pixels."""
    mask = _check(image, mask).to(image.dtype)
    known = 1 - mask
    mean = (image * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True)  # (B, 3, 1, 1)
    return composite(mean.expand_as(image), image, mask)


def pyramid_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`kdinpaint.ops.fill.harmonic_fill` with the settings ``ReferenceNet(prefill=True)`` starts from
    (64 Jacobi sweeps and 100 biharmonic conjugate-gradient steps per level): what such a network adds to its
    own starting point is its score minus this one."""
    mask = _check(image, mask).to(image.dtype)
    return composite(harmonic_fill(image, mask, PREFILL_SWEEPS, PREFILL_BIHARMONIC).clamp(-1, 1), image, mask)


BASELINES: dict[str, Inpainter] = {
    "biharmonic": biharmonic,
    "pyramid": pyramid_fill,
    "telea": telea,
    "ns": navier_stokes,
    "mean": mean_fill,
}


def get_baseline(name: str) -> Inpainter:
    """The baseline called ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    return BASELINES[name]


BYTES_PER_PIXEL: dict[str, int] = {"biharmonic": 1024, "pyramid": 512, "telea": 160, "ns": 160, "mean": 128}
"""About how much memory each baseline needs per pixel of each image of a batch, run through an
:class:`~kdinpaint.inference.Inpainter` on the CPU (its copies included), rounded up: measured as the rise of the
peak resident memory at 128², 256² and 512² with 10-50 % free-form holes (mean 61-97, pyramid 220-480, biharmonic
250-930 bytes, growing with the hole and the size: its sparse systems); telea and ns from their array copies. A
floor under which ``kdinpaint evaluate`` refuses a size before building any image, not a promise that a size fits."""


NEEDS_OPENCV: frozenset[str] = frozenset({"telea", "ns"})
"""The baselines that run only with the optional extra ``kdinpaint[cv]`` (OpenCV)."""


def baseline_unavailable(name: str) -> str | None:
    """Why the baseline ``name`` cannot run here (a missing optional package), or ``None`` when it can.

    Unknown names raise ``ValueError`` as :func:`get_baseline` does. OpenCV is imported to check it: an
    installed but broken one (a missing system library) counts as missing.
    """
    get_baseline(name)
    if name in NEEDS_OPENCV:
        try:
            import cv2  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as exc:
            return f"needs OpenCV ({exc}): pip install 'kdinpaint[cv]'"
    return None
