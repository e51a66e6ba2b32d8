"""kdinpaint.inference.io: mask files thresholded and resized nearest (of the image's aspect ratio), images written
and read back, bad files named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdinpaint.inference import load_image, load_mask, save_image


def test_mask_files_are_thresholded_and_resized_nearest(tmp_path):
    holes = np.zeros((6, 5), bool)
    holes[1:4, 2:4] = True
    Image.fromarray(holes.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(holes.astype(np.uint8)).save(tmp_path / "m01.png")  # a 0/1 label image
    noisy = np.where(holes, 230, 20).astype(np.uint8)  # JPEG-like grey levels
    Image.fromarray(np.stack([noisy] * 3 + [np.full_like(noisy, 255)], -1), "RGBA").save(tmp_path / "rgba.png")
    for name in ("m255.png", "m01.png", "rgba.png"):
        m = load_mask(tmp_path / name)
        assert m.shape == (1, 1, 6, 5) and torch.equal(m[0, 0], torch.from_numpy(holes).float())
    big = load_mask(tmp_path / "m255.png", size=(18, 15))  # 3x larger, the same aspect: every pixel repeated
    assert torch.equal(big[0, 0], torch.from_numpy(np.kron(holes, np.ones((3, 3)))).float())
    with pytest.raises(ValueError, match=r"5x6 .* 10x18 .*mask of another image"):  # another aspect ratio
        load_mask(tmp_path / "m255.png", size=(18, 10))
    big = load_mask(tmp_path / "m255.png", size=(18, 10), aspect_tolerance=None)  # stretched only when asked
    assert torch.equal(big[0, 0], torch.from_numpy(np.kron(holes, np.ones((3, 2)))).float())
    assert torch.equal(load_mask(tmp_path / "m255.png", hole="black")[0, 0], torch.from_numpy(~holes).float())
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_mask(tmp_path / "nope.png")


def test_image_round_trip_and_errors(tmp_path):
    image = (torch.randint(0, 256, (1, 3, 7, 9)).float() / 127.5 - 1)
    save_image(tmp_path / "sub" / "x.png", image)
    assert torch.allclose(load_image(tmp_path / "sub" / "x.png"), image, atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
