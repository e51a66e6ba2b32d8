"""EdgeConnect's input conventions, converted at the adapter boundary.

The toolkit speaks :mod:`kdinpaint.masking` (images in ``[-1, 1]``, mask ``1 = hole``). EdgeConnect
(Nazeri et al., ICCV-W 2019, knazeri/edge-connect) speaks:

* images RGB in ``[0, 1]``; holes painted **white** (``x * (1 - m) + m``) in the network input;
* grayscale with the ITU-R 709 luma weights of ``skimage.color.rgb2gray``: ``0.2125 R + 0.7154 G + 0.0721 B``;
* edges from Canny with the hole excluded (:mod:`.canny`);
* spatial sizes a multiple of 4 (two stride-2 convolutions): inputs are reflect-padded at the bottom/right
  and outputs cropped (:func:`kdinpaint.padding.pad_bottom_right`, :func:`kdinpaint.padding.crop_top_left`).
"""

from __future__ import annotations

import math

import torch

from kdinpaint.masking import check_image_range, check_mask, check_rgb_image, warn_if_inverted

__all__ = [
    "RGB2GRAY_COEFFS",
    "EC_SIZE_MULTIPLE",
    "to_unit",
    "from_unit",
    "rgb_to_gray",
    "check_inputs",
    "edge_generator_input",
    "inpaint_generator_input",
]

RGB2GRAY_COEFFS: tuple[float, float, float] = (0.2125, 0.7154, 0.0721)
EC_SIZE_MULTIPLE: int = 4


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """Toolkit ``[-1, 1]`` to EdgeConnect ``[0, 1]``: ``(x + 1) / 2``. Any shape."""
    return (image + 1) * 0.5


def from_unit(image: torch.Tensor) -> torch.Tensor:
    """EdgeConnect ``[0, 1]`` to toolkit ``[-1, 1]``: ``2 x - 1``. Any shape."""
    return image * 2 - 1


def rgb_to_gray(image: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB image as ``skimage.color.rgb2gray`` computes it.

    ``image``: ``(B, 3, H, W)`` in ``[0, 1]``. Returns ``(B, 1, H, W)`` in ``[0, 1]``.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"rgb_to_gray expects (B, 3, H, W) RGB images, got {tuple(image.shape)}")
    w = torch.tensor(RGB2GRAY_COEFFS, dtype=image.dtype, device=image.device)
    return torch.einsum("bchw,c->bhw", image, w).unsqueeze(1)


def check_inputs(image: torch.Tensor, mask: torch.Tensor, *, min_size: int = 12) -> None:
    """Validate a toolkit ``(image, mask)`` pair before it enters EdgeConnect.

    ``image``: ``(B, 3, H, W)`` float in ``[-1, 1]``; ``mask``: ``(B, 1, H, W)``, 1 = hole
    (:func:`kdinpaint.masking.check_mask`). Raises ``ValueError``/``TypeError`` naming the fix; warns when a
    sample is more than 60 % hole, the usual sign of an inverted mask (1 = known).
    """
    check_rgb_image(image, "EdgeConnect")
    check_mask(mask, image)
    H, W = image.shape[-2:]
    # after padding to a multiple of 4, the residual blocks reflect-pad by 2 at 1/4 resolution: >= 3 pixels
    if min(math.ceil(H / EC_SIZE_MULTIPLE), math.ceil(W / EC_SIZE_MULTIPLE)) * EC_SIZE_MULTIPLE < min_size:
        raise ValueError(
            f"EdgeConnect needs images of at least {min_size - EC_SIZE_MULTIPLE + 1}x{min_size - EC_SIZE_MULTIPLE + 1}"
            f" pixels (padded to {min_size}x{min_size}), got {H}x{W}; upsample the image first"
        )
    check_image_range(image)
    warn_if_inverted(mask)


def edge_generator_input(gray: torch.Tensor, edges: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The edge generator's 3-channel input ``[gray with white holes, edges outside holes, mask]``.

    ``gray``, ``edges``, ``mask``: ``(B, 1, H, W)`` in ``[0, 1]`` (mask 1 = hole). Returns ``(B, 3, H, W)``.
    """
    return torch.cat([gray * (1 - mask) + mask, edges * (1 - mask), mask.to(gray.dtype)], dim=1)


def inpaint_generator_input(image01: torch.Tensor, edges: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting generator's 4-channel input ``[RGB with white holes, edge map]``.

    ``image01``: ``(B, 3, H, W)`` in ``[0, 1]``; ``edges``, ``mask``: ``(B, 1, H, W)``. Returns ``(B, 4, H, W)``.
    """
    return torch.cat([image01 * (1 - mask) + mask, edges], dim=1)
