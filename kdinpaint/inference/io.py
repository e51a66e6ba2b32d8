"""Image and mask files for inference: read as tensors in the toolkit's conventions, written as 8-bit images.

Mask files (:func:`load_mask`): luminance, white = hole by default; thresholded at half the range of the
stored values (0/255 and 0/1 label PNGs alike; anti-aliased edges and grey JPEG artefacts go to the nearer side),
but a soft mask (more than 5 % of its pixels grey, :func:`~kdinpaint.data.masks.binarize`) is refused; then
resized with nearest-neighbour sampling to the image size. A mask of the image's aspect ratio at another
resolution is resized; one of another aspect ratio (beyond 1 % and a pixel's rounding) is refused, since
stretching it would move every hole: it is the mask of another image. Images and masks are turned upright by
their EXIF orientation (:func:`~kdinpaint.data.images.upright`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdinpaint.data.images import read_image, to_tensor
from kdinpaint.data.masks import _read_luminance, _resize_nearest, binarize

__all__ = ["load_image", "load_mask", "check_aspect", "save_image", "mask_to_rgb"]


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as ``(1, 3, H, W)`` float32 in [-1, 1] (grey replicated, alpha dropped, 16-bit scaled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        return to_tensor(read_image(path))[None]
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {str(path)!r} ({type(e).__name__}: {e})") from None


ASPECT_TOLERANCE = 0.01
"""How far (relative) a mask's aspect ratio may differ from its image's and still be resized to it, beyond the
rounding of one pixel: :func:`load_mask`."""


def check_aspect(mask_hw: tuple[int, int], image_hw: tuple[int, int], *, tolerance: float = ASPECT_TOLERANCE,
                 mask_name: str = "the mask", image_name: str = "the image") -> None:
    """Refuse, with ``ValueError`` naming both sizes, a mask of ``mask_hw = (H, W)`` whose aspect ratio differs from
    the image's by more than ``tolerance`` (relative) plus half a pixel of rounding on each side of either."""
    (mh, mw), (ih, iw) = mask_hw, image_hw
    ratio = (mw / mh) / (iw / ih)
    slack = tolerance + 0.5 * (1 / mh + 1 / mw + 1 / ih + 1 / iw)
    if abs(ratio - 1) > slack:
        raise ValueError(
            f"{mask_name} is {mw}x{mh} (aspect {mw / mh:.3f}) but {image_name} is {iw}x{ih} (aspect {iw / ih:.3f}): "
            "stretching it would move every hole, so it is probably the mask of another image. Use the mask made "
            "for this image (one of the same aspect ratio at another resolution is resized)"
        )


def load_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None,
              hole: Literal["white", "black"] = "white", *, aspect_tolerance: float | None = ASPECT_TOLERANCE,
              image_name: str = "the image") -> torch.Tensor:
    """A mask file as ``(1, 1, H, W)`` float32 in {0, 1}, 1 = hole, resized to ``size = (H, W)`` (nearest).

    The file's luminance is thresholded at half its range: ``> 0.5`` of full scale for ordinary masks;
    a file whose values are all 0 or 1 (a label PNG) is read as those labels. ``hole="black"`` inverts.
    Refused with ``ValueError``: a soft mask (:func:`~kdinpaint.data.masks.binarize`), and with ``size`` a mask
    of another aspect ratio (:func:`check_aspect`; ``aspect_tolerance=None`` stretches any mask to ``size``).
    ``image_name`` names the image in that message.
    """
    if hole not in ("white", "black"):
        raise ValueError(f"hole must be 'white' or 'black', got {hole!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask {str(path)!r} does not exist")
    try:
        arr, full = _read_luminance(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read mask {str(path)!r} ({type(e).__name__}: {e})") from None
    if full > 1 and arr.max() <= 1:  # a 0/1 label image
        full = 1.0
    if size is not None and aspect_tolerance is not None:
        check_aspect(arr.shape, tuple(size), tolerance=aspect_tolerance, mask_name=f"mask {str(path)!r}",
                     image_name=image_name)
    white = binarize(arr, full, name=f"mask {str(path)!r}")
    hole_map = _resize_nearest(white if hole == "white" else ~white, size)
    return torch.from_numpy(hole_map.astype(np.float32))[None, None]


def save_image(path: str | os.PathLike[str], image: torch.Tensor) -> None:
    """Write ``(3, H, W)`` or ``(1, 3, H, W)`` in [-1, 1] as an 8-bit file (format from the suffix), rounded."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"save_image writes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image takes (3, H, W) in [-1, 1], got {tuple(image.shape)}")
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(arr).save(path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot write {str(path)!r} ({e}); use a .png or .jpg file name") from None


def mask_to_rgb(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` mask → ``(B, 3, H, W)`` image in [-1, 1], white = hole (for side-by-side views)."""
    return (mask * 2 - 1).expand(-1, 3, -1, -1)
