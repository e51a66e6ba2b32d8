"""kdinpaint.padding against numpy.pad: the bottom/right padding the adapters use inside their forward, and the
centred padding of the Inpainter (pad_to_multiple / unpad)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdinpaint.padding import crop_top_left, pad_bottom_right, pad_to_multiple, unpad

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


# ---- centred: what the Inpainter does once, around the image ----------------------------------------------------
@pytest.mark.parametrize("h, w, multiple", [(37, 50, 8), (32, 24, 8), (5, 9, 4), (3, 2, 8), (17, 1, 3)])
def test_pad_round_trip_against_numpy(h, w, multiple, random_image):
    image = random_image(2, h, w)
    mask = (torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    padded, pmask, crop = pad_to_multiple(image, mask, multiple)
    H, W = padded.shape[-2:]
    assert H % multiple == 0 and W % multiple == 0 and H - h < multiple and W - w < multiple
    assert pmask.shape == (2, 1, H, W)
    assert torch.equal(unpad(padded, crop), image) and torch.equal(unpad(pmask, crop), mask)
    # oracle: numpy's pad, the border split evenly with the odd pixel bottom/right; mirror without repeating the
    # edge pixel, or repeat the edge when the image is too small to mirror
    ph, pw = H - h, W - w
    widths = ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    mode = "reflect" if max(widths[2]) < h and max(widths[3]) < w else "edge"
    np.testing.assert_array_equal(padded.numpy(), np.pad(image.numpy(), widths, mode=mode))
    np.testing.assert_array_equal(pmask.numpy(), np.pad(mask.numpy(), widths, mode=mode))
    assert set(pmask.unique().tolist()) <= {0.0, 1.0}


def test_pad_is_a_no_op_on_multiples_and_refuses_bad_multiples(random_image):
    image, mask = random_image(1, 16, 24), torch.zeros(1, 1, 16, 24)
    padded, pmask, crop = pad_to_multiple(image, mask, 8)
    assert padded is image and pmask is mask and crop == (0, 0, 16, 24)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(image, mask, 0)
