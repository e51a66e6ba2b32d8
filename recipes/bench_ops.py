"""Benchmarks of kdinpaint's operators against their references; prints the figures the issues set targets for.

    python recipes/bench_ops.py                              # all, on the default device
    python recipes/bench_ops.py attention adaptive_conv fill --baseline a227355   # also the kernels of that commit
    python recipes/bench_ops.py train_step                   # the demo recipe's step against the bare network
    python recipes/bench_ops.py meta_step --device cuda --autocast bf16

Every timing is a median of ``--repeats`` rounds after warm-up; the variants of one line run in turns within a
round, in this one process, so a busy machine slows them alike (the ratios are what to read; say the load).

attention: :func:`kdinpaint.ops.attention.softmax_attention` against the plain ``softmax(q k^T) @ v`` (and the
``--baseline`` commit's kernel): without autograd at the shapes of full-width Net8's decoder attention on a
256×256 image (hole rows of a quarter hole), and at the main job's training shapes (batch 16, 64×64 crops, the
hole rows at H/2) forward+backward and the second derivative Reverse-HG takes; then attention transfer (Eq. 9,
:func:`kdinpaint.losses.attention_transfer.attention_transfer`) against the naive full-matrix loss, the same ways.

adaptive_conv: :func:`kdinpaint.ops.adaptive_conv` against ``torchvision.ops.deform_conv2d`` (its oracle) and
against an ``nn.Conv2d`` of the same channels and kernel (C -> C, 3×3), forward and forward+backward, at the
shapes of full-width Net8 at 256×256 (batch 1) and of the main job's training (batch 16); then the modules
(:class:`~kdinpaint.blocks.GlobalLocalFusion`, PGL with its predictors) against the same convolution.

deployed: the deployed Net8 (full width) against EdgeConnect at 256×256, in turns (``kdinpaint bench``'s pair).

main_model: the main job's model (the demo recipe's Net8 with completion blocks and PGL, random weights) on a
256×256 photograph with a centre hole of a quarter, against scikit-image's biharmonic fill of the same image.

threads: the bare demo network's forward+backward with 1 and 2 CPU threads and OpenMP's default or passive wait
policy, each setting in fresh processes, in turns (whatever else runs on the machine then).

fill: :func:`kdinpaint.ops.fill.harmonic_fill` as the reference network's prefill runs it, and
:func:`kdinpaint.ops.fill.biharmonic_fill` against ``skimage.restoration.inpaint_biharmonic`` (what the main
job's ``prefill: biharmonic`` calls, float32) with its largest difference from scikit-image's float64 solve, on
a training batch (16 crops of 64×64) and on 256×256 photographs with a centre hole and with strokes.

train_step: the demo recipe's student step (``recipes/demo.yaml``: Net8 width 8 with its fill, batch 16, 64×64,
``meta.every`` 4, Algorithm 1 through :class:`kdinpaint.train.bilevel.MetaLearner`, an untrained teacher) against
the bare network's forward and backward on the same batch (its fill cached, as training reuses it), amortised
over ``meta.every`` batches: per batch and per theta step; then where a batch's time goes (torch.profiler ranges
around the fills, the attention kernels, attention transfer, adaptive convolution and the hypergradient).

adaptive_conv_oracle: forward+backward of :func:`kdinpaint.ops.adaptive_conv` over the oracle
``torchvision.ops.deform_conv2d`` (all-one depthwise weight, kernel as modulation mask), B=2, C=128, 64×64,
K=3. Target: ratio <= 0.2.

attention_memory: peak memory of the attention-transfer loss (Eq. 9) forward+backward, hole rows only
(:func:`kdinpaint.losses.attention_transfer.attention_transfer`) over a naive full-matrix computation, B=4, a 64×64
feature with 64 channels (queries/keys of 8 channels), 30 % holes. Each variant runs in its own fresh process;
on CPU the figure is the rise of the peak resident set size over the resident size just before the
computation, on CUDA ``torch.cuda.max_memory_allocated`` over the allocation before it. Target: ratio <= 0.45.

meta_step: amortised time per theta-step of Algorithm 1 (:class:`kdinpaint.train.bilevel.MetaLearner`) with
``reverse_hg`` and ``first_order`` over ``frozen``, T=2, on the built-in ``tiny-unet`` (width 16) with
cross/self-distillation and completion blocks, batch 4 at 64×64, L1 inpainting loss. The modes run in
turns, one batch each per round, and each figure is the median over the rounds (timings on a shared CPU
drift; turns keep the ratio honest). Also printed: the hypergradient's share of a reverse_hg batch and its
floor, the final forward at theta_T plus the backward of L_inp(theta_T) to Psi, which no reuse of the
ordinary steps can remove. ``every_K_ratio`` (K = 2, 4, 8): ``reverse_hg`` with the Psi step on every K-th
batch (``meta.every``), the time of K consecutive batches per theta step over ``frozen`` (K = 1 is
``reverse_hg_ratio``). Target: every_4_ratio <= 1.5. ``--model demo`` times the main job's network instead
(``reference`` Net8 at width 8 with its weight-free fill, an untrained teacher, batch 16 at 64×64), whose
frozen batch is dearer (the fill, computed once per batch and reused by every call of Algorithm 1) so the
Psi step weighs less. ``--device cuda`` runs it on a GPU; ``--autocast
bf16`` runs the ordinary steps of every mode under bf16 autocast (the hypergradient stays float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from kdinpaint.inference.timing import median_seconds, synchronize


def bench_adaptive_conv_oracle(device: torch.device, repeats: int) -> dict:
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

    t_ours = median_seconds(ours, device, repeats)
    t_oracle = median_seconds(oracle, device, repeats)
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

    from kdinpaint.losses.attention_transfer import attention_transfer

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


EVERY = (2, 4, 8)  # meta.every values timed beside every batch (1)


def bench_meta_step(device: torch.device, repeats: int, autocast: str = "none", model: str = "tiny-unet") -> dict:
    import kdinpaint
    from kdinpaint.train.bilevel import MetaLearner
    from kdinpaint_adapters.tiny import TinyInpaintUNet

    torch.manual_seed(0)
    if model == "demo":  # the main job's network: Net8 at width 8 with its fill, batches of 16
        adapter = kdinpaint.get_adapter("reference")
        student, teacher = adapter.student(None, width=8, prefill=True), adapter.teacher(None, width=8, prefill=True)
        kd, batch = kdinpaint.attach(student, teacher, adapter.spec).to(device), 16
    else:
        student = TinyInpaintUNet(width=16).to(device)
        teacher = kdinpaint.build_teacher(student)
        kd, batch = kdinpaint.attach(student, teacher, {"encoder_levels": ["enc1", "enc2", "enc3"]}).to(device), 4
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1).to(device)
    mask = torch.zeros(batch, 1, 64, 64, device=device)
    mask[:, :, 16:40, 20:48] = 1

    def l1(pred, target, m):
        return (pred - target).abs().mean()

    theta = [*student.parameters(), *kd.student_parameters()]
    cast = None if autocast == "none" else (lambda: torch.autocast(device.type, dtype=torch.bfloat16))

    def learner_of(mode: str, every: int = 1) -> MetaLearner:
        return MetaLearner(kd, torch.optim.Adam(theta, lr=1e-4), l1, mode=mode, steps=2, every=every, autocast=cast)

    learners = {mode: learner_of(mode) for mode in ("frozen", "first_order", "reverse_hg")}
    # every K-th batch: K batches per round, so each round holds exactly one Psi step
    learners.update({f"every_{k}": learner_of("reverse_hg", k) for k in EVERY})
    batches = {name: int(name.split("_")[1]) if name.startswith("every_") else 1 for name in learners}
    inputs = (gt * (1 - mask), mask)
    parts: dict[str, list[float]] = {}
    hyper = learners["reverse_hg"].hypergradient

    def timed_hypergradient(*args, **kwargs):
        t0 = time.perf_counter()
        out = hyper(*args, **kwargs)
        parts.setdefault("hypergradient", []).append(time.perf_counter() - t0)
        return out

    learners["reverse_hg"].hypergradient = timed_hypergradient
    times = {mode: [] for mode in learners}
    for round_ in range(repeats + 2):
        for mode, learner in learners.items():
            def run(learner=learner, n=batches[mode]) -> None:
                for _ in range(n):  # a fresh input tensor per batch, as a data loader gives (the fill is cached per tensor)
                    learner.step((inputs[0].clone(), inputs[1]), gt)

            seconds = median_seconds(run, device, 1, warmup=0)
            if round_ >= 2:  # warm-up rounds
                times[mode].append(seconds / batches[mode])
    result = {f"{mode}_ms_per_theta_step": 1e3 * statistics.median(ts) / 2 for mode, ts in times.items()}
    frozen = result["frozen_ms_per_theta_step"]
    for mode in learners:
        if mode != "frozen":
            result[f"{mode}_ratio"] = result[f"{mode}_ms_per_theta_step"] / frozen
    result["hypergradient_ms"] = 1e3 * statistics.median(parts["hypergradient"][2:])
    result["frozen_batch_ms"] = 2 * frozen
    result["floor_ms"] = 1e3 * statistics.median(_final_pass(learners["reverse_hg"], inputs, gt) for _ in range(repeats))
    kd.detach()
    return result


def _final_pass(learner, inputs: tuple, target: torch.Tensor) -> float:
    """The part of the hypergradient no reuse can remove: the forward at theta_T and the backward of
    L_inp(theta_T) through both unrolled steps to Psi (replays the unroll untimed, then times the rest)."""
    from torch.func import functional_call

    from kdinpaint.losses._target import differentiate_targets

    kd = learner.kd
    params = dict(kd.named_parameters())
    psi = {n: params[n] for n in learner._psi_names}
    theta = {n: params[n].detach().clone().requires_grad_() for n in learner._theta_names}
    rest = {n: p.detach() for n, p in params.items() if n not in psi and n not in theta}
    buffers = {n: b.clone() for n, b in kd.named_buffers()}
    with kd.reusing_teacher():
        for _ in range(learner.steps):
            out, losses = functional_call(kd, {**rest, **buffers, **psi, **theta}, inputs, {"kd_target": target})
            total = learner._loss(out, target, inputs[1]) + learner.lambda_d * losses["total"]
            grads = torch.autograd.grad(total, list(theta.values()), create_graph=True)
            theta = {n: v - learner.inner_lr * g for (n, v), g in zip(theta.items(), grads)}
        synchronize(target.device)
        t0 = time.perf_counter()
        out = functional_call(kd, {**rest, **buffers, **psi, **theta}, inputs)
        loss = learner._loss(out, target, inputs[1])
        kd.drop_captures()
        with differentiate_targets():
            torch.autograd.grad(loss, list(psi.values()))
        synchronize(target.device)
    return time.perf_counter() - t0


# ---- shared helpers -------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of every ``fn``, the functions run in turns within each round (a load that comes and goes
    slows them alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    clock = time.process_time if CLOCK == "cpu" and device.type == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


CLOCK = "wall"  # --clock cpu: this process's CPU time (with one thread, what the work costs on a busy machine)


def baseline_module(commit: str, path: str, name: str):
    """The module at ``path`` as it was at ``commit`` (``git show``), imported apart as ``name``: the previous
    kernels, timed beside the current ones."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="kdinpaint-baseline-"))
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _line(label: str, ms: dict[str, float], reference: str, extra: str = "") -> None:
    ref = ms[reference]
    parts = [f"{k} {1e3 * v:.1f} ms" + ("" if k == reference else f" ({v / ref:.2f}x)") for k, v in ms.items()]
    print(f"  {label}: " + ", ".join(parts) + (f"; {extra}" if extra else ""), flush=True)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else ""


