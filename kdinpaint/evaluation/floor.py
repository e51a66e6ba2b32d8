"""The floor: what needs no training, scored on the same images and masks as a network, and the gap to it.

Every score of a network comes with the weight-free baselines of :mod:`~kdinpaint.evaluation.baselines`
(biharmonic, Telea when OpenCV is installed, mean fill: :data:`FLOOR_METHODS`) run through the same
:class:`~kdinpaint.inference.Inpainter` and :func:`~kdinpaint.inference.evaluate_model` on the same images and
masks (:func:`evaluate_floor`, :func:`evaluate_with_floor`). :func:`compare_floor` sets the network's
:func:`~kdinpaint.evaluation.metrics.summarize` result beside theirs with the per-bucket gap to the reference
(biharmonic, :func:`floor_gap`), the standard error of the overall gap from the per-image differences
(:func:`gap_standard_error`) and one verdict line (:func:`floor_verdict`); :func:`floor_to_markdown`,
:func:`floor_to_csv` and ``to_json(..., floor=)`` write it out. ``kdinpaint evaluate`` prints it and a training
run's ``report.md`` holds it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kdinpaint.evaluation.baselines import baseline_unavailable
from kdinpaint.evaluation.metrics import MetricRow, _metric_specs
from kdinpaint.inference.evaluate import evaluate_model
from kdinpaint.inference.inpainter import Inpainter

__all__ = [
    "FLOOR_METHODS",
    "FLOOR_BATCH_SIZE",
    "FLOOR_REFERENCE",
    "Floor",
    "floor_methods",
    "evaluate_floor",
    "evaluate_with_floor",
    "floor_gap",
    "floor_verdict",
    "gap_standard_error",
    "compare_floor",
    "floor_to_markdown",
    "floor_to_csv",
]

log = logging.getLogger(__name__)

FLOOR_METHODS: tuple[str, ...] = ("biharmonic", "telea", "mean")
"""The default floor: biharmonic (the reference of the gap), Telea (when OpenCV is installed), mean fill."""


FLOOR_BATCH_SIZE = 8
"""Images per call of a floor method in :func:`evaluate_floor` (they run on the CPU, one image after another)."""


def floor_methods(methods: Sequence[str] = FLOOR_METHODS) -> tuple[list[str], dict[str, str]]:
    """The floor methods that can run here, in order without repeats, and ``{method: why}`` for the others.

    A method that needs a missing optional package (Telea without OpenCV) is skipped and logged, not an
    error; an unknown name raises ``ValueError`` listing the baselines of :mod:`~kdinpaint.evaluation.baselines`.
    """
    if isinstance(methods, str):
        methods = [methods]
    usable: list[str] = []
    skipped: dict[str, str] = {}
    for method in dict.fromkeys(methods):
        why = baseline_unavailable(method)
        if why is None:
            usable.append(method)
        else:
            skipped[method] = why
            log.info("floor: %s skipped (%s)", method, why)
    return usable, skipped


@dataclass
class Floor:
    """The weight-free baselines scored on one set of images and masks (:func:`evaluate_floor`).

    ``rows[method]`` and ``summaries[method]`` are what :func:`~kdinpaint.inference.evaluate_model` returns for that
    baseline; ``skipped`` names the methods that could not run here and why.
    """

    rows: dict[str, list[MetricRow]] = field(default_factory=dict)
    summaries: dict[str, dict[str, object]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def compare(self, network: dict[str, object], name: str = "network", reference: str | None = None,
                keep_rows: bool = True, network_rows: Sequence[MetricRow] | None = None) -> dict[str, object]:
        """:func:`compare_floor` of a network's summary on the same images and masks
        (the gap to biharmonic, the verdict line); ``keep_rows`` keeps the floor's per-image rows for the JSON;
        ``network_rows`` (the network's per-image rows) adds the standard error of the gap."""
        return compare_floor(network, self.summaries, name=name, reference=reference, skipped=self.skipped,
                             rows=self.rows, network_rows=network_rows, keep_rows=keep_rows)


def evaluate_floor(
    images: torch.Tensor | Sequence[Any],
    masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    methods: Sequence[str] = FLOOR_METHODS,
    *,
    convention: str = "default",
    names: Sequence[str] | None = None,
    batch_size: int = FLOOR_BATCH_SIZE,
    on_batch: Callable[[str, int], None] | None = None,
) -> Floor:
    """Score the weight-free baselines ``methods`` on ``images`` and ``masks`` (as
    :func:`~kdinpaint.inference.evaluate_model` takes them).

    Each runs on the CPU through :meth:`~kdinpaint.inference.Inpainter.from_baseline`; biharmonic costs about 0.3 s
    per 64×64 image and seconds per 256×256 one. Methods that cannot run here are skipped (:func:`floor_methods`); when none
    can, ``ValueError``. ``on_batch(method, n)`` is called after every batch of ``n`` images (progress bars).
    """
    usable, skipped = floor_methods(methods)
    if not usable:
        raise ValueError(f"no floor method can run here ({skipped}); choose from biharmonic, mean, or install OpenCV")
    floor = Floor(skipped=skipped)
    for method in usable:
        inpainter = Inpainter.from_baseline(method, batch_size=batch_size)
        report = (lambda n, m=method: on_batch(m, n)) if on_batch is not None else None
        floor.rows[method], floor.summaries[method] = evaluate_model(
            inpainter, images, masks, convention=convention, names=names, on_batch=report)
    return floor


def evaluate_with_floor(
    inpainter: Inpainter,
    images: torch.Tensor | Sequence[Any],
    masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    methods: Sequence[str] = FLOOR_METHODS,
    convention: str = "default",
    names: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_floor_batch: Callable[[str, int], None] | None = None,
) -> tuple[list[MetricRow], dict[str, object], dict[str, object]]:
    """:func:`~kdinpaint.inference.evaluate_model` and :func:`evaluate_floor` on the same images and masks, compared.

    Returns ``(rows, summary, floor)``: the network's per-image rows and Table 1 summary, and the
    :func:`compare_floor` result (floor summaries, gap to biharmonic per bucket, verdict)
    for :func:`floor_to_markdown` and ``to_json(summary, rows, floor=floor)``.
    """
    rows, summary = evaluate_model(inpainter, images, masks, convention=convention, names=names, on_batch=on_batch)
    floor = evaluate_floor(images, masks, methods, convention=convention, names=names, on_batch=on_floor_batch)
    return rows, summary, floor.compare(summary, name=inpainter.name, network_rows=rows)


FLOOR_REFERENCE = "biharmonic"
"""The floor method the gap is measured against when it is among the methods (else the first one)."""


def floor_gap(network: dict[str, object], reference: dict[str, object]) -> dict[str, dict[str, float]]:
    """Per bucket, network minus reference: ``{label: {"psnr": dB, "ssim", "l1"}}`` (NaN where a bucket is empty).

    Both are :func:`summarize` results of the same images and masks (same conventions and buckets).
    """
    net: dict[str, dict] = network["buckets"]  # type: ignore[assignment]
    ref: dict[str, dict] = reference["buckets"]  # type: ignore[assignment]
    if list(net) != list(ref):
        raise ValueError(f"the summaries have different buckets: {list(net)} vs {list(ref)}; summarize both alike")
    gap = {}
    for label in net:
        empty = net[label]["count"] == 0 or ref[label]["count"] == 0
        gap[label] = {k: math.nan if empty else net[label][k] - ref[label][k] for k in ("psnr", "ssim", "l1")}
    return gap


def floor_verdict(gap: Mapping[str, Mapping[str, float]], name: str, reference: str, count: int | None = None,
                  standard_error: Mapping[str, float] | None = None) -> str:
    """One line on the ``all`` bucket of a :func:`floor_gap`: is the network above or below the reference?

    E.g. ``"net is above biharmonic overall: +0.80 dB PSNR / +0.012 SSIM (8 images)"``; when PSNR and SSIM
    disagree, each gets its own word. Signs are read on the printed (rounded) values. ``standard_error``
    (:func:`gap_standard_error`) adds how precisely these images measure the gap, e.g.
    ``"; standard error of the gap 0.05 dB / 0.0004 SSIM"``.
    """
    dp, ds = round(gap["all"]["psnr"], 2), round(gap["all"]["ssim"], 3)
    if math.isnan(dp) or math.isnan(ds):
        return f"{name} vs {reference}: no image to compare"

    def word(d: float) -> str:
        return "above" if d > 0 else "below" if d < 0 else "level with"

    notes = [f"{count} images"] if count is not None else []
    if standard_error is not None and not math.isnan(standard_error["psnr"]):
        notes.append(f"standard error of the gap {standard_error['psnr']:.2f} dB / {standard_error['ssim']:.4f} SSIM")
    images = f" ({'; '.join(notes)})" if notes else ""
    if word(dp) == word(ds):
        return f"{name} is {word(dp)} {reference} overall: {dp:+.2f} dB PSNR / {ds:+.3f} SSIM{images}"
    return f"{name} vs {reference} overall: {dp:+.2f} dB PSNR ({word(dp)}) / {ds:+.3f} SSIM ({word(ds)}){images}"


def gap_standard_error(network: Sequence[MetricRow], reference: Sequence[MetricRow]) -> dict[str, float]:
    """Standard error of the overall gap, from the per-image differences of two methods on the same images
    and masks: ``{"psnr": dB, "ssim"}``, ``std(d, ddof=1) / sqrt(n)`` of ``d = network - reference`` per image
    (NaN for fewer than 2 images). How far another draw of as many images from the same photos could move the
    gap, about: a gap smaller than its standard error says little either way.
    """
    if len(network) != len(reference) or any(a.name != b.name for a, b in zip(network, reference)):
        raise ValueError("the per-image rows of the network and the reference differ in images; score both on the "
                         "same images and masks, in the same order")
    n = len(network)
    if n < 2:
        return {"psnr": math.nan, "ssim": math.nan}
    diffs = {key: [getattr(a, key) - getattr(b, key) for a, b in zip(network, reference)] for key in ("psnr", "ssim")}
    return {key: float(np.std(d, ddof=1)) / math.sqrt(n) for key, d in diffs.items()}


def compare_floor(
    network: dict[str, object],
    floors: Mapping[str, dict[str, object]],
    *,
    name: str = "network",
    reference: str | None = None,
    skipped: Mapping[str, str] | None = None,
    rows: Mapping[str, Sequence[MetricRow]] | None = None,
    network_rows: Sequence[MetricRow] | None = None,
    keep_rows: bool = True,
) -> dict[str, object]:
    """A network's :func:`summarize` result against the floor methods' on the same images and masks.

    Args:
        network: the network's summary.
        floors: ``{method: summary}`` of the weight-free baselines (:func:`evaluate_floor`).
        name: how the tables call the network.
        reference: the method the gap is measured against; default :data:`FLOOR_REFERENCE` when present,
            else the first method.
        skipped: ``{method: why}`` for methods that could not run (Telea without OpenCV); printed as notes.
        rows: ``{method: per-image rows}`` to keep in the JSON (optional; ``keep_rows=False`` leaves them out).
        network_rows: the network's per-image rows; with the reference's in ``rows``, the result gets the
            standard error of the overall gap (:func:`gap_standard_error`) under ``"gap_se"`` and in the verdict.

    Returns ``{"network": name, "convention", "reference", "methods": {method: summary (+ "rows")},
    "gap": floor_gap(network, methods[reference]), "verdict": floor_verdict(...), "skipped": {...}}``, the
    ``"floor"`` entry of ``to_json`` (and ``"gap_se"`` with ``network_rows``). Refused with ``ValueError``: no
    method, a reference that is not one of them, summaries of other conventions or of other images (bucket counts
    differ).
    """
    if not floors:
        raise ValueError("no floor method to compare with; give at least one of biharmonic, telea, ns, mean")
    reference = reference or (FLOOR_REFERENCE if FLOOR_REFERENCE in floors else next(iter(floors)))
    if reference not in floors:
        raise ValueError(f"reference {reference!r} is not among the floor methods {list(floors)}")
    net_buckets: dict[str, dict] = network["buckets"]  # type: ignore[assignment]
    net_counts = {k: v["count"] for k, v in net_buckets.items()}
    for method, summary in floors.items():
        if summary["convention"] != network["convention"]:
            raise ValueError(f"floor {method!r} is scored with convention {summary['convention']!r}, the network with "
                             f"{network['convention']!r}; evaluate both with the same convention")
        buckets: dict[str, dict] = summary["buckets"]  # type: ignore[assignment]
        counts = {k: v["count"] for k, v in buckets.items()}
        if counts != net_counts:
            raise ValueError(f"floor {method!r} has images per bucket {counts}, the network {net_counts}: "
                             "run both on the same images and masks")
    gap = floor_gap(network, floors[reference])
    methods: dict[str, dict] = {}
    for method, summary in floors.items():
        methods[method] = dict(summary)
        if keep_rows and rows is not None and method in rows:
            methods[method]["rows"] = [asdict(r) for r in rows[method]]
    se = None
    if network_rows is not None and rows is not None and reference in rows:
        se = gap_standard_error(network_rows, rows[reference])
    count = net_buckets["all"]["count"] if "all" in net_buckets else None
    out = {
        "network": name,
        "convention": network["convention"],
        "reference": reference,
        "methods": methods,
        "gap": gap,
        "verdict": floor_verdict(gap, name, reference, count, standard_error=se),
        "skipped": dict(skipped or {}),
    }
    if se is not None:
        out["gap_se"] = se
    return out


def floor_to_markdown(network: dict[str, object], floor: Mapping[str, object]) -> str:
    """The comparison table: per bucket (columns), each metric of the network and of every floor method, then
    the gap network − reference (PSNR in dB, SSIM), the image counts, the verdict line and a note per skipped
    method. ``floor``: a :func:`compare_floor` result for ``network``; numbers formatted as :func:`to_markdown`.
    """
    convention = str(network["convention"])
    table: dict[str, dict] = network["buckets"]  # type: ignore[assignment]
    labels = list(table)
    name, ref = str(floor["network"]), str(floor["reference"])
    methods: dict[str, dict] = floor["methods"]  # type: ignore[assignment]
    gap: dict[str, dict] = floor["gap"]  # type: ignore[assignment]
    columns = [(name, table)] + [(m, s["buckets"]) for m, s in methods.items()]
    lines = [f"| Metric ({convention}) | Method | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]

    def cell(value: float, count: int, fmt: str) -> str:
        return "-" if count == 0 or math.isnan(value) else format(value, fmt)

    for title, key, scale, digits in _metric_specs(convention):
        for method, buckets in columns:
            cells = [cell(buckets[k][key] * scale, buckets[k]["count"], f".{digits}f") for k in labels]
            lines.append(f"| {title} | {method} | " + " | ".join(cells) + " |")
    for title, key, digits in (("Δ PSNR (dB)", "psnr", 2), ("Δ SSIM", "ssim", 3)):
        cells = [cell(gap[k][key], table[k]["count"], f"+.{digits}f") for k in labels]
        lines.append(f"| {title} | {name} − {ref} | " + " | ".join(cells) + " |")
    lines.append("| images | | " + " | ".join(str(table[k]["count"]) for k in labels) + " |")
    lines += ["", str(floor["verdict"])]
    skipped: dict[str, str] = floor.get("skipped") or {}  # type: ignore[assignment]
    lines += [f"{method}: skipped ({why})" for method, why in skipped.items()]
    return "\n".join(lines) + "\n"


def floor_to_csv(network: dict[str, object], floor: Mapping[str, object]) -> str:
    """:func:`to_csv` with a leading ``method`` column: the network's lines, then each floor method's.

    The gaps are differences of these lines (and the ``"gap"`` entry of the JSON).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "convention", "bucket", "count", "psnr", "ssim", "l1"])
    methods: dict[str, dict] = floor["methods"]  # type: ignore[assignment]
    for method, summary in [(str(floor["network"]), network), *methods.items()]:
        for label, s in summary["buckets"].items():  # type: ignore[attr-defined]
            writer.writerow([method, summary["convention"], label, s["count"], s["psnr"], s["ssim"], s["l1"]])
    return buf.getvalue()
