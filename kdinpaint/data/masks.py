"""Mask files: the NVIDIA irregular mask set (or any folder of mask images) as toolkit masks.

Every mask leaves here as a boolean ``(H, W)`` array (``True`` = hole) or a float tensor ``(1, H, W)``
with 1 = hole, the convention of :mod:`kdinpaint.masking`.

The NVIDIA irregular masks (Liu et al., 2018) come in two sets that mark holes in opposite colours:
the test set (``testing_mask_dataset``, 12,000 PNGs of 512², hole ratios 1-60 %) is white = hole; the
training set (55,116 masks) is black = hole and mostly white. ``hole="auto"`` reads up to 32 files spread
over the folder and takes the median white fraction: below 0.4 means white holes, above 0.6 black
holes; in between it refuses to guess and asks for ``hole="white"`` or ``hole="black"``.

Hole ratios are counted on the mask as the model sees it: binarised, then resized to ``size`` with
nearest-neighbour sampling. (Resizing bilinearly and thresholding at ``> 0``, as several codebases do,
dilates the holes: on 512→256 stroke masks it adds 1.5 points on average and moves ~12 % of masks to
another 10 % bin.) Buckets are half-open, ``[lo, hi)``. Masks with no hole or no known pixel are dropped
and counted in :attr:`MaskFolder.dropped`.

Unreadable files (truncated, not an image, over PIL's pixel limit) are treated like those of
:class:`~kdinpaint.data.images.ImageFolder`: skipped wherever masks are drawn or measured, logged once with
the file name and listed in :attr:`MaskFolder.skipped`; only indexing one file directly (``folder[i]``)
raises, with the file name. A folder whose probed masks are all empty (or all hole) under an explicit
``hole=`` colour is refused at construction: it is the other colour. A ratio cache keeps each file's hole ratio
with the file's mtime and size; a file rewritten since (another hole) is measured again. A cache that is not valid
JSON, or not shaped as kdinpaint writes it, is refused naming the file (it can be deleted: it is rebuilt).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from kdinpaint.data.images import (_DECODE_ERRORS, _SIXTEEN_BIT_MODES, _size2, float_scale, is_wide_integer, list_images,
                                   open_image, upright, warn_frames)

__all__ = ["MaskFolder", "read_mask", "binarize", "soft_share", "detect_hole_colour", "mask_to_tensor", "ratio_in"]

log = logging.getLogger(__name__)

HoleColour = Literal["auto", "white", "black"]


def _read_luminance(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode a mask image to its luminance ``(H, W)`` and the value of full white.

    16-bit modes keep their stored values (``uint16``, full scale 65535), ``F`` and 32-bit integer TIFFs theirs
    (full scale 1, 255 or 65535 by their range: :func:`~kdinpaint.data.images.float_scale`); every other mode is
    flattened onto black (alpha and transparency dropped) and reduced to 8-bit ``L`` (``uint8``, full scale 255).
    A mask drawn only in its alpha channel is refused naming the file. The mask is turned upright by its EXIF
    orientation, as its photo is. Raises the decoder's error for unreadable files.
    """
    with open_image(path) as im:
        im.load()
        warn_frames(im, path)
        im = upright(im)
        if im.mode == "F" or is_wide_integer(im):
            values = np.asarray(im)
            return values, float_scale(values.astype(np.float32), path)
        if im.mode in _SIXTEEN_BIT_MODES:
            return np.asarray(im), 65535.0
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            _refuse_alpha_only(np.asarray(im), path)
            im = im.convert("RGB")
        return np.asarray(im.convert("L"), dtype=np.uint8), 255.0


def _refuse_alpha_only(rgba: np.ndarray, path: str | os.PathLike[str]) -> None:
    """``ValueError`` naming ``path`` for a mask drawn only in its alpha channel (one colour everywhere, the hole
    transparent or opaque): read as luminance it would have no hole, or be all hole."""
    colour, alpha = rgba[..., :3], rgba[..., 3]
    if colour.size and (colour == colour.flat[0]).all() and alpha.min() != alpha.max():
        raise ValueError(
            f"mask {os.fspath(path)!r} is one colour everywhere and draws its hole only in its alpha channel "
            "(transparency); kdinpaint reads a mask's brightness: save it with the hole white on black, e.g. "
            "Image.open(path).getchannel('A').save('mask.png') if the hole is the opaque part"
        )


