"""Mask generators (free-form strokes, rectangles) and deterministic per-index evaluation masks.

A *mask source* is anything with ``sample(rng: numpy.random.Generator, size: (H, W)) -> bool (H, W)``
(``True`` = hole): :class:`FreeFormMasks`, :class:`RectangleMasks`,
:class:`~kdinpaint.data.masks.MaskFolder` and :class:`MixedMasks` (one of several sources per mask). Randomness comes only from the ``rng`` passed in, so a
source is deterministic given its generator.

:class:`EvalMasks` fixes one mask per index: mask ``i`` is drawn with
``numpy.random.Generator(PCG64(SeedSequence([seed, i])))``, which is the same bit stream on every
platform, and vertices are rounded to whole pixels before drawing, so the set is the same on every
machine, in any order of access and with any number of DataLoader workers. :meth:`EvalMasks.fingerprint`
hashes a set to compare machines.

The free-form generator follows DeepFill v2 (Yu et al., ICCV 2019; ``JiahuiYu/generative_inpainting``
``inpaint_ops.py`` ``brush_stroke_mask``): 1-3 strokes, each of 4-11 vertices; angles drawn uniformly in
``[2π/5 - a, 2π/5 + b]`` with ``a, b ~ U(0, 2π/15)`` and mirrored (``2π - angle``) on every other vertex;
segment lengths ``N(r, r/2)`` clipped to ``[0, 2r]`` with ``r = sqrt(H² + W²) / 8``; brush width
uniform in ``[12, 40)`` pixels at 256 (scaled with the image side); a disc at every vertex. DeepFill's
optional box (``box=True``): a 128×128 box at 256 (scaled), each side shrunk by up to 16 px.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from kdinpaint.data.masks import _check_bucket, mask_to_tensor

__all__ = ["FreeFormMasks", "RectangleMasks", "EvalMasks", "MixedMasks", "rng_for"]


def rng_for(seed: int, index: int) -> np.random.Generator:
    """The dedicated generator of evaluation mask ``index``: PCG64 seeded with ``SeedSequence([seed, index])``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


_Shape = Callable[[ImageDraw.ImageDraw, np.random.Generator], None]


def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A black ``L`` canvas of ``size = (H, W)`` and its drawing context (holes are painted 255)."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    return canvas, ImageDraw.Draw(canvas)


def _render(size: tuple[int, int], paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """The boolean ``(H, W)`` hole array (``True`` where > 127) of what ``paint(draw)`` draws on a fresh canvas."""
    canvas, draw = _canvas(size)
    paint(draw)
    return np.asarray(canvas) > 127


def _fill_to_bucket(draw_one: _Shape, rng: np.random.Generator, size: tuple[int, int], ratio: tuple[float, float],
                    max_tries: int, what: str) -> np.ndarray:
    """Accumulate shapes drawn by ``draw_one(draw, rng)`` until the hole ratio reaches ``[lo, hi)``."""
    h, w = size
    lo, hi = ratio
    for _ in range(max_tries):
        canvas, draw = _canvas(size)
        for _ in range(1000):
            draw_one(draw, rng)
            hole = np.asarray(canvas) > 127
            r = float(hole.mean())
            if r >= lo:
                break
        if lo <= r < hi and not hole.all():
            return hole
    raise RuntimeError(
        f"{what} found no mask with a hole ratio in [{lo}, {hi}) at {h}x{w} in {max_tries} tries; "
        "widen the bucket or change the shape parameters"
    )


def _sample_shapes(draw_one: _Shape, count: tuple[int, int], rng: np.random.Generator, size: tuple[int, int],
                   ratio: tuple[float, float] | None, max_tries: int, what: str,
                   then: _Shape | None = None) -> np.ndarray:
    """The ``sample`` of a drawn generator: with ``ratio``, shapes fill the bucket (:func:`_fill_to_bucket`);
    otherwise ``rng.integers(*count)`` shapes, then ``then`` (if any), on one canvas."""
    if ratio is not None:
        return _fill_to_bucket(draw_one, rng, size, ratio, max_tries, what)

    def paint(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(*count))):
            draw_one(draw, rng)
        if then is not None:
            then(draw, rng)

    return _render(size, paint)


