"""Uploads and masks of the brush page, checked before anything is decoded: bytes, format, pixels, integrity.

Everything here works on bytes in memory (nothing touches the disk) and raises :class:`UploadError` with a message
for the person at the page: what is wrong and what to do.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Limits", "DEFAULT_LIMITS", "UploadError", "read_upload", "decode_mask", "to_tensor", "to_png",
           "to_image", "data_url", "from_data_url", "fit"]

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
"""The image formats an upload may have (PIL's names)."""


class UploadError(ValueError):
    """An upload the page refuses; the message is shown to the person (``status``: the HTTP status to answer)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """``max_bytes``: largest upload; ``max_pixels``: largest image (width × height, read from its header);
    ``max_side``: images are shrunk to this longest side before inpainting (the page works at that size)."""

    max_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 512

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 or self.max_pixels < 64 * 64 or self.max_side < 32:
            raise ValueError(f"limits too small to hold an image: {self}")


DEFAULT_LIMITS = Limits()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _open(data: bytes, limits: Limits, what: str) -> Image.Image:
    """The PIL image of ``data`` after the byte, format and pixel checks (header only; not decoded yet)."""
    if not data:
        raise UploadError(f"the {what} is empty: choose an image file")
    if len(data) > limits.max_bytes:
        raise UploadError(f"the {what} is {_mib(len(data))}, over the limit of {_mib(limits.max_bytes)}: "
                          "upload a smaller image (or start the server with a larger --max-upload-mb)", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError,
            SyntaxError, ValueError):
        raise UploadError(f"the {what} is not an image this page reads ({', '.join(FORMATS)}): choose a photo file",
                          415) from None
    if image.format not in FORMATS:
        raise UploadError(f"the {what} is a {image.format} file; this page takes {', '.join(FORMATS)}", 415)
    w, h = image.size
    if w * h > limits.max_pixels:
        raise UploadError(f"the {what} has {w}x{h} = {w * h / 1e6:.1f} million pixels, over the limit of "
                          f"{limits.max_pixels / 1e6:.1f} million: shrink it first", 413)
    if min(w, h) < 16 and what != "mask":  # a mask is checked against its photo
        raise UploadError(f"the {what} is {w}x{h} pixels: too small to inpaint (16 pixels a side at least)")
    return image


def _decoded(image: Image.Image, what: str) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UploadError(f"the {what} is damaged and cannot be decoded ({type(e).__name__}): save it again and retry") from None
    return image


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` shrunk (never enlarged) so that its longest side is at most ``max_side``."""
    w, h = image.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)


def read_upload(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """An uploaded photo as an RGB image of at most ``limits.max_side`` a side (EXIF rotation applied, transparency
    flattened on white, first frame of an animation); :class:`UploadError` for anything else."""
    image = _decoded(_open(data, limits, "upload"), "upload")
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: keep the pixels as stored
        pass
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits (convert("L") would clip everything above 255 to white)
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    return fit(image.convert("RGB"), limits.max_side)


def decode_mask(data: bytes, size: tuple[int, int], limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """The page's brushed mask (a PNG whose painted pixels are opaque or bright) as a boolean ``(H, W)`` array of the
    image's ``size = (W, H)``; :class:`UploadError` when it is not that size, has no hole or no known pixel."""
    image = _decoded(_open(data, limits, "mask"), "mask")
    if image.size != tuple(size):
        raise UploadError(f"the mask is {image.size[0]}x{image.size[1]} but the photo is {size[0]}x{size[1]}: "
                          "reload the photo and brush again")
    rgba = np.asarray(image.convert("RGBA"))
    hole = (rgba[..., 3] > 127) & (rgba[..., :3].max(-1) > 127)  # painted (opaque) and bright; a flat black PNG is no hole
    if not hole.any():
        raise UploadError("the mask is empty: brush over the part of the photo to fill, then press Inpaint")
    if hole.all():
        raise UploadError("the mask covers the whole photo: leave some of it unpainted for the fill to start from")
    return hole


def from_data_url(url: object, what: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL the page sends."""
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url[:64]:
        raise UploadError(f"the {what} must be sent as a data:image/...;base64 URL")
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(f"the {what} is not valid base64") from None


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(to_png(image)).decode("ascii")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → ``(1, 3, H, W)`` float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    return (x / 127.5 - 1)[None]


def to_image(x: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in [-1, 1] → RGB image (rounded, as a saved PNG)."""
    x = x.detach().float().cpu().reshape(3, *x.shape[-2:])
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
