"""Images from a folder tree or an EdgeConnect-style file list, as ``(3, H, W)`` tensors in [-1, 1].

* Sources: a directory (searched recursively for image extensions), or a ``.flist`` / ``.txt`` file
  with one path per line (absolute, or relative to the list's folder or to the working directory).
* Geometry (``crop``): ``"resize"`` squeezes the whole image to the target size; ``"center"`` scales the
  shorter side to cover the target, then crops the centre; ``"random"`` crops a random window at native
  resolution (images smaller than the target are first scaled up to cover it). Resampling is PIL's
  bicubic, which low-pass filters when it shrinks.
* Pixel formats: grayscale is replicated to RGB; palette, CMYK and other modes go through PIL's RGB
  conversion; an alpha channel is dropped (colours kept as stored); 16-bit grayscale (``I;16``, ``I``)
  is scaled by 1/65535 and kept in float until the end (PIL's own conversion would clip it to white);
  16-bit RGB PNGs are decoded by PIL to their high byte (8-bit precision). Float images (PIL mode ``F``,
  e.g. a 32-bit float TIFF) are read on the scale their values show: a maximum up to 1.5 is [0, 1], up to
  257.55 (255 + 1 %) is [0, 255], up to 66190 (65535 + 1 %) is [0, 65535]; anything larger, a negative value
  (an image on [-1, 1]) or NaN/inf is refused naming the file (:func:`float_scale`); 32-bit integer TIFFs alike.
  Of an animated GIF or a multi-page TIFF the first frame is read, with a warning.
* Orientation: a photo whose EXIF Orientation tag says it is stored sideways (phones write such JPEGs) is
  turned upright as every viewer shows it (:func:`upright`); masks are turned alike, so a mask drawn over
  the photo as seen matches it.
* Files that cannot be decoded never end an epoch: the item is replaced by the next readable file, the
  path is logged once, added to :attr:`ImageFolder.skipped` (per process) and counted in the sample's
  ``"skipped"`` field (summed by the caller across DataLoader workers). :meth:`ImageFolder.scan`
  checks every file up front.
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolder", "list_images", "open_image", "read_image", "fit_image", "to_tensor", "upright",
    "float_scale", "is_wide_integer", "warn_frames",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LIST_SUFFIXES = (".flist", ".txt")
CropMode = Literal["resize", "center", "random"]
_CROPS = ("resize", "center", "random")
# PIL modes of 16-bit files (PIL opens some 16-bit PNGs as 32-bit "I"): full scale 65535
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of a positive int or a pair of them. Anything else is refused naming it: a string is a sequence
    of characters (``"32"`` would read as 3 x 2), a float or a bool is no pixel count."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    pair = isinstance(size, Sequence) and not isinstance(size, (str, bytes)) and len(size) == 2
    if not pair or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in size):
        hint = f"; write size={int(size)} (a number, not a string)" if isinstance(size, str) and size.strip().isdigit() else ""
        raise ValueError(f"size must be a positive int or (height, width) of positive ints, got {size!r} "
                         f"({type(size).__name__}){hint}")
    return int(size[0]), int(size[1])


def list_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image paths of a folder tree (sorted), a ``.flist`` / ``.txt`` list, or a sequence of paths.

    Raises ``ValueError`` for an empty folder, a folder with no image files, list entries that do not
    exist (the first few are named) or are not images by extension, and ``FileNotFoundError`` for a
    source that does not exist.
    """
    if not isinstance(source, (str, os.PathLike)):
        return _check_listed([os.fspath(p) for p in source], "the given paths")
    if not os.fspath(source).strip():  # Path("") is the working directory: every image below it would be read
        raise ValueError("the image source is an empty path (an unset variable?); give a folder of images or a "
                         ".flist (write '.' for the current folder)")
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file())
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            others = [os.path.relpath(f, path) for f in files[:3]]
            detail = f"; it holds {len(files)} other file(s) such as {others}" if files else " (it is empty)"
            raise ValueError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(path)!r}{detail}; "
                "point at the folder that holds the images"
            )
        return images
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        lines = [ln.strip() for ln in _read_list(path).splitlines()]
        entries = []
        for ln in lines:
            if not ln or ln.startswith("#"):
                continue
            p = Path(ln)
            if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
                p = path.parent / p
            entries.append(str(p))
        if not entries:
            raise ValueError(f"file list {str(path)!r} is empty; write one image path per line")
        return _check_listed(entries, f"file list {str(path)!r}")
    if path.is_file():
        raise ValueError(
            f"{str(path)!r} is neither a folder nor a file list ({', '.join(LIST_SUFFIXES)}); "
            "pass the folder of images or a .flist with one path per line"
        )
    raise FileNotFoundError(f"image source {str(path)!r} does not exist")