def _resize_nearest(bool_map: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """A boolean ``(H, W)`` map resized to ``size = (H, W)`` by nearest-neighbour sampling (None: unchanged)."""
    if size is None or bool_map.shape == tuple(size):
        return bool_map
    h, w = size
    return np.asarray(Image.fromarray(bool_map.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def read_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None, threshold: float = 0.5) -> np.ndarray:
    """Read a mask image as a boolean ``(H, W)`` array, ``True`` where the pixel is white (> threshold).

    Any colour mode is reduced to luminance; 16-bit images are scaled to [0, 1] first. With ``size =
    (H, W)`` the binary mask is resized by nearest-neighbour sampling (no new values, no dilation).
    """
    values, full = _read_luminance(path)
    if values.dtype == np.uint8:  # 8-bit levels compare exactly against the threshold in levels
        white = values > threshold * 255
    else:  # wider modes are scaled to [0, 1] in float32
        white = values.astype(np.float32) / full > threshold
    return _resize_nearest(white, size)


SOFT_BAND: tuple[float, float] = (0.1, 0.9)
"""Grey levels (fractions of full scale) strictly between these are neither black nor white: a soft mask's."""
SOFT_LIMIT = 0.05
"""The largest share of such pixels a mask file may have and still be read as binary (:func:`binarize`)."""


def soft_share(values: np.ndarray, full: float) -> float:
    """The share of pixels whose level lies strictly inside :data:`SOFT_BAND` of ``full``: a few percent for a
    binary mask with anti-aliased edges or JPEG noise, much more for a feathered (soft) mask."""
    if values.size == 0:
        return 0.0
    lo, hi = SOFT_BAND[0] * full, SOFT_BAND[1] * full
    return float(((values > lo) & (values < hi)).mean())


def binarize(values: np.ndarray, full: float, *, name: str = "mask", limit: float = SOFT_LIMIT) -> np.ndarray:
    """A mask file's luminance ``values`` (full white = ``full``) as a boolean white map, ``values > full / 2``.

    A mask that is binary up to anti-aliased edges and compression noise (at most ``limit`` of its pixels strictly
    between 10 % and 90 % grey) is thresholded; a soft mask, with more such pixels, is refused with ``ValueError``
    naming ``name``, the share and the fix: thresholding it would move the hole's border by a guess. The tensor API
    (:func:`~kdinpaint.masking.check_mask`) refuses any value but 0 and 1; this is the file readers' rule.
    """
    share = soft_share(values, full)
    if share > limit:
        raise ValueError(
            f"{name} is a soft mask: {share:.1%} of its pixels are grey (strictly between 10 % and 90 % of white), "
            f"more than the {limit:.0%} that edges and compression noise leave; a hole must be black or white. "
            "Threshold it and save it as a PNG, e.g. Image.open(path).convert('L').point(lambda v: 255 * (v > 127))"
        )
    return values > full / 2


def mask_to_tensor(hole: np.ndarray) -> torch.Tensor:
    """Boolean ``(H, W)`` hole array → float32 ``(1, H, W)`` with 1 = hole."""
    return torch.from_numpy(np.ascontiguousarray(hole, dtype=np.float32))[None]


def ratio_in(ratio: float, bucket: tuple[float, float] | None) -> bool:
    """Whether ``ratio`` falls in the half-open bucket ``[lo, hi)`` (any ratio when ``bucket`` is None)."""
    return bucket is None or bucket[0] <= ratio < bucket[1]


def _check_bucket(ratio: tuple[float, float] | None) -> None:
    """Raise ``ValueError`` unless ``ratio`` is None or a hole-ratio bucket ``(lo, hi)`` with 0 <= lo < hi <= 1."""
    if ratio is not None and not (0 <= ratio[0] < ratio[1] <= 1):
        raise ValueError(f"ratio must be a bucket (lo, hi) with 0 <= lo < hi <= 1, got {ratio!r}")


def _read_cache(cache: Path) -> dict:
    """The parsed JSON of a ratio cache file, ``{}`` when it does not exist yet; ``ValueError`` naming the file
    when it is not JSON (a run killed while writing it, or another file at that path) or not shaped as kdinpaint
    writes it: ``{setting: {mask path: [hole ratio, mtime_ns, size]}}``."""
    if not cache.is_file():
        return {}
    try:
        stored = json.loads(cache.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"mask ratio cache {str(cache)!r} is not valid JSON ({e}); delete it (it is rebuilt from the masks) "
            "or pass another cache path"
        ) from None
    wrong = next((k for k, v in stored.items() if not isinstance(v, dict)), None) if isinstance(stored, dict) else ""
    if wrong is not None:
        found = type(stored).__name__ if wrong == "" else f"{type(stored[wrong]).__name__} under {wrong!r}"
        raise ValueError(
            f"mask ratio cache {str(cache)!r} is not shaped as kdinpaint writes it ({{setting: {{mask path: "
            f"[hole ratio, mtime_ns, size]}}}}; found a {found}); delete it (it is rebuilt from the masks) or pass "
            "another cache path"
        )
    return stored


def _stamp(path: str) -> list[int] | None:
    """``[mtime_ns, size]`` of a file, what a ratio cache entry is checked against; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _well_formed(entry: object) -> bool:
    """Whether a ratio cache entry is ``[hole ratio in [0, 1], mtime_ns, size]``."""
    return (
        isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], (int, float)) and 0 <= entry[0] <= 1
        and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:])
    )


def _write_cache(cache: Path, stored: dict) -> None:
    """Write the ratio cache atomically (a run killed while writing leaves the earlier file whole)."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored))
    os.replace(tmp, cache)


def _readable(paths: Sequence[str], skipped: list[str], threshold: float, probe: int) -> list[tuple[str, np.ndarray]]:
    """``(path, white map)`` of up to ``probe`` readable files spread over ``paths``; unreadable files met on
    the way are logged and added to ``skipped`` (the next file is tried in their place)."""
    idx = np.unique(np.linspace(0, len(paths) - 1, min(probe, len(paths))).round().astype(int))
    read: list[tuple[str, np.ndarray]] = []
    taken = set()
    for i in idx:
        for j in [*range(int(i), len(paths)), *range(int(i))]:  # this file, else the next readable one
            if j in taken:
                continue
            taken.add(j)
            try:
                read.append((paths[j], read_mask(paths[j], threshold=threshold)))
                break
            except _DECODE_ERRORS as exc:
                _skip(paths[j], exc, skipped)
    return read


def _skip(path: str, exc: BaseException, skipped: list[str]) -> None:
    if path not in skipped:
        skipped.append(path)
        log.warning("skipping unreadable mask %s (%s: %s)", path, type(exc).__name__, exc)


def detect_hole_colour(
    paths: Sequence[str], threshold: float = 0.5, probe: int = 32, skipped: list[str] | None = None
) -> Literal["white", "black"]:
    """Guess which colour marks holes from the median white fraction of up to ``probe`` readable files.

    Returns ``"white"`` when the median is below 0.4 and ``"black"`` above 0.6; raises ``ValueError``
    in between (an ambiguous folder needs an explicit choice). Unreadable files are passed over (and added
    to ``skipped``).
    """
    if not paths:
        raise ValueError("no mask files to detect the hole colour from")
    read = _readable(paths, skipped if skipped is not None else [], threshold, probe)
    if not read:
        raise ValueError(f"none of the {len(paths)} mask files is a readable image (first: {paths[0]!r})")
    med = float(np.median([float(white.mean()) for _, white in read]))
    if med < 0.4:
        return "white"
    if med > 0.6:
        return "black"
    raise ValueError(
        f"cannot tell which colour marks holes: the median white fraction of {len(read)} masks is {med:.2f}; "
        "pass hole='white' (NVIDIA test masks, EdgeConnect) or hole='black' (NVIDIA training masks)"
    )


class MaskFolder:
    """A folder (or file list) of mask images, optionally restricted to a hole-ratio bucket.

    Args:
        source: folder of mask images or a ``.flist`` / ``.txt`` list.
        size: ``(H, W)`` or an int: masks are resized to it with nearest-neighbour sampling.
        hole: ``"white"``, ``"black"`` or ``"auto"`` (see the module docstring).
        ratio: keep only masks whose hole ratio at ``size`` lies in ``[lo, hi)``; needs one pass over the
            folder, which ``cache`` (a JSON file) saves for later runs.
        threshold: binarisation level in [0, 1] of the stored grey values.

    ``len(folder)``, ``folder[i]`` (float ``(1, H, W)``, 1 = hole), ``folder.hole(i)`` (bool ``(H, W)``),
    ``folder.sample(rng, size)`` (a random mask, for :class:`~kdinpaint.data.dataset.InpaintingDataset`),
    ``folder.ratios`` (per kept file, once computed) and ``folder.bucket_counts(edges)``.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        size: int | Sequence[int] = 256,
        *,
        hole: HoleColour = "auto",
        ratio: tuple[float, float] | None = None,
        threshold: float = 0.5,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if hole not in ("auto", "white", "black"):
            raise ValueError(f"hole must be 'auto', 'white' or 'black', got {hole!r}")
        _check_bucket(ratio)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.size = _size2(size)
        self.threshold = threshold
        self.paths = list_images(source)
        self.skipped: list[str] = []  # unreadable files met so far (logged once each)
        if hole == "auto":
            self.hole_colour = detect_hole_colour(self.paths, threshold, skipped=self.skipped)
            log.info("masks under %s: holes are %s (autodetected)", source, self.hole_colour)
        else:
            self.hole_colour = hole
            self._check_colour(source)
        self.dropped: list[str] = []
        self.ratios: np.ndarray | None = None
        if ratio is not None:
            self._filter(ratio, cache)

    def __len__(self) -> int:
        return len(self.paths)

    def _check_colour(self, source: object) -> None:
        """Refuse an explicit hole colour under which every probed mask is empty (or every one all hole): the
        folder marks holes in the other colour. Warn when holes cover most of the typical mask."""
        read = _readable(self.paths, self.skipped, self.threshold, 32)
        if not read:
            raise ValueError(f"none of the {len(self.paths)} mask files under {source} is a readable image (first: {self.paths[0]!r})")
        holes = [float(white.mean()) if self.hole_colour == "white" else 1 - float(white.mean()) for _, white in read]
        other = "black" if self.hole_colour == "white" else "white"
        if max(holes) == 0 or min(holes) == 1:
            what = "empty (no hole pixel)" if max(holes) == 0 else "full (no known pixel)"
            if all(h in (0.0, 1.0) for h in holes):  # one flat colour each: neither colour makes a usable mask
                fix = "these files are flat black or white images, not masks with holes; check the folder"
            else:
                fix = f"these masks mark holes in {other}; pass hole={other!r} or hole='auto'"
            raise ValueError(
                f"with hole={self.hole_colour!r} every one of {len(read)} probed masks under {source} is {what}, "
                f"e.g. {read[0][0]!r}: {fix}"
            )
        median = float(np.median(holes))
        if median > 0.6:
            log.warning(
                "masks under %s: with hole=%r holes cover %.0f %% of the median mask; if they mark holes in %s, "
                "pass hole=%r", source, self.hole_colour, 100 * median, other, other,
            )

    def _hole_of(self, path: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """The boolean hole array of the mask file ``path`` at ``size`` (default: the folder's size)."""
        white = read_mask(path, size or self.size, self.threshold)
        return white if self.hole_colour == "white" else ~white

    def hole(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """The boolean hole array of file ``index`` at ``size`` (default: the folder's size); a ``ValueError``
        naming the file if it cannot be read (it is also added to :attr:`skipped`)."""
        path = self.paths[index]
        try:
            return self._hole_of(path, size)
        except _DECODE_ERRORS as exc:
            _skip(path, exc, self.skipped)
            raise ValueError(f"cannot read mask {path!r} ({type(exc).__name__}: {exc})") from None

    def __getitem__(self, index: int) -> torch.Tensor:
        return mask_to_tensor(self.hole(index))

    def compute_ratios(self) -> np.ndarray:
        """Hole ratio of every file at the folder's size, float64 ``(N,)`` (an unreadable file raises, named)."""
        return np.array([float(self.hole(i).mean()) for i in range(len(self.paths))])

    def _filter(self, bucket: tuple[float, float], cache: str | os.PathLike[str] | None) -> None:
        # a cached ratio holds while its file keeps the mtime and size it was measured at; a rewritten file is measured again
        key = f"{self.size[0]}x{self.size[1]}:{self.hole_colour}:{self.threshold}"
        entries: dict[str, object] = {}
        if cache is not None:
            entries = _read_cache(Path(cache)).get(key, {})
        malformed = [p for p in self.paths if p in entries and not _well_formed(entries[p])]
        if malformed:
            log.warning(
                "mask ratio cache %s: %d entries are not [hole ratio, mtime_ns, size] (an earlier kdinpaint's cache or "
                "an edited file), e.g. %s; those masks are measured again", cache, len(malformed), malformed[0],
            )
        table: dict[str, float] = {}
        measured: dict[str, list] = {}
        for p in self.paths:
            stamp, entry = _stamp(p), entries.get(p)
            if stamp is not None and _well_formed(entry) and entry[1:] == stamp:
                table[p] = float(entry[0])
                continue
            try:
                table[p] = float(self._hole_of(p).mean())
            except _DECODE_ERRORS as exc:  # not cached: a file fixed later is measured then
                _skip(p, exc, self.skipped)
                continue
            if stamp is not None:
                measured[p] = [table[p], *stamp]  # the stamp from before the read: a file rewritten meanwhile is stale
        unreadable = set(self.skipped)
        if cache is not None and measured:
            # read again: the pass above can take minutes, and another run may have stored its own key meanwhile
            stored = _read_cache(Path(cache))
            stored[key] = {**stored.get(key, {}), **measured}
            _write_cache(Path(cache), stored)
        readable = [p for p in self.paths if p not in unreadable]
        degenerate = [p for p in readable if table[p] in (0.0, 1.0)]
        self.dropped.extend(degenerate)
        keep = [p for p in readable if 0 < table[p] < 1 and ratio_in(table[p], bucket)]
        if not keep:
            raise ValueError(
                f"no mask has a hole ratio in [{bucket[0]}, {bucket[1]}) at size {self.size} "
                f"(hole colour {self.hole_colour!r}, {len(degenerate)} empty/full masks dropped, "
                f"{len(self.paths) - len(readable)} unreadable files skipped)"
            )
        self.paths = keep
        self.ratios = np.array([table[p] for p in keep])

    def bucket_counts(self, edges: Sequence[tuple[float, float]]) -> dict[str, int]:
        """How many masks fall in each ``[lo, hi)`` bucket at the folder's size."""
        ratios = self.ratios if self.ratios is not None else self.compute_ratios()
        return {f"{lo:g}-{hi:g}": int(((ratios >= lo) & (ratios < hi)).sum()) for lo, hi in edges}

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A random mask of the folder at ``size``; masks with no hole or no known pixel, and unreadable files
        (:attr:`skipped`), are passed over for the next one."""
        n = len(self.paths)
        start = int(rng.integers(n))
        for k in range(n):
            i = (start + k) % n
            try:
                hole = self._hole_of(self.paths[i], size)
            except _DECODE_ERRORS as exc:
                _skip(self.paths[i], exc, self.skipped)
                continue
            if hole.any() and not hole.all():
                return hole
            if self.paths[i] not in self.dropped:
                self.dropped.append(self.paths[i])
                why = "no hole" if not hole.any() else "no known pixel"
                log.warning("skipping mask %s: it has %s", self.paths[i], why)
        raise ValueError(
            f"every mask of the source is empty, full or unreadable (hole colour {self.hole_colour!r}, "
            f"{len(self.skipped)} unreadable files skipped); check hole= and the files"
        )

    def __repr__(self) -> str:
        return f"MaskFolder({len(self)} masks, size={self.size}, hole={self.hole_colour!r})"

