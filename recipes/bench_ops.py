"""Benchmarks of kdinpaint's operators; prints the figures the issues set targets for.

    python recipes/bench_ops.py                 # all, on the default device
    python recipes/bench_ops.py adaptive_conv --device cuda
    python recipes/bench_ops.py meta_step --device cuda --autocast bf16

adaptive_conv: forward+backward time of :func:`kdinpaint.ops.adaptive_conv` over the oracle
``torchvision.ops.deform_conv2d`` (all-one depthwise weight, kernel as modulation mask), B=2, C=128, 64×64,
K=3, median of repeated runs after warm-up, both in this process. Target: ratio <= 0.2.

attention_memory: peak memory of the attention-transfer loss (Eq. 9) forward+backward, hole rows only
(:func:`kdinpaint.losses.attention.attention_transfer`) over a naive full-matrix computation, B=4, a 64×64
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
import statistics
import time

import torch

from kdinpaint.inference.timing import median_seconds, synchronize


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


BENCHES = {"adaptive_conv": bench_adaptive_conv, "attention_memory": bench_attention_memory, "meta_step": bench_meta_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHES)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="meta_step: run the ordinary steps under bf16 autocast (default: none)")
    parser.add_argument("--model", choices=("tiny-unet", "demo"), default="tiny-unet",
                        help="meta_step: tiny-unet (width 16, batch 4) or demo (the main job's Net8, width 8, fill, batch 16)")
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
        options = {"autocast": args.autocast, "model": args.model} if name == "meta_step" else {}
        result = BENCHES[name](device, args.repeats, **options)
        print(name + ": " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
