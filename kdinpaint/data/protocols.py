"""The field's fixed evaluation masks: LaMa's thin / medium / thick and MAT's large / small mask protocols.

Inpainting papers since LaMa (Suvorov et al., WACV 2022) and MAT (Li et al., CVPR 2022) report on masks drawn by
their generators with the parameters of their published configurations. Each protocol here is a mask source
(``sample(rng, (H, W)) -> bool (H, W)``, ``True`` = hole, like :class:`~kdinpaint.data.FreeFormMasks`) with
those parameters, and :func:`protocol_masks` fixes a set: mask ``i`` of protocol ``NAME`` is drawn with
``rng_for(protocol_seed(NAME), i)``, so a protocol name and an image count give the same masks on every
machine, in any order of access (the first ``n`` masks of a longer set are the set of ``n``).

LaMa (``advimman/lama``, ``configs/data_gen/random_{thin,medium,thick}_{256,512}.yaml`` and
``saicinpainting/training/data/masks.py``): each mask is either irregular strokes (probability
``1 / (1 + box_proba)``) or boxes (``box_proba / (1 + box_proba)``; thin has no boxes). Strokes: ``times`` uniform in
``[min_times, max_times]``; each starts at a random pixel and chains 1-5 segments whose angle is
``0.01 + k`` radians, ``k`` uniform in ``{0, .., max_angle - 1}`` (mirrored to ``2π - angle`` on even strokes),
length ``10 + U{0, .., max_len - 1}`` and width ``5 + U{0, .., max_width - 1}`` pixels, drawn as thick lines with
round ends; the end point is truncated to whole pixels and clipped to the image. Boxes: ``times`` uniform in
``[min_times, max_times]``, sides uniform in ``[bbox_min, min(bbox_max, side - 2 margin))``, placed ``margin``
pixels from the border. LaMa's dataset script drops masks covering more than ``max_tamper_area`` = 50 % and
keeps one of the rest: here a mask over 50 % is drawn again (the same distribution).

MAT (``fenglinglwb/MAT``, ``datasets/mask_generator_{256,512}{,_small}.py``, ``RandomMask`` with the default
``hole_range [0, 1]``): up to ``fills_half - 1`` rectangles of sides below ``side / 2`` and up to
``fills_full - 1`` of sides below ``side`` (each may hang over the border by up to half its size), then up to
``brush - 1`` DeepFill-style brush strokes (4-17 vertices, angles around 2π/5 ± up to 2π/15, segment lengths
``N(r, r // 2)`` clipped to ``[0, 2r]`` with ``r = side √2 / 8``, width uniform in ``[12, 48)``), the stroke layer
flipped up-down and left-right with probability 1/2 each; a mask with no hole or no known pixel is drawn again.
Here a mask covering more than 90 % is drawn again too (``max_area``; about 1 in 800 masks of the large protocols):
kdinpaint's metrics refuse such a mask as probably inverted.

Differences from the original scripts, all of the drawing and none of the parameters: LaMa draws on the photo
resized to a short side of 256 (512) and then crops a square around the mask; here masks are drawn on the square
directly. Lines are rasterised by PIL (LaMa uses OpenCV). Random numbers come from numpy's ``Generator`` (normal
samples by Box-Muller from uniforms, as :mod:`kdinpaint.data.generators` does) instead of the global legacy
state. A protocol draws at its own side (256 or 512) and resizes the mask to the requested size by
nearest-neighbour sampling, so the hole-ratio distribution is the protocol's at any image size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from kdinpaint.data.generators import EvalMasks
from kdinpaint.data.masks import _check_bucket

__all__ = [
    "LamaMasks",
    "MatMasks",
    "PROTOCOLS",
    "protocol",
    "protocol_seed",
    "protocol_masks",
    "describe_protocol",
    "is_protocol",
]


def _resized(hole: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean ``(h, w)`` map resized to ``size = (H, W)`` by nearest-neighbour sampling."""
    if hole.shape == tuple(size):
        return hole
    h, w = size
    return np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def _thick_line(draw: ImageDraw.ImageDraw, p0: tuple[int, int], p1: tuple[int, int], width: int) -> None:
    """A line of ``width`` pixels with round ends (a disc of that diameter at each end point)."""
    draw.line([p0, p1], fill=255, width=width)
    r = width / 2
    for x, y in (p0, p1):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _normal(rng: np.random.Generator, mean: float, std: float) -> float:
    # Box-Muller from two uniforms: a normal sample with a platform- and version-independent bit stream
    u1, u2 = 1.0 - rng.random(), rng.random()
    return mean + std * math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


