"""Training: a recipe (:mod:`~kdinpaint.train.recipe`) run by the :class:`~kdinpaint.train.trainer.Trainer`.

* :mod:`~kdinpaint.train.recipe` — the YAML recipe as validated dataclasses, with dotted overrides;
* :mod:`~kdinpaint.train.objective` — Eq. (11)'s inpainting terms and the adapters' own objectives;
* :mod:`~kdinpaint.train.bilevel` — Algorithm 1 (:class:`MetaLearner`) and the divergence guard;
* :mod:`~kdinpaint.train.averaging` — the weight average that is evaluated and exported;
* :mod:`~kdinpaint.train.runs` — the run folder: checkpoints, resume checks, ``metrics.jsonl``;
* :mod:`~kdinpaint.train.report` — ``report.md`` / ``report.json``;
* :mod:`~kdinpaint.train.trainer` — the teacher stage, the student stage and the report, with callbacks.

``Trainer`` and ``Callback`` are imported on first use (they need accelerate).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "Callback", "train_main"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "Callback"):
        from kdinpaint.train import trainer

        return getattr(trainer, name)
    if name == "train_main":
        from kdinpaint.train.trainer import main

        return main
    raise AttributeError(f"module 'kdinpaint.train' has no attribute {name!r}")
