"""Latency of the deployed model eager, under torch.compile, as a torch.export program and under onnxruntime.

    python recipes/bench_export.py                       # Net8 (reference, full width), 256x256, CPU
    python recipes/bench_export.py --adapter tiny-unet --size 64 --repeats 5
    python recipes/bench_export.py --kwargs '{"width": 8, "prefill": true}' --size 512 --skip compile   # demo-sized

Every variant runs :class:`kdinpaint.deploy.Deployable` (``(image, mask) -> prediction``) of the same deployed
model (random weights unless ``--checkpoint``) on the same random image with a centre hole of a quarter of it,
batch 1: the median of ``--repeats`` calls after one warm-up (for torch.compile the warm-up includes the
compilation, reported apart), and the largest difference from eager. onnxruntime uses as many threads as torch.
``--kwargs`` (JSON) builds the adapter's student with those arguments (the demo recipe's network: width 8 and a
prefill); the export column is the whole ``kdinpaint export`` step (tracing, and for ONNX the conversion).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kdinpaint import deploy
from kdinpaint.inference.timing import median_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default="reference")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=("compile", "pt2", "onnx"))
    p.add_argument("--kwargs", type=json.loads, default=None, help="the student builder's arguments, as JSON")
    args = p.parse_args()
    from kdinpaint.export import load_checkpoint
    from kdinpaint.inference import deployed_model
    from kdinpaint.plugins import get_adapter

    if args.checkpoint:
        model, which = load_checkpoint(args.checkpoint)
    else:
        model, _ = deployed_model(args.adapter, args.kwargs)
        which = args.adapter
    stride = get_adapter(which.partition(":")[0]).stride
    which += f" {json.dumps(args.kwargs)}" if args.kwargs and not args.checkpoint else ""
    model = model.eval()
    image, mask = deploy.example_inputs(args.size, args.size)
    cpu = torch.device("cpu")
    eager_fn = deploy.Deployable(model)
    rows = []
    with torch.inference_mode():
        eager = eager_fn(image, mask)
        rows.append(("eager", median_seconds(lambda: eager_fn(image, mask), cpu, args.repeats, 1), 0.0, None))
    print(f"eager: {rows[-1][1] * 1000:.0f} ms", flush=True)
    if "compile" not in args.skip:
        compiled = deploy.compile_model(model)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = compiled(image, mask)
            first = time.perf_counter() - t0
            ms = median_seconds(lambda: compiled(image, mask), cpu, args.repeats, 1)
        rows.append(("torch.compile (inductor)", ms, float((out - eager).abs().max()), first))
        print(f"compiled: {ms * 1000:.0f} ms (first call {first:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "pt2" not in args.skip:
            t0 = time.perf_counter()
            deploy.save_program(deploy.export_program(model, args.size, args.size, stride), Path(tmp) / "m.pt2")
            first = time.perf_counter() - t0
            program = deploy.load_program(Path(tmp) / "m.pt2")
            with torch.no_grad():
                out = program(image, mask)
                ms = median_seconds(lambda: program(image, mask), cpu, args.repeats, 1)
            rows.append(("torch.export (.pt2, reloaded)", ms, float((out - eager).abs().max()), first))
            print(f"pt2: {ms * 1000:.0f} ms", flush=True)
        if "onnx" not in args.skip:
            import onnxruntime as ort

            t0 = time.perf_counter()
            path = deploy.export_onnx(model, Path(tmp) / "m.onnx", args.size, args.size, stride)
            first = time.perf_counter() - t0
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"image": image.numpy(), "mask": mask.numpy()}
            out = torch.from_numpy(session.run(["prediction"], feed)[0])
            ms = median_seconds(lambda: session.run(["prediction"], feed), cpu, args.repeats, 1)
            rows.append(("onnxruntime (CPU)", ms, float((out - eager).abs().max()), first))
            print(f"onnx: {ms * 1000:.0f} ms", flush=True)
    print(f"\n{which}, {args.size}x{args.size}, batch 1, CPU, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| runtime | ms / image | × eager | max abs diff vs eager | export / compile (s) |\n|---|---|---|---|---|")
    for name, sec, diff, first in rows:
        print(f"| {name} | {sec * 1000:.0f} | {sec / rows[0][1]:.2f} | {diff:.1e} | {'' if first is None else f'{first:.0f}'} |")


if __name__ == "__main__":
    main()
