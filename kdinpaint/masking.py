"""The one mask convention of kdinpaint, stated once.

* images are float tensors in ``[-1, 1]``, shape ``(B, 3, H, W)``;
* the mask ``M`` is a float tensor ``(B, 1, H, W)`` with ``1 = hole`` (missing) and ``0 = known``,
  exactly the paper's ``M``;
* at a feature level of lower resolution the mask is the max-pool of ``M``: a feature pixel is a hole
  if any input pixel under it is (:func:`mask_at`).

Adapters convert to and from their network's own convention at their boundary; everything inside the
toolkit speaks this one.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "check_mask",
    "check_rgb_image",
    "masked",
    "composite",
    "masked_mean",
    "mask_at",
    "hole_ratio",
    "at_least_fp32",
    "check_image_range",
    "check_finite",
    "warn_if_inverted",
]


def check_mask(mask: torch.Tensor, image: torch.Tensor | None = None, *, name: str = "mask") -> torch.Tensor:
    """Validate a mask against the convention and return it unchanged.

    Raises ``ValueError`` naming the problem and the fix for: a wrong rank or channel count, a spatial size
    other than the image's, a batch size other than the image's, and values other than {0, 1} (a 0/255
    mask or a soft mask is refused, not silently thresholded, so that nothing is lost).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 1, H, W), got {type(mask).__name__}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (B, 1, H, W) with 1 = hole, got {tuple(mask.shape)}; "
            "add the channel axis with mask[:, None] or keep one channel with mask[:, :1]"
        )
    if image is not None:
        if image.dim() != 4:
            raise ValueError(
                f"{name} is checked against an image of shape {tuple(image.shape)}, but images are (B, C, H, W); "
                "add the batch axis with image[None]"
            )
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"{name} is {tuple(mask.shape[-2:])} (H, W) but the image is {tuple(image.shape[-2:])}; "
                "resize the mask with nearest-neighbour interpolation to the image size "
                "(torch.nn.functional.interpolate(mask, size=image.shape[-2:], mode='nearest'))"
            )
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"{name} has batch size {mask.shape[0]} but the image has {image.shape[0]}")
    if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        check_finite(mask, name=name, fix="mark each pixel 0 (known) or 1 (hole); a NaN cannot be thresholded")
        hi = float(mask.max())
        hint = (
            "it looks like a 0/255 mask: divide it by 255" if hi > 1 else "threshold it, e.g. (mask > 0.5).float()"
        )
        raise ValueError(f"{name} must contain only 0 (known) and 1 (hole); found other values (max {hi:g}): {hint}")
    return mask


