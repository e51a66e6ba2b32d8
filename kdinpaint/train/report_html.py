"""``report.html`` of a run folder: the evaluation tables, and the held-out crops behind the numbers.

For each hole-ratio bucket of the paper's Table 1 (and one for the holes outside them), the crops where the network
gains most over the biharmonic floor and where it loses most, or gains least (PSNR of the network minus PSNR of the
floor, per image),
each as a row: input (the hole in grey) | network | floor | truth (| control, when the run has one). One file, no
external resources: the images are PNGs embedded as base64, so the page opens anywhere and can be mailed.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from kdinpaint.evaluation import metrics
from kdinpaint.evaluation.floor import floor_gap, floor_verdict, gap_standard_error
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS, MetricRow

__all__ = ["write_report_html", "gains"]

FLOOR = "biharmonic"
_OUTSIDE = "outside 10-50%"
_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 24px; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; } h3 { font-size: 15px; margin: 20px 0 8px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #d8d8dc; padding: 4px 8px; text-align: right; }
th:first-child, th:nth-child(2), td:first-child, td.method { text-align: left; }
thead th { background: #f4f4f6; }
.gain { color: #1a7f37; } .loss { color: #c4281c; }
.crops { display: grid; gap: 6px 10px; align-items: start; margin-bottom: 10px; }
.crops figure { margin: 0; } .crops figcaption { font-size: 12px; color: #6e6e73; }
.crops img { width: 100%; max-width: 256px; image-rendering: pixelated; display: block; }
.row-note { grid-column: 1 / -1; font-size: 13px; margin-top: 6px; }
.verdict { font-weight: 600; }
"""