class FreeFormMasks:
    """DeepFill v2 free-form brush strokes (see the module docstring), optionally in a ratio bucket.

    ``ratio=(lo, hi)``: strokes are added one by one until the hole ratio reaches ``lo``; the mask is
    kept if it is below ``hi``, else drawn again (up to ``max_tries``).
    """

    def __init__(
        self,
        *,
        strokes: tuple[int, int] = (1, 4),
        vertices: tuple[int, int] = (4, 12),
        width: tuple[float, float] = (12, 40),
        mean_angle: float = 2 * math.pi / 5,
        angle_range: float = 2 * math.pi / 15,
        box: bool = False,
        ratio: tuple[float, float] | None = None,
        max_tries: int = 100,
    ) -> None:
        _check_bucket(ratio)
        if not (1 <= strokes[0] < strokes[1] and 2 <= vertices[0] < vertices[1] and 0 < width[0] < width[1]):
            raise ValueError("strokes, vertices and width are half-open ranges (low, high) with low < high")
        self.strokes, self.vertices, self.width = strokes, vertices, width
        self.mean_angle, self.angle_range = mean_angle, angle_range
        self.box, self.ratio, self.max_tries = box, ratio, max_tries

    def _stroke(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int]) -> None:
        h, w = size
        scale = min(h, w) / 256
        avg_r = math.sqrt(h * h + w * w) / 8
        n = int(rng.integers(*self.vertices))
        a_min = self.mean_angle - rng.random() * self.angle_range
        a_max = self.mean_angle + rng.random() * self.angle_range
        width = max(1, round((self.width[0] + rng.random() * (self.width[1] - self.width[0])) * scale))
        x, y = float(rng.integers(w)), float(rng.integers(h))
        points = [(round(x), round(y))]
        for i in range(n):
            angle = a_min + rng.random() * (a_max - a_min)
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            # Box-Muller from two uniforms: a normal sample with a platform-independent bit stream
            u1, u2 = 1.0 - rng.random(), rng.random()
            length = avg_r + avg_r / 2 * math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
            length = min(max(length, 0.0), 2 * avg_r)
            x = min(max(x + length * math.cos(angle), 0.0), w - 1.0)
            y = min(max(y + length * math.sin(angle), 0.0), h - 1.0)
            points.append((round(x), round(y)))
        draw.line(points, fill=255, width=width)
        r = width / 2
        for px, py in points:
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)

    def _box(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int]) -> None:
        h, w = size
        bh, bw = min(h - 1, round(128 * h / 256)), min(w - 1, round(128 * w / 256))
        top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
        dh, dw = int(rng.integers(round(16 * h / 256) + 1)), int(rng.integers(round(16 * w / 256) + 1))
        draw.rectangle((left + dw, top + dh, left + bw - dw - 1, top + bh - dh - 1), fill=255)

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A boolean ``(H, W)`` hole array drawn with ``rng``."""
        box = (lambda d, g: self._box(d, g, size)) if self.box else None
        return _sample_shapes(lambda d, g: self._stroke(d, g, size), self.strokes, rng, size, self.ratio,
                              self.max_tries, "FreeFormMasks", then=box)


class RectangleMasks:
    """One or more axis-aligned rectangular holes.

    ``side``: range of each side as a fraction of the image side, ``[lo, hi]``; ``count``: half-open
    range of the number of boxes; ``margin``: minimum distance to the border as a fraction of the side.
    ``ratio=(lo, hi)`` accumulates boxes until the hole ratio reaches the bucket, as in
    :class:`FreeFormMasks`.
    """

    def __init__(
        self,
        *,
        side: tuple[float, float] = (0.25, 0.5),
        count: tuple[int, int] = (1, 2),
        margin: float = 0.0,
        ratio: tuple[float, float] | None = None,
        max_tries: int = 100,
    ) -> None:
        _check_bucket(ratio)
        if not (0 < side[0] <= side[1] < 1):
            raise ValueError(f"side must be fractions 0 < lo <= hi < 1 of the image side, got {side!r}")
        if not 1 <= count[0] < count[1]:
            raise ValueError(f"count is a half-open range (low, high) with 1 <= low < high, got {count!r}")
        if not 0 <= margin < (1 - side[1]) / 2 + 1e-9:
            raise ValueError(f"margin {margin} leaves no room for a box of side {side[1]}")
        self.side, self.count, self.margin, self.ratio, self.max_tries = side, count, margin, ratio, max_tries

    def _rect(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int]) -> None:
        h, w = size
        bh = max(1, round(h * (self.side[0] + rng.random() * (self.side[1] - self.side[0]))))
        bw = max(1, round(w * (self.side[0] + rng.random() * (self.side[1] - self.side[0]))))
        mh, mw = round(self.margin * h), round(self.margin * w)
        top = mh + int(rng.integers(max(1, h - 2 * mh - bh + 1)))
        left = mw + int(rng.integers(max(1, w - 2 * mw - bw + 1)))
        draw.rectangle((left, top, left + bw - 1, top + bh - 1), fill=255)

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A boolean ``(H, W)`` hole array drawn with ``rng``."""
        return _sample_shapes(lambda d, g: self._rect(d, g, size), self.count, rng, size, self.ratio,
                              self.max_tries, "RectangleMasks")


