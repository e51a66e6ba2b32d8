"""Fixtures shared by the adapter tests: the Trainer's command line and a tiny training run."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def train():
    """``recipes/train.py ARGV`` in this process (the Trainer's command line); an input error raises (``--debug``)."""
    from kdinpaint.train.trainer import main

    def run(argv: list[str]) -> None:
        assert main(["--debug", *argv], prog="train.py", default_recipe=ROOT / "recipes" / "demo.yaml") == 0

    return run


@pytest.fixture
def tiny_run() -> list[str]:
    """Overrides that make an adapter's recipe a run of seconds: no released weights, one teacher step, two bundled
    photos at 32 px, random VGG weights, a log line and a checkpoint every step (add the network's own width)."""
    return [
        "model.init=null", "teacher.steps=1", "data.images=sample", "data.eval_images=sample", "data.size=32",
        "data.sample_count=2", "data.eval_count=1", "data.workers=0", "masks.train=freeform", "masks.eval=freeform",
        "optim.batch_size=1", "losses.vgg=null", "losses.allow_random_vgg=true", "log.every=1", "log.sample_every=0",
        "log.tensorboard=false", "checkpoint.every=1", "checkpoint.keep=2",
    ]
