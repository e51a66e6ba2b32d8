"""Benchmarks of kdinpaint's operators; prints the figures the issues set targets for.

    python recipes/bench_ops.py                 # all, on the default device
    python recipes/bench_ops.py adaptive_conv --device cuda

adaptive_conv: forward+backward time of :func:`kdinpaint.ops.adaptive_conv` over the oracle
``torchvision.ops.deform_conv2d`` (all-one depthwise weight, kernel as modulation mask), B=2, C=128, 64×64,
K=3, median of repeated runs after warm-up, both in this process. Target: ratio <= 0.2.

attention_memory: peak memory of the attention-transfer loss (Eq. 9) forward+backward, hole rows only
(:func:`kdinpaint.losses.attention.attention_transfer`) over a naive full-matrix computation, B=4, a 64×64
feature with 64 channels (queries/keys of 8 channels), 30 % holes. Each variant runs in its own fresh process;
on CPU the figure is the rise of the peak resident set size over the resident size just before the
computation, on CUDA ``torch.cuda.max_memory_allocated`` over the allocation before it. Target: ratio <= 0.45.
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


def _attention_inputs(device: torch.device):
    B, C, H, W, Cqk = 4, 64, 64, 64, 8
    g = torch.Generator().manual_seed(0)
    d = torch.randn(B, C, H, W, generator=g)
    proj = [torch.randn(Cqk, C, generator=g) / C**0.5 for _ in range(4)]
    flat = d.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, q_t, k_t = (flat @ p.T for p in proj)  # (B, N, Cqk)
    mask = torch.zeros(B, 1, H, W)
    rows = round(0.3 * H)
    for b in range(B):  # 30 % holes, a band at a different place per sample
        mask[b, :, 8 * b : 8 * b + rows] = 1
    t = torch.rand(B, 1, H, W, generator=g)
    q, k, t = (x.to(device).requires_grad_() for x in (q, k, t))
    return q, k, q_t.to(device), k_t.to(device), t, mask.to(device)


def _attention_worker(variant: str, device: torch.device) -> None:
    """Runs one variant and prints its peak memory rise in bytes (used by bench_attention_memory)."""
    import resource

    from kdinpaint.losses.attention import attention_transfer

    inputs = _attention_inputs(device)
    q, k, q_t, k_t, t, mask = inputs

    def naive():
        r = torch.softmax(q @ k.transpose(1, 2), -1)  # (B, N, N)
        r_t = torch.softmax(q_t @ k_t.transpose(1, 2), -1)
        holes = mask.flatten(1)
        per_row = (r_t - r).pow(2).sum(-1)  # (B, N)
        return (t.flatten(1) * per_row * holes).sum() / holes.sum()

    fn = naive if variant == "naive" else lambda: attention_transfer(q, k, q_t, k_t, t, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn().backward()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated(device) - base)
        return
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    fn().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - base)


def bench_attention_memory(device: torch.device, repeats: int) -> dict:
    import subprocess
    import sys

    def run(variant: str) -> int:
        cmd = [sys.executable, __file__, "--worker", variant, "--device", str(device)]
        return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    hole, naive = run("hole_rows"), run("naive")
    return {"hole_rows_MiB": hole / 2**20, "naive_MiB": naive / 2**20, "ratio": hole / naive}


BENCHES = {"adaptive_conv": bench_adaptive_conv, "attention_memory": bench_attention_memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHES)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _attention_worker(args.worker, torch.device(args.device))
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
