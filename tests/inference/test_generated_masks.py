"""kdinpaint.inference.masks: generated evaluation masks, one per Table 1 bucket in turn, drawn as the data
module draws them with the same generator."""

from __future__ import annotations

import pytest
import torch

from kdinpaint.data import FreeFormMasks, rng_for
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS
from kdinpaint.inference import generated_masks


def test_generated_masks_fill_the_table1_buckets_deterministically():
    masks = generated_masks("freeform", 5, 48, seed=3)
    ratios = masks.mean((1, 2, 3))
    for i, r in enumerate(ratios.tolist()):
        lo, hi = TABLE1_BUCKETS[i % 4]
        assert lo <= r < hi
    again = FreeFormMasks(ratio=TABLE1_BUCKETS[1]).sample(rng_for(3, 1), (48, 48))
    assert torch.equal(masks[1, 0], torch.from_numpy(again).float())
    with pytest.raises(ValueError, match="freeform"):
        generated_masks("circles", 1, 32)