def _read_list(path: Path) -> str:
    """The text of a file list, UTF-8 (a byte-order mark is dropped); ``ValueError`` naming the file and the first
    byte that is not UTF-8 otherwise (a list saved in a legacy code page, or a binary file given as a list)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"file list {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}: "
            f"{e.reason}); save it as UTF-8, one image path per line"
        ) from None


def _check_listed(entries: list[str], where: str) -> list[str]:
    missing = [e for e in entries if not os.path.isfile(e)]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(entries)} files in {where} do not exist, e.g. {missing[:3]}; "
            "fix the paths (relative paths are tried against the working directory and the list's folder)"
        )
    not_images = [e for e in entries if not e.lower().endswith(IMAGE_EXTENSIONS)]
    if not_images:
        raise ValueError(
            f"{len(not_images)} entries in {where} are not image files by extension, e.g. {not_images[:3]}; "
            f"accepted: {', '.join(IMAGE_EXTENSIONS)}"
        )
    return entries


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """``PIL.Image.open(path)``, with PIL's decompression-bomb refusal (more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 million pixels) as a ``ValueError`` that names the file and the fix.

    Every image and mask file of the toolkit is opened here."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"image {os.fspath(path)!r} is too large to decode safely ({e}); resize it, or if the file is trusted "
            "raise PIL.Image.MAX_IMAGE_PIXELS before loading"
        ) from None


ORIENTATION = 0x0112  # the EXIF tag: 1 = stored upright, 2-8 = mirrored and/or turned by quarter turns


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF Orientation tag says (``PIL.ImageOps.exif_transpose``), or ``im`` itself when the
    tag is absent, 1, or the EXIF block cannot be read (then the pixels are kept as stored)."""
    try:
        if im.getexif().get(ORIENTATION, 1) == 1:
            return im
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        return im


def is_wide_integer(im: Image.Image) -> bool:
    """Whether ``im`` is a 32-bit integer image (PIL mode ``I`` of a TIFF, not a 16-bit PNG that PIL opens as ``I``):
    its full scale is not 65535 by its format, so it is read on the scale its values show (:func:`float_scale`)."""
    return im.mode == "I" and im.format != "PNG"


def warn_frames(im: Image.Image, path: str | os.PathLike[str]) -> None:
    """Warn that only the first frame of an animation or a multi-page file (GIF, TIFF, WEBP) is read."""
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        warnings.warn(f"{os.fspath(path)!r} holds {frames} frames (an animation or several pages); only the first is "
                      "read: save the frame you mean as a PNG", UserWarning, stacklevel=3)


def float_scale(values: np.ndarray, path: str | os.PathLike[str]) -> float:
    """The full scale of a float (or 32-bit integer) image's ``values``: 1, 255 or 65535, whichever range the largest
    value fits (with 1.5 and 1 % of slack); ``ValueError`` naming ``path`` for NaN/inf values, a negative value
    (an image on [-1, 1] would lose its dark half) or a larger maximum."""
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"image {os.fspath(path)!r} has {int((~finite).sum())} NaN/inf value(s); "
                         "replace them and save it again")
    lo = float(values.min()) if values.size else 0.0
    if lo < 0:  # clipped to 0, the dark half would turn black: it is on another scale, such as [-1, 1]
        raise ValueError(f"image {os.fspath(path)!r} has values down to {lo:g}; kdinpaint reads files on [0, 1], [0, 255] "
                         "or [0, 65535] (a tensor in [-1, 1] is saved as (x + 1) / 2): scale it and save it again")
    hi = float(values.max()) if values.size else 0.0
    for limit, full in ((1.5, 1.0), (255 * 1.01, 255.0), (65535 * 1.01, 65535.0)):
        if hi <= limit:
            return full
    raise ValueError(f"image {os.fspath(path)!r} has values up to {hi:g}, beyond the [0, 1], [0, 255] and "
                     "[0, 65535] scales kdinpaint reads; scale it to [0, 1] and save it again")


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode ``path`` into a PIL image in mode ``"RGB"`` (8-bit) or ``"F"`` (16-bit, 32-bit integer or float gray
    scaled to [0, 1]), turned upright by its EXIF orientation (:func:`upright`); of an animation or a multi-page
    file, the first frame (with a warning naming the file).

    Raises the decoder's error (``OSError``, ``UnidentifiedImageError``, ...) for unreadable files and a
    ``ValueError`` naming the file for one over PIL's pixel limit (:func:`open_image`) or a float image
    of no known scale (:func:`float_scale`).
    """
    with open_image(path) as im:
        im.load()
        warn_frames(im, path)
        im = upright(im)
        mode = im.mode
        if mode in _SIXTEEN_BIT_MODES and not is_wide_integer(im):
            arr = np.asarray(im, dtype=np.float32) / 65535.0
            return Image.fromarray(np.clip(arr, 0, 1), mode="F")
        if mode in ("F", "I"):  # float, or 32-bit integer (a TIFF): on the scale its values show
            arr = np.asarray(im, dtype=np.float32)
            return Image.fromarray(np.clip(arr / float_scale(arr, path), 0, 1), mode="F")
        if mode == "RGB":
            return im.copy()
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return im.convert("RGB")  # drops alpha, replicates gray


