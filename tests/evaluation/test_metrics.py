"""Metrics against skimage (the oracle), per convention, plus buckets, writers and bad inputs."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kdinpaint.data import sample_images
from kdinpaint.evaluation.metrics import (
    MetricRow,
    MetricUnavailable,
    evaluate,
    fid_score,
    lpips_distance,
    psnr,
    rows_to_csv,
    ssim,
    summarize,
    to_csv,
    to_json,
    to_markdown,
)


@pytest.fixture(scope="module")
def pair():
    gt = sample_images(64, 2, names=["astronaut", "coffee"])
    g = torch.Generator().manual_seed(0)
    pred = (gt.flip(-1) * 0.7 + 0.2 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:40, 12:30] = 1
    mask[1, :, 30:60, 5:55] = 1
    return pred, gt, mask


def _u8(x: torch.Tensor, trunc: bool) -> np.ndarray:
    v = ((x.double() + 1) * 127.5).clamp(0, 255)
    v = torch.floor(v) if trunc else torch.round(v)
    return v.permute(1, 2, 0).numpy().astype(np.uint8)


def test_default_equals_skimage(pair):
    pred, gt, mask = pair
    rows = evaluate(pred, gt, mask)
    comp = pred * mask + gt * (1 - mask)
    for i, row in enumerate(rows):
        a, b = _u8(comp[i], False), _u8(gt[i], False)
        ref_ssim = structural_similarity(
            b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
        )
        assert row.psnr == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-3)
        assert row.ssim == pytest.approx(ref_ssim, abs=1e-3)
        assert row.l1 == pytest.approx(np.abs(a.astype(float) - b).mean() / 255, abs=1e-6)
        assert row.mask_ratio == pytest.approx(mask[i].mean().item())


def test_compat_modes_equal_their_scripts(pair):
    pred, gt, mask = pair
    comp = pred * mask + gt * (1 - mask)
    ec, rn, mm = (evaluate(pred, gt, mask, convention=c) for c in ("edgeconnect", "rn", "mmagic"))
    for i in range(2):
        # EdgeConnect scripts/metrics.py: truncated uint8 → /255 → rgb2gray; win 51; relative MAE
        a, b = rgb2gray(_u8(comp[i], True) / 255.0), rgb2gray(_u8(gt[i], True) / 255.0)
        assert ec[i].psnr == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1), abs=1e-3)
        assert ec[i].ssim == pytest.approx(structural_similarity(b, a, data_range=1, win_size=51), abs=1e-3)
        assert ec[i].l1 == pytest.approx(np.abs(b - a).sum() / (b + a).sum(), abs=1e-6)
        # RN eval.py: truncated uint8 RGB, win 11 uniform with sample covariance, channel-mean L1
        a, b = _u8(comp[i], True), _u8(gt[i], True)
        assert rn[i].psnr == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-3)
        ref = structural_similarity(b, a, data_range=255, win_size=11, channel_axis=-1)
        assert rn[i].ssim == pytest.approx(ref, abs=1e-3)
        assert rn[i].l1 == pytest.approx(np.mean(np.abs((a.mean(2) - b.mean(2)) / 255)), abs=1e-6)
        # MMagic: hole-only MAE on /255 values, ×100
        a, b = _u8(comp[i], False) / 255.0, _u8(gt[i], False) / 255.0
        hole = mask[i, 0].numpy() > 0
        assert mm[i].l1 == pytest.approx(np.abs(a - b)[hole].mean() * 100, abs=1e-6)


def test_low_level_functions():
    a = torch.zeros(1, 1, 16, 16)
    b = a + 10
    assert psnr(a, b).item() == pytest.approx(10 * np.log10(255**2 / 100))
    assert psnr(a, a).item() == 100.0  # the stated ceiling (PSNR_CEILING), not inf
    assert ssim(b, b).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(a[..., :8, :8], a[..., :8, :8])
    with pytest.raises(ValueError, match="odd"):
        ssim(a, b, win_size=4)


def test_buckets_and_writers():
    rows = [
        MetricRow("a", 0.12, 30.0, 0.9, 0.01),
        MetricRow("b", 0.18, 28.0, 0.8, 0.03),
        MetricRow("c", 0.2, 25.0, 0.7, 0.05),  # boundary: [0.2, 0.3)
        MetricRow("d", 0.55, 20.0, 0.5, 0.09),  # outside the Table 1 buckets, counted in "all"
    ]
    summary = summarize(rows)
    b = summary["buckets"]
    assert b["10-20%"] == {"count": 2, "psnr": 29.0, "ssim": pytest.approx(0.85), "l1": pytest.approx(0.02)}
    assert b["20-30%"]["count"] == 1 and b["30-40%"]["count"] == 0 and b["all"]["count"] == 4
    md = to_markdown(summary)
    assert "| 10-20% | 20-30% | 30-40% | 40-50% | all |" in md
    assert "| PSNR ↑ | 29.00 | 25.00 | - | - | 25.75 |" in md
    assert "| Mean l1 (%) ↓ | 2.00 | 5.00 | - | - | 4.50 |" in md
    parsed = list(csv.DictReader(io.StringIO(to_csv(summary))))
    assert parsed[0]["bucket"] == "10-20%" and float(parsed[0]["psnr"]) == 29.0
    j = json.loads(to_json(summary, rows))
    assert j["buckets"]["30-40%"]["psnr"] is None and j["rows"][2]["mask_ratio"] == 0.2
    per_image = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert [float(r["mask_ratio"]) for r in per_image] == [0.12, 0.18, 0.2, 0.55]
    with pytest.raises(ValueError, match="mix metric conventions"):
        summarize(rows + [MetricRow("e", 0.1, 1, 1, 1, "rn")])


def test_bad_inputs(pair):
    pred, gt, mask = pair
    with pytest.raises(ValueError, match="no hole"):
        evaluate(pred, gt, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="inverted"):
        evaluate(pred, gt, torch.ones_like(mask))
    with pytest.raises(ValueError, match="inverted"):
        evaluate(pred, gt, 1 - mask, max_hole_ratio=0.5)
    with pytest.raises(ValueError, match="0/255"):
        evaluate(pred, gt, mask * 255)
    with pytest.raises(ValueError, match="resize the mask"):
        evaluate(pred, gt, mask[..., :32, :32])
    with pytest.raises(ValueError, match=r"x / 127.5 - 1"):
        evaluate((pred + 1) * 127.5, gt, mask)
    with pytest.raises(ValueError, match="unknown metric convention"):
        evaluate(pred, gt, mask, convention="lama")


def test_optional_metrics_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(MetricUnavailable, match="lpips|checkpoints"):
        lpips_distance(x, x)
    with pytest.raises(MetricUnavailable, match="pytorch-fid|checkpoints"):
        fid_score(x, x)