def check_rgb_image(image: object, network: str = "the network", *, name: str = "image") -> None:
    """Refuse anything but a non-empty float ``(B, 3, H, W)`` tensor (values are not read), naming ``network`` and the fix."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor (B, 3, H, W) in [-1, 1], got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(
            f"{name} must be a float tensor (B, 3, H, W) in [-1, 1], got {image.dtype}; "
            "map uint8 images with x.float() / 127.5 - 1"
        )
    if image.dim() == 3:
        raise ValueError(
            f"{network} expects a batch of images (B, 3, H, W), got one image {tuple(image.shape)}; "
            "add the batch axis with image[None]"
        )
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(
            f"{network} expects RGB images (B, 3, H, W), got {tuple(image.shape)}; "
            "repeat a gray channel with image.expand(-1, 3, -1, -1) or drop alpha with image[:, :3]"
        )
    if image.numel() == 0:
        raise ValueError(
            f"{name} is empty, shape {tuple(image.shape)}: {network} needs at least one image of at least 1x1 "
            "pixel; check the batch before calling (an empty folder or a filter that kept nothing)"
        )


def check_image_range(image: torch.Tensor, *, name: str = "image", tol: float = 1e-3) -> None:
    """Refuse NaN/inf values and values outside ``[-1 - tol, 1 + tol]`` (a [0, 1] or [0, 255] image), naming the fix.

    Non-finite values are found by the same read-back as the range (``min``/``max`` propagate NaN), so the
    check costs nothing more. An empty tensor has no values to refuse (its shape is :func:`check_rgb_image`'s
    business). Skipped while ``torch.compile`` traces (the check reads values back to the host).
    """
    if torch.compiler.is_compiling() or image.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(image.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(
            image, name=name,
            fix="replace them (torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=-1.0)) or fix what produced "
                "the image (a division by zero in normalisation, a corrupt file)",
        )
    if lo < -1.0 - tol or hi > 1.0 + tol:
        raise ValueError(
            f"{name} values must lie in [-1, 1], found [{lo:g}, {hi:g}]; "
            "map [0, 1] images with x * 2 - 1 and uint8 images with x / 127.5 - 1"
        )
    if lo >= 0.0 and hi <= 1.0 and hi - lo > 0.25:  # a [0, 1] image passes the range check
        warnings.warn(
            f"{name} values lie inside [0, 1]: torchvision's ToTensor() convention? kdinpaint "
            "expects [-1, 1] (x * 2 - 1); a [0, 1] image is inpainted and scored on the wrong scale. (A genuinely "
            "bright [-1, 1] image gives this warning too: then ignore it.)", UserWarning, stacklevel=3)


def check_finite(x: torch.Tensor, *, name: str, fix: str) -> None:
    """Refuse a tensor with NaN or inf values: ``ValueError`` naming ``name``, how many, where the first is, and ``fix``.

    Skipped while ``torch.compile`` traces (the check reads values back to the host).
    """
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        count, nan = int(bad.sum()), int(torch.isnan(x.detach()).sum())
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} has {count} non-finite value(s) ({nan} NaN, {count - nan} inf; the first at index {first}): {fix}"
        )


def warn_if_inverted(mask: torch.Tensor, limit: float = 0.6, stacklevel: int = 3, fix: str = "pass 1 - mask") -> None:
    """Warn when a sample is more than ``limit`` hole: the usual sign of a mask with 1 = known. ``fix`` says what
    to do then (the command line names its ``--mask-hole`` option)."""
    if torch.compiler.is_compiling():
        return
    ratio = hole_ratio(mask)
    if bool((ratio > limit).any()):
        warnings.warn(
            f"a mask is {float(ratio.max()):.0%} hole; kdinpaint masks use 1 = hole. If yours uses 1 = known, "
            f"{fix}",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def masked(image: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The network input: known pixels kept, holes set to ``fill``. ``image * (1 - M) + fill * M``."""
    return image * (1 - mask) + fill * mask


def composite(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prediction in the hole, ground truth outside: ``pred * M + image * (1 - M)``."""
    return pred * mask + image * (1 - mask)


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(values * weight) / sum(weight)`` with ``weight`` broadcast to ``values``.

    The denominator counts the broadcast weight (so a ``(B, 1, H, W)`` mask over ``(B, C, H, W)`` values
    counts ``C`` elements per hole pixel). Exactly 0, never NaN, when the weight is all zero.
    """
    weight = weight.expand_as(values)
    total = weight.sum()
    # With no weight the numerator is an exact 0, so dividing by a tiny positive number keeps it 0.
    return (values * weight).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def mask_at(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The mask at a feature resolution: max-pool, so a feature pixel is a hole if any pixel under it is.

    ``mask``: ``(B, 1, H, W)``; ``size``: the feature's ``(h, w)``, each at least 1. Returns ``(B, 1, h, w)``.
    Cell ``i`` of an axis covers input pixels ``floor(i H / h)`` to ``ceil((i + 1) H / h) - 1`` (adaptive
    max-pooling, which also upsamples), so the cells cover every input pixel and a hole is never lost,
    whichever way each side changes.
    """
    size = tuple(size)
    if len(size) != 2 or size[0] < 1 or size[1] < 1:
        raise ValueError(f"mask_at needs a feature size (h, w) of at least 1x1, got {size}")
    H, W = mask.shape[-2:]
    if H < 1 or W < 1:
        raise ValueError(f"mask_at got an empty mask of shape {tuple(mask.shape)}; a mask needs at least 1x1 pixel")
    if (H, W) == size:
        return mask
    if H % size[0] == 0 and W % size[1] == 0:
        return F.max_pool2d(mask, kernel_size=(H // size[0], W // size[1]))  # the same cells, the fast kernel
    return F.adaptive_max_pool2d(mask, size)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a lower-precision float (fp16/bf16 under autocast); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def hole_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of hole pixels per sample, ``(B,)`` (float32 for a bool or integer mask)."""
    return (mask if mask.is_floating_point() else mask.float()).flatten(1).mean(1)
