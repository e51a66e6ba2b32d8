"""The embedded default data: natural colour photographs bundled in scikit-image and scikit-learn.

No download is needed: the photos ship inside the installed wheels. Sources and licences:

============================ ============================== =============================================
name                         loader                         licence
============================ ============================== =============================================
astronaut                    ``skimage.data.astronaut``     NASA, public domain
coffee                       ``skimage.data.coffee``        CC0 (R. Michetti)
chelsea                      ``skimage.data.chelsea``       CC0 (S. van der Walt)
rocket                       ``skimage.data.rocket``        SpaceX, public domain
china, flower                ``sklearn.datasets`` images    CC-BY 2.0 (attribution in scikit-learn)
motorcycle_left / _right     ``skimage.data.stereo_motorcycle`` Middlebury 2014 stereo (cite)
immunohistochemistry         ``skimage.data.immunohistochemistry`` no known restrictions
hubble                       ``skimage.data.hubble_deep_field`` HubbleSite
============================ ============================== =============================================

:func:`sample_images` cuts them into square crops: crop ``k`` comes from photo ``k mod n``; the first
pass takes the centre of each photo with its shorter side scaled to ``size``; later passes zoom in
(shorter side ``size × (1 + 0.35 (r mod 8))`` on pass ``r``: eight scales, up to 3.45 times the whole photo,
repeated at new places from pass 8 on rather than enlarged past the photos' resolution), pick a position with
a generator seeded by ``(photo, pass)`` and flip every other pass. The result is deterministic and cached per
``(size, count, names)``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["SAMPLE_NAMES", "SampleCrops", "sample_images", "sample_photo"]

log = logging.getLogger(__name__)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle(side: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[side]

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        # Read the file from the installed package: importing sklearn.datasets costs about a second.
        spec = importlib.util.find_spec("sklearn")
        if spec is not None and spec.origin:
            path = os.path.join(os.path.dirname(spec.origin), "datasets", "images", filename)
            if os.path.isfile(path):
                with Image.open(path) as im:
                    return np.asarray(im.convert("RGB"))
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "motorcycle_left": _motorcycle(0),
    "motorcycle_right": _motorcycle(1),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "hubble": _skimage("hubble_deep_field"),
}
SAMPLE_NAMES: tuple[str, ...] = tuple(_LOADERS)
"""The photos :func:`sample_images` draws from, in order."""


@functools.lru_cache(maxsize=None)
def sample_photo(name: str) -> np.ndarray:
    """One bundled photo at native resolution, uint8 ``(H, W, 3)`` (read-only, cached)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown sample photo {name!r}; known: {list(SAMPLE_NAMES)}")
    arr = np.ascontiguousarray(_LOADERS[name]()[..., :3])
    arr.setflags(write=False)
    return arr


CROP_SCALES = 8
"""The scales :func:`sample_images` cycles through, one per pass over the photos."""


def _crop(photo: np.ndarray, size: int, photo_index: int, pass_index: int) -> np.ndarray:
    h, w = photo.shape[:2]
    target_short = size * (1 + 0.35 * (pass_index % CROP_SCALES))  # pass 8 on: the same scales at new places
    scale = target_short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = Image.fromarray(photo)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BICUBIC)
    if pass_index == 0:
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([photo_index, pass_index])))
        top, left = int(rng.integers(nh - size + 1)), int(rng.integers(nw - size + 1))
    out = np.asarray(img.crop((left, top, left + size, top + size)))
    return out[:, ::-1] if pass_index % 2 == 1 else out


@functools.lru_cache(maxsize=16)
def _cached(size: int, count: int, names: tuple[str, ...]) -> torch.Tensor:
    photos = [sample_photo(n) for n in names]
    crops = [_crop(photos[k % len(names)], size, k % len(names), k // len(names)) for k in range(count)]
    batch = torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2).float()  # (N, 3, S, S)
    return batch / 127.5 - 1


def _checked_names(size: int, count: int, names: Sequence[str] | None) -> tuple[str, ...]:
    """Validate the crop size, the count and the photo names (default :data:`SAMPLE_NAMES`); the names."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    chosen = tuple(names) if names is not None else SAMPLE_NAMES
    unknown = [n for n in chosen if n not in _LOADERS]
    if unknown or not chosen:
        raise ValueError(f"unknown sample photo(s) {unknown}; known: {list(SAMPLE_NAMES)}")
    return chosen


def sample_images(size: int = 256, count: int = 10, *, names: Sequence[str] | None = None) -> torch.Tensor:
    """Crops of the bundled photos, float32 ``(count, 3, size, size)`` in [-1, 1].

    ``names`` restricts (and orders) the photos, default :data:`SAMPLE_NAMES`. Deterministic and cached:
    repeated calls cost a copy. The returned tensor is the caller's to modify.
    """
    return _cached(size, count, _checked_names(size, count, names)).clone()


class SampleCrops(Dataset):
    """``count`` random crops of the bundled photos at random scales: a training set from a handful of photos.

    Crop ``k`` is a pure function of ``(seed, k)``: a photo, a scale between the one whose short side is
    ``size`` (the whole photo) and the photo's native resolution (log-uniform over ``levels`` pre-resized
    copies; a photo whose short side is below ``size`` has one copy, up-scaled to it), and a position. A
    small network trained on a few dozen fixed crops memorises them; drawn from every scale and place, the
    same photos teach it how image content continues across a hole.

    Items are float32 ``(3, size, size)`` in [-1, 1] (flips are left to :class:`TrainingStream`).
    """

    def __init__(self, size: int, count: int, *, names: Sequence[str] | None = None, seed: int = 0, levels: int = 6):
        chosen = _checked_names(size, count, names)
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive int, got {levels!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.size, self.count, self.seed = size, count, int(seed)
        self._levels: list[list[np.ndarray]] = []  # per photo, copies from whole-photo to native scale
        for name in chosen:
            photo = sample_photo(name)
            h, w = photo.shape[:2]
            lo = size / min(h, w)
            copies = []
            for j in range(levels if lo < 1 else 1):  # a photo smaller than a crop: one copy, up-scaled
                s = lo ** (1 - j / max(1, levels - 1))  # lo ... 1, geometric
                nh, nw = max(size, round(h * s)), max(size, round(w * s))
                copies.append(np.asarray(Image.fromarray(photo).resize((nw, nh), Image.BICUBIC)) if (nh, nw) != (h, w) else photo)
            self._levels.append(copies)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> torch.Tensor:
        if not 0 <= k < self.count:
            raise IndexError(f"crop {k} out of range for {self.count} crops")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, k, 0xC209])))
        copies = self._levels[int(rng.integers(len(self._levels)))]
        img = copies[int(rng.integers(len(copies)))]
        h, w = img.shape[:2]
        top, left = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
        crop = img[top : top + self.size, left : left + self.size].copy()  # never a view of the read-only copies
        return torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1  # (3, size, size)
