"""DeepFill v2 numerics modes (compat="tf" / "nipponjo") and the channel-order check of real weights.

References are independent of the code under test: mask resizing and patch validity re-computed with
Python loops (TF's float32 rounding emulated with numpy float32, the port's rounding in exact fractions),
hand-computed single-pixel holes, and weights trained for a few steps in a known channel order.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from kdinpaint.cli import main
from kdinpaint.data import sample_images
from kdinpaint.evaluation.metrics import psnr
from kdinpaint_adapters.gatedconv import (
    OFFICIAL_COMPAT,
    ContextualAttention,
    GatedConvInpaint,
    build_gatedconv,
    build_gatedconv_teacher,
    check_channel_order,
    hole_psnr,
    load_official,
    resize_nearest_tf,
    save_official,
)


def _tf_index(n_in: int, n_out: int) -> list[int]:
    """TF1 resize_nearest_neighbor(align_corners=True): roundf(float32(i) * float32((n_in-1)/(n_out-1)))."""
    if n_out == 1:
        return [0]
    scale = np.float32(n_in - 1) / np.float32(n_out - 1)
    return [min(math.floor(float(np.float32(i) * scale) + 0.5), n_in - 1) for i in range(n_out)]


def _exact_index(n_in: int, n_out: int) -> list[int]:
    """Round half up of i * (n_in-1) / (n_out-1) in exact fractions (the port's rounding away from float ties)."""
    return [math.floor(Fraction(i * (n_in - 1), n_out - 1) + Fraction(1, 2)) for i in range(n_out)]


def _naive_invalid(mask: torch.Tensor, compat: str) -> set[tuple[int, int]]:
    """Keys (row, col) at H/8 whose 3x3 neighbourhood (zero outside) holds a hole, mask (H, W) 0/1."""
    H, W = mask.shape
    if compat == "tf":  # resized to the H/4 features, then to H/8 inside contextual attention
        r4, c4 = _tf_index(H, H // 4), _tf_index(W, W // 4)
        rows = [r4[i] for i in _tf_index(H // 4, H // 8)]
        cols = [c4[j] for j in _tf_index(W // 4, W // 8)]
    else:  # resized once, H -> H/8
        rows, cols = _exact_index(H, H // 8), _exact_index(W, W // 8)
    small = [[float(mask[r, c]) for c in cols] for r in rows]
    h, w = len(rows), len(cols)
    return {
        (y, x)
        for y in range(h)
        for x in range(w)
        if any(small[y + dy][x + dx] > 0 for dy in (-1, 0, 1) for dx in (-1, 0, 1) if 0 <= y + dy < h and 0 <= x + dx < w)
    }


def _invalid_keys(model: GatedConvInpaint, image: torch.Tensor, mask: torch.Tensor) -> list[set[tuple[int, int]]]:
    """The keys contextual attention zeroed (all-zero affinity rows), per sample, as (row, col) at H/8."""
    seen = []
    handle = model.contextual_attention.affinity.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(image, mask)
    handle.remove()
    att = seen[0]  # (B, L, h, w)
    wb = image.shape[-1] // 8
    return [{(int(k) // wb, int(k) % wb) for k in (att[b] == 0).flatten(1).all(1).nonzero().flatten()} for b in range(att.shape[0])]


# ------------------------------------------------------------------ mask resizing and patch validity


def test_single_hole_pixel_hand_computed():
    """64x64 image: TF reads rows 0, 8, 17, 25, 38, 46, 55, 63 (64 -> 16 -> 8), the port rows 0, 9, 18, ... 63
    (64 -> 8). A hole at (9, 9) is seen only by the port, one at (8, 8) only by TF; a hole seen at cell
    (1, 1) invalidates the 3x3 keys around it."""
    assert [_tf_index(64, 16)[i] for i in _tf_index(16, 8)] == [0, 8, 17, 25, 38, 46, 55, 63]
    assert _exact_index(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    torch.manual_seed(0)
    tf, nj = GatedConvInpaint(cnum=4).eval(), GatedConvInpaint(cnum=4, compat="nipponjo").eval()
    nj.load_state_dict(tf.state_dict())
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    around = {(y, x) for y in range(3) for x in range(3)}
    for pixel, tf_expected, nj_expected in (((9, 9), set(), around), ((8, 8), around, set())):
        mask = torch.zeros(1, 1, 64, 64)
        mask[0, 0, pixel[0], pixel[1]] = 1
        assert _invalid_keys(tf, image, mask) == [tf_expected], pixel
        assert _invalid_keys(nj, image, mask) == [nj_expected], pixel


@pytest.mark.parametrize("compat", ["tf", "nipponjo"])
def test_patch_validity_equals_naive_recomputation(compat):
    torch.manual_seed(1)
    H, W = 80, 72
    mask = torch.zeros(3, 1, H, W)
    g = torch.Generator().manual_seed(3)
    for b in range(3):  # a few thin strokes and boxes per sample: holes near cell borders
        for _ in range(4):
            y, x = torch.randint(0, H - 6, (1,), generator=g).item(), torch.randint(0, W - 6, (1,), generator=g).item()
            h, w = torch.randint(1, 6, (2,), generator=g).tolist()
            mask[b, 0, y : y + h, x : x + w] = 1
    model = GatedConvInpaint(cnum=4, compat=compat).eval()
    got = _invalid_keys(model, torch.rand(3, 3, H, W) * 2 - 1, mask)
    assert got == [_naive_invalid(mask[b, 0], compat) for b in range(3)]  # each sample its own mask
    # The two modes see different patches for these masks (the test would not tell them apart otherwise).
    assert [_naive_invalid(mask[b, 0], "tf") for b in range(3)] != [_naive_invalid(mask[b, 0], "nipponjo") for b in range(3)]


def test_resize_rounding_of_each_mode():
    for n_in in range(4, 601, 2):
        for n_out in (n_in // 2, n_in // 4, n_in // 8):
            if n_out >= 2:
                col = torch.arange(float(n_in)).view(1, 1, n_in, 1)
                rows = resize_nearest_tf(col, (n_out, 1)).flatten().long().tolist()
                assert rows == _tf_index(n_in, n_out), (n_in, n_out)
    # Float ties: TF's float32 product and the port's linspace round to different rows.
    col = torch.arange(58.0).view(1, 1, 58, 1)
    assert resize_nearest_tf(col, (29, 1))[0, 0, 14, 0] == 29 == _tf_index(58, 29)[14]
    assert resize_nearest_tf(col, (29, 1), "nipponjo")[0, 0, 14, 0] == 28
    col = torch.arange(54.0).view(1, 1, 54, 1)
    assert resize_nearest_tf(col, (27, 1))[0, 0, 13, 0] == 26 == _tf_index(54, 27)[13]
    assert resize_nearest_tf(col, (27, 1), "nipponjo")[0, 0, 13, 0] == 27
    # Away from ties the port's rounding is exact round-half-up.
    for n_in, n_out in ((256, 32), (256, 128), (232, 29), (80, 10)):
        col = torch.arange(float(n_in)).view(1, 1, n_in, 1)
        assert resize_nearest_tf(col, (n_out, 1), "nipponjo").flatten().long().tolist() == _exact_index(n_in, n_out)


def test_modes_differ_only_in_mask_resizing_fusion_and_order():
    """With no hole and the same fusion and order, the two modes are the same network (64: no rounding ties)."""
    torch.manual_seed(0)
    tf = GatedConvInpaint(cnum=4, channel_order="rgb", fuse=False).eval()
    nj = GatedConvInpaint(cnum=4, compat="nipponjo").eval()
    nj.load_state_dict(tf.state_dict())
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    empty = torch.zeros(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(tf(image, empty, return_coarse=True)[0], nj(image, empty, return_coarse=True)[0])
        mask = torch.zeros(2, 1, 64, 64)
        mask[..., 9:30, 9:30] = 1
        a, ca = tf(image, mask, return_coarse=True)
        b, cb = nj(image, mask, return_coarse=True)
    assert torch.equal(ca, cb)  # the coarse stage is shared
    assert not torch.equal(a, b)  # rows 8 / 9 of the mask: other background patches


# ------------------------------------------------------------------ presets and loaders


def test_compat_presets_overrides_and_errors():
    nj = GatedConvInpaint(cnum=4, compat="nipponjo")
    assert (nj.compat, nj.channel_order, nj.contextual_attention.fuse, nj.contextual_attention.compat) == (
        "nipponjo", "rgb", False, "nipponjo")
    tf = GatedConvInpaint(cnum=4)
    assert (tf.compat, tf.channel_order, tf.contextual_attention.fuse) == ("tf", "bgr", True)
    mixed = GatedConvInpaint(cnum=4, compat="nipponjo", channel_order="bgr", fuse=True)
    assert (mixed.channel_order, mixed.contextual_attention.fuse) == ("bgr", True)
    with pytest.raises(ValueError, match=r"compat must be one of \('tf', 'nipponjo'\).*'pytorch'"):
        GatedConvInpaint(cnum=4, compat="pytorch")
    with pytest.raises(ValueError, match="compat must be one of"):
        ContextualAttention(compat="torch")


def test_loaders_of_the_official_files_use_the_tf_numerics(tmp_path):
    assert OFFICIAL_COMPAT == "tf"
    path = tmp_path / "states_tf_places2.pth"
    save_official(GatedConvInpaint(), path)
    for model in (load_official(path), build_gatedconv(path), build_gatedconv_teacher(path)):
        assert (model.compat, model.channel_order, model.contextual_attention.fuse) == ("tf", "bgr", True)
    assert build_gatedconv(path, compat="nipponjo").compat == "nipponjo"


# ------------------------------------------------------------------ channel-order check


def test_hole_psnr_equals_psnr_of_the_hole_pixels():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    pred = (target + 0.2 * torch.randn_like(target)).clamp(-1, 1)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:9, 3:7] = 1
    mask[1, :, 10:, :] = 1
    for b in range(2):
        hole = mask[b, 0].bool()
        p = ((pred[b][:, hole] + 1) * 127.5).reshape(1, 1, 1, -1)
        t = ((target[b][:, hole] + 1) * 127.5).reshape(1, 1, 1, -1)
        torch.testing.assert_close(hole_psnr(pred, target, mask)[b], psnr(p, t)[0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="needs a hole"):
        hole_psnr(pred, target, torch.zeros(2, 1, 16, 16))


def _tinted(size: int) -> torch.Tensor:
    """Bundled photos with a red cast: a colour statistic a few training steps pick up."""
    return (sample_images(size, 10) * 0.5 + torch.tensor([0.4, 0.0, -0.4]).view(1, 3, 1, 1)).clamp(-1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_check_weights_finds_the_order_weights_were_trained_in(order, tmp_path, capsys):
    images = _tinted(32)
    for i, im in enumerate(images):  # the photos the command reads, as PNG files
        Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / f"p{i}.png")
    torch.manual_seed(0)
    model = GatedConvInpaint(cnum=8, channel_order=order)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):  # a few steps of L1 on both stages, boxes as holes
        mask = torch.zeros(10, 1, 32, 32)
        for b in range(10):
            h, w = torch.randint(8, 16, (2,), generator=g).tolist()
            y, x = torch.randint(0, 32 - h, (1,), generator=g).item(), torch.randint(0, 32 - w, (1,), generator=g).item()
            mask[b, :, y : y + h, x : x + w] = 1
        refined, coarse = model(images, mask, return_coarse=True)
        loss = (refined - images).abs().mean() + (coarse - images).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = tmp_path / "trained.pth"
    save_official(model, weights)
    out = tmp_path / "check.json"
    code = main(["check-weights", "gatedconv", str(weights), "--images", str(tmp_path), "--size", "32",
                 "--json", str(out), "--device", "cpu"])
    assert code == 0
    report = json.loads(out.read_text())
    other = "bgr" if order == "rgb" else "rgb"
    assert report["recommendation"] == order
    assert report["mean_psnr_hole"][order] > report["mean_psnr_hole"][other] + 1.0
    assert len(report["psnr_hole"][order]) == 10
    assert f"recommendation: channel_order='{order}'" in capsys.readouterr().out
    # The Python API restores the model's own order and agrees.
    model.channel_order = other
    from kdinpaint.inference import GeneratedMasks

    masks = GeneratedMasks("freeform", 10, 32, 0)
    result = check_channel_order(model, images, [masks[i] for i in range(10)])
    assert model.channel_order == other and result.recommendation == order


def test_check_weights_refuses_bad_input(tmp_path, capsys):
    assert main(["check-weights", "gatedconv", str(tmp_path / "missing.pth"), "--size", "32", "--count", "1"]) == 1
    assert "missing.pth" in capsys.readouterr().err
    model = GatedConvInpaint(cnum=4)
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="one mask per image"):
        check_channel_order(model, images, torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="needs a hole"):
        check_channel_order(model, images, torch.zeros(2, 1, 16, 16))
