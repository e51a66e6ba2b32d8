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


def test_a_slow_forward_is_warned_with_the_side_that_makes_it_quick():
    import warnings

    from kdinpaint.inference import Inpainter
    from kdinpaint.inference.memory import MemoryModel, warn_if_slow
    from tiny import TinyUNet

    model = MemoryModel(0.0, 1.0, seconds_per_pixel=1e-4)  # 100 s for a 1000 x 1000 image
    # the quick side: the largest multiple of 8 whose square takes at most 10 s (312² · 1e-4 = 9.7 s; 320²: 10.2 s)
    assert 312**2 * 1e-4 <= 10 < 320**2 * 1e-4
    with pytest.warns(UserWarning, match=r"about 100 s per forward of 1 image\(s\) of 1000x1000 .*--max-side 312 "):
        assert warn_if_slow(model, 1000, 1000, stride=8, batch_size=1, name="net", device=torch.device("cpu")) == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 500 padded to 504: 25.4 s, below the 30 s that is warned about
        seconds = warn_if_slow(model, 500, 500, stride=8, batch_size=1, name="net", device=torch.device("cpu"))
        assert seconds == pytest.approx(504**2 * 1e-4)
    inpainter = Inpainter(TinyUNet(width=4), stride=8)
    assert inpainter.memory_model().seconds_per_pixel > 0  # timed on the probes
    inpainter._memory = model
    with pytest.warns(UserWarning, match="--size 312 runs it"):
        inpainter.check_memory(1000, 1000, option="--size")


class _Three(torch.nn.Module):
    """Leaf calls per forward, by hand: conv, act, act again (the same module twice), conv = 4."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1)

    def forward(self, image, mask):
        return self.b(self.act(self.act(self.a(torch.cat([image, mask], 1)))))


def test_leaf_calls_are_counted_and_reported_within_one_forward():
    from kdinpaint.inference import Inpainter
    from kdinpaint.inference.memory import count_leaf_calls

    net = _Three()
    seen = []
    with count_leaf_calls(net, seen.append) as calls:
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    assert calls.count == 4 and seen == [1, 2, 3, 4]
    net(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))  # the hooks are gone
    assert calls.count == 4 and not net.a._forward_hooks

    inpainter = Inpainter(net, batch_size=2)
    assert inpainter.memory_model().calls_per_forward == 4  # the probe's count, at another size
    progress = []
    inpainter.progress = lambda done, total: progress.append((done, total))
    image, mask = torch.zeros(3, 3, 40, 24), torch.zeros(3, 1, 40, 24)
    mask[..., 5:20, 5:15] = 1
    inpainter(image, mask)  # two forwards: 2 images, then 1
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)] * 2
    assert not net.a._forward_hooks