@dataclass(frozen=True)
class LamaMasks:
    """One of LaMa's evaluation mask generators (``random_<kind>_<side>.yaml``); see the module docstring.

    ``ratio=(lo, hi)`` keeps only masks with a hole ratio in ``[lo, hi)`` (drawn again otherwise, at most
    ``max_tries`` times), for training on one bucket; the protocol itself has none.
    """

    side: int
    min_times: int
    max_times: int
    max_width: int
    max_len: int
    max_angle: int = 4
    box_proba: float = 0.0
    box_margin: int = 0
    box_min: int = 30
    box_max: int = 100
    box_min_times: int = 1
    box_max_times: int = 3
    max_area: float = 0.5
    ratio: tuple[float, float] | None = None
    max_tries: int = 1000

    def __post_init__(self) -> None:
        _check_bucket(self.ratio)
        if not (0 <= self.min_times <= self.max_times and self.max_width >= 1 and self.max_len >= 1 and self.max_angle >= 1):
            raise ValueError(f"bad LaMa stroke parameters: {self}")
        if self.box_proba and not (1 <= self.box_min < self.box_max and 0 <= self.box_min_times <= self.box_max_times):
            raise ValueError(f"bad LaMa box parameters: {self}")

    def _strokes(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
        s = self.side
        for i in range(int(rng.integers(self.min_times, self.max_times + 1))):
            x, y = int(rng.integers(s)), int(rng.integers(s))
            for _ in range(1 + int(rng.integers(5))):
                angle = 0.01 + int(rng.integers(self.max_angle))  # whole radians, as the published generator draws
                if i % 2 == 0:
                    angle = 2 * math.pi - angle
                length = 10 + int(rng.integers(self.max_len))
                width = 5 + int(rng.integers(self.max_width))
                # truncation towards zero, then clipping to [0, side], as the published generator does
                ex = min(max(int(x + length * math.sin(angle)), 0), s)
                ey = min(max(int(y + length * math.cos(angle)), 0), s)
                _thick_line(draw, (x, y), (ex, ey), width)
                x, y = ex, ey

    def _boxes(self, hole: np.ndarray, rng: np.random.Generator) -> None:
        s, m = self.side, self.box_margin
        top = min(self.box_max, s - 2 * m)
        for _ in range(int(rng.integers(self.box_min_times, self.box_max_times + 1))):
            bw, bh = int(rng.integers(self.box_min, top)), int(rng.integers(self.box_min, top))
            x0, y0 = int(rng.integers(m, s - m - bw + 1)), int(rng.integers(m, s - m - bh + 1))
            hole[y0 : y0 + bh, x0 : x0 + bw] = True

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One mask at the protocol's own side, before the area limit: boolean ``(side, side)``."""
        if self.box_proba and rng.random() < self.box_proba / (1 + self.box_proba):
            hole = np.zeros((self.side, self.side), dtype=bool)
            self._boxes(hole, rng)
            return hole
        canvas = Image.new("L", (self.side, self.side), 0)
        self._strokes(ImageDraw.Draw(canvas), rng)
        return np.asarray(canvas) > 127

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A boolean ``(H, W)`` hole array drawn with ``rng`` (at the protocol's side, then resized)."""
        for _ in range(self.max_tries):
            hole = self.draw(rng)
            r = float(hole.mean())
            if 0 < r <= self.max_area and (self.ratio is None or self.ratio[0] <= r < self.ratio[1]):
                out = _resized(hole, size)
                if out.any() and not out.all():
                    return out
        raise RuntimeError(f"LaMa masks found no mask with a hole ratio in {self.ratio} in {self.max_tries} tries")


@dataclass(frozen=True)
class MatMasks:
    """One of MAT's mask generators (``mask_generator_<side>[_small].py``); see the module docstring.

    ``fills_half``, ``fills_full``, ``brush``: the exclusive upper bounds of the number of rectangles below half the
    side, of rectangles below the side and of brush strokes. ``max_area``: a mask covering more (a fraction) is drawn
    again (the published generator keeps any mask below 100 %). ``ratio`` as for :class:`LamaMasks`.
    """

    side: int
    fills_half: int
    fills_full: int
    brush: int
    min_vertices: int = 4
    max_vertices: int = 18
    mean_angle: float = 2 * math.pi / 5
    angle_range: float = 2 * math.pi / 15
    min_width: float = 12
    max_width: float = 48
    max_area: float = 0.9
    ratio: tuple[float, float] | None = None
    max_tries: int = 1000

    def __post_init__(self) -> None:
        _check_bucket(self.ratio)
        if min(self.fills_half, self.fills_full, self.brush) < 1 or max(self.fills_half, self.fills_full, self.brush) < 2:
            raise ValueError(f"bad MAT mask parameters: {self}")

    def _rectangle(self, hole: np.ndarray, rng: np.random.Generator, max_size: int) -> None:
        s = self.side
        w, h = int(rng.integers(max_size)), int(rng.integers(max_size))
        x, y = int(rng.integers(-(w // 2), s - w + w // 2)), int(rng.integers(-(h // 2), s - h + h // 2))
        hole[max(y, 0) : min(y + h, s), max(x, 0) : min(x + w, s)] = True

    def _strokes(self, rng: np.random.Generator) -> np.ndarray:
        s = self.side
        avg_r = math.sqrt(2 * s * s) / 8
        canvas = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(self.brush))):
            n = int(rng.integers(self.min_vertices, self.max_vertices))
            a_min = self.mean_angle - _uniform(rng, 0, self.angle_range)
            a_max = self.mean_angle + _uniform(rng, 0, self.angle_range)
            angles = [_uniform(rng, a_min, a_max) for _ in range(n)]
            angles = [2 * math.pi - a if i % 2 == 0 else a for i, a in enumerate(angles)]
            x, y = int(rng.integers(s)), int(rng.integers(s))
            points = [(x, y)]
            for a in angles:
                r = min(max(_normal(rng, avg_r, avg_r // 2), 0.0), 2 * avg_r)
                x = int(min(max(points[-1][0] + r * math.cos(a), 0.0), s))
                y = int(min(max(points[-1][1] + r * math.sin(a), 0.0), s))
                points.append((x, y))
            width = int(_uniform(rng, self.min_width, self.max_width))
            draw.line(points, fill=255, width=width)
            for px, py in points:  # discs of diameter 2 (width // 2) at the vertices, as the published generator
                draw.ellipse((px - width // 2, py - width // 2, px + width // 2, py + width // 2), fill=255)
        hole = np.asarray(canvas) > 127
        if rng.random() < 0.5:
            hole = hole[::-1]
        if rng.random() < 0.5:
            hole = hole[:, ::-1]
        return hole

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One mask at the protocol's own side, possibly empty or full: boolean ``(side, side)``."""
        hole = np.zeros((self.side, self.side), dtype=bool)
        for _ in range(int(rng.integers(self.fills_half))):
            self._rectangle(hole, rng, self.side // 2)
        for _ in range(int(rng.integers(self.fills_full))):
            self._rectangle(hole, rng, self.side)
        return hole | self._strokes(rng)

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A boolean ``(H, W)`` hole array drawn with ``rng`` (at the protocol's side, then resized)."""
        for _ in range(self.max_tries):
            hole = self.draw(rng)
            r = float(hole.mean())
            if 0 < r < 1 and r <= self.max_area and (self.ratio is None or self.ratio[0] <= r < self.ratio[1]):
                out = _resized(hole, size)
                if out.any() and not out.all():
                    return out
        raise RuntimeError(f"MAT masks found no mask with a hole ratio in {self.ratio} in {self.max_tries} tries")


# The published parameters, by protocol name: LaMa's configs/data_gen/random_<kind>_<side>.yaml (irregular_kwargs and
# box_kwargs; box_proba 0.3 beside irregular_proba 1) and MAT's mask_generator_<side>[_small].py (coef 1).
PROTOCOLS: dict[str, LamaMasks | MatMasks] = {
    "lama-thin-256": LamaMasks(256, min_times=4, max_times=50, max_width=10, max_len=40),
    "lama-medium-256": LamaMasks(256, min_times=4, max_times=5, max_width=50, max_len=100, box_proba=0.3,
                                 box_margin=0, box_min=10, box_max=50, box_min_times=1, box_max_times=5),
    "lama-thick-256": LamaMasks(256, min_times=1, max_times=5, max_width=100, max_len=200, box_proba=0.3,
                                box_margin=10, box_min=30, box_max=150, box_min_times=1, box_max_times=3),
    "lama-thin-512": LamaMasks(512, min_times=4, max_times=70, max_width=20, max_len=100),
    "lama-medium-512": LamaMasks(512, min_times=4, max_times=10, max_width=100, max_len=200, box_proba=0.3,
                                 box_margin=0, box_min=30, box_max=150, box_min_times=1, box_max_times=5),
    "lama-thick-512": LamaMasks(512, min_times=1, max_times=5, max_width=250, max_len=450, box_proba=0.3,
                                box_margin=10, box_min=30, box_max=300, box_min_times=1, box_max_times=4),
    "mat-large-512": MatMasks(512, fills_half=5, fills_full=3, brush=9),
    "mat-small-512": MatMasks(512, fills_half=3, fills_full=2, brush=4),
    "mat-large-256": MatMasks(256, fills_half=4, fills_full=2, brush=8),
    "mat-small-256": MatMasks(256, fills_half=2, fills_full=2, brush=3),
}

_SOURCES = {
    "lama": "LaMa configs/data_gen/random_{kind}_{side}.yaml",
    "mat": "MAT datasets/mask_generator_{side}{small}.py",
}


def is_protocol(name: object) -> bool:
    """Whether ``name`` is the name of a mask protocol (:data:`PROTOCOLS`)."""
    return isinstance(name, str) and name in PROTOCOLS


def protocol(name: str, ratio: tuple[float, float] | None = None) -> LamaMasks | MatMasks:
    """The mask source of protocol ``name`` (optionally restricted to the hole-ratio bucket ``ratio``); an unknown
    name is a ``ValueError`` listing the known ones."""
    if not is_protocol(name):
        raise ValueError(f"unknown mask protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    source = PROTOCOLS[name]
    if ratio is None:
        return source
    return type(source)(**{**source.__dict__, "ratio": tuple(ratio)})


def protocol_seed(name: str) -> int:
    """The seed of protocol ``name``'s fixed set: the first 4 bytes of the SHA-256 of its name (no process salt, so
    the same on every machine)."""
    protocol(name)
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def protocol_masks(name: str, count: int, size: int | Sequence[int] = 256) -> EvalMasks:
    """The fixed evaluation set of protocol ``name``: ``count`` masks of ``size`` (``masks[i]`` float ``(1, H, W)``,
    1 = hole), mask ``i`` drawn with ``rng_for(protocol_seed(name), i)``; :meth:`EvalMasks.fingerprint` hashes it."""
    return EvalMasks(protocol(name), count, size=size, seed=protocol_seed(name))


def describe_protocol(name: str) -> str:
    """One line naming the protocol and where its parameters come from, for reports."""
    family, kind, side = name.split("-")
    source = _SOURCES[family].format(kind=kind, side=side, small="_small" if kind == "small" else "")
    return f"protocol {name} ({source}; seed {protocol_seed(name)})"
