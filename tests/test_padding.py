"""kdinpaint.padding: the bottom/right padding the adapters use inside their forward, against numpy.pad.

(The centred padding of the Inpainter, pad_to_multiple / unpad, is tested in test_inference.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdinpaint.padding import crop_top_left, pad_bottom_right

# (H, W, multiple, min_size): the sizes of EdgeConnect (4), DeepFill v2 (8) and StructureFlow (16, at least 48),
# including maps too small to mirror (a pad as wide as the side)
CASES = [(32, 32, 4, 0), (37, 50, 4, 0), (9, 13, 4, 0), (50, 37, 8, 0), (1, 5, 8, 0), (48, 48, 16, 48),
         (50, 37, 16, 48), (20, 64, 16, 48), (3, 2, 16, 48)]


def _numpy_pad(x: torch.Tensor, ph: int, pw: int, mode: str, **kwargs) -> torch.Tensor:
    return torch.from_numpy(np.pad(x.numpy(), [(0, 0), (0, 0), (0, ph), (0, pw)], mode=mode, **kwargs))


@pytest.mark.parametrize("H, W, multiple, min_size", CASES)
def test_pad_bottom_right_is_numpy_reflect_or_edge_and_crops_back(H, W, multiple, min_size):
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    out = pad_bottom_right(x, multiple, min_size)
    th = max(math.ceil(H / multiple), math.ceil(min_size / multiple)) * multiple
    tw = max(math.ceil(W / multiple), math.ceil(min_size / multiple)) * multiple
    assert out.shape == (2, 3, th, tw)
    ph, pw = th - H, tw - W
    # numpy's "reflect" does not repeat the edge pixel; "edge" repeats it (replicate) where a side is too small
    expected = _numpy_pad(x, ph, pw, "reflect" if ph < H and pw < W else "edge")
    assert torch.equal(out, expected)
    assert torch.equal(crop_top_left(out, (H, W)), x)
    zeros = pad_bottom_right(x, multiple, min_size, value=0.0)
    assert torch.equal(zeros, _numpy_pad(x, ph, pw, "constant", constant_values=0.0))


def test_pad_bottom_right_hand_computed_and_no_copy_when_aligned():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])[None, None]  # (1, 1, 3, 3)
    assert pad_bottom_right(x, 4).tolist() == [[[[1, 2, 3, 2], [4, 5, 6, 5], [7, 8, 9, 8], [4, 5, 6, 5]]]]
    assert pad_bottom_right(x, 4, value=-1.0).tolist() == [[[[1, 2, 3, -1], [4, 5, 6, -1], [7, 8, 9, -1], [-1, -1, -1, -1]]]]
    two_rows = x[..., :2, :]  # a 2-row pad needs 3 rows to mirror: replicated instead
    assert pad_bottom_right(two_rows, 4).tolist() == [[[[1, 2, 3, 3], [4, 5, 6, 6], [4, 5, 6, 6], [4, 5, 6, 6]]]]
    aligned = torch.zeros(1, 1, 8, 16)
    assert pad_bottom_right(aligned, 8) is aligned and pad_bottom_right(aligned, 8, value=0.0) is aligned
