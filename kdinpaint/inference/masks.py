"""Evaluation masks drawn on demand, spread over the hole-ratio buckets of the paper's Table 1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from kdinpaint.data import FreeFormMasks, RectangleMasks, rng_for
from kdinpaint.data.masks import mask_to_tensor
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS

__all__ = ["GeneratedMasks", "generated_masks"]


class GeneratedMasks(Sequence):
    """``count`` evaluation masks drawn on demand: ``masks[i]`` is ``(1, H, W)`` in {0, 1}, in Table 1 bucket ``i mod 4``.

    Mask ``i`` is drawn by :class:`~kdinpaint.data.FreeFormMasks` (``freeform``) or
    :class:`~kdinpaint.data.RectangleMasks` (``rect``) restricted to the hole-ratio bucket
    ``TABLE1_BUCKETS[i % 4]``, with the generator ``rng_for(seed, i)``: the same on every machine and in any
    order of access, and every column of the table gets images. Nothing is held in memory.
    """

    def __init__(self, kind: Literal["freeform", "rect"], count: int, size: int | tuple[int, int], seed: int = 0) -> None:
        makers = {"freeform": FreeFormMasks, "rect": RectangleMasks}
        if kind not in makers:
            raise ValueError(f"unknown mask generator {kind!r}; choose one of {sorted(makers)}")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.count, self.seed = count, seed
        self.sources = [makers[kind](ratio=b) for b in TABLE1_BUCKETS]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= i < self.count:
            raise IndexError(f"mask index {i} out of range for {self.count} masks")
        return mask_to_tensor(self.sources[i % len(self.sources)].sample(rng_for(self.seed, i), self.size))


def generated_masks(kind: Literal["freeform", "rect"], count: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """All of :class:`GeneratedMasks` as one ``(count, 1, H, W)`` tensor."""
    return torch.stack(list(GeneratedMasks(kind, count, size, seed)))
