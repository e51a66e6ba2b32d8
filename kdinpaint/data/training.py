"""The training stream: sample ``k`` of the whole run is a pure function of ``(seed, k)``.

Training draws images and masks from an index, not from a random-number state: sample ``k`` takes image
``permutation(seed, epoch)[k % N]`` (``epoch = k // N``), a horizontal flip and a mask from
``rng_for(seed, k)``. A run resumed at step ``s`` therefore sees exactly the batches an uninterrupted run sees
(skip the first ``s`` batches), on any number of data-loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from kdinpaint.data.generators import rng_for
from kdinpaint.data.masks import mask_to_tensor

__all__ = ["TrainingStream"]


class TrainingStream(Dataset):
    """``samples`` training items ``{"image": (3, H, W) in [-1, 1], "mask": (1, H, W), "index": k}``.

    Args:
        images: an ``(N, 3, H, W)`` tensor or a dataset of such images (items may be dicts with ``"image"``).
        masks: a mask source with ``sample(rng, (H, W))`` (``FreeFormMasks``, ``RectangleMasks``,
            ``MaskFolder``, ``EvalMasks``).
        samples: length of the stream (steps × batch size × processes).
        seed: the stream's seed.
        flip: random horizontal flips.
    """

    def __init__(self, images: torch.Tensor | Dataset, masks: object, samples: int, *, seed: int = 0, flip: bool = True):
        if len(images) == 0:
            raise ValueError("the image set is empty: give a folder or file list with readable images")
        if not hasattr(masks, "sample"):
            raise TypeError(f"masks must have sample(rng, (H, W)), got {type(masks).__name__}")
        self.images, self.masks, self.samples, self.seed, self.flip = images, masks, int(samples), int(seed), flip
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
        if self.flip and rng.random() < 0.5:
            image = image.flip(-1)
        mask = mask_to_tensor(self.masks.sample(rng, (int(image.shape[-2]), int(image.shape[-1]))))
        return {"image": image, "mask": mask, "index": k}
