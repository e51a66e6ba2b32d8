"""Padding an image to a network's stride and cropping the result back: the one place kdinpaint pads.

Two layouts, each with its inverse:

* centred, :func:`pad_to_multiple` / :func:`unpad`: what :class:`kdinpaint.inference.Inpainter` does once
  before any model runs. The border is split evenly (the odd pixel goes bottom/right) and image and mask
  are both mirrored. The mask is mirrored rather than padded as known: a mirrored hole stays a hole, so the
  padding never shows the network content that the mask hides. The padded area never counts as hole
  anywhere else: it is cropped away before compositing and before any metric (hole ratios are those of
  the unpadded mask).
* bottom/right, :func:`pad_bottom_right` / :func:`crop_top_left`: what adapters whose networks need a size
  multiple do inside their own forward (DeepFill v2: 8, EdgeConnect: 4, StructureFlow: 16 and at least
  48), so that the top-left pixel of input and output stay where the official code has them.

Mirroring is ``reflect`` (the edge pixel not repeated), or ``replicate`` when a pad is as wide as the side
it extends (too small an image to mirror). Nothing is copied when no padding is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Crop", "pad_to_multiple", "unpad", "pad_bottom_right", "crop_top_left"]

Crop = tuple[int, int, int, int]
"""``(top, left, height, width)`` of the original image inside a padded one."""


def _mirror(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pad)`` with ``pad = (left, right, top, bottom)``, reflected, or replicated where too small."""
    left, right, top, bottom = pad
    H, W = x.shape[-2:]
    mode = "reflect" if max(top, bottom) < H and max(left, right) < W else "replicate"
    return F.pad(x, pad, mode=mode)


def pad_to_multiple(image: torch.Tensor, mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, Crop]:
    """Pad ``image`` ``(B, C, H, W)`` and ``mask`` ``(B or 1, 1, H, W)`` so H and W are multiples of ``multiple``.

    Both are mirrored around the centre (see the module docstring for why the mask is mirrored too); returns
    the padded image ``(B, C, H', W')``, mask ``(., 1, H', W')`` with ``H' = ceil(H / multiple) * multiple``
    and the :data:`Crop` that :func:`unpad` takes. Nothing is copied when no padding is needed.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"image is {tuple(image.shape[-2:])} but mask is {tuple(mask.shape[-2:])} (H, W)")
    H, W = image.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    top, left = ph // 2, pw // 2
    crop = (top, left, H, W)
    if ph == 0 and pw == 0:
        return image, mask, crop
    pad = (left, pw - left, top, ph - top)  # F.pad order: (left, right, top, bottom)
    return _mirror(image, pad), _mirror(mask, pad), crop


def unpad(x: torch.Tensor, crop: Crop) -> torch.Tensor:
    """The original ``(…, H, W)`` window of a tensor padded by :func:`pad_to_multiple`."""
    top, left, H, W = crop
    return x[..., top : top + H, left : left + W]


def pad_bottom_right(x: torch.Tensor, multiple: int, min_size: int = 0, *, value: float | None = None) -> torch.Tensor:
    """Pad ``(..., H, W)`` at the bottom/right to a multiple of ``multiple`` and at least ``min_size``.

    ``value=None`` mirrors (reflect; replicate where the map is too small to reflect); a number pads with
    that constant instead (e.g. ``0.0`` for a mask whose padding is known context). Undo with
    :func:`crop_top_left`.
    """
    H, W = x.shape[-2:]
    th = max(math.ceil(H / multiple), math.ceil(min_size / multiple)) * multiple
    tw = max(math.ceil(W / multiple), math.ceil(min_size / multiple)) * multiple
    ph, pw = th - H, tw - W
    if ph == 0 and pw == 0:
        return x
    if value is not None:
        return F.pad(x, (0, pw, 0, ph), value=value)
    return _mirror(x, (0, pw, 0, ph))


def crop_top_left(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Undo :func:`pad_bottom_right`: the top-left ``size = (H, W)`` of ``(..., H', W')``."""
    return x[..., : size[0], : size[1]]
