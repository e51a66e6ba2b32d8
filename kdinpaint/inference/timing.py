"""Wall-clock timing of device work, for the benchmarks (``kdinpaint bench``, ``recipes/bench_*.py``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["synchronize", "median_seconds"]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA, MPS); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, each call
    bracketed by :func:`synchronize` so that asynchronous device work is counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
