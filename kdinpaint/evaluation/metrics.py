"""PSNR / SSIM / mean L1 for inpainting, one pinned convention plus documented compatibility modes.

Peers disagree widely: on one image pair SSIM ranges 0.888-0.961 and "L1" differs 7× with the
convention. kdinpaint's default (``convention="default"``):

* evaluate the **composite** (prediction in the hole, ground truth outside), both images mapped from
  [-1, 1] to [0, 255] and **rounded** to integers (what saving a PNG does);
* **PSNR** over the RGB image, data range 255: ``10 log10(255² / mean((a - b)²))``, at most
  :data:`PSNR_CEILING` (100 dB): an image filled exactly would score +inf and make every mean it enters inf;
* **SSIM** per channel with an 11×11 Gaussian window, σ = 1.5, population covariance, ``K1 = 0.01``,
  ``K2 = 0.03``, data range 255, averaged over the valid (uncropped-by-padding) region and the
  channels: what ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)`` computes (Wang et al. 2004, MATLAB);
* **mean L1** over the whole image in [0, 1]: ``mean |a - b| / 255`` (tables print it ×100, in %).

Compatibility modes reproduce other evaluation scripts on the same tensors:

* ``"edgeconnect"`` (``knazeri/edge-connect`` ``scripts/metrics.py``): uint8 by truncation, grayscale
  (``skimage.color.rgb2gray`` weights 0.2125, 0.7154, 0.0721) in [0, 1]; PSNR with data range 1; SSIM
  with a 51×51 uniform window and sample covariance; "MAE" = ``sum |a - b| / sum (a + b)`` (relative).
* ``"rn"`` (``geekyutao/RN`` ``eval.py``): uint8 by truncation; PSNR RGB 255; SSIM per channel, 11×11
  uniform window, sample covariance (skimage's old ``multichannel=True``); L1 = ``mean |gray(a) -
  gray(b)| / 255`` with gray = channel mean.
* ``"mmagic"`` (``open-mmlab/mmagic`` ``evaluation/metrics``): rounded; PSNR and SSIM as the default;
  MAE on the hole only, ``sum(|a - b| ⊙ M) / (C sum M) / 255``, ×100 as its tables report it.

Everything is batched in torch (float64 where the device has it) on the images' device. Per-image
:class:`MetricRow` objects carry the hole ratio so buckets can be recomputed; :func:`summarize`
groups them into the paper's Table 1 buckets (10-20, 20-30, 30-40, 40-50 %, half-open ``[lo, hi)``)
and :func:`to_markdown`, :func:`to_csv`, :func:`to_json` write them out (the comparison with the weight-free
baselines on the same images and masks is :mod:`kdinpaint.evaluation.floor`). LPIPS and FID run
only when their packages and weights are present locally (:func:`lpips_distance`, :func:`fid_score`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from kdinpaint import _moved
from kdinpaint.losses.reconstruction import check_pair
from kdinpaint.masking import check_image_range, check_mask, check_rgb_image, composite, hole_ratio

__all__ = [
    "CONVENTIONS",
    "TABLE1_BUCKETS",
    "MetricRow",
    "MetricUnavailable",
    "to_uint8",
    "rgb_to_gray",
    "PSNR_CEILING",
    "psnr",
    "ssim",
    "evaluate",
    "summarize",
    "to_markdown",
    "to_csv",
    "rows_to_csv",
    "to_json",
    "lpips_distance",
    "fid_score",
]

Convention = Literal["default", "edgeconnect", "rn", "mmagic"]
CONVENTIONS: tuple[str, ...] = ("default", "edgeconnect", "rn", "mmagic")
TABLE1_BUCKETS: tuple[tuple[float, float], ...] = ((0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5))
"""The mask-ratio columns of the paper's Table 1, half-open ``[lo, hi)``."""


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def to_uint8(image: torch.Tensor, rounding: Literal["round", "truncate"] = "round") -> torch.Tensor:
    """[-1, 1] → integer values in [0, 255] (kept as float64, or float32 on MPS), same shape."""
    x = ((image.to(_dtype(image.device)) + 1) * 127.5).clamp(0, 255)
    return torch.round(x) if rounding == "round" else torch.floor(x)


