"""``report.md`` / ``report.json`` of a training run folder (``recipes/train.py``): the evaluation beside the
weight-free floor, or what stopped a diverged run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kdinpaint.evaluation import metrics
from kdinpaint.evaluation.floor import floor_to_markdown

__all__ = ["write_evaluation_report", "write_divergence_report"]


def write_evaluation_report(run: Path, name: str, count: int, summary: dict, rows: list, floor: dict,
                            control: dict | None = None, perceptual: tuple[dict | None, str] = (None, "")) -> str:
    """The Table 1 layout of ``summary`` (:func:`kdinpaint.inference.evaluate_model` on ``count`` held-out
    images) and its comparison with ``floor`` (:meth:`FloorResult.compare`) into ``run/report.md``, every
    row into ``run/report.json``; with ``control`` (the twin trained without distillation: ``name``, ``summary``,
    ``rows``, ``gap`` of :func:`kdinpaint.compare.paired_gap`, ``verdict``, ``table``) a section "Did
    distillation help?" first, and ``"control"`` in the JSON; ``perceptual``: ``(scores, table)`` of
    :func:`kdinpaint.evaluation.perceptual.perceptual_report` (LPIPS and FID, or the line naming what is missing),
    under "Perceptual" and ``"perceptual"``. Returns the text to print."""
    table = metrics.to_markdown(summary)
    comparison = floor_to_markdown(summary, floor)
    floor_title = f"Against the weight-free floor (same images and masks; gap to {floor['reference']})"
    help_title = "Did distillation help? The student against its control (no distillation; same images and masks)"
    helped = f"## {help_title}\n\n{control['table']}\n" if control else ""
    scores, perceptual_text = perceptual
    perceptual_md = f"\n## Perceptual (LPIPS, FID; same images and masks)\n\n{perceptual_text}" if perceptual_text else ""
    (run / "report.md").write_text(
        f"# {name}: evaluation on {count} held-out images\n\n{helped}{table}\n## {floor_title}\n\n{comparison}"
        f"{perceptual_md}"
    )
    extra = {}
    if control:
        extra["control"] = {
            "name": control["name"], "buckets": control["summary"]["buckets"], "gap": control["gap"],
            "verdict": control["verdict"], "rows": [dataclasses.asdict(r) for r in control["rows"]],
        }
    if scores is not None:
        extra["perceptual"] = scores
    (run / "report.json").write_text(metrics.to_json(summary, rows, floor=floor, **extra))
    shown = f"{help_title}:\n{control['table']}\n" if control else ""
    return f"{shown}{table}\n{floor_title}:\n{comparison}{perceptual_text}"


def write_divergence_report(run: Path, error, step: int, last_checkpoint: str | None, who: str = "student") -> str:
    """``report.md`` / ``report.json`` of a run the divergence guard stopped at ``step`` with ``error``
    (:class:`kdinpaint.train.bilevel.TrainingDiverged`), in place of the evaluation; returns what to do next."""
    (run / "report.json").write_text(json.dumps(
        {"diverged": True, "who": who, "step": step, "term": error.term, "reason": error.reason, "message": str(error),
         "last_checkpoint": last_checkpoint}, indent=2) + "\n")
    resume = (
        f"The last good checkpoint is `{last_checkpoint}`; a run in this folder resumes from it with the learning "
        "rates saved in it, so to train with a lower `optim.lr` start a new `checkpoint.dir`."
        if last_checkpoint else "No checkpoint was written before the divergence."
    )
    (run / "report.md").write_text(
        f"# Training DIVERGED at step {step}{'' if who == 'student' else f' ({who})'}\n\n{error}.\n\nThe bad term: `{error.term}` ({error.reason}). "
        f"Nothing was exported or evaluated.\n\n{resume}\n"
    )
    return resume
