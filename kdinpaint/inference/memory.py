"""What a forward pass needs in memory, measured before it runs, so that a too-large image is refused with a
message instead of the process being killed by the kernel (a CPU allocation beyond physical memory is not an
exception: the out-of-memory killer ends the process, exit 137, no message).

:func:`peak_bytes` measures the rise of peak memory during one call: on CUDA from
``torch.cuda.max_memory_allocated``, on Linux from the process's peak resident set (``VmHWM`` of
``/proc/self/status``, reset through ``/proc/self/clear_refs``). :func:`fit_linear` turns two such probes at
small sizes into ``bytes = intercept + slope × pixels``: since the pixel attention keeps ``O(rows × N)``
(:mod:`kdinpaint.ops.attention`), a network's memory is linear in the pixel count, and the probes run with the
attention's smallest forward blocks so that their own attention buffers are linear too; the largest forward
block (:data:`~kdinpaint.ops.attention.FORWARD_BLOCK_ELEMENTS`) is added once. :func:`available_bytes` is what
the device can still give: ``MemAvailable`` bounded by the cgroup limit on Linux, the free memory on CUDA.

:func:`probe_memory` runs those probes on a model and :func:`check_fits` refuses, with
:class:`InferenceOutOfMemory`, images whose forward would not fit: what :meth:`Inpainter.memory_model
<kdinpaint.inference.Inpainter.memory_model>` and :meth:`~kdinpaint.inference.Inpainter.check_memory` do.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdinpaint.pixel_attention import PixelAttention
from kdinpaint.inference.device import model_dtype
from kdinpaint.ops import attention

__all__ = [
    "InferenceOutOfMemory", "MemoryModel", "peak_bytes", "available_bytes", "fit_linear", "small_attention_blocks",
    "side_that_fits", "probe_memory", "check_fits", "gib",
]

#: safety factor on the estimate (allocator fragmentation, the probes' measurement noise)
MARGIN = 1.25


class InferenceOutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the batch size to lower."""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _mmap_threshold(nbytes: int, trim: bool = False) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, nbytes)``: allocations from ``nbytes`` up are mapped and returned to the
    system when freed; with ``trim``, ``malloc_trim(0)`` first returns the free pages the heap still holds (no-op
    without glibc). glibc raises its threshold as large blocks are freed (up to 32 MiB) and reuses freed heap
    memory, after which a repeated forward runs in memory already resident and its peak shows no rise."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """The rise of peak memory on ``device`` while ``fn()`` runs, in bytes; ``None`` where it cannot be measured
    (not Linux, MPS). On the CPU, blocks from 64 KiB up are mapped afresh during the call (:func:`_mmap_threshold`),
    so the figure is what the call's tensors need even when freed memory of earlier calls is still resident."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu" or not _reset_peak_rss():
        return None
    _mmap_threshold(64 << 10, trim=True)
    try:
        _reset_peak_rss()
        base = _status_kib("VmRSS") or 0
        fn()
        return max(0, ((_status_kib("VmHWM") or 0) - base) * 1024)
    finally:
        _mmap_threshold(32 << 20)  # glibc's own upper bound: large blocks are still returned when freed


def available_bytes(device: torch.device) -> int | None:
    """Memory the device can still give this process; ``None`` where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    if m is None:
        return None
    free = int(m.group(1)) * 1024
    try:  # a container's limit (cgroup v2) may be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, free)


@contextlib.contextmanager
def small_attention_blocks() -> Iterator[None]:
    """Pixel attention with its smallest forward blocks (their memory linear in ``N``), for the probes."""
    saved = attention.FORWARD_BLOCK_ELEMENTS
    attention.FORWARD_BLOCK_ELEMENTS = 0
    try:
        yield
    finally:
        attention.FORWARD_BLOCK_ELEMENTS = saved


@dataclass(frozen=True)
class MemoryModel:
    """``bytes(pixels) = intercept + slope × pixels`` of one model at one batch size, on one device, and the
    forward's time per pixel of the larger probe (``seconds(pixels)``: a lower bound where attention grows faster)."""

    intercept: float
    slope: float
    extra: float = 0.0
    seconds_per_pixel: float = 0.0
    calls_per_forward: int = 0  # forward calls of leaf modules in one forward (progress within one image)

    def seconds(self, pixels: int) -> float:
        return self.seconds_per_pixel * pixels

    def bytes(self, pixels: int) -> int:
        return int(MARGIN * (max(0.0, self.intercept) + self.slope * pixels + self.extra))

    def max_pixels(self, available: int) -> int:
        """The most pixels per image that fit ``available`` bytes."""
        room = available / MARGIN - max(0.0, self.intercept) - self.extra
        return max(0, int(room / self.slope)) if self.slope > 0 else 2**62