def rgb_to_gray(image: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(B, 1, H, W)`` with skimage's ``rgb2gray`` weights (0.2125, 0.7154, 0.0721)."""
    w = torch.tensor([0.2125, 0.7154, 0.0721], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * w).sum(1, keepdim=True)


PSNR_CEILING = 100.0
"""The highest PSNR reported, in dB: identical images (an exact fill) score this, not +inf, so means, gaps and
verdicts over a set stay finite. The mean squared error is clamped at ``R² · 10^(-PSNR_CEILING / 10)``, the
epsilon clamp of several toolkits. Only an all-but-exact fill gets near it: one 8-bit level wrong in one channel
of one pixel of a 256×256 RGB image is 101.1 dB, so such a fill ties with an exact one at the ceiling."""


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR ``10 log10(R² / mean((a - b)²))`` over C, H, W; ``(B,)``, at most :data:`PSNR_CEILING`
    (identical images score exactly the ceiling)."""
    check_pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-PSNR_CEILING / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def _window(kind: str, size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if kind == "gaussian":
        x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
        w = torch.exp(-(x**2) / (2 * sigma**2))
    elif kind == "uniform":
        w = torch.ones(size, dtype=dtype, device=device)
    else:
        raise ValueError(f"window must be 'gaussian' or 'uniform', got {kind!r}")
    return w / w.sum()


def _band(w: torch.Tensor, n: int) -> torch.Tensor:
    """``(n - k + 1, n)`` matrix whose row ``i`` holds the window ``w`` at columns ``i .. i + k - 1``."""
    k = w.numel()
    rows = torch.arange(n - k + 1, device=w.device)
    band = torch.zeros(n - k + 1, n, dtype=w.dtype, device=w.device)
    band[rows[:, None], rows[:, None] + torch.arange(k, device=w.device)] = w
    return band


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 255.0,
    window: Literal["gaussian", "uniform"] = "gaussian",
    win_size: int = 11,
    sigma: float = 1.5,
    sample_covariance: bool = False,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM ``(B,)``: mean over channels and the valid region of the SSIM map.

    ``S = (2 μa μb + C1)(2 σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2))``, ``C1 = (k1 R)²``,
    ``C2 = (k2 R)²``; local statistics use a separable window (``gaussian``: σ = ``sigma``; ``uniform``),
    variances scaled by ``n / (n - 1)`` with ``sample_covariance``. The map covers only pixels whose
    window lies inside the image, which is skimage's crop of ``(win_size - 1) / 2`` pixels.
    """
    check_pair(a, b)
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {win_size}x{win_size} SSIM window")
    dtype = _dtype(a.device)
    a, b = a.to(dtype), b.to(dtype)
    B, C, H, W = a.shape
    w = _window(window, win_size, sigma, dtype, a.device)
    # Separable "valid" filtering as two matrix products with banded matrices: exact, and on CPU much
    # faster in float64 than conv2d, whatever the window size.
    kh, kw = _band(w, H), _band(w, W)  # (H - k + 1, H), (W - k + 1, W)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return kh @ x.reshape(B * C, H, W) @ kw.T  # (B·C, H', W'): every channel filtered alone

    mu_a, mu_b = filt(a), filt(b)
    caa, cbb, cab = filt(a * a), filt(b * b), filt(a * b)
    n = win_size * win_size
    norm = n / (n - 1) if sample_covariance else 1.0
    va, vb, vab = norm * (caa - mu_a**2), norm * (cbb - mu_b**2), norm * (cab - mu_a * mu_b)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * vab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return smap.reshape(B, -1).mean(1)


@dataclass
class MetricRow:
    """One evaluated image: ``l1`` in [0, 1] (×100 for ``mmagic``), ``mask_ratio`` the hole fraction."""

    name: str
    mask_ratio: float
    psnr: float
    ssim: float
    l1: float
    convention: str = "default"


def evaluate(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    convention: Convention = "default",
    names: Sequence[str] | None = None,
    use_composite: bool = True,
    max_hole_ratio: float = 0.9,
) -> list[MetricRow]:
    """Metrics of a batch, one :class:`MetricRow` per image.

    ``pred``, ``target``: ``(B, 3, H, W)`` in [-1, 1]; ``mask``: ``(B, 1, H, W)`` with 1 = hole (float, or bool
    with True = hole, or integer 0/1). The
    composite ``pred ⊙ M + target ⊙ (1 - M)`` is scored unless ``use_composite=False``. Refused with
    ``ValueError``: an empty mask (nothing was inpainted; every score would be perfect), a hole ratio above
    ``max_hole_ratio`` (almost surely an inverted mask), images not in [-1, 1] or with NaN/inf values (a
    score of NaN is never returned), an empty batch.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; choose one of {list(CONVENTIONS)}")
    check_rgb_image(pred, "evaluate", name="pred")
    check_pair(pred, target)
    check_mask(mask, pred)
    if not mask.is_floating_point():  # a bool (True = hole) or 0/1 integer mask says the same: composite in floats
        mask = mask.to(pred.dtype)
    if mask.shape[0] != pred.shape[0]:
        mask = mask.expand(pred.shape[0], -1, -1, -1)
    for label, x in (("pred", pred), ("target", target)):
        check_image_range(x, name=label, tol=0.01)
    ratios = hole_ratio(mask.float())
    empty = (ratios == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask of image(s) {empty[:5]} has no hole: nothing to evaluate (every score would be "
                         "perfect)")
    inverted = (ratios > max_hole_ratio).nonzero().flatten().tolist()
    if inverted:
        raise ValueError(
            f"mask of image(s) {inverted[:5]} is {float(ratios[inverted[0]]):.0%} hole (> max_hole_ratio "
            f"{max_hole_ratio}): is it inverted? kdinpaint masks are 1 = hole; use 1 - mask, or raise max_hole_ratio"
        )
    if names is not None and len(names) != pred.shape[0]:
        raise ValueError(f"{len(names)} names for {pred.shape[0]} images")
    out = composite(pred, target, mask) if use_composite else pred
    rounding = "truncate" if convention in ("edgeconnect", "rn") else "round"
    a, b = to_uint8(out, rounding), to_uint8(target, rounding)
    m = mask.to(a.dtype)
    if convention == "edgeconnect":
        ga, gb = rgb_to_gray(a / 255), rgb_to_gray(b / 255)
        p = psnr(ga, gb, 1.0)
        s = ssim(ga, gb, data_range=1.0, window="uniform", win_size=51, sample_covariance=True)
        l1 = (ga - gb).abs().flatten(1).sum(1) / (ga + gb).flatten(1).sum(1)
    else:
        p = psnr(a, b, 255.0)
        if convention == "rn":
            s = ssim(a, b, window="uniform", win_size=11, sample_covariance=True)
            l1 = (a.mean(1) - b.mean(1)).abs().flatten(1).mean(1) / 255
        else:
            s = ssim(a, b)
            if convention == "mmagic":
                diff = (a - b).abs() / 255 * m
                l1 = diff.flatten(1).sum(1) / (m.flatten(1).sum(1) * a.shape[1]) * 100
            else:
                l1 = (a - b).abs().flatten(1).mean(1) / 255
    names = list(names) if names is not None else [str(i) for i in range(pred.shape[0])]
    return [
        MetricRow(n, float(r), float(pi), float(si), float(li), convention)
        for n, r, pi, si, li in zip(names, ratios.tolist(), p.tolist(), s.tolist(), l1.tolist())
    ]


def _label(lo: float, hi: float) -> str:
    return f"{round(lo * 100)}-{round(hi * 100)}%"


def summarize(rows: Sequence[MetricRow], buckets: Sequence[tuple[float, float]] = TABLE1_BUCKETS) -> dict[str, object]:
    """Mean PSNR / SSIM / L1 per ``[lo, hi)`` hole-ratio bucket and over all rows.

    Returns ``{"convention": str, "buckets": {label: {"count", "psnr", "ssim", "l1"}}}`` with labels
    like ``"10-20%"`` plus ``"all"``; an empty bucket has count 0 and NaN means. Rows of different
    conventions are refused.
    """
    conventions = sorted({r.convention for r in rows}) or ["default"]
    if len(conventions) > 1:
        raise ValueError(f"rows mix metric conventions {conventions}; summarize each convention separately")
    for lo, hi in buckets:
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"bucket ({lo}, {hi}) is not a range 0 <= lo < hi <= 1")
    groups = {_label(lo, hi): [r for r in rows if lo <= r.mask_ratio < hi] for lo, hi in buckets}
    groups["all"] = list(rows)
    table = {}
    for label, rs in groups.items():
        n = len(rs)
        mean = lambda key: sum(getattr(r, key) for r in rs) / n if n else math.nan  # noqa: E731
        table[label] = {"count": n, "psnr": mean("psnr"), "ssim": mean("ssim"), "l1": mean("l1")}
    return {"convention": conventions[0], "buckets": table}


def _metric_specs(convention: str) -> list[tuple[str, str, float, int]]:
    """``(row title, key, scale, digits)`` of PSNR, SSIM and the convention's L1 as tables print them."""
    if convention == "mmagic":
        l1_name, l1_scale, l1_digits = "MAE (%)", 1.0, 2
    elif convention == "edgeconnect":
        l1_name, l1_scale, l1_digits = "rel. MAE", 1.0, 4
    else:
        l1_name, l1_scale, l1_digits = "Mean l1 (%)", 100.0, 2
    return [("PSNR ↑", "psnr", 1.0, 2), ("SSIM ↑", "ssim", 1.0, 3), (l1_name + " ↓", "l1", l1_scale, l1_digits)]


def to_markdown(summary: dict[str, object]) -> str:
    """The paper's Table 1 layout: metrics as rows, mask-ratio buckets as columns.

    Mean L1 is printed in % (×100) for ``default`` and ``rn``; ``mmagic`` MAE is already ×100;
    ``edgeconnect``'s relative MAE is printed as is.
    """
    convention = str(summary["convention"])
    table: dict[str, dict] = summary["buckets"]  # type: ignore[assignment]
    labels = list(table)
    lines = [f"| Mask ratio ({convention}) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for title, key, scale, digits in _metric_specs(convention):
        cells = ["-" if table[k]["count"] == 0 else f"{table[k][key] * scale:.{digits}f}" for k in labels]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("| images | " + " | ".join(str(table[k]["count"]) for k in labels) + " |")
    return "\n".join(lines) + "\n"


def to_csv(summary: dict[str, object]) -> str:
    """One line per bucket: ``convention,bucket,count,psnr,ssim,l1`` (L1 as stored, not in %)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["convention", "bucket", "count", "psnr", "ssim", "l1"])
    for label, s in summary["buckets"].items():  # type: ignore[attr-defined]
        writer.writerow([summary["convention"], label, s["count"], s["psnr"], s["ssim"], s["l1"]])
    return buf.getvalue()


def rows_to_csv(rows: Sequence[MetricRow]) -> str:
    """Per-image rows with their mask ratio, so other bucketings can be computed later."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "mask_ratio", "psnr", "ssim", "l1", "convention"])
    for r in rows:
        writer.writerow([r.name, r.mask_ratio, r.psnr, r.ssim, r.l1, r.convention])
    return buf.getvalue()


def to_json(
    summary: dict[str, object], rows: Sequence[MetricRow] | None = None, *, floor: Mapping[str, object] | None = None,
    **sections: object,
) -> str:
    """Strict JSON of the summary (and the rows, and under ``"floor"`` a
    :func:`~kdinpaint.evaluation.floor.compare_floor` result, and any further ``sections`` under their names);
    non-finite numbers become ``null``."""

    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    payload: dict[str, object] = dict(summary)
    if rows is not None:
        payload["rows"] = [asdict(r) for r in rows]
    if floor is not None:
        payload["floor"] = dict(floor)
    payload.update(sections)
    return json.dumps(clean(payload), indent=2, allow_nan=False)


class MetricUnavailable(RuntimeError):
    """An optional metric whose package or weights are not available on this machine."""


def _hub_file(filename: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


_LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def lpips_distance(pred: torch.Tensor, target: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """LPIPS (Zhang et al. 2018) per image, ``(B,)``, through the ``lpips`` package.

    Runs only when ``lpips`` is installed and torchvision's ``net`` backbone weights are in the torch
    hub cache (``torch.hub.get_dir()/checkpoints``); otherwise raises :class:`MetricUnavailable` naming
    what is missing. Images ``(B, 3, H, W)`` in [-1, 1].
    """
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MetricUnavailable("LPIPS needs the 'lpips' package: pip install lpips") from exc
    path = _hub_file(_LPIPS_BACKBONES[net])
    if not os.path.isfile(path):
        raise MetricUnavailable(f"LPIPS-{net} needs torchvision's backbone weights at {path}; copy the file there")
    model = lpips.LPIPS(net=net, verbose=False).to(pred.device).eval()
    with torch.no_grad():
        return model(pred, target).flatten()


def fid_score(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 32) -> float:
    """FID between two image sets ``(N, 3, H, W)`` in [-1, 1], through ``pytorch-fid``'s InceptionV3.

    Runs only when ``pytorch-fid`` is installed and its weights file is in the torch hub cache;
    otherwise raises :class:`MetricUnavailable`. Use thousands of images for a meaningful value.
    """
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance  # type: ignore[import-not-found]
        from pytorch_fid.inception import InceptionV3  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MetricUnavailable("FID needs the 'pytorch-fid' package: pip install pytorch-fid") from exc
    path = _hub_file(_FID_WEIGHTS)
    if not os.path.isfile(path):
        raise MetricUnavailable(f"FID needs the Inception weights at {path}; copy {_FID_WEIGHTS} there")
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(real.device).eval()

    def feats(x: torch.Tensor):
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(model((x[i : i + batch_size] + 1) / 2)[0].flatten(1).cpu().double())
        f = torch.cat(out).numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    (m1, s1), (m2, s2) = feats(real), feats(fake)
    return float(calculate_frechet_distance(m1, s1, m2, s2))


__getattr__ = _moved.moved_names(__name__)  # the floor functions, now in kdinpaint.evaluation.floor
