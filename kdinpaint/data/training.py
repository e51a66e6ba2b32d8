"""The training stream: sample ``k`` of the whole run is a pure function of ``(seed, k)``.

Training draws images and masks from an index, not from a random-number state: sample ``k`` takes image
``permutation(seed, epoch)[k % N]`` (``epoch = k // N``), its augmentation (a horizontal flip; optionally a
rotation by a multiple of 90° and an order of the colour channels) and a mask from ``rng_for(seed, k)``. A run
resumed at step ``s`` therefore sees exactly the batches an uninterrupted run sees (skip the first ``s``
batches), on any number of data-loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdinpaint.data.generators import FreeFormMasks, MixedMasks, RectangleMasks, rng_for
from kdinpaint.data.images import ImageFolder
from kdinpaint.data.masks import MaskFolder, mask_to_tensor
from kdinpaint.data.protocols import PROTOCOLS, is_protocol, protocol
from kdinpaint.data.samples import SAMPLE_NAMES, SampleCrops, sample_images

__all__ = ["TrainingStream", "AUGMENTATIONS", "HELD_OUT", "images_from", "mask_source", "valid_augment"]

AUGMENTATIONS = ("flip", "rot90", "channels")
"""What :class:`TrainingStream` can do to an image: a horizontal flip (probability 1/2), a rotation by a random
multiple of 90° (with ``flip``, the eight symmetries of the square; square images only), a random order of the
colour channels (any of the six)."""


def valid_augment(names: Sequence[str]) -> bool:
    """Whether ``names`` lists distinct names from :data:`AUGMENTATIONS` (the stream's and the recipe's check)."""
    names = list(names)
    return all(isinstance(a, str) and a in AUGMENTATIONS for a in names) and len(set(names)) == len(names)


HELD_OUT = ("chelsea", "coffee")  # bundled photos kept for evaluation when the images are "sample"


def images_from(source: str, size: int, count: int, crop: str, held_out: bool) -> torch.Tensor | ImageFolder:
    """The images a recipe's ``data.images`` / ``data.eval_images`` names. ``sample``: crops of the bundled
    photos (two of them, :data:`HELD_OUT`, are kept for evaluation); training crops are drawn at random scales
    and places (``crop: random``, :class:`~kdinpaint.data.SampleCrops`), evaluation crops are the fixed
    :func:`~kdinpaint.data.sample_images`. Otherwise a folder or ``.flist`` (held out: centre crops)."""
    if source == "sample":
        names = HELD_OUT if held_out else tuple(n for n in SAMPLE_NAMES if n not in HELD_OUT)
        if crop == "random" and not held_out:
            return SampleCrops(size, count, names=names)
        return sample_images(size, count, names=names)
    if not Path(source).exists():
        raise FileNotFoundError(f"data path {source!r} does not exist; give an image folder, a .flist, or 'sample'")
    return ImageFolder(source, size, crop if not held_out else "center")


def mask_source(kind: str, size: int, hole: str, ratio: tuple[float, float] | None = None,
                buckets: Sequence[tuple[float, float]] | None = None):
    """The masks a recipe's ``masks.train`` / ``masks.eval`` names: ``freeform``, ``rect``, a mask protocol
    (:data:`kdinpaint.data.protocols.PROTOCOLS`, e.g. ``lama-thick-256``) or a mask folder.

    ``ratio``: every mask in that hole-ratio bucket. ``buckets``: each mask in one of these buckets, drawn evenly
    (:class:`~kdinpaint.data.MixedMasks`; ``masks.train_ratio: table1`` passes the Table 1 buckets)."""
    if buckets is not None:
        if ratio is not None:
            raise ValueError("give ratio (one bucket) or buckets (several, drawn evenly), not both")
        return MixedMasks([mask_source(kind, size, hole, tuple(b)) for b in buckets])
    if kind == "freeform":
        return FreeFormMasks(ratio=ratio)
    if kind == "rect":
        return RectangleMasks(ratio=ratio)
    if is_protocol(kind):
        return protocol(kind, ratio)
    if not Path(kind).exists():
        raise FileNotFoundError(f"mask folder {kind!r} does not exist; give a folder of mask PNGs, 'freeform', 'rect' "
                                f"or a mask protocol ({', '.join(PROTOCOLS)})")
    return MaskFolder(kind, size, hole=hole, ratio=ratio)


class TrainingStream(Dataset):
    """``samples`` training items ``{"image": (3, H, W) in [-1, 1], "mask": (1, H, W), "index": k}``.

    Args:
        images: an ``(N, 3, H, W)`` tensor or a dataset of such images (items may be dicts with ``"image"``).
        masks: a mask source with ``sample(rng, (H, W))`` (``FreeFormMasks``, ``RectangleMasks``,
            ``MaskFolder``, ``EvalMasks``).
        samples: length of the stream (steps × batch size × processes).
        seed: the stream's seed.
        augment: names from :data:`AUGMENTATIONS`, applied in that tuple's order (default: horizontal flips only).
    """

    def __init__(self, images: torch.Tensor | Dataset, masks: object, samples: int, *, seed: int = 0,
                 augment: Sequence[str] = ("flip",)):
        if len(images) == 0:
            raise ValueError("the image set is empty: give a folder or file list with readable images")
        if not hasattr(masks, "sample"):
            raise TypeError(f"masks must have sample(rng, (H, W)), got {type(masks).__name__}")
        if isinstance(augment, str) or not all(isinstance(a, str) for a in augment):
            raise TypeError(f"augment is a list of names from {list(AUGMENTATIONS)}, got {augment!r}")
        if not valid_augment(augment):
            raise ValueError(f"augment takes each of {list(AUGMENTATIONS)} at most once, got {list(augment)}")
        self.images, self.masks, self.samples, self.seed = images, masks, int(samples), int(seed)
        self.augment = tuple(a for a in AUGMENTATIONS if a in augment)  # one fixed order: flip, rot90, channels
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.samples

    def _image_index(self, k: int) -> int:
        n = len(self.images)
        epoch = k // n
        perm = self._perm.get(epoch)
        if perm is None:
            perm = self._perm[epoch] = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n)
            if len(self._perm) > 4:
                self._perm.pop(min(self._perm))
        return int(perm[k % n])

    def __getitem__(self, k: int) -> dict[str, object]:
        if not 0 <= k < self.samples:
            raise IndexError(f"sample {k} out of range for a stream of {self.samples}")
        rng = rng_for(self.seed, k)
        with torch.random.fork_rng(devices=[]):  # random crops inside image datasets draw from torch: pin them
            torch.manual_seed(int(rng.integers(2**62)))
            item = self.images[self._image_index(k)]
        image = item["image"] if isinstance(item, dict) else item
        if "flip" in self.augment and rng.random() < 0.5:
            image = image.flip(-1)
        if "rot90" in self.augment:
            if image.shape[-1] != image.shape[-2]:
                raise ValueError(f"augment rot90 needs square images, got {tuple(image.shape[-2:])}; crop them square "
                                 "(data.crop) or leave rot90 out")
            image = torch.rot90(image, int(rng.integers(4)), (-2, -1))
        if "channels" in self.augment:
            image = image[torch.from_numpy(rng.permutation(image.shape[0]))]
        mask = mask_to_tensor(self.masks.sample(rng, (int(image.shape[-2]), int(image.shape[-1]))))
        return {"image": image, "mask": mask, "index": k}