# ---- attention ------------------------------------------------------------------------------------------
def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(1, 2), -1) @ v


def _second_order(f: Callable, inputs: list[torch.Tensor], grad: torch.Tensor) -> None:
    """A gradient with ``create_graph`` and the gradient of its square norm: what Reverse-HG takes."""
    first = torch.autograd.grad(f(*inputs), inputs, grad, create_graph=True, allow_unused=True)
    torch.autograd.grad(sum((g * g).sum() for g in first if g is not None), inputs, allow_unused=True)


def bench_attention(device: torch.device, repeats: int, baseline: str | None = None) -> None:
    from kdinpaint.losses.attention_transfer import attention_transfer
    from kdinpaint.ops.attention import softmax_attention

    kernels = {"ours": softmax_attention, "naive": _naive_attention}
    transfer = {"ours": attention_transfer}
    if baseline:
        kernels["baseline"] = baseline_module(baseline, "kdinpaint/ops/attention.py", "baseline_attention").softmax_attention
        transfer["baseline"] = baseline_module(baseline, "kdinpaint/losses/attention.py", "baseline_transfer").attention_transfer
    g = torch.Generator().manual_seed(0)
    print(f"attention ({_load()}); reference: naive softmax(q k^T) @ v", flush=True)
    # (label, B, rows, N, C_qk, C): Net8 full width at 256x256 (a quarter hole), the main job's training batch
    for label, B, R, N, c, C in (("att1 Net8 256x256 no grad", 1, 4096, 16384, 16, 128), ("att2 Net8 256x256 no grad", 1, 1024, 4096, 32, 256),
                                 ("att1 demo width 8 at 256x256 no grad", 1, 4096, 16384, 8, 16)):
        q, k, v = (torch.randn(B, n, w, generator=g).to(device) * s for n, w, s in ((R, c, 0.3), (N, c, 0.3), (N, C, 1.0)))
        with torch.inference_mode():
            ms = interleaved({n: (lambda f=f: f(q, k, v)) for n, f in kernels.items()}, device, repeats)
            diff = float((kernels["ours"](q, k, v) - _naive_attention(q, k, v)).abs().max())
        _line(label, ms, "naive", f"max |ours - naive| {diff:.1e}")
    B, R, N, c, C = 16, 600, 1024, 8, 16  # att1 of the main job in training: 16 crops, hole rows at 32x32
    q, k, v = (torch.randn(B, n, w, generator=g).to(device).mul(s).requires_grad_() for n, w, s in ((R, c, 0.3), (N, c, 0.3), (N, C, 1.0)))
    grad = torch.randn(B, R, C, generator=g).to(device)
    ms = interleaved({n: (lambda f=f: torch.autograd.grad(f(q, k, v), (q, k, v), grad)) for n, f in kernels.items()}, device, repeats)
    _line("att1 demo training (16 x 600 rows x 1024) forward+backward", ms, "naive")
    ms = interleaved({n: (lambda f=f: _second_order(f, [q, k, v], grad)) for n, f in kernels.items()}, device, max(3, repeats // 2))
    _line("att1 demo training second derivative", ms, "naive")
    # attention transfer on the same grid: 32x32 queries and keys, teacher's without gradient, 60 % holes
    h = w = 32
    qs, ks = (torch.randn(B, h * w, c, generator=g).to(device).mul(0.3).requires_grad_() for _ in range(2))
    qt, kt = (torch.randn(B, h * w, c, generator=g).to(device).mul(0.3) for _ in range(2))
    t = torch.rand(B, 1, h, w, generator=g).to(device).requires_grad_()
    mask = (torch.rand(B, 1, 64, 64, generator=g) < 0.25).float().to(device)

    def naive_transfer(qs, ks, t):
        r, r_t = torch.softmax(qs @ ks.transpose(1, 2), -1), torch.softmax(qt @ kt.transpose(1, 2), -1)
        holes = torch.nn.functional.max_pool2d(mask, 2).flatten(1)
        return (((r_t - r) ** 2).sum(-1) * t.flatten(1) * holes).sum() / holes.sum()

    fns = {"naive": naive_transfer, **{n: (lambda qs, ks, t, f=f: f(qs, ks, qt, kt, t, mask)) for n, f in transfer.items()}}
    holes = float(torch.nn.functional.max_pool2d(mask, 2).mean())
    ms = interleaved({n: (lambda f=f: torch.autograd.grad(f(qs, ks, t), (qs, ks, t))) for n, f in fns.items()}, device, repeats)
    _line(f"attention transfer demo training ({holes:.0%} hole rows of 1024) forward+backward", ms, "naive")
    one = torch.ones((), device=device)
    ms = interleaved({n: (lambda f=f: _second_order(f, [qs, ks, t], one)) for n, f in fns.items()}, device, max(3, repeats // 2))
    _line("attention transfer second derivative", ms, "naive")


# ---- adaptive convolution --------------------------------------------------------------------------------
def bench_adaptive_conv(device: torch.device, repeats: int, baseline: str | None = None) -> None:
    from torchvision.ops import deform_conv2d

    from kdinpaint.blocks import GlobalLocalFusion
    from kdinpaint.ops import adaptive_conv

    ops = {"ours": adaptive_conv}
    if baseline:
        ops["baseline"] = baseline_module(baseline, "kdinpaint/ops/adaptive_conv.py", "baseline_adaptive_conv").adaptive_conv
    print(f"adaptive convolution ({_load()}); reference: nn.Conv2d(C, C, 3); oracle: deform_conv2d", flush=True)
    g = torch.Generator().manual_seed(0)
    for label, (B, C, H, W) in (("Net8 256x256 enc1 / att1", (1, 128, 128, 128)), ("Net8 256x256 att2", (1, 256, 64, 64)),
                                ("demo training enc1 / att1", (16, 16, 32, 32)), ("demo training enc2 / att2", (16, 32, 16, 16))):
        x = torch.randn(B, C, H, W, generator=g).to(device).requires_grad_()
        kernel = torch.randn(B, 9, H, W, generator=g).to(device).requires_grad_()
        offset = (torch.randn(B, 18, H, W, generator=g) * 2).to(device).requires_grad_()
        conv = torch.nn.Conv2d(C, C, 3, padding=1).to(device)
        ones = torch.ones(C, 1, 3, 3, device=device)
        fns = {"conv": lambda: conv(x), **{n: (lambda f=f: f(x, kernel, offset)) for n, f in ops.items()},
               "deform_conv2d": lambda: deform_conv2d(x, offset, ones, padding=1, mask=kernel)}
        with torch.no_grad():
            ms = interleaved(fns, device, repeats)
            diff = float((adaptive_conv(x, kernel, offset) - deform_conv2d(x, offset, ones, padding=1, mask=kernel)).abs().max())
        _line(f"{label} {B}x{C}x{H}x{W} forward", ms, "conv", f"max |ours - deform_conv2d| {diff:.1e}")
        grad = torch.randn(B, C, H, W, generator=g).to(device)
        params = [x, kernel, offset]
        fb = {"conv": lambda: torch.autograd.grad(conv(x), [x, *conv.parameters()], grad),
              **{n: (lambda f=f: torch.autograd.grad(f(x, kernel, offset), params, grad)) for n, f in ops.items()}}
        if B * H * W <= 16384:
            fb["deform_conv2d"] = lambda: torch.autograd.grad(deform_conv2d(x, offset, ones, padding=1, mask=kernel), params, grad)
        _line(f"{label} forward+backward", interleaved(fb, device, repeats), "conv")
        if B > 1:
            so = {"conv": lambda: _second_order(conv, [x], grad), **{n: (lambda f=f: _second_order(f, params, grad)) for n, f in ops.items()}}
            _line(f"{label} second derivative", interleaved(so, device, max(3, repeats // 2)), "conv")
    for label, (B, C, H, W) in (("PGL module, Net8 256x256 att1", (1, 128, 128, 128)), ("PGL module, demo training att1", (16, 16, 32, 32))):
        torch.manual_seed(0)
        fusion, conv = GlobalLocalFusion(C).to(device), torch.nn.Conv2d(C, C, 3, padding=1).to(device)
        with torch.no_grad():
            for p in fusion.parameters():
                p.normal_(0, 0.1)
        d, att = (torch.randn(B, C, H, W, generator=g).to(device) for _ in range(2))
        with torch.no_grad():
            _line(f"{label} forward", interleaved({"conv": lambda: conv(d), "PGL": lambda: fusion(d, att)}, device, repeats), "conv")
        d.requires_grad_()
        grad = torch.randn(B, C, H, W, generator=g).to(device)
        fb = {"conv": lambda: torch.autograd.grad(conv(d), [d, *conv.parameters()], grad),
              "PGL": lambda: torch.autograd.grad(fusion(d, att), [d, *fusion.parameters()], grad)}
        _line(f"{label} forward+backward", interleaved(fb, device, repeats), "conv")


# ---- fills -----------------------------------------------------------------------------------------------
def bench_fill(device: torch.device, repeats: int, baseline: str | None = None) -> None:
    import numpy as np
    from skimage.data import chelsea, coffee
    from skimage.restoration import inpaint_biharmonic
    from skimage.transform import resize

    from kdinpaint.ops.fill import PREFILL_BIHARMONIC, PREFILL_SWEEPS, biharmonic_fill, harmonic_fill

    fills = {"harmonic_fill": harmonic_fill}
    if baseline:
        fills["baseline harmonic_fill"] = baseline_module(baseline, "kdinpaint/ops/fill.py", "baseline_fill").harmonic_fill
    print(f"fills ({_load()}); reference: skimage.restoration.inpaint_biharmonic (float32, as the prefill calls it)", flush=True)

    def skimage_fill(image: torch.Tensor, mask: torch.Tensor, dtype=np.float32) -> np.ndarray:
        img = ((image.cpu().numpy().transpose(0, 2, 3, 1) + 1) / 2).astype(dtype)
        return np.stack([inpaint_biharmonic(i, m[0] > 0.5, channel_axis=-1) for i, m in zip(img, mask.cpu().numpy())])

    def cases():
        images, masks = _training_batch()
        yield "training batch 16x64x64", images, masks
        rng = np.random.default_rng(0)
        for photo, name in ((chelsea(), "chelsea"), (coffee(), "coffee")):
            image = torch.from_numpy(resize(photo, (256, 256), anti_aliasing=True).astype(np.float32)).permute(2, 0, 1)[None] * 2 - 1
            centre = torch.zeros(1, 1, 256, 256)
            centre[..., 64:192, 64:192] = 1
            strokes = torch.zeros(1, 1, 256, 256)
            for _ in range(8):
                y, x0, x1 = rng.integers(0, 240), rng.integers(0, 200), rng.integers(20, 120)
                strokes[..., y : y + 12, x0 : x0 + x1] = 1
                strokes[..., x0 : x0 + x1, y : y + 10] = 1
            yield f"{name} 256x256 centre hole", image, centre
            yield f"{name} 256x256 strokes ({strokes.mean():.0%})", image, strokes

    for label, image, mask in cases():
        image, mask = image.to(device), mask.to(device)
        hole = image * (1 - mask)
        fns = {"skimage": lambda: skimage_fill(hole, mask), "biharmonic_fill": lambda: biharmonic_fill(hole, mask),
               **{n: (lambda f=f: f(hole, mask, PREFILL_SWEEPS)) for n, f in fills.items()}}
        if image.shape[-1] <= 64:
            fns["harmonic_fill + 100 CG (prefill=true)"] = lambda: harmonic_fill(hole, mask, PREFILL_SWEEPS, PREFILL_BIHARMONIC)
        ms = interleaved(fns, device, max(1, repeats // 2), warmup=1)
        exact = torch.from_numpy(skimage_fill(hole, mask, np.float64)).permute(0, 3, 1, 2) * 2 - 1
        ours = biharmonic_fill(hole, mask).cpu().double()
        sk32 = torch.from_numpy(skimage_fill(hole, mask)).permute(0, 3, 1, 2).double() * 2 - 1
        _line(label, ms, "skimage", f"max |biharmonic_fill - skimage float64| {float((ours - exact).abs().max()):.1e} "
              f"(skimage float32: {float((sk32 - exact).abs().max()):.1e}), in [-1, 1]")


def _training_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the demo recipe's training stream: 16 crops of 64×64 and their free-form holes."""
    from torch.utils.data import DataLoader

    from kdinpaint.data.training import TrainingStream, images_from, mask_source
    from kdinpaint.train.recipe import load_recipe

    try:
        from kdinpaint.evaluation.metrics import TABLE1_BUCKETS
    except ImportError:  # before kdinpaint.evaluation
        from kdinpaint.metrics import TABLE1_BUCKETS

    recipe = load_recipe(Path(__file__).with_name("demo.yaml"))
    d, m = recipe.data, recipe.masks
    images = images_from(d.images, d.size, 256, d.crop, held_out=False)
    masks = mask_source(m.train, d.size, m.hole, buckets=TABLE1_BUCKETS if m.train_ratio == "table1" else None)
    batch = next(iter(DataLoader(TrainingStream(images, masks, 64, seed=0, augment=d.augment), batch_size=recipe.optim.batch_size)))
    return batch["image"], batch["mask"]


# ---- the demo recipe's training step --------------------------------------------------------------------
PARTS = {  # profiler ranges: (module, attribute) wrapped while train_step runs
    "fills (prefill and guide)": ("kdinpaint_adapters.reference.model", "ReferenceNet._compute_fills"),
    "decoder attention kernel": ("kdinpaint.pixel_attention", "softmax_attention"),
    "attention transfer (Eq. 9)": ("kdinpaint.train.objective", None),
    "adaptive convolution": ("kdinpaint.blocks", "adaptive_conv"),
    "hypergradient (Psi step)": ("kdinpaint.train.bilevel", "MetaLearner.hypergradient"),
}


def bench_train_step(device: torch.device, repeats: int, baseline: str | None = None) -> None:
    import dataclasses

    from torch.profiler import ProfilerActivity, profile, record_function

    import kdinpaint
    from kdinpaint.masking import masked
    from kdinpaint.plugins import resolve_objective
    from kdinpaint.train.bilevel import MetaLearner
    from kdinpaint.train.objective import build_objective, total_of
    from kdinpaint.train.recipe import load_recipe
    from kdinpaint.train.runs import build_models

    recipe = load_recipe(Path(__file__).with_name("demo.yaml"))
    torch.manual_seed(0)
    adapter, _, spec, student, teacher = build_models(recipe)
    bare = adapter.student(None, **recipe.model.kwargs).to(device)
    L = recipe.losses
    cls, kwargs = resolve_objective(L.objective, L.objective_kwargs)
    objective = build_objective(cls, kwargs, {k: getattr(L, k) for k in cls.recipe_keys}).to(device)
    spec = dataclasses.replace(spec, meta=dataclasses.replace(spec.meta, mode=recipe.meta.mode, steps=recipe.meta.steps))
    kd = kdinpaint.attach(student, teacher, spec).to(device)

    def inpaint_loss(out, target, mask):
        return total_of(objective.generator_loss(out, target, mask), "generator_loss")

    theta = [*student.parameters(), *kd.student_parameters()]
    learner = MetaLearner(kd, torch.optim.Adam(theta, lr=recipe.optim.lr), inpaint_loss,
                          torch.optim.Adam(kd.meta_parameters(), lr=recipe.meta.lr), every=recipe.meta.every,
                          lambda_d=L.lambda_d, max_hypergrad_norm=recipe.meta.max_hypergrad_norm, loss_input=objective.loss_input)
    bare_opt = torch.optim.Adam(bare.parameters(), lr=recipe.optim.lr)
    image, mask = (t.to(device) for t in _training_batch())
    every, steps = recipe.meta.every, recipe.meta.steps
    inputs = masked(image, mask)

    def bare_step() -> None:  # the same input tensor every time: its fill is cached, as in training
        loss = inpaint_loss(bare(inputs, mask), image, mask)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    def demo_round() -> None:  # meta.every batches: one with the Psi step; a fresh input tensor each (new fills)
        for _ in range(every):
            learner.step((masked(image, mask), mask), image)

    def fills() -> None:
        bare._compute_fills(inputs, mask)

    print(f"training step of recipes/demo.yaml ({_load()}); batch {image.shape[0]}x{image.shape[-1]}x{image.shape[-1]}, "
          f"meta.every {every}, meta.steps {steps}", flush=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an untrained teacher may give a skipped Psi step
        ms = interleaved({"bare": bare_step, "round": demo_round, "fills": fills}, device, repeats)
        per_batch = ms["round"] / every
        print(f"  bare network forward+backward (fill cached) {1e3 * ms['bare']:.0f} ms; fills of a batch {1e3 * ms['fills']:.0f} ms")
        print(f"  demo step per batch (amortised over meta.every {every}) {1e3 * per_batch:.0f} ms = {per_batch / ms['bare']:.2f}x bare; "
              f"per theta step {1e3 * per_batch / steps:.0f} ms = {per_batch / steps / ms['bare']:.2f}x bare", flush=True)
        # where a round's time goes: profiler ranges around the parts (inclusive times, CPU)
        patches = _range_patches(record_function)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("round"):
                    demo_round()
        finally:
            for owner, name, original in patches:
                setattr(owner, name, original)
    events = prof.key_averages()
    totals = {event.key: event.cpu_time_total / 1e3 for event in events}
    whole = totals.get("round", float("nan"))
    print(f"  one round under the profiler: {whole:.0f} ms; forward calls of the parts (inclusive, they nest; their "
          "backward passes run in autograd's engine, counted below by operator):")
    for label in [*PARTS, "aten::convolution", "aten::convolution_backward"]:
        if label in totals:
            print(f"    {label}: {totals[label] / every:.0f} ms per batch ({totals[label] / whole:.0%})")
    print("  operators with the most time of their own (per batch):")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"    {event.key}: {event.self_cpu_time_total / 1e3 / every:.0f} ms ({event.self_cpu_time_total / 1e3 / whole:.0%}, "
              f"{event.count // every} calls)")


def _range_patches(record_function) -> list:
    """Wrap the functions of :data:`PARTS` in profiler ranges named after the part; returns what to restore."""
    import importlib

    from kdinpaint.losses import attention_transfer as transfer_module

    patches = []

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def ranged(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, ranged)

    for label, (module_name, attribute) in PARTS.items():
        if attribute is None:
            continue
        module = importlib.import_module(module_name)
        owner_name, _, name = attribute.rpartition(".")
        wrap(getattr(module, owner_name) if owner_name else module, name, label)
    wrap(importlib.import_module("kdinpaint.attach"), "attention_transfer", "attention transfer (Eq. 9)")
    del transfer_module
    return patches


# ---- Table 2: the deployed Net8 against EdgeConnect ------------------------------------------------------
def bench_deployed(device: torch.device, repeats: int, baseline: str | None = None, size: int = 256) -> None:
    """``kdinpaint bench``'s Table 2 pair, timed in turns: the deployed Net8 (full width, completion blocks and
    PGL) and EdgeConnect, random weights, batch 1, a centre hole of a quarter."""
    from kdinpaint import deploy
    from kdinpaint.inference import deployed_model

    models = {name: deploy.Deployable(deployed_model(name)[0].to(device)) for name in ("reference", "edgeconnect")}
    image, mask = (t.to(device) for t in deploy.example_inputs(size, size))
    with torch.inference_mode():
        ms = interleaved({name: (lambda m=m: m(image, mask)) for name, m in models.items()}, device, repeats)
    print(f"deployed models at {size}x{size} ({_load()}, clock {CLOCK})", flush=True)
    _line("Net8 (reference) and EdgeConnect", ms, "edgeconnect")


# ---- the main job's model against scikit-image -----------------------------------------------------------
def bench_main_model(device: torch.device, repeats: int, baseline: str | None = None, size: int = 256) -> None:
    """The main job's model (``recipes/demo.yaml``'s network with its completion blocks and PGL, random weights:
    the time does not depend on them) inpainting a ``size``×``size`` photograph with a centre hole of a quarter,
    against ``skimage.restoration.inpaint_biharmonic`` on the same image (float64, one call, as the model's prefill
    and the biharmonic baseline make it; float32 too, printed apart); both single-threaded here if the process is."""
    import numpy as np
    from skimage.data import chelsea
    from skimage.restoration import inpaint_biharmonic
    from skimage.transform import resize

    import kdinpaint
    from kdinpaint.masking import masked
    from kdinpaint.train.recipe import load_recipe
    from kdinpaint.train.runs import build_models

    recipe = load_recipe(Path(__file__).with_name("demo.yaml"))
    torch.manual_seed(0)
    _, _, spec, student, teacher = build_models(recipe)
    kd = kdinpaint.attach(student, teacher, spec)
    model = kd.export().eval().to(device)
    kd.detach()
    photo = resize(chelsea(), (size, size), anti_aliasing=True).astype(np.float32)
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].to(device) * 2 - 1
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    hole = mask[0, 0].cpu().numpy() > 0.5
    inputs = masked(image, mask)

    def run_model() -> None:
        model(inputs.clone(), mask)  # a new tensor each call: the fills are computed, not taken from the cache

    with torch.inference_mode():
        photo64 = photo.astype(np.float64)
        ms = interleaved({"skimage biharmonic": lambda: inpaint_biharmonic(photo64, hole, channel_axis=-1), "model": run_model,
                          "skimage float32": lambda: inpaint_biharmonic(photo, hole, channel_axis=-1)}, device, repeats)
        parts = interleaved({"fills": lambda: model.model._compute_fills(inputs, mask)}, device, repeats)
    print(f"main job's model at {size}x{size} ({_load()})", flush=True)
    _line(f"{size}x{size}, a centre hole of a quarter", ms, "skimage biharmonic", f"its fills (prefill and guide) {1e3 * parts['fills']:.0f} ms")


# ---- CPU threads on a shared machine --------------------------------------------------------------------
THREAD_SETTINGS = (("1", None), ("2", None), ("2", "passive"), ("2", "spin10k"), ("1", "passive"))  # (threads, policy)
WAIT_POLICIES = {"passive": {"OMP_WAIT_POLICY": "passive"},  # sleep at once after a parallel region
                 "spin10k": {"GOMP_SPINCOUNT": "10000"}}  # spin briefly (libgomp's default: 300,000 spins), then sleep


def _threads_worker(repeats: int) -> None:
    """In a fresh process (its OpenMP settings from the environment): the median of the bare demo network's
    forward+backward over ``repeats`` steps, printed as milliseconds."""
    from kdinpaint.masking import masked
    from kdinpaint.train.recipe import load_recipe
    from kdinpaint.train.runs import build_models

    torch.set_num_threads(int(os.environ["KDINPAINT_BENCH_THREADS"]))
    recipe = load_recipe(Path(__file__).with_name("demo.yaml"))
    torch.manual_seed(0)
    net = build_models(recipe)[3]
    image, mask = _training_batch()
    inputs = masked(image, mask)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        (net(inputs, mask) - image).abs().mean().backward()

    print(1e3 * median_seconds(step, torch.device("cpu"), repeats, warmup=2))


def bench_threads(device: torch.device, repeats: int, rounds: int = 3, busy: int = 0) -> dict:
    """The bare demo network's forward+backward on the CPU with 1 or 2 threads, OpenMP's default (spinning), passive
    or briefly spinning wait (:data:`WAIT_POLICIES`), each setting in fresh processes taken in turns over ``rounds``.
    ``busy``: that many processes spinning on a core each for the whole measurement (a shared machine, made
    repeatable); whatever else runs on the machine runs too (the load is printed)."""
    import signal

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    times: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for threads, policy in THREAD_SETTINGS:
                env = {**os.environ, "KDINPAINT_BENCH_THREADS": threads, "OMP_NUM_THREADS": threads}
                for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
                    env.pop(key, None)
                env.update(WAIT_POLICIES.get(policy or "", {}))
                cmd = [sys.executable, __file__, "--worker", "threads", "--repeats", str(repeats)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                times.setdefault(f"threads_{threads}_{policy or 'default'}_ms", []).append(float(out))
    finally:
        for p in spinners:
            p.send_signal(signal.SIGKILL)
            p.wait()
    print(f"threads, {busy} busy process(es) beside ({_load()})", flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


BENCHES = {
    "attention": bench_attention, "adaptive_conv": bench_adaptive_conv, "fill": bench_fill, "train_step": bench_train_step,
    "main_model": bench_main_model, "deployed": bench_deployed,
    "threads": bench_threads, "adaptive_conv_oracle": bench_adaptive_conv_oracle, "attention_memory": bench_attention_memory, "meta_step": bench_meta_step,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHES)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="meta_step: run the ordinary steps under bf16 autocast (default: none)")
    parser.add_argument("--model", choices=("tiny-unet", "demo"), default="tiny-unet",
                        help="meta_step: tiny-unet (width 16, batch 4) or demo (the main job's Net8, width 8, fill, batch 16)")
    parser.add_argument("--baseline", metavar="COMMIT", help="attention, adaptive_conv, fill: also time the kernels of this "
                        "commit (git show), e.g. the one before the fused kernels")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time this process's CPU time instead of the wall clock (a busy shared machine)")
    parser.add_argument("--busy", type=int, default=0,
                        help="threads: this many processes spinning beside the measurement (a shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    if args.worker == "threads":
        return _threads_worker(args.repeats)
    if args.worker:
        return _attention_worker(args.worker, torch.device(args.device))
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    device = torch.device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), torch {torch.__version__}")
    for name in args.names or list(BENCHES):
        options = {"autocast": args.autocast, "model": args.model} if name == "meta_step" else {}
        if name in ("attention", "adaptive_conv", "fill", "train_step", "main_model", "deployed"):
            options = {"baseline": args.baseline}
        if name == "threads":
            options = {"busy": args.busy}
        result = BENCHES[name](device, args.repeats, **options)
        if result is not None:
            print(name + ": " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
