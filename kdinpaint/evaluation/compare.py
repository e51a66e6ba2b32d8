"""Paired comparison of two methods scored on the same images and masks: did distillation help?

The distilled student and its control (the same network trained without distillation, :attr:`Recipe.train.control`)
are scored image by image on the held-out set; the per-image differences ``d = a - b`` give, per Table 1 bucket
and overall, the mean gap, its standard error ``std(d, ddof=1) / sqrt(n)`` and a 95 % interval from Student's t
with ``n - 1`` degrees of freedom. Pairing removes what the images themselves contribute (an easy crop is easy for
both), so the interval is far narrower than one from two independent means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from kdinpaint.evaluation.metrics import TABLE1_BUCKETS, MetricRow, _label

__all__ = ["paired_gap", "paired_verdict", "paired_to_markdown", "pooled_interval"]

KEYS = ("psnr", "ssim")


def _interval(d: Sequence[float]) -> dict[str, float]:
    n = len(d)
    if n == 0:
        return {"gap": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(np.mean(d))
    if n < 2:
        return {"gap": mean, "se": math.nan, "lo": math.nan, "hi": math.nan}
    from scipy import stats  # here, not at the top: importing scipy.stats takes about a second

    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return {"gap": mean, "se": se, "lo": mean - half, "hi": mean + half}


def paired_gap(a: Sequence[MetricRow], b: Sequence[MetricRow],
               buckets: Sequence[tuple[float, float]] = TABLE1_BUCKETS) -> dict[str, dict]:
    """``{label: {"count": n, "psnr": {"gap", "se", "lo", "hi"}, "ssim": {...}}}`` for each bucket of the hole
    ratio (``"10-20%"`` ...) and ``"all"``: the mean of ``a - b`` per image, its standard error and 95 % interval.

    ``a`` and ``b`` are the per-image rows of two methods on the same images and masks, in the same order
    (:func:`kdinpaint.inference.evaluate_model`); rows of other images are refused. A non-finite PSNR (an
    image one method fills exactly) is left out of the PSNR figures of its bucket, and counted in ``"inf"``.
    """
    if len(a) != len(b) or any(x.name != y.name for x, y in zip(a, b)):
        raise ValueError("the per-image rows of the two methods differ in images; score both on the same images and "
                         "masks, in the same order")
    groups = {_label(lo, hi): [i for i, r in enumerate(a) if lo <= r.mask_ratio < hi] for lo, hi in buckets}
    groups["all"] = list(range(len(a)))
    out = {}
    for label, idx in groups.items():
        entry: dict = {"count": len(idx)}
        for key in KEYS:
            d = [getattr(a[i], key) - getattr(b[i], key) for i in idx]
            finite = [v for v in d if math.isfinite(v)]
            entry[key] = _interval(finite)
            if len(finite) < len(d):
                entry[key]["inf"] = len(d) - len(finite)
        out[label] = entry
    return out


def pooled_interval(gaps: Sequence[Sequence[float]]) -> dict[str, float]:
    """The gap pooled over runs (seeds) on one held-out set: ``gaps[k][i]`` is run ``k``'s difference on image
    ``i``; each image's differences are averaged over the runs (which averages out the training noise), and the
    interval is taken over the images as in :func:`paired_gap`."""
    lengths = {len(g) for g in gaps}
    if len(lengths) != 1:
        raise ValueError(f"the runs were scored on different numbers of images ({sorted(lengths)}); pool runs of one held-out set")
    per_image = np.mean(np.asarray(gaps, dtype=float), axis=0)
    return _interval([float(v) for v in per_image if math.isfinite(v)])


def paired_verdict(gap: Mapping[str, Mapping], a: str, b: str) -> str:
    """One line on the ``all`` bucket: ``a`` above / below / level with ``b`` by the 95 % interval of each metric."""
    parts = []
    for key, unit, fmt in (("psnr", " dB", "+.2f"), ("ssim", "", "+.4f")):
        g = gap["all"][key]
        if math.isnan(g["gap"]):
            return f"{a} vs {b}: no image to compare"
        word = "above" if g["lo"] > 0 else "below" if g["hi"] < 0 else "level with"
        interval = f"95 % interval [{g['lo']:{fmt}}, {g['hi']:{fmt}}]" if not math.isnan(g["lo"]) else "one image"
        parts.append((word, f"{g['gap']:{fmt}}{unit} {key.upper()} ({interval})"))
    if parts[0][0] == parts[1][0]:
        return f"{a} is {parts[0][0]} {b}: {parts[0][1]} / {parts[1][1]}"
    return f"{a} vs {b}: {parts[0][1]}, {parts[0][0]} / {parts[1][1]}, {parts[1][0]}"


def paired_to_markdown(gap: Mapping[str, Mapping], summaries: Mapping[str, Mapping], a: str, b: str) -> str:
    """A table: each method's PSNR and SSIM per bucket (``summaries``: name -> :func:`kdinpaint.evaluation.metrics.summarize`
    result, e.g. the student, its control and biharmonic), then ``a - b`` with its 95 % interval, and the verdict."""
    labels = list(gap)
    lines = ["| Metric | Method | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, name, fmt in (("psnr", "PSNR ↑", ".2f"), ("ssim", "SSIM ↑", ".4f")):
        for method, summary in summaries.items():
            cells = [f"{summary['buckets'][label][key]:{fmt}}" for label in labels]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
        cells = []
        for label in labels:
            g = gap[label][key]
            cells.append(f"{g['gap']:+{fmt}} [{g['lo']:+{fmt}}, {g['hi']:+{fmt}}]" if not math.isnan(g["lo"]) else f"{g['gap']:+{fmt}}")
        lines.append(f"| Δ {key.upper()} (95 % interval) | {a} − {b} | " + " | ".join(cells) + " |")
    lines.append("| images | | " + " | ".join(str(gap[label]["count"]) for label in labels) + " |")
    return "\n".join(lines) + "\n\n" + paired_verdict(gap, a, b) + "\n"