def _png(image: torch.Tensor) -> str:
    """``(3, H, W)`` in [-1, 1] → a base64 PNG data URL (rounded to 8 bits, as a saved PNG)."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label(ratio: float) -> str:
    for lo, hi in TABLE1_BUCKETS:
        if lo <= ratio < hi:
            return metrics._label(lo, hi)
    return _OUTSIDE


def gains(rows: Sequence[MetricRow], floor_rows: Sequence[MetricRow]) -> dict[str, list[tuple[int, float]]]:
    """Per bucket (Table 1 labels, then ``"outside 10-50%"`` when any hole falls outside), ``[(image index, PSNR gain
    in dB of the network over the floor)]`` from the largest gain to the largest loss (ties by index)."""
    if len(rows) != len(floor_rows) or any(a.name != b.name for a, b in zip(rows, floor_rows)):
        raise ValueError("the network's and the floor's rows differ in images; score both on the same images and masks")
    out: dict[str, list[tuple[int, float]]] = {metrics._label(lo, hi): [] for lo, hi in TABLE1_BUCKETS}
    for i, (a, b) in enumerate(zip(rows, floor_rows)):
        out.setdefault(_label(a.mask_ratio), []).append((i, a.psnr - b.psnr))
    return {k: sorted(v, key=lambda t: (-t[1], t[0])) for k, v in out.items() if v or k != _OUTSIDE}


def _cell(value: float, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not signed:
        return f"{value:.{digits}f}"
    shown = round(value, digits) + 0.0  # a value that rounds to zero is +0.00, neither gain nor loss
    return f'<span class="{"gain" if shown > 0 else "loss" if shown < 0 else ""}">{shown:+.{digits}f}</span>'


def _table(summaries: dict[str, dict], gap: dict[str, dict], name: str) -> str:
    labels = list(next(iter(summaries.values()))["buckets"])
    counts = next(iter(summaries.values()))["buckets"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in labels)
    lines = [f"<table><thead><tr><th>Metric</th><th>Method</th>{head}</tr></thead><tbody>"]
    for title, key, scale, digits in (("PSNR ↑ (dB)", "psnr", 1, 2), ("SSIM ↑", "ssim", 1, 3), ("Mean l1 ↓ (%)", "l1", 100, 2)):
        for method, summary in summaries.items():
            cells = "".join(f"<td>{_cell(summary['buckets'][k][key] * scale if summary['buckets'][k]['count'] else math.nan, digits)}</td>"
                            for k in labels)
            lines.append(f'<tr><td>{title}</td><td class="method">{html.escape(method)}</td>{cells}</tr>')
    for title, key, digits in (("Δ PSNR (dB)", "psnr", 2), ("Δ SSIM", "ssim", 3)):
        cells = "".join(f"<td>{_cell(gap[k][key], digits, signed=True)}</td>" for k in labels)
        lines.append(f'<tr><td>{title}</td><td class="method">{html.escape(name)} − {FLOOR}</td>{cells}</tr>')
    lines.append("<tr><td>images</td><td></td>" + "".join(f"<td>{counts[k]['count']}</td>" for k in labels) + "</tr>")
    return "\n".join(lines) + "</tbody></table>"


def write_report_html(
    run: str | Path,
    name: str,
    images: torch.Tensor,
    masks: torch.Tensor,
    outputs: torch.Tensor,
    floor_outputs: torch.Tensor,
    rows: Sequence[MetricRow],
    floor_rows: Sequence[MetricRow],
    control_outputs: torch.Tensor | None = None,
    *,
    per_bucket: int = 3,
) -> Path:
    """Write ``run/report.html`` and return its path.

    Args:
        run: the run folder.
        name: how the page calls the network (e.g. ``"reference:net8"``).
        images: the held-out crops ``(N, 3, H, W)`` in [-1, 1] (the truth).
        masks: their masks ``(N, 1, H, W)``, 1 = hole.
        outputs: the network's composites ``(N, 3, H, W)`` (what :class:`~kdinpaint.inference.Inpainter` returns).
        floor_outputs: the biharmonic fill's composites ``(N, 3, H, W)``.
        rows: the network's per-image :class:`~kdinpaint.evaluation.metrics.MetricRow` s, in image order.
        floor_rows: the biharmonic fill's, same images and order.
        control_outputs: the control network's composites (a run with ``train.control``), scored here.
        per_bucket: crops shown per bucket where the network gains most, and as many where it loses most (or gains
            least, when it gains on every crop); a bucket of few crops shows its top half and its bottom half.
    """
    n = images.shape[0]
    shapes = {"masks": masks, "outputs": outputs, "floor_outputs": floor_outputs}
    if control_outputs is not None:
        shapes["control_outputs"] = control_outputs
    for key, x in shapes.items():
        if x.shape[0] != n or x.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"{key} has shape {tuple(x.shape)}; expected {n} images of {tuple(images.shape[-2:])}")
    if len(rows) != n or len(floor_rows) != n:
        raise ValueError(f"{len(rows)} network rows and {len(floor_rows)} floor rows for {n} images; give one per image")
    if per_bucket < 1:
        raise ValueError(f"per_bucket must be at least 1, got {per_bucket}")
    by_bucket = gains(rows, floor_rows)
    summary, floor_summary = metrics.summarize(rows), metrics.summarize(floor_rows)
    summaries = {name: summary, FLOOR: floor_summary}
    control_rows = None
    if control_outputs is not None:
        control_rows = metrics.evaluate(control_outputs.float(), images.float(), masks.float(), names=[r.name for r in rows])
        summaries[f"{name} (control)"] = metrics.summarize(control_rows)
    gap = floor_gap(summary, floor_summary)
    verdict = floor_verdict(gap, name, FLOOR, n, gap_standard_error(rows, floor_rows))

    columns = ["input", name, FLOOR, "truth"] + (["control"] if control_outputs is not None else [])
    hole_grey = torch.zeros_like(images)  # 0 in [-1, 1]: mid grey
    masked = torch.where(masks.bool(), hole_grey, images)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(name)}: evaluation</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(name)}: evaluation on {n} held-out crops</h1>",
        f"<p class='verdict'>{html.escape(verdict)}</p>",
        "<h2>Against the weight-free floor (same images and masks)</h2>",
        _table(summaries, gap, name),
        "<h2>Where the network gains and loses most against biharmonic</h2>",
        f"<p>Per hole-ratio bucket, the crops with the largest PSNR gain of {html.escape(name)} over {FLOOR}, then the "
        "largest losses. Columns: " + " | ".join(html.escape(c) for c in columns) + ". The hole is grey in the input.</p>",
    ]
    template = f"grid-template-columns: repeat({len(columns)}, minmax(0, 1fr));"
    for label, ranked in by_bucket.items():
        parts.append(f"<h3>Holes {html.escape(label)} ({len(ranked)} crop{'s' if len(ranked) != 1 else ''})</h3>")
        if not ranked:
            parts.append("<p>No held-out crop has a hole in this range.</p>")
            continue
        best = ranked[: min(per_bucket, (len(ranked) + 1) // 2)]  # the top half at most, the rest from the bottom
        worst = ranked[len(best):][::-1][:per_bucket][::-1]
        parts.append(f"<div class='crops' style='{template}'>")
        for chosen, at_top in ((best, True), (worst, False)):
            for i, gain in chosen:
                kind = "gains most" if at_top else "loses most" if gain < 0 else "gains least"
                row, frow = rows[i], floor_rows[i]
                note = (f"{html.escape(row.name)}: {kind}, {_cell(gain, 2, signed=True)} dB "
                        f"({row.psnr:.2f} vs {frow.psnr:.2f} dB; SSIM {row.ssim:.3f} vs {frow.ssim:.3f}; "
                        f"hole {100 * row.mask_ratio:.1f} %")
                if control_rows is not None:
                    note += f"; control {control_rows[i].psnr:.2f} dB"
                parts.append(f"<div class='row-note'>{note})</div>")
                shown = [masked[i], outputs[i], floor_outputs[i], images[i]]
                if control_outputs is not None:
                    shown.append(control_outputs[i])
                for title, x in zip(columns, shown):
                    parts.append(f"<figure><img alt='{html.escape(title)} {html.escape(row.name)}' "
                                 f"src='{_png(x)}'><figcaption>{html.escape(title)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    path = Path(run) / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
