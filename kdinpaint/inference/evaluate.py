"""A network evaluated on a set of images and masks: inpainted through an :class:`~kdinpaint.inference.Inpainter`
and scored per image (:mod:`kdinpaint.evaluation.metrics`); the weight-free floor on the same images and masks is
:mod:`kdinpaint.evaluation.floor`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kdinpaint.evaluation.metrics import MetricRow, evaluate, summarize
from kdinpaint.inference.inpainter import Inpainter

__all__ = ["evaluate_model"]


def _item(x: Any, key: str, i: int) -> torch.Tensor:
    """Item ``i``'s image or mask as a ``(C, H, W)`` tensor (a NumPy array is taken as a tensor of its dtype)."""
    x = x[key] if isinstance(x, dict) else x
    what = "image" if key == "image" else "mask"
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} {i} is a {type(x).__name__}; evaluate_model takes tensors (or NumPy arrays): "
                        f"{'(3, H, W) in [-1, 1]' if key == 'image' else '(1, H, W) in {0, 1}, 1 = hole'}")
    if x.dim() != 3:
        shape = "(3, H, W)" if key == "image" else "(1, H, W)"
        raise ValueError(f"{what} {i} has shape {tuple(x.shape)}; evaluate_model takes one {shape} per item "
                         "(a batch: a (N, C, H, W) tensor, whose items are that)")
    return x


def evaluate_model(
    inpainter: Inpainter,
    images: torch.Tensor | Sequence[Any],
    masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    convention: str = "default",
    names: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[MetricRow], dict[str, object]]:
    """Inpaint every image and score it: per-image :class:`~kdinpaint.evaluation.metrics.MetricRow` s and their Table 1 summary.

    Args:
        inpainter: the model to evaluate (wrap a bare network as ``Inpainter(model, stride=, spec=)``).
        images: ``(N, 3, H, W)`` in [-1, 1], or a sequence of ``(3, H, W)`` tensors or of dicts with
            ``"image"`` (and ``"mask"`` when ``masks`` is None: an :class:`~kdinpaint.data.InpaintingDataset`);
            NumPy arrays of the same shapes are taken as tensors. Images of different sizes are fine: a batch
            holds consecutive images of one size.
        masks: ``(N, 1, H, W)`` in {0, 1}, 1 = hole, or a sequence of ``(1, H, W)`` (mask ``i`` for image ``i``).
        convention: metric convention of :mod:`kdinpaint.evaluation.metrics` (``default``, ``edgeconnect``, ``rn``, ``mmagic``).
        names: one per image (default ``"0"``, ``"1"``, ...).
        on_batch: called with the number of images of each finished batch (progress bars).

    Returns ``(rows, summary)``; ``summary`` is :func:`~kdinpaint.evaluation.metrics.summarize` of the rows (Table 1
    buckets and ``all``), ready for ``to_markdown`` / ``to_csv`` / ``to_json``.
    """
    if not isinstance(inpainter, Inpainter):
        raise TypeError(f"evaluate_model takes an Inpainter, got {type(inpainter).__name__}; "
                        "wrap a network as Inpainter(model, stride=adapter.stride, spec=adapter.spec)")
    n = len(images)
    if n == 0:
        raise ValueError("no images to evaluate")
    if masks is None and not isinstance(images[0], dict):
        raise ValueError("masks=None needs images whose items are dicts with 'image' and 'mask'")
    if masks is not None and len(masks) != n:
        raise ValueError(f"{n} images but {len(masks)} masks; give one mask per image")
    if names is not None and len(names) != n:
        raise ValueError(f"{n} images but {len(names)} names")
    rows: list[MetricRow] = []
    batch: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (index, image, mask): consecutive, of one size

    def run() -> None:
        idx = [i for i, _, _ in batch]
        image = torch.stack([x for _, x, _ in batch])  # (b, 3, H, W)
        mask = torch.stack([m for _, _, m in batch])  # (b, 1, H, W)
        pred = inpainter(image, mask)
        batch_names = [names[i] for i in idx] if names is not None else [str(i) for i in idx]
        rows.extend(evaluate(pred, image, mask, convention=convention, names=batch_names))  # type: ignore[arg-type]
        if on_batch is not None:
            on_batch(len(idx))
        batch.clear()

    for i in range(n):
        item = images[i]
        image = _item(item, "image", i)
        mask = _item(masks[i] if masks is not None else item, "mask", i)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask {i} is {tuple(mask.shape[-2:])} (H, W) but image {i} is {tuple(image.shape[-2:])}; "
                             "give each image a mask of its size (resize masks with nearest-neighbour sampling)")
        first = batch[0][1] if batch else image
        if batch and (len(batch) == inpainter.batch_size or (first.shape, first.dtype) != (image.shape, image.dtype)):
            run()
        batch.append((i, image, mask))
    run()
    return rows, summarize(rows)