def fit_linear(points: list[tuple[int, int]], extra: float = 0.0) -> MemoryModel:
    """The line through ``(pixels, bytes)`` probes (least squares); a negative slope (noise) counts as the
    largest probe's bytes per pixel."""
    if len(points) < 2:
        raise ValueError("fit_linear needs two probes or more")
    xs, ys = [float(p) for p, _ in points], [float(b) for _, b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    if slope <= 0:
        p, b = max(points)
        return MemoryModel(0.0, b / max(1, p), extra)
    return MemoryModel(my - slope * mx, slope, extra)


def side_that_fits(model: MemoryModel, available: int, height: int, width: int, multiple: int = 1) -> int:
    """The longest side (a multiple of ``multiple``) an image of ``height × width``'s shape may be scaled to
    and fit ``available`` bytes; 0 when none does."""
    pixels = model.max_pixels(available)
    longest = max(height, width)
    scale = math.sqrt(pixels / max(1, height * width))
    return int(longest * min(1.0, scale)) // multiple * multiple


def probe_memory(module: nn.Module, call: Any, batch_size: int, stride: int, device: torch.device) -> MemoryModel | None:
    """How ``module``'s peak memory grows with the pixel count at ``batch_size`` on ``device``, from two forwards
    at small sizes (multiples of ``stride``, about 64² and 128²) with the attention's smallest blocks; ``call``:
    the model's :class:`~kdinpaint.calling.CallConvention` (``None``: ``module(image, mask)``). ``None`` where
    memory cannot be measured. The module runs in eval mode; its train/eval mode is restored."""
    dtype = model_dtype(module) or torch.float32
    side = -(-64 // stride) * stride
    points = []
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(), small_attention_blocks():
            for s in (side, 2 * side):
                image = torch.zeros(batch_size, 3, s, s, device=device, dtype=dtype)
                mask = torch.zeros(batch_size, 1, s, s, device=device, dtype=dtype)
                mask[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
                args, kwargs = call.build(image, mask) if call is not None else ((image, mask), {})
                start = time.perf_counter()
                with count_leaf_calls(module) as calls:
                    peak = peak_bytes(lambda: module(*args, **kwargs), device)
                seconds = time.perf_counter() - start
                if peak is None:
                    return None
                points.append((s * s, peak))
    finally:
        module.train(was_training)
    has_attention = any(isinstance(m, PixelAttention) for m in module.modules())
    # one forward block of the attention at its full size (the probes ran the smallest): its scores and output
    extra = 2 * attention.FORWARD_BLOCK_ELEMENTS * torch.finfo(dtype).bits // 8 if has_attention else 0
    return dataclasses.replace(fit_linear(points, extra), seconds_per_pixel=seconds / points[-1][0],
                               calls_per_forward=calls.count)


class _LeafCalls:
    count = 0


@contextlib.contextmanager
def count_leaf_calls(module: nn.Module, on_call: Callable[[int], None] | None = None) -> Iterator[_LeafCalls]:
    """Count the forward calls of ``module``'s leaf modules (those without children) while the block runs; the
    count is the same at every image size (the layers do not depend on it), so a probe's count at a small size is
    the total of a large forward, and ``on_call(count)`` after each call shows how far that forward is."""
    calls = _LeafCalls()

    def hook(*_: Any) -> None:
        calls.count += 1
        if on_call is not None:
            on_call(calls.count)

    handles = [m.register_forward_hook(hook) for m in module.modules() if next(m.children(), None) is None]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


SLOW_SECONDS = 30.0  # a forward estimated longer than this is warned about, with the side that makes it quick
QUICK_SECONDS = 10.0


def warn_if_slow(model: MemoryModel | None, height: int, width: int, *, stride: int, batch_size: int, name: str,
                 device: torch.device, option: str = "--max-side") -> float | None:
    """Warn when a forward of ``height × width`` images (padded to ``stride``) is estimated above
    :data:`SLOW_SECONDS` by ``model``, naming the estimate and the ``option`` side that takes about
    :data:`QUICK_SECONDS`; returns the estimate in seconds (``None`` without a model)."""
    if model is None or model.seconds_per_pixel <= 0:
        return None
    H, W = -(-height // stride) * stride, -(-width // stride) * stride
    seconds = model.seconds(H * W)
    if seconds > SLOW_SECONDS:
        scale = math.sqrt(QUICK_SECONDS / seconds)
        side = max(stride, int(max(H, W) * scale) // stride * stride)
        warnings.warn(
            f"{name} needs about {seconds:.0f} s per forward of {batch_size} image(s) of {H}x{W} on {device} (timed "
            f"on small probes; more with attention): {option} {side} runs it in about {QUICK_SECONDS:.0f} s "
            "(the result is scaled back up into the holes)", UserWarning, stacklevel=3)
    return seconds


def check_fits(model: MemoryModel | None, device: torch.device, height: int, width: int, *, stride: int,
               batch_size: int, name: str, option: str = "--max-side") -> int | None:
    """Refuse, with :class:`InferenceOutOfMemory`, images of ``height × width`` (padded to ``stride``) whose forward
    at ``batch_size`` would need more than :func:`available_bytes` of ``device`` by ``model``; the message names
    the model (``name``), the longest side that fits with ``option`` (the command-line option that makes images
    smaller), a lower batch size and the CPU. Returns the estimated bytes, or ``None`` where ``model`` or the
    free memory is unknown (then nothing is checked)."""
    free = available_bytes(device)
    if model is None or free is None:
        return None
    H, W = -(-height // stride) * stride, -(-width // stride) * stride
    need = model.bytes(H * W)
    if need <= free:
        return need
    fixes = []
    side = side_that_fits(model, free, H, W, stride)
    if side >= stride:
        fixes.append(f"use {option} {side} (the longest side that fits)")
    if batch_size > 1:
        fixes.append(f"lower --batch-size from {batch_size}")
    if device.type != "cpu":
        fixes.append("or run on the CPU (--device cpu)")
    raise InferenceOutOfMemory(
        f"{name} would need about {gib(need)} for {H}x{W} images at batch size {batch_size} on "
        f"{device}, but only {gib(free)} is free: {'; '.join(fixes) or 'free memory on this machine'}"
    )
