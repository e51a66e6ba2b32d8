"""kdinpaint.evaluation.compare: the paired gap of two methods on the same images, against hand-computed cases and numpy."""

import math

import numpy as np
import pytest

from kdinpaint.evaluation.compare import paired_gap, paired_to_markdown, paired_verdict, pooled_interval
from kdinpaint.evaluation.metrics import MetricRow

T_975_2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (printed tables: 4.303)


def _rows(psnr, ssim, ratios, names=None):
    names = names or [f"img{i}" for i in range(len(psnr))]
    return [MetricRow(n, r, p, s, 0.0) for n, r, p, s in zip(names, ratios, psnr, ssim)]


def test_a_hand_computed_gap_and_interval():
    a = _rows([11.0, 12.0, 13.0], [0.5, 0.5, 0.5], [0.15, 0.15, 0.15])
    b = _rows([10.0, 10.0, 10.0], [0.4, 0.5, 0.6], [0.15, 0.15, 0.15])
    gap = paired_gap(a, b)
    # d = 1, 2, 3: mean 2, sample deviation 1, standard error 1 / sqrt(3)
    se = 1 / math.sqrt(3)
    assert gap["all"]["psnr"] == pytest.approx({"gap": 2.0, "se": se, "lo": 2 - T_975_2 * se, "hi": 2 + T_975_2 * se})
    assert gap["10-20%"]["count"] == 3 and gap["20-30%"]["count"] == 0 and math.isnan(gap["20-30%"]["psnr"]["gap"])
    # ssim: d = 0.1, 0, -0.1: mean 0, deviation 0.1
    assert gap["all"]["ssim"]["gap"] == pytest.approx(0.0, abs=1e-12)
    assert gap["all"]["ssim"]["hi"] == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    # 2 - 4.30 / sqrt(3) < 0: three images do not show the PSNR gain
    assert paired_verdict(gap, "student", "control").startswith("student is level with control: +2.00 dB PSNR (95 % interval [-0.48, +4.48])")
    wide = paired_gap(_rows([11.0, 12.0, 13.0, 12.0], [0.5] * 4, [0.15] * 4), _rows([10.0] * 4, [0.4, 0.5, 0.6, 0.5], [0.15] * 4))
    assert paired_verdict(wide, "student", "control").startswith("student vs control: +2.00 dB PSNR (95 % interval [+0.70, +3.30]), above")


def test_buckets_and_numpy_agree_on_random_rows():
    rng = np.random.default_rng(0)
    n = 40
    ratios = rng.uniform(0.1, 0.5, n)
    pa, pb = rng.normal(25, 2, n), rng.normal(24.5, 2, n)
    a, b = _rows(pa, np.full(n, 0.8), ratios), _rows(pb, np.full(n, 0.8), ratios)
    gap = paired_gap(a, b)
    for label, lo, hi in (("10-20%", 0.1, 0.2), ("40-50%", 0.4, 0.5), ("all", 0.0, 1.0)):
        d = (pa - pb)[(ratios >= lo) & (ratios < hi)]
        assert gap[label]["count"] == len(d)
        assert gap[label]["psnr"]["gap"] == pytest.approx(d.mean())
        assert gap[label]["psnr"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
    table = paired_to_markdown(gap, {"a": {"buckets": {k: {"psnr": 1.0, "ssim": 0.5} for k in gap}}}, "a", "b")
    assert "| Δ PSNR (95 % interval) | a − b |" in table and table.strip().endswith(paired_verdict(gap, "a", "b"))


def test_an_exact_fill_is_left_out_of_the_psnr_gap_and_counted():
    a = _rows([math.inf, 12.0, 13.0], [1.0, 0.5, 0.5], [0.15, 0.15, 0.15])
    b = _rows([30.0, 10.0, 10.0], [0.9, 0.5, 0.5], [0.15, 0.15, 0.15])
    gap = paired_gap(a, b)
    assert gap["all"]["psnr"]["gap"] == pytest.approx(2.5) and gap["all"]["psnr"]["inf"] == 1
    assert gap["all"]["ssim"]["gap"] == pytest.approx(0.1 / 3)


def test_rows_of_other_images_are_refused():
    a = _rows([1.0, 2.0], [0.1, 0.1], [0.15, 0.15], names=["x", "y"])
    b = _rows([1.0, 2.0], [0.1, 0.1], [0.15, 0.15], names=["x", "z"])
    with pytest.raises(ValueError, match="same images and masks"):
        paired_gap(a, b)


def test_pooling_over_seeds_averages_each_image_first():
    gaps = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]  # per image: 2, 2, 2 -> no spread left
    pooled = pooled_interval(gaps)
    assert pooled["gap"] == pytest.approx(2.0) and pooled["se"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="different numbers of images"):
        pooled_interval([[1.0], [1.0, 2.0]])
