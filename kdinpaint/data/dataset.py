"""Images plus masks: the ``{"image", "mask"}`` samples that training and evaluation consume.

:class:`InpaintingDataset` pairs an image source with a mask source and yields
``{"image": (3, H, W) float32 in [-1, 1], "mask": (1, H, W) float32, 1 = hole, "index": int}`` plus
``"path"`` and ``"skipped"`` when the images come from files (see :class:`~kdinpaint.data.images.ImageFolder`).
It works with a ``torch.utils.data.DataLoader`` and any number of workers.

Masks are drawn in one of two ways:

* ``seed=None`` (training): a fresh mask per call, from a generator seeded by torch's RNG, which a
  DataLoader reseeds per worker and per epoch (so epochs differ and workers never repeat each other);
* ``seed=s`` (evaluation): mask ``i`` is drawn with :func:`~kdinpaint.data.generators.rng_for` ``(s, i)``,
  the same on every machine, epoch and worker count. Passing an :class:`~kdinpaint.data.generators.EvalMasks`
  does the same with its own seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kdinpaint.data.generators import EvalMasks, rng_for
from kdinpaint.data.masks import mask_to_tensor

__all__ = ["InpaintingDataset"]


class InpaintingDataset(Dataset):
    """Pairs ``images`` with masks from ``masks``.

    Args:
        images: an ``(N, 3, H, W)`` tensor in [-1, 1] (e.g. :func:`~kdinpaint.data.samples.sample_images`),
            or a dataset whose items are such ``(3, H, W)`` tensors or dicts with an ``"image"`` key
            (e.g. :class:`~kdinpaint.data.images.ImageFolder`).
        masks: a mask source with ``sample(rng, (H, W))`` (:class:`FreeFormMasks`, :class:`RectangleMasks`,
            :class:`MaskFolder`), an :class:`EvalMasks` (mask ``i`` for image ``i``, cycling), or a
            sequence of ``(1, H, W)`` mask tensors (mask ``i % len`` for image ``i``).
        seed: fixes mask ``i`` to ``rng_for(seed, i)`` for a sample source; ``None`` draws fresh masks.
    """

    def __init__(self, images: torch.Tensor | Dataset, masks: object, *, seed: int | None = None) -> None:
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"an image tensor must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        elif not hasattr(images, "__getitem__") or not hasattr(images, "__len__"):
            raise TypeError(f"images must be a tensor or a dataset, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("images is empty")
        is_source = hasattr(masks, "sample") and not isinstance(masks, EvalMasks)
        if not is_source and not (hasattr(masks, "__getitem__") and hasattr(masks, "__len__")):
            raise TypeError(
                "masks must be a mask source with sample(rng, size), an EvalMasks or a sequence of mask tensors, "
                f"got {type(masks).__name__}"
            )
        if not is_source and len(masks) == 0:  # type: ignore[arg-type]
            raise ValueError("masks is empty")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.images, self.masks, self.seed, self._is_source = images, masks, seed, is_source

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int) -> dict[str, object]:
        item = self.images[index]
        if isinstance(item, dict):
            if "image" not in item:
                raise KeyError(f"image dataset items must carry an 'image' key, got keys {sorted(item)}")
            return dict(item)
        if isinstance(item, (tuple, list)):
            item = item[0]
        return {"image": item}

    def _mask(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        if self._is_source:
            if self.seed is None:
                rng = np.random.default_rng(int(torch.randint(2**62, ())))
            else:
                rng = rng_for(self.seed, index)
            return mask_to_tensor(self.masks.sample(rng, size))  # type: ignore[attr-defined]
        seq: Sequence[torch.Tensor] = self.masks  # type: ignore[assignment]
        if isinstance(seq, EvalMasks):
            return mask_to_tensor(seq.hole(index % len(seq), size))
        mask = seq[index % len(seq)]
        if mask.dim() != 3 or mask.shape[0] != 1 or tuple(mask.shape[-2:]) != size:
            raise ValueError(
                f"mask {index % len(seq)} has shape {tuple(mask.shape)}, expected (1, {size[0]}, {size[1]}); "
                "resize masks with nearest-neighbour interpolation to the image size"
            )
        return mask.float()

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self._image(index)
        image = sample["image"]
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index} must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
        sample["mask"] = self._mask(index, (int(image.shape[1]), int(image.shape[2])))
        sample.setdefault("index", index)
        return sample
