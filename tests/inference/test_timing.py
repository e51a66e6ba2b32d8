"""kdinpaint.inference.timing: median_seconds runs the warm-up calls untimed and takes the median of the timed ones
(a scripted clock, not a measurement)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kdinpaint.inference import timing


def test_median_seconds_skips_the_warmup_and_takes_the_median(monkeypatch):
    calls = []
    # each timed call reads the clock twice (before and after); durations 3, 1, 2 seconds
    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    seconds = timing.median_seconds(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2)
    assert seconds == 2.0 and len(calls) == 5
