"""kdinpaint.inference.evaluate: evaluate_model over tensors or dataset items, in batches, refusing mismatches."""

from __future__ import annotations

import pytest
import torch

from kdinpaint.inference import Inpainter, evaluate_model, generated_masks


def test_evaluate_model_takes_dataset_items_and_refuses_mismatches():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = generated_masks("rect", 3, 32)
    inp = Inpainter.from_baseline("mean", batch_size=2)
    done = []
    rows, summary = evaluate_model(inp, [{"image": i, "mask": m} for i, m in zip(images, masks)], on_batch=done.append)
    rows2, _ = evaluate_model(inp, images, masks, names=["a", "b", "c"])
    assert done == [2, 1] and [r.psnr for r in rows] == [r.psnr for r in rows2] and rows2[2].name == "c"
    assert summary["buckets"]["all"]["count"] == 3
    with pytest.raises(ValueError, match="3 images but 2 masks"):
        evaluate_model(inp, images, masks[:2])
    with pytest.raises(TypeError, match="Inpainter"):
        evaluate_model(lambda i, m: i, images, masks)
