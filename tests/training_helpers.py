"""Training runs for the tests: a tiny recipe, and the Trainer in this process or in a child process.

A child process is for what must not happen in the test process: a run killed abruptly (``--stop-after``), or
several ranks. ``tests/train/faulty_run.py`` is that child: ``kdinpaint train`` with test-only callbacks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
FAULTY_RUN = Path(__file__).with_name("train") / "faulty_run.py"
# the demo recipe at a few thousand parameters and a few steps
TINY = [
    "model.kwargs={width: 4}", "data.size=32", "data.sample_count=6", "data.eval_count=4", "optim.batch_size=2",
    "teacher.steps=2", "losses.recon_padding=zeros", "log.every=2", "log.sample_every=0", "log.tensorboard=false",
    "train.control=false",  # the demo recipe trains the twin too; the tests of the twin turn it on
]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_child(*args: str, config: str | os.PathLike[str] = DEMO, check: bool = True,
                launcher: tuple[str, ...] = (sys.executable,), script: str | os.PathLike[str] = FAULTY_RUN,
                timeout: int = 600) -> subprocess.CompletedProcess:
    """``faulty_run.py --config CONFIG ARGS`` (or another ``script``) in a child process from the repository root."""
    cmd = [*launcher, str(script), "--config", str(config), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_here(*args: str, config: str | os.PathLike[str] = DEMO) -> int:
    """The exit status of ``kdinpaint train CONFIG ARGS`` run in this process."""
    from kdinpaint.train.trainer import main

    return main([str(config), *args], prog="kdinpaint train")
