"""The floor beside every score: weight-free baselines on the same images and masks as the network, the gap to
biharmonic, the comparison table and JSON, ``kdinpaint evaluate``'s floor and train.py's report."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage.restoration import inpaint_biharmonic

import kdinpaint
from kdinpaint.cli import main
from kdinpaint.data import sample_images
from kdinpaint.evaluation.floor import (
    FLOOR_METHODS,
    compare_floor,
    evaluate_floor,
    evaluate_with_floor,
    floor_to_csv,
    floor_to_markdown,
    floor_verdict,
    gap_standard_error,
)
from kdinpaint.evaluation.metrics import MetricRow, evaluate, summarize, to_json, to_markdown
from kdinpaint.inference import Inpainter, generated_masks

BUCKETS = ["10-20%", "20-30%", "30-40%", "40-50%", "all"]
HAS_CV2 = importlib.util.find_spec("cv2") is not None


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 32x32 crops with freeform masks, one per Table 1 bucket."""
    return sample_images(32, 4), generated_masks("freeform", 4, 32, seed=1)


def _skimage_biharmonic(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """skimage's fill on [0, 1] images solved in float64, back to [-1, 1], composited: without kdinpaint.evaluation.baselines."""
    out = []
    for img, m in zip(image, mask):
        x = ((img.float() + 1) / 2).permute(1, 2, 0).numpy().astype(np.float64)  # (H, W, 3)
        filled = inpaint_biharmonic(x, m[0].numpy() > 0.5, channel_axis=-1).astype(np.float32)
        out.append(torch.from_numpy(filled).permute(2, 0, 1).clamp(0, 1) * 2 - 1)
    pred = torch.stack(out)
    return pred * mask + image * (1 - mask)


def _numpy_mean_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    img, hole = image.double().numpy(), mask.double().numpy()
    known = 1 - hole
    mean = (img * known).sum((2, 3), keepdims=True) / known.sum((2, 3), keepdims=True)
    return torch.from_numpy(img * known + mean * hole).float()


def test_floor_numbers_equal_evaluate_on_independent_fills(data):
    images, masks = data
    names = [f"im{i}" for i in range(4)]
    floor = evaluate_floor(images, masks, ("biharmonic", "mean"), names=names)
    assert list(floor.summaries) == ["biharmonic", "mean"]
    for method, fill in (("biharmonic", _skimage_biharmonic), ("mean", _numpy_mean_fill)):
        expected_rows = evaluate(fill(images, masks), images, masks, names=names)
        for got, want in zip(floor.rows[method], expected_rows):
            assert got.name == want.name and got.mask_ratio == pytest.approx(want.mask_ratio)
            assert (got.psnr, got.ssim, got.l1) == pytest.approx((want.psnr, want.ssim, want.l1), abs=1e-6)
        expected = summarize(expected_rows)["buckets"]
        for label in BUCKETS:
            got = floor.summaries[method]["buckets"][label]
            assert got["count"] == expected[label]["count"] == (4 if label == "all" else 1)
            assert (got["psnr"], got["ssim"], got["l1"]) == pytest.approx(
                (expected[label]["psnr"], expected[label]["ssim"], expected[label]["l1"]), abs=1e-6)


def test_telea_is_skipped_and_logged_without_opencv(data, monkeypatch, caplog):
    # OpenCV missing even where it is installed: what the floor module asks of the baselines
    monkeypatch.setattr("kdinpaint.evaluation.floor.baseline_unavailable",
                        lambda name: "needs OpenCV: pip install 'kdinpaint[cv]'" if name == "telea" else None)
    images, masks = data
    with caplog.at_level("INFO", logger="kdinpaint.evaluation.floor"):
        floor = evaluate_floor(images[:1], masks[:1], ("telea", "mean"))
    assert list(floor.summaries) == ["mean"] and "kdinpaint[cv]" in floor.skipped["telea"]
    assert "telea skipped" in caplog.text
    with pytest.raises(ValueError, match="no floor method can run"):
        evaluate_floor(images[:1], masks[:1], ("telea",))
    with pytest.raises(ValueError, match="unknown baseline 'lama'"):
        evaluate_floor(images[:1], masks[:1], ("lama",))


@pytest.mark.skipif(not HAS_CV2, reason="OpenCV (kdinpaint[cv]) is not installed")
def test_telea_runs_with_opencv(data):
    images, masks = data
    floor = evaluate_floor(images[:2], masks[:2])
    assert list(floor.summaries) == list(FLOOR_METHODS) and floor.skipped == {}


def _zero_model(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(image)  # a grey fill: a "network" without weights


def test_gap_is_network_minus_biharmonic_and_verdict(data):
    images, masks = data
    net = Inpainter(_zero_model, name="grey")
    rows, summary, floor = evaluate_with_floor(net, images, masks, methods=("biharmonic", "mean"))
    assert floor["network"] == "grey" and floor["reference"] == "biharmonic"
    bih = floor["methods"]["biharmonic"]["buckets"]
    for label in BUCKETS:
        for key in ("psnr", "ssim", "l1"):
            want = summary["buckets"][label][key] - bih[label][key]
            assert floor["gap"][label][key] == pytest.approx(want, abs=1e-12)
    dp, ds = floor["gap"]["all"]["psnr"], floor["gap"]["all"]["ssim"]
    assert dp < 0 and ds < 0  # grey is below biharmonic on photos
    # the standard error of the gap: numpy's sample deviation of the per-image differences over sqrt(n)
    ref_rows = floor["methods"]["biharmonic"]["rows"]
    se = {k: np.std([getattr(r, k) - b[k] for r, b in zip(rows, ref_rows)], ddof=1) / 2 for k in ("psnr", "ssim")}
    assert floor["gap_se"] == pytest.approx(se, rel=1e-9)
    assert floor["verdict"] == (f"grey is below biharmonic overall: {dp:+.2f} dB PSNR / {ds:+.3f} SSIM (4 images; "
                                f"standard error of the gap {se['psnr']:.2f} dB / {se['ssim']:.4f} SSIM)")
    assert len(floor["methods"]["mean"]["rows"]) == 4  # per-image rows kept for the JSON
    # another reference when biharmonic is not among the methods
    floor2 = evaluate_floor(images, masks, ("mean",)).compare(summary, name="grey")
    assert floor2["reference"] == "mean"


def _summary(psnr: float, ssim: float, convention: str = "default") -> dict:
    rows = [MetricRow(f"r{i}", r, psnr + i, ssim, 0.01 * (i + 1), convention) for i, r in enumerate((0.15, 0.25, 0.26))]
    return summarize(rows)


def test_verdict_words():
    gap = lambda p, s: {"all": {"psnr": p, "ssim": s, "l1": 0.0}}  # noqa: E731
    assert floor_verdict(gap(0.8, 0.012), "net", "biharmonic", 8) == \
        "net is above biharmonic overall: +0.80 dB PSNR / +0.012 SSIM (8 images)"
    assert floor_verdict(gap(-1.234, 0.0101), "net", "biharmonic") == \
        "net vs biharmonic overall: -1.23 dB PSNR (below) / +0.010 SSIM (above)"
    assert "level with" in floor_verdict(gap(0.001, -0.0001), "net", "mean")
    # per-image gaps 1, 2, 3 dB and 0, 0, 0.003 SSIM: sample deviations 1 and 0.0017320508, over sqrt(3)
    net = [MetricRow(f"i{k}", 0.15, 20.0 + 2 * k, 0.5 + (0.003 if k == 2 else 0), 0.1) for k in range(3)]
    ref = [MetricRow(f"i{k}", 0.15, 19.0 + k, 0.5, 0.1) for k in range(3)]
    se = gap_standard_error(net, ref)
    assert se["psnr"] == pytest.approx(1 / 3**0.5) and se["ssim"] == pytest.approx(0.001, rel=1e-6)
    assert floor_verdict(gap(2.0, 0.001), "net", "biharmonic", 3, standard_error=se) == \
        "net is above biharmonic overall: +2.00 dB PSNR / +0.001 SSIM (3 images; standard error of the gap 0.58 dB / 0.0010 SSIM)"
    assert math.isnan(gap_standard_error(net[:1], ref[:1])["psnr"])
    with pytest.raises(ValueError, match="same images and masks"):
        gap_standard_error(net, ref[::-1])


def test_markdown_json_csv_of_the_comparison():
    network = _summary(25.0, 0.8)
    floors = {"biharmonic": _summary(24.0, 0.85), "telea": _summary(23.0, 0.7), "mean": _summary(20.0, 0.6)}
    floor = compare_floor(network, floors, name="my-net")
    md = floor_to_markdown(network, floor)
    lines = md.splitlines()
    assert lines[0] == "| Metric (default) | Method | " + " | ".join(BUCKETS) + " |"
    for method in ("my-net", *floors):
        for title in ("PSNR ↑", "SSIM ↑", "Mean l1 (%) ↓"):
            assert sum(ln.startswith(f"| {title} | {method} |") for ln in lines) == 1, (title, method)
    # buckets 10-20 %: one row (25.0), 20-30 %: two rows (26.0, 27.0), others empty, all: 26.0
    assert "| PSNR ↑ | my-net | 25.00 | 26.50 | - | - | 26.00 |" in lines
    assert "| Δ PSNR (dB) | my-net − biharmonic | +1.00 | +1.00 | - | - | +1.00 |" in lines
    assert "| Δ SSIM | my-net − biharmonic | -0.050 | -0.050 | - | - | -0.050 |" in lines
    assert "| images | | 1 | 2 | 0 | 0 | 3 |" in lines
    assert "my-net vs biharmonic overall: +1.00 dB PSNR (above) / -0.050 SSIM (below) (3 images)" in lines
    # the single-model table is unchanged
    assert to_markdown(network).startswith("| Mask ratio (default) | 10-20% | 20-30% | 30-40% | 40-50% | all |\n")

    data = json.loads(to_json(network, floor=floor))
    assert data["buckets"]["all"]["psnr"] == 26.0 and set(data["floor"]["methods"]) == set(floors)
    assert data["floor"]["gap"]["30-40%"]["psnr"] is None and data["floor"]["gap"]["all"]["psnr"] == 1.0
    assert data["floor"]["reference"] == "biharmonic" and data["floor"]["skipped"] == {}
    parsed = list(csv.DictReader(io.StringIO(floor_to_csv(network, floor))))
    assert [r["method"] for r in parsed[::5]] == ["my-net", "biharmonic", "telea", "mean"]
    assert parsed[4]["bucket"] == "all" and float(parsed[4]["psnr"]) == 26.0

    skipped = compare_floor(network, {"mean": floors["mean"]}, name="n", skipped={"telea": "needs OpenCV"})
    assert floor_to_markdown(network, skipped).splitlines()[-1] == "telea: skipped (needs OpenCV)"
    with pytest.raises(ValueError, match="same images and masks"):
        compare_floor(network, {"biharmonic": summarize([MetricRow("x", 0.15, 1, 1, 1)])})
    with pytest.raises(ValueError, match="same convention"):
        compare_floor(network, {"biharmonic": _summary(24.0, 0.85, "rn")})
    with pytest.raises(ValueError, match="no floor method"):
        compare_floor(network, {})


# ---- kdinpaint evaluate -----------------------------------------------------------------------------
def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ("--count", 2, "--size", 32, "--mask-generator", "rect", "--no-progress")


def test_cli_prints_the_floor_for_a_network(capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--adapter", "tiny-unet", *SMALL, "--json", tmp_path / "e.json",
                         "--csv", tmp_path / "e.csv")
    assert code == 0, err
    assert "| Mask ratio (default) |" in out  # the network's own table first
    assert "The floor: weight-free baselines on the same images and masks, gap to biharmonic" in out
    for method in ("biharmonic", "mean") + (("telea",) if HAS_CV2 else ()):
        assert f"| PSNR ↑ | {method} |" in out
    assert "| Δ PSNR (dB) | tiny-unet (random weights) − biharmonic |" in out
    assert "tiny-unet (random weights) is below biharmonic" in out or "tiny-unet (random weights) vs biharmonic" in out
    data = json.loads((tmp_path / "e.json").read_text())
    assert len(data["rows"]) == 2 and data["floor"]["reference"] == "biharmonic"
    assert len(data["floor"]["methods"]["biharmonic"]["rows"]) == 2
    assert ("telea" in data["floor"]["methods"]) == HAS_CV2 and ("telea" in data["floor"]["skipped"]) != HAS_CV2
    header = (tmp_path / "e.csv").read_text().splitlines()[0]
    assert header == "method,convention,bucket,count,psnr,ssim,l1"


def test_cli_no_floor_floor_choice_and_baseline_alone(capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--adapter", "tiny-unet", *SMALL, "--no-floor",
                         "--json", tmp_path / "n.json")
    assert code == 0, err
    assert "biharmonic" not in out and "The floor" not in out and "Δ" not in out
    assert "floor" not in json.loads((tmp_path / "n.json").read_text())

    code, out, err = run(capsys, "evaluate", "--adapter", "tiny-unet", *SMALL, "--floor", "mean")
    assert code == 0, err
    assert "| PSNR ↑ | mean |" in out and "biharmonic" not in out and "gap to mean" in out

    code, out, err = run(capsys, "evaluate", "--baseline", "mean", *SMALL, "--csv", tmp_path / "b.csv")
    assert code == 0, err
    assert "The floor" not in out and "Δ" not in out  # --baseline alone: as before
    assert (tmp_path / "b.csv").read_text().startswith("convention,bucket,count,psnr,ssim,l1\n")

    code, _, err = run(capsys, "evaluate", "--adapter", "tiny-unet", *SMALL, "--floor", "mean", "--no-floor")
    assert code == 1 and "not both" in err


# ---- recipes/train.py finish() -----------------------------------------------------------------------
class _MainProcess:
    """What finish() uses of an Accelerator, on the CPU, collecting what it prints."""

    is_main_process = True
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.printed: list[str] = []

    def print(self, *args: object) -> None:
        self.printed.append(" ".join(map(str, args)))


def test_train_finish_reports_the_floor(tmp_path):
    """finish() on an untrained tiny reference network (no training run): report.md, report.json, stdout."""
    from training_helpers import DEMO, TINY

    from kdinpaint.train.recipe import load_recipe
    from kdinpaint.train.runs import build_models
    from kdinpaint.train.trainer import Trainer

    recipe = load_recipe(DEMO, [*TINY, f"checkpoint.dir={tmp_path}"])
    torch.manual_seed(0)
    adapter, variant, adapter_spec, student, teacher = build_models(recipe)
    kd = kdinpaint.attach(student, teacher if adapter_spec.uses_teacher else None, adapter_spec)
    accelerator = _MainProcess()
    trainer = Trainer(recipe)
    trainer.accelerator = accelerator
    student_arm = SimpleNamespace(name="student", kd=kd, average=None)  # what finish() reads of a trained arm
    trainer.finish([student_arm], adapter_spec, adapter, variant)

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["buckets"]) == set(BUCKETS) and len(report["rows"]) == 4  # kept for recipes/ablation.py
    floor = report["floor"]
    assert floor["network"] == adapter.name and floor["reference"] == "biharmonic"
    assert set(floor["methods"]) == {"biharmonic", "mean"} | ({"telea"} if HAS_CV2 else set())
    for label in BUCKETS:
        net, bih = report["buckets"][label], floor["methods"]["biharmonic"]["buckets"][label]
        assert floor["gap"][label]["psnr"] == pytest.approx(net["psnr"] - bih["psnr"])
        assert floor["gap"][label]["ssim"] == pytest.approx(net["ssim"] - bih["ssim"])
    md = (tmp_path / "report.md").read_text()
    assert md.count("| PSNR ↑ |") == 1 + len(floor["methods"]) + 1  # the network's table, then the comparison
    assert "## Against the weight-free floor" in md and floor["verdict"] in md
    assert all(label in md for label in BUCKETS)
    printed = "\n".join(accelerator.printed)
    assert "| Δ PSNR (dB) |" in printed and floor["verdict"] in printed
    assert not math.isnan(report["buckets"]["all"]["psnr"])
