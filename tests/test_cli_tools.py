"""``kdinpaint evaluate``, ``inpaint`` and ``bench``: tables checked against skimage and independent counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio
from skimage.restoration import inpaint_biharmonic

import kdinpaint
from kdinpaint.cli import main
from kdinpaint.data import FreeFormMasks, rng_for, sample_images
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _table(markdown: str) -> dict[str, list[str]]:
    """``{row title: cells}`` of the first markdown table, the header row under the key ``"header"`` (a network's
    evaluation prints the floor comparison as a second table)."""
    lines: list[str] = []
    for ln in markdown.splitlines():
        if not ln.startswith("|") and lines:
            break  # the end of the first table
        if ln.startswith("|") and not ln.startswith("|---"):
            lines.append(ln)
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {"header" if i == 0 else c[0]: c[1:] for i, c in enumerate(cells)}


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def test_evaluate_biharmonic_on_sample_images(capsys, tmp_path):
    size = 48
    code, out, err = run(capsys, "evaluate", "--baseline", "biharmonic", "--count", 3, "--size", size,
                         "--mask-generator", "freeform", "--seed", 0, "--json", tmp_path / "e.json",
                         "--csv", tmp_path / "e.csv", "--no-progress")
    assert code == 0, err
    table = _table(out)
    assert table["header"] == ["10-20%", "20-30%", "30-40%", "40-50%", "all"]
    # independent masks: the generator restricted to bucket i mod 4, seeded per index
    holes = [FreeFormMasks(ratio=TABLE1_BUCKETS[i % 4]).sample(rng_for(0, i), (size, size)) for i in range(3)]
    counts = [sum(lo <= h.mean() < hi for h in holes) for lo, hi in TABLE1_BUCKETS]
    assert table["images"] == [str(c) for c in counts] + ["3"] and counts == [1, 1, 1, 0]
    assert table["PSNR ↑"][3] == "-"
    # one row against skimage: biharmonic fill, composite, 8-bit, PSNR over RGB
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    image = sample_images(size, 3)[1].permute(1, 2, 0).double().numpy()  # (H, W, 3) in [-1, 1]
    hole = holes[1]
    filled = inpaint_biharmonic((image + 1) / 2, hole, channel_axis=-1) * 2 - 1
    result = np.where(hole[..., None], np.clip(filled, -1, 1), image)
    expected = peak_signal_noise_ratio(_u8(image), _u8(result), data_range=255)
    assert rows[1]["psnr"] == pytest.approx(expected, abs=0.005)  # float32 vs float64 fill: a few 8-bit roundings
    assert rows[1]["mask_ratio"] == pytest.approx(hole.mean())
    assert float(table["PSNR ↑"][1]) == pytest.approx(rows[1]["psnr"], abs=0.006)
    csv = (tmp_path / "e.csv").read_text().splitlines()
    assert csv[0] == "convention,bucket,count,psnr,ssim,l1" and csv[2].startswith("default,20-30%,1,")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("tiny-unet")
    kd = kdinpaint.attach(adapter.student(width=4), adapter.teacher(width=4), adapter.spec)
    path = tmp_path / "tiny.safetensors"
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet", builder_kwargs={"width": 4})
    kd.detach()
    return path


def test_evaluate_checkpoint_and_wrong_adapter(capsys, tmp_path, tiny_checkpoint):
    code, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--adapter", "tiny-unet", "--count", 2,
                         "--size", 32, "--mask-generator", "rect", "--json", tmp_path / "t.json", "--no-progress")
    assert code == 0, err
    assert "tiny-unet" in out.splitlines()[0] and _table(out)["images"] == ["1", "1", "0", "0", "2"]
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    # independently: the file loaded into a fresh student, called on the masked image, composited
    model = kdinpaint.load_exported(tiny_checkpoint, kdinpaint.get_adapter("tiny-unet").student(width=4)).eval()
    from kdinpaint.inference import generated_masks

    image, mask = sample_images(32, 2)[:1], generated_masks("rect", 1, 32)
    with torch.no_grad():
        pred = model(image * (1 - mask), mask).clamp(-1, 1)
    result = (pred * mask + image * (1 - mask))[0].permute(1, 2, 0).numpy()
    expected = peak_signal_noise_ratio(_u8(image[0].permute(1, 2, 0).numpy()), _u8(result), data_range=255)
    assert rows[0]["psnr"] == pytest.approx(expected, abs=1e-4)

    code, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--adapter", "reference", "--count", 1,
                         "--size", 32)
    assert code == 1 and out == ""
    assert "is a checkpoint of 'tiny-unet', but 'reference' was expected" in err


def test_evaluate_random_weights_warn_loudly_and_bad_paths_are_named(capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--adapter", "tiny-unet", "--count", 1, "--size", 16, "--no-progress")
    assert code == 0 and "RANDOM WEIGHTS" in err and "| images | 1 |" in out
    code, _, err = run(capsys, "evaluate", "--baseline", "mean", "--images", tmp_path / "nowhere")
    assert code == 1 and "nowhere" in err and "does not exist" in err
    code, _, err = run(capsys, "evaluate", "--count", 1)
    assert code == 1 and "--checkpoint" in err and "--baseline" in err


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_inpaint_folder_with_one_broadcast_mask_and_concat(capsys, tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(0)
    sizes = {"a.png": (21, 30), "b.png": (21, 30), "sub/c.png": (35, 50)}  # none a multiple of the stride 8
    for name, (h, w) in sizes.items():
        _png(tmp_path / "in" / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    hole = np.zeros((42, 60), np.uint8)
    hole[12:30, 15:45] = 255
    _png(tmp_path / "mask.png", hole)  # another size than every image, of their aspect ratio: resized to each
    code, _, err = run(capsys, "inpaint", tmp_path / "in", tmp_path / "mask.png", tmp_path / "out",
                       "--checkpoint", tiny_checkpoint, "--concat", "--batch-size", 2, "--device", "cpu")
    assert code == 0, err
    for name, (h, w) in sizes.items():
        out = np.asarray(Image.open(tmp_path / "out" / name))
        assert out.shape == (h, 3 * w, 3)
        source = np.asarray(Image.open(tmp_path / "in" / name))
        mask = np.asarray(Image.fromarray(hole).resize((w, h), Image.NEAREST)) > 127
        np.testing.assert_array_equal(out[:, :w], source)  # input | mask | result
        np.testing.assert_array_equal(out[:, w : 2 * w, 0] > 127, mask)
        np.testing.assert_array_equal(out[:, 2 * w :][~mask], source[~mask])  # known pixels kept
        assert mask.any() and not np.array_equal(out[:, 2 * w :][mask], source[mask])


def test_inpaint_masks_by_stem_single_file_and_missing_paths(capsys, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        _png(tmp_path / "in" / f"{name}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    hole = np.zeros((12, 12), np.uint8)
    hole[3:7, 3:7] = 255
    _png(tmp_path / "masks" / "x_mask.png", hole)
    code, _, err = run(capsys, "inpaint", tmp_path / "in", tmp_path / "masks", tmp_path / "out", "--baseline", "mean")
    assert code == 1 and "y.png" in err and "no mask" in err and not (tmp_path / "out").exists()
    _png(tmp_path / "masks" / "y.png", 255 - hole)
    code, _, err = run(capsys, "inpaint", tmp_path / "in", tmp_path / "masks", tmp_path / "out", "--baseline", "mean")
    assert code == 0, err
    y_in, y_out = np.asarray(Image.open(tmp_path / "in" / "y.png")), np.asarray(Image.open(tmp_path / "out" / "y.png"))
    np.testing.assert_array_equal(y_out[3:7, 3:7], y_in[3:7, 3:7])  # y's mask is inverted: the centre is known
    code, _, err = run(capsys, "inpaint", tmp_path / "in" / "x.png", tmp_path / "masks" / "x_mask.png",
                       tmp_path / "one.jpg", "--baseline", "mean")
    assert code == 0 and Image.open(tmp_path / "one.jpg").size == (12, 12)
    code, _, err = run(capsys, "inpaint", tmp_path / "in" / "nope.png", tmp_path / "masks" / "y.png", tmp_path / "o.png",
                       "--baseline", "mean")
    assert code == 1 and "nope.png" in err and "does not exist" in err


def test_bench_row_for_tiny_unet(capsys, tmp_path):
    # every time relative to the first model (Net8 by default; here the small tiny-unet:wide, for speed)
    code, out, err = run(capsys, "bench", "--repeats", 2, "--adapters", "tiny-unet", "--size", 64, "--warmup", 1,
                         "--relative-to", "tiny-unet:wide", "--json", tmp_path / "b.json")
    assert code == 0, err
    # independently: the student with its completion blocks attached, then exported
    adapter = kdinpaint.get_adapter("tiny-unet")
    kd = kdinpaint.attach(adapter.student(), adapter.teacher(), adapter.spec)
    params = sum(p.numel() for p in kd.export().parameters())
    kd.detach()
    assert params > sum(p.numel() for p in adapter.student().parameters())  # the completion blocks count
    table = _table(out)
    assert table["header"][0] == "Params (M)" and "64×64" in table["header"][1] and "batch 1" in table["header"][1]
    assert table["header"][2:] == ["× tiny-unet:wide", "peak memory (MiB)"]
    assert table["tiny-unet"][0] == f"{params / 1e6:.3f}" and float(table["tiny-unet"][1]) > 0
    assert "bench [1/2] tiny-unet:wide" in err and "bench [2/2] tiny-unet" in err  # progress per model
    wide, tiny = json.loads((tmp_path / "b.json").read_text())
    assert wide["model"] == "tiny-unet:wide" and tiny["params"] == params and tiny["repeats"] == 2
    assert table["tiny-unet:wide"][2] == "1.00" and table["tiny-unet"][2] == f"{tiny['ms'] / wide['ms']:.2f}"
    assert tiny["peak_mib"] >= 0 and table["tiny-unet"][3] == f"{tiny['peak_mib']:.0f}"
    code, _, err = run(capsys, "bench", "--adapters", "no-such-net", "--relative-to", "tiny-unet", "--repeats", 1,
                       "--size", 32, "--no-memory")
    assert code == 1 and "no-such-net" in err
    code, _, err = run(capsys, "bench", "--adapters", "tiny-unet", "--dtype", "float16", "--device", "cpu")
    assert code == 1 and "float16 runs on CUDA only" in err


def test_inpaint_refuses_what_would_not_fit_and_max_side_runs_it(capsys, tmp_path, monkeypatch):
    from kdinpaint.inference import memory

    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)
    _png(tmp_path / "p.png", photo)
    hole = np.zeros((96, 64), np.uint8)
    hole[30:60, 20:40] = 255
    _png(tmp_path / "m.png", hole)
    # a model needing 1 kB per pixel on a device with 2 MB free (1.25 safety margin): 96x64 does not fit,
    # by hand the most pixels are 2e6 / 1.25 / 1000 = 1600, so the longest side is 96 * sqrt(1600 / 6144) = 48.99
    from kdinpaint.inference import Inpainter

    monkeypatch.setattr(Inpainter, "memory_model", lambda self: memory.MemoryModel(0.0, 1000.0))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2_000_000)
    code, _, err = run(capsys, "inpaint", tmp_path / "p.png", tmp_path / "m.png", tmp_path / "o.png", "--adapter",
                       "tiny-unet", "--no-progress")
    stride = kdinpaint.get_adapter("tiny-unet").stride
    side = 48 // stride * stride
    assert code == 1 and f"--max-side {side} " in err and not (tmp_path / "o.png").exists()
    assert "would need about 0.01 GiB" in err and "96x64" in err  # 1.25 * 6144 * 1000 B
    code, _, err = run(capsys, "inpaint", tmp_path / "p.png", tmp_path / "m.png", tmp_path / "o.png", "--adapter",
                       "tiny-unet", "--no-progress", "--max-side", side)
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == photo.shape and np.array_equal(out[hole == 0], photo[hole == 0])  # known pixels kept


def test_evaluate_image_folder_with_a_mask_folder(capsys, tmp_path):
    rng = np.random.default_rng(2)
    for name in ("p", "q", "r"):
        _png(tmp_path / "img" / f"{name}.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    ratios = {"m0.png": 0.0, "m1.png": 0.25, "m2.png": 0.45}  # white = hole (NVIDIA test set); m0 has no hole
    for name, ratio in ratios.items():
        m = np.zeros((64, 64), np.uint8)
        m[: round(64 * ratio)] = 255
        _png(tmp_path / "masks" / name, m)
    code, out, err = run(capsys, "evaluate", "--baseline", "mean", "--images", tmp_path / "img", "--masks",
                         tmp_path / "masks", "--mask-hole", "white", "--size", 32, "--no-progress")
    assert code == 0, err
    assert "skipped 1 mask" in err
    # p -> m1 (25 %), q -> m2 (45 % of 64 rows = 29 rows, at 32: 14.5 -> 45.3 %), r -> m1 again (cycling)
    assert _table(out)["images"] == ["0", "2", "0", "1", "3"]
    code, out, err = run(capsys, "evaluate", "--baseline", "mean", "--images", tmp_path / "img", "--masks",
                         tmp_path / "masks", "--mask-hole", "white", "--size", 32, "--no-progress", "--count", 5)
    assert code == 0 and "--count 5 asked for more images" in err and "scoring its 3" in err
    assert _table(out)["images"][-1] == "3"


def test_evaluate_against_a_control_gives_the_paired_gap(capsys, tmp_path, tiny_checkpoint):
    """--control: a second network on the same images and masks; the JSON's gap is the mean of the per-image
    differences of the two networks' rows, with numpy's standard error."""
    torch.manual_seed(1)  # another network of the same adapter
    adapter = kdinpaint.get_adapter("tiny-unet")
    kd = kdinpaint.attach(adapter.student(width=4), adapter.teacher(width=4), adapter.spec)
    other = tmp_path / "control.safetensors"
    kdinpaint.save_exported(kd.export(), other, adapter="tiny-unet", builder_kwargs={"width": 4})
    kd.detach()
    code, out, err = run(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--control", other, "--count", 4,
                         "--size", 32, "--json", tmp_path / "c.json", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "c.json").read_text())
    d = np.array([a["psnr"] - b["psnr"] for a, b in zip(report["rows"], report["control"]["rows"])])
    gap = report["control"]["gap"]["all"]["psnr"]
    assert gap["gap"] == pytest.approx(d.mean()) and gap["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(4))
    assert "Did distillation help?" in out and report["control"]["verdict"] in out
    assert "control.safetensors" in report["control"]["name"]  # the same adapter: told apart by file name
