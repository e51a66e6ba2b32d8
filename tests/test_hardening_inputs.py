"""Bad input, third round (issue 31): images, masks, the CLI and the metrics.

Each case is checked against an independent reference: EXIF-rotated photos and masks against ``np.rot90`` of the
stored pixels; masks of another aspect ratio or soft masks refused by the CLI while a binary mask with grey edges
is thresholded as NumPy thresholds it; an exact fill scoring the stated PSNR ceiling with finite means and a
verdict; output collisions refused with no file written; float images on [0, 1] and [0, 255] read on their scale;
a [0, 255] callable refused; bool masks, NumPy arrays and mixed sizes scored like float tensors one by one;
``--device meta``, a non-UTF-8 file list and an evaluation too large for memory refused with messages that name
the fix (the last one before any image is built: the builder is replaced by one that fails the test).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdinpaint.cli import main
from kdinpaint.data.images import list_images, read_image
from kdinpaint.evaluation.floor import compare_floor, evaluate_floor
from kdinpaint.evaluation.metrics import PSNR_CEILING, evaluate, summarize
from kdinpaint.inference import Inpainter, evaluate_model, load_image, load_mask

ORIENTATION = 0x0112


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth (JPEG-friendly) RGB photo ``(h, w, 3)`` uint8 that differs along both axes."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w - 2)], -1)
    return np.clip(base + rng.integers(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def _save_rotated_jpeg(path: Path, pixels: np.ndarray, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


# ---- 1. EXIF orientation --------------------------------------------------------------------------------------
def test_a_phone_jpeg_with_orientation_6_is_read_upright_as_image_and_mask(tmp_path):
    _save_rotated_jpeg(tmp_path / "photo.jpg", _photo(24, 40))  # stored 40 wide, 24 tall; shown turned a quarter
    with Image.open(tmp_path / "photo.jpg") as im:
        assert im.getexif()[ORIENTATION] == 6
        stored = np.asarray(im.convert("RGB"))  # the decoded pixels, as stored
    upright = np.rot90(stored, k=-1)  # Orientation 6: turn 90 degrees clockwise to show
    got = load_image(tmp_path / "photo.jpg")
    assert got.shape == (1, 3, 40, 24)
    assert torch.equal(got[0], torch.from_numpy(upright.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    assert read_image(tmp_path / "photo.jpg").size == (24, 40)  # the datasets' reader too

    holes = np.zeros((24, 40), np.uint8)
    holes[4:12, 6:30] = 255  # a wide block as stored: tall once upright
    _save_rotated_jpeg(tmp_path / "mask.jpg", np.stack([holes] * 3, -1))
    with Image.open(tmp_path / "mask.jpg") as im:
        stored_mask = np.asarray(im.convert("L")) > 127
    mask = load_mask(tmp_path / "mask.jpg", size=(40, 24))  # the upright photo's size: no aspect refusal
    assert torch.equal(mask[0, 0], torch.from_numpy(np.rot90(stored_mask, k=-1).copy()).float())


# ---- 2. a mask of another aspect ratio in the CLI ----------------------------------------------------------------
def test_cli_refuses_a_mask_of_another_aspect_ratio_and_resizes_one_of_the_same(tmp_path, capsys):
    Image.fromarray(_photo(32, 32)).save(tmp_path / "img.png")
    wide = np.zeros((32, 48), np.uint8)
    wide[8:16, 8:24] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    code, _, err = run(capsys, "inpaint", tmp_path / "img.png", tmp_path / "wide.png", tmp_path / "out.png",
                       "--baseline", "mean", "--no-progress")
    assert code == 1 and "48x32" in err and "32x32" in err and "mask of another image" in err
    assert not (tmp_path / "out.png").exists()

    double = np.zeros((64, 64), np.uint8)
    double[8:24, 16:40] = 255  # even bounds: nearest-neighbour halving is exact
    Image.fromarray(double).save(tmp_path / "double.png")
    code, _, err = run(capsys, "inpaint", tmp_path / "img.png", tmp_path / "double.png", tmp_path / "out.png",
                       "--baseline", "mean", "--no-progress")
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    hole = np.zeros((32, 32), bool)
    hole[4:12, 8:20] = True
    assert np.array_equal(out[~hole], _photo(32, 32)[~hole])  # known pixels kept where the halved mask says
    assert not np.array_equal(out[hole], _photo(32, 32)[hole])


# ---- 3. soft and noisy masks in the CLI --------------------------------------------------------------------------
def test_cli_thresholds_a_binary_mask_with_grey_edges_and_refuses_a_soft_one(tmp_path, capsys):
    Image.fromarray(_photo(128, 128)).save(tmp_path / "img.png")
    big = np.zeros((512, 512), np.uint8)
    big[130:370, 82:402] = 255
    edged = np.asarray(Image.fromarray(big).resize((128, 128), Image.BILINEAR))  # anti-aliased border
    share = ((edged > 25.5) & (edged < 229.5)).mean()
    assert 0.01 < share <= 0.05  # grey edges, a few percent
    Image.fromarray(edged).save(tmp_path / "edged.png")
    code, _, err = run(capsys, "inpaint", tmp_path / "img.png", tmp_path / "edged.png", tmp_path / "out.png",
                       "--baseline", "mean", "--no-progress")
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    known = edged <= 127  # the threshold at half range
    assert np.array_equal(out[known], _photo(128, 128)[known])
    assert not np.array_equal(out[~known], _photo(128, 128)[~known])

    soft = np.tile(np.linspace(0, 255, 32), (32, 1)).astype(np.uint8)  # a feathered ramp: 80 % grey
    Image.fromarray(soft).save(tmp_path / "soft.png")
    code, _, err = run(capsys, "inpaint", tmp_path / "img.png", tmp_path / "soft.png", tmp_path / "out2.png",
                       "--baseline", "mean", "--no-progress")  # of another size but the same aspect ratio
    expected = ((soft > 25.5) & (soft < 229.5)).mean()
    assert code == 1 and "soft mask" in err and f"{expected:.1%}" in err and "Threshold it" in err
    assert not (tmp_path / "out2.png").exists()


# ---- 4. an exact fill: PSNR at the ceiling, finite means and a verdict ---------------------------------------------
def test_an_exact_fill_scores_the_psnr_ceiling_and_keeps_means_gaps_and_verdict_finite():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 250, (2, 3, 16, 16), generator=g).float() / 127.5 - 1  # room for + 2 levels
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:8, 4:9] = 1  # 20 of 256 pixels: Table 1's first bucket is [10 %, 20 %); this is 7.8 %
    pred = target.clone()
    pred[1, :, 4:8, 4:9] += 2 / 127.5  # image 1: two 8-bit levels off on every hole value
    rows = evaluate(pred, target, mask)
    assert rows[0].psnr == PSNR_CEILING == 100.0
    by_hand = 10 * math.log10(255**2 / (2**2 * 20 * 3 / (16 * 16 * 3)))
    assert rows[1].psnr == pytest.approx(by_hand)
    summary = summarize(rows)
    assert summary["buckets"]["all"]["psnr"] == pytest.approx((100.0 + by_hand) / 2)

    exact = Inpainter(lambda x, m: target, name="exact", batch_size=2)  # knows the truth: fills holes exactly
    net_rows, net = evaluate_model(exact, target, mask)
    floor = evaluate_floor(target, mask, ["mean"])
    result = compare_floor(net, floor.summaries, name="exact", rows=floor.rows, network_rows=net_rows)
    assert all(r.psnr == 100.0 for r in net_rows) and math.isfinite(result["gap"]["all"]["psnr"])
    assert result["verdict"].startswith("exact is above mean overall")


# ---- 5. output collisions ------------------------------------------------------------------------------------------
def test_cli_refuses_two_inputs_with_one_output_and_an_output_that_is_an_input(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(16, 16, 1)).save(src / "a.png")
    Image.fromarray(_photo(16, 16, 2)).save(src / "a.jpg")
    Image.fromarray(_photo(16, 16, 3)).save(src / "b.png")
    hole = np.zeros((16, 16), np.uint8)
    hole[4:8, 4:8] = 255
    Image.fromarray(hole).save(tmp_path / "mask.png")
    code, _, err = run(capsys, "inpaint", src, tmp_path / "mask.png", tmp_path / "out", "--baseline", "mean",
                       "--no-progress")
    assert code == 1 and "a.png" in err and "a.jpg" in err and "Rename" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran

    before = {p: p.read_bytes() for p in (src / "b.png", tmp_path / "mask.png")}
    for output in (src / "b.png", tmp_path / "mask.png", tmp_path / "." / "in" / ".." / "mask.png"):
        code, _, err = run(capsys, "inpaint", src / "b.png", tmp_path / "mask.png", output, "--baseline", "mean",
                           "--no-progress")
        assert code == 1 and "would replace it" in err, err
    (src / "a.jpg").unlink()
    code, _, err = run(capsys, "inpaint", src, tmp_path / "mask.png", src, "--baseline", "mean", "--no-progress")
    assert code == 1 and "is an input image" in err  # a folder written over itself
    assert {p: p.read_bytes() for p in before} == before


# ---- 6. float images on [0, 1] and [0, 255] ------------------------------------------------------------------------
def test_float_tiffs_are_read_on_the_scale_their_values_show(tmp_path):
    grey = np.linspace(0, 255, 12 * 10, dtype=np.float32).reshape(12, 10)
    Image.fromarray(grey, mode="F").save(tmp_path / "f255.tif")
    Image.fromarray(grey / 255, mode="F").save(tmp_path / "f01.tif")
    expected = torch.from_numpy(grey / 127.5 - 1).expand(3, -1, -1)
    for name in ("f255.tif", "f01.tif"):
        assert torch.allclose(load_image(tmp_path / name)[0], expected, atol=1e-6), name
    Image.fromarray(grey * 1e4, mode="F").save(tmp_path / "huge.tif")
    with pytest.raises(ValueError, match=r"huge.tif.*values up to 2\.55e\+06.*scale it to \[0, 1\]"):
        load_image(tmp_path / "huge.tif")
    mask = np.where(np.arange(12 * 10).reshape(12, 10) % 10 < 4, 255.0, 0.0).astype(np.float32)
    Image.fromarray(mask, mode="F").save(tmp_path / "m255.tif")  # a float mask on [0, 255]: not all white
    assert torch.equal(load_mask(tmp_path / "m255.tif")[0, 0], torch.from_numpy(mask > 127.5).float())


# ---- 7. a callable answering on [0, 255] -----------------------------------------------------------------------------
def test_inpainter_refuses_a_callable_that_answers_on_0_255():
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    with pytest.raises(ValueError, match=r"byte_model returned values up to 127.5 .*\[-1, 1\].*pred / 127.5 - 1"):
        Inpainter(lambda x, m: (x + 1) * 127.5, name="byte_model")(image, mask)  # holes blanked to 0: 127.5
    out = Inpainter(lambda x, m: torch.full_like(x, -1.5))(image, mask)  # slightly beyond: clamped as before
    assert torch.equal(out[mask.expand_as(out) == 1], torch.full((27,), -1.0))


# ---- 8. raw tracebacks turned into handling or messages --------------------------------------------------------------
def test_evaluate_takes_a_bool_mask_as_its_float_twin():
    g = torch.Generator().manual_seed(1)
    target, pred = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 3:9, 2:8] = 1
    assert evaluate(pred, target, mask.bool()) == evaluate(pred, target, mask)


def test_evaluate_model_and_the_floor_take_numpy_arrays_and_mixed_sizes():
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 16, 16, generator=g) * 2 - 1, torch.rand(3, 24, 20, generator=g) * 2 - 1,
              torch.rand(3, 24, 20, generator=g) * 2 - 1]
    masks = []
    for im in images:
        m = torch.zeros(1, *im.shape[-2:])
        m[:, 4:10, 3:9] = 1
        masks.append(m)
    mean = Inpainter.from_baseline("mean", batch_size=2)
    one_by_one = [evaluate_model(mean, x[None], m[None])[0][0] for x, m in zip(images, masks)]
    rows, _ = evaluate_model(mean, images, masks)  # 16x16 alone, then the two 24x20 in one batch
    def scores(rs):
        return [v for r in rs for v in (r.psnr, r.ssim, r.l1)]

    assert scores(rows) == pytest.approx(scores(one_by_one), rel=1e-12)
    rows_np, _ = evaluate_model(mean, [x.numpy() for x in images], [m.numpy().astype(bool) for m in masks])
    assert scores(rows_np) == pytest.approx(scores(rows), rel=1e-12)
    floor = evaluate_floor([x.numpy() for x in images], masks, ["mean"])  # the floor runs through evaluate_model
    assert scores(floor.rows["mean"]) == pytest.approx(scores(rows), rel=1e-12)
    with pytest.raises(ValueError, match=r"mask 1 is \(16, 16\) \(H, W\) but image 1 is \(24, 20\)"):
        evaluate_model(mean, images, [masks[0]] * 3)
    with pytest.raises(ValueError, match=r"image 0 has shape \(16, 16\); evaluate_model takes one \(3, H, W\)"):
        evaluate_model(mean, [images[0][0]], masks[:1])


def test_cli_refuses_the_meta_device_naming_the_devices_it_takes(tmp_path, capsys):
    for argv in (("evaluate", "--baseline", "mean", "--count", 1, "--size", 16),
                 ("evaluate", "--adapter", "tiny-unet", "--count", 1, "--size", 16)):
        code, _, err = run(capsys, *argv, "--device", "meta", "--no-progress")
        assert code == 1 and "--device 'meta'" in err and "cuda, cuda:N, mps or cpu" in err, err


def test_a_file_list_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path, capsys):
    Image.fromarray(_photo(16, 16)).save(tmp_path / "café.png")
    flist = tmp_path / "list.flist"
    flist.write_bytes(str(tmp_path / "café.png").encode("latin-1") + b"\n")  # a legacy code page
    with pytest.raises(ValueError, match=r"list.flist' is not UTF-8 text \(byte 0xe9 .*save it as UTF-8"):
        list_images(flist)
    code, _, err = run(capsys, "evaluate", "--baseline", "mean", "--images", flist, "--size", 16, "--no-progress")
    assert code == 1 and "list.flist" in err and "UTF-8" in err
    flist.write_text("\ufeff" + str(tmp_path / "café.png") + "\n", encoding="utf-8")  # UTF-8 with a byte-order mark
    assert list_images(flist) == [str(tmp_path / "café.png")]


# ---- 9. an evaluation too large for memory, refused before any image is built ----------------------------------------
def test_evaluate_refuses_a_size_that_does_not_fit_before_building_images(tmp_path, capsys, monkeypatch):
    import kdinpaint.cli as cli

    def never(*_args, **_kwargs):
        raise AssertionError("images were built before the memory check")

    free = 2**30
    monkeypatch.setattr(cli, "available_bytes", lambda device: free)
    monkeypatch.setattr(cli, "_evaluation_images", never)
    # a baseline (no check at all before): 10 sample crops held twice plus mean's own need at batch 1
    code, _, err = run(capsys, "evaluate", "--baseline", "mean", "--size", 4096, "--no-progress")
    pixels = 4096 * 4096
    images, need = 20 * 3 * pixels * 4, pixels * (128 + 16)
    fits = int(4096 * math.sqrt(free / (images + need))) // 8 * 8
    assert code == 1 and f"--size {fits} or less" in err and "20 x 3 x 4096 x 4096 x 4 bytes" in err, err
    assert f"{(images + need) / 2**30:.2f} GiB" in err and "1.00 GiB is free" in err
    # a network with the default floor on a folder: images read a batch at a time, the floor's biharmonic counted
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(_photo(16, 16)).save(folder / "a.png")
    code, _, err = run(capsys, "evaluate", "--adapter", "tiny-unet", "--images", folder, "--size", 2048,
                       "--no-progress")
    assert code == 1 and "for biharmonic at a time" in err and "sample images" not in err, err
