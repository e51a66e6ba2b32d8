"""``recipes/train.py`` with faults for the tests, given as Trainer callbacks (the production loop has no such flags).

    python tests/train/faulty_run.py --config recipes/demo.yaml --stop-after 6 ...   # dies like a killed run (status 3)
    python tests/train/faulty_run.py --inject-nan-at 5 ...                           # NaN images from step 5 on
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from kdinpaint.train.trainer import Callback, main


class StopAfter(Callback):
    """Exit abruptly (status 3) after ``steps`` steps of this run, as if killed: nothing after the last checkpoint is saved."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, trainer, step, logs):
        if step >= trainer.start_step + self.steps:  # counted from where this process started (or resumed)
            print(f"stopping abruptly after step {step} (--stop-after)", flush=True)
            os._exit(3)


class InjectNaN(Callback):
    """NaN images from step ``step`` on: a data fault."""

    def __init__(self, step: int):
        self.step = step

    def on_batch(self, trainer, step, batch):
        if step >= self.step:
            return {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return None


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--inject-nan-at", type=int, default=None)
    known, rest = p.parse_known_args()
    callbacks = ([StopAfter(known.stop_after)] if known.stop_after is not None else []) + (
        [InjectNaN(known.inject_nan_at)] if known.inject_nan_at is not None else [])
    root = Path(__file__).resolve().parents[2]
    sys.exit(main(rest, prog="train.py", default_recipe=root / "recipes" / "demo.yaml", callbacks=callbacks))