class MixedMasks:
    """Each mask from one of ``sources``, chosen uniformly with the same generator.

    With one source per hole-ratio bucket (``MixedMasks([FreeFormMasks(ratio=b) for b in TABLE1_BUCKETS])``),
    training masks are spread evenly over the buckets, as the evaluation masks are (:func:`kdinpaint.train.runs.eval_set`
    gives image ``i`` bucket ``i mod 4``). Free-form strokes alone put most holes below 30 % at 64 px.
    """

    def __init__(self, sources: Sequence[object]) -> None:
        sources = list(sources)
        if not sources:
            raise ValueError("MixedMasks needs at least one mask source")
        for s in sources:
            if not hasattr(s, "sample"):
                raise TypeError(f"every source must have sample(rng, size), got {type(s).__name__}")
        self.sources = sources

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A boolean ``(H, W)`` hole array: a source drawn with ``rng``, then its sample with ``rng``."""
        return self.sources[int(rng.integers(len(self.sources)))].sample(rng, size)  # type: ignore[attr-defined]


class EvalMasks:
    """``count`` fixed masks of ``size`` from a mask source: ``masks[i]`` is float ``(1, H, W)``, 1 = hole.

    Mask ``i`` depends only on ``(seed, i)`` (see the module docstring), never on access order.
    """

    def __init__(self, source: object, count: int, *, size: int | Sequence[int] = 256, seed: int = 0) -> None:
        if not hasattr(source, "sample"):
            raise TypeError(
                "source must have sample(rng, size) (FreeFormMasks, RectangleMasks, MaskFolder), "
                f"got {type(source).__name__}"
            )
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        if isinstance(size, int):
            size = (size, size)
        self.source, self.count, self.size, self.seed = source, int(count), (int(size[0]), int(size[1])), int(seed)

    def __len__(self) -> int:
        return self.count

    def hole(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean ``(H, W)`` hole array of mask ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"mask index {index} out of range for {self.count} evaluation masks")
        return self.source.sample(rng_for(self.seed, index), size or self.size)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> torch.Tensor:
        return mask_to_tensor(self.hole(index))

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A random member of the fixed set (lets an EvalMasks serve as a training mask source)."""
        return self.hole(int(rng.integers(self.count)), size)

    def fingerprint(self) -> str:
        """SHA-256 of all masks (bit-packed), to check that two machines evaluate on the same set."""
        digest = hashlib.sha256(f"{self.size}".encode())
        for i in range(self.count):
            digest.update(np.packbits(self.hole(i)).tobytes())
        return digest.hexdigest()
