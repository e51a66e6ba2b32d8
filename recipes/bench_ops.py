"""Benchmarks of kdinpaint's operators; prints the figures the issues set targets for.

    python recipes/bench_ops.py                 # all, on the default device
    python recipes/bench_ops.py adaptive_conv --device cuda

adaptive_conv: forward+backward time of :func:`kdinpaint.ops.adaptive_conv` over the oracle
``torchvision.ops.deform_conv2d`` (all-one depthwise weight, kernel as modulation mask), B=2, C=128, 64×64,
K=3, median of repeated runs after warm-up, both in this process. Target: ratio <= 0.2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def _time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_adaptive_conv(device: torch.device, repeats: int) -> dict:
    from torchvision.ops import deform_conv2d

    from kdinpaint.ops import adaptive_conv

    B, C, H, W, K = 2, 128, 64, 64, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g).to(device).requires_grad_()
    kernel = torch.randn(B, K * K, H, W, generator=g).to(device).requires_grad_()
    offset = (torch.randn(B, 2 * K * K, H, W, generator=g) * 2).to(device).requires_grad_()
    ones = torch.ones(C, 1, K, K, device=device)
    grad = torch.randn(B, C, H, W, device=device)

    def ours() -> None:
        adaptive_conv(x, kernel, offset).backward(grad)

    def oracle() -> None:
        deform_conv2d(x, offset, ones, padding=K // 2, mask=kernel).backward(grad)

    t_ours = _time(ours, device, repeats)
    t_oracle = _time(oracle, device, repeats)
    return {"adaptive_conv_ms": 1e3 * t_ours, "deform_conv2d_ms": 1e3 * t_oracle, "ratio": t_ours / t_oracle}


BENCHES = {"adaptive_conv": bench_adaptive_conv}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHES)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    device = torch.device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), torch {torch.__version__}")
    for name in args.names or list(BENCHES):
        result = BENCHES[name](device, args.repeats)
        print(name + ": " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