def fit_image(
    img: Image.Image, size: tuple[int, int], crop: CropMode, generator: torch.Generator | None = None
) -> Image.Image:
    """Resize / crop a PIL image to ``size = (H, W)`` following ``crop`` (see the module docstring)."""
    th, tw = size
    w, h = img.size
    if crop == "resize":
        return img.resize((tw, th), Image.BICUBIC) if (w, h) != (tw, th) else img
    if crop not in _CROPS:
        raise ValueError(f"crop must be one of {_CROPS}, got {crop!r}")
    if crop == "center" or w < tw or h < th:
        scale = max(th / h, tw / w)
        if crop == "center" or scale > 1:
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BICUBIC)
            w, h = nw, nh
    if crop == "center":
        left, top = (w - tw) // 2, (h - th) // 2
    else:
        top = int(torch.randint(h - th + 1, (), generator=generator))
        left = int(torch.randint(w - tw + 1, (), generator=generator))
    return img.crop((left, top, left + tw, top + th))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL ``"RGB"`` or ``"F"`` image → float32 ``(3, H, W)`` in [-1, 1]."""
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        t = torch.from_numpy(arr.copy())[None].expand(3, -1, -1).contiguous()
    else:
        arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return t * 2 - 1


class ImageFolder(Dataset):
    """Images of a folder tree or file list, fitted to ``size``.

    ``__getitem__(i)`` returns ``{"image": (3, H, W) float32 in [-1, 1], "path": str, "index": i,
    "skipped": int}`` where ``skipped`` counts the unreadable files passed over to produce this item.
    Random crops draw from torch's generator, which a DataLoader seeds per worker and epoch.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        size: int | Sequence[int] = 256,
        crop: CropMode = "center",
    ) -> None:
        if crop not in _CROPS:
            raise ValueError(f"crop must be one of {_CROPS}, got {crop!r}")
        self.size = _size2(size)
        self.crop = crop
        self.paths = list_images(source)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """The fitted image at ``index``, ``(3, H, W)`` in [-1, 1]; raises if the file is unreadable."""
        return to_tensor(fit_image(read_image(self.paths[index]), self.size, self.crop))

    def __getitem__(self, index: int) -> dict[str, object]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image = self.load(i)
            except _DECODE_ERRORS as exc:
                path = self.paths[i]
                if path not in self.skipped:
                    self.skipped.append(path)
                    log.warning("skipping unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
                continue
            return {"image": image, "path": self.paths[i], "index": index, "skipped": attempt}
        raise ValueError(f"none of the {n} files is a readable image (first: {self.paths[0]!r}); check the image source")

    def scan(self) -> list[str]:
        """Decode every file once, drop the unreadable ones from the dataset and return their paths."""
        bad = []
        for p in self.paths:
            try:
                read_image(p)
            except _DECODE_ERRORS:
                bad.append(p)
        if bad:
            log.warning("%d of %d files are unreadable and were dropped, e.g. %s", len(bad), len(self.paths), bad[:3])
            self.paths = [p for p in self.paths if p not in set(bad)]
            self.skipped.extend(b for b in bad if b not in self.skipped)
        if not self.paths:
            raise ValueError(f"no readable image among {len(bad)} files, e.g. {bad[:3]}")
        return bad
