"""kdinpaint.inference.memory: the rise of peak memory during a call, the line through the probes, and the refusal
of an image whose forward would not fit (by-hand numbers)."""

from __future__ import annotations

import pytest
import torch

from kdinpaint.inference import memory


def test_peak_bytes_and_the_linear_fit():
    # a 40 MB tensor created and dropped inside the call: the peak rises by about that much
    peak = memory.peak_bytes(lambda: torch.ones(10_000_000), torch.device("cpu"))
    if peak is None:
        pytest.skip("peak resident memory cannot be measured here (not Linux)")
    assert 0.9 * 40e6 <= peak <= 1.5 * 40e6
    # least squares through three points on bytes = 100 + 3 x, by hand
    fit = memory.fit_linear([(10, 130), (20, 160), (40, 220)], extra=50)
    assert fit.intercept == pytest.approx(100) and fit.slope == pytest.approx(3)
    assert fit.bytes(100) == int(1.25 * (100 + 300 + 50))
    assert fit.max_pixels(int(1.25 * (100 + 300 + 50))) in (99, 100)


def test_check_fits_names_the_side_that_fits(monkeypatch):
    # 1 kB per pixel, 2 MB free, margin 1.25: at most 2e6 / 1.25 / 1000 = 1600 pixels; a 96x64 image scaled to
    # 1600 pixels has a longest side of 96 * sqrt(1600 / 6144) = 48.99, so 48 (a multiple of the stride 8)
    model = memory.MemoryModel(0.0, 1000.0)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2_000_000)
    cpu = torch.device("cpu")
    with pytest.raises(memory.InferenceOutOfMemory, match=r"net would need about 0.01 GiB for 96x64 images at batch "
                                                          r"size 2 .*--size 48 .*lower --batch-size from 2"):
        memory.check_fits(model, cpu, 96, 64, stride=8, batch_size=2, name="net", option="--size")
    assert memory.check_fits(model, cpu, 40, 40, stride=8, batch_size=1, name="net") == int(1.25 * 1000 * 1600)
    assert memory.check_fits(None, cpu, 96, 64, stride=8, batch_size=1, name="net") is None  # nothing to check
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert memory.check_fits(model, cpu, 96, 64, stride=8, batch_size=1, name="net") is None
