"""Peak memory of inference against the input size: is it linear in the pixel count?

    python recipes/bench_memory.py                              # Net8 (full width), 64 ... 1024, CPU
    python recipes/bench_memory.py --sizes 64 96 128 --what attention
    python recipes/bench_memory.py --checkpoint runs/demo/student.safetensors --sizes 512

``--what net8`` (default): ``kdinpaint.inference.Inpainter`` running the deployed ``reference`` student (Net8 of
Table 3 with its completion blocks and PGL; random weights unless ``--checkpoint``) on ``skimage.data.astronaut()``
resized to SIZE × SIZE with a centre hole of a quarter of the image, batch 1, ``torch.inference_mode``.
``--what attention``: one ``PixelAttention(128)`` on a ``(1, 128, SIZE, SIZE)`` feature (``N = SIZE²``).

Every size runs in its own fresh process. Printed per size: the peak resident set of that process (``VmHWM``,
everything: Python, torch, the weights), its rise during the forward pass alone (``VmHWM`` reset through
``/proc/self/clear_refs`` just before), the rise per pixel (constant when memory is linear in ``N``), the
wall time of the forward, and for Net8 what ``Inpainter.check_memory`` estimated beforehand. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = [64, 96, 128, 256, 512, 1024]


def _child(what: str, size: int, checkpoint: str | None) -> dict:
    import numpy as np
    import torch

    from kdinpaint.inference.memory import _reset_peak_rss, _status_kib

    torch.manual_seed(0)
    row: dict = {"what": what, "size": size}
    if what == "attention":
        from kdinpaint.pixel_attention import PixelAttention

        att = PixelAttention(128).eval()
        d = torch.randn(1, 128, size, size)
        run = lambda: att(d)  # noqa: E731
    else:
        from skimage.data import astronaut
        from skimage.transform import resize

        from kdinpaint.inference import Inpainter

        inpainter = Inpainter.from_checkpoint(checkpoint, device="cpu") if checkpoint else Inpainter.from_adapter("reference", device="cpu")
        photo = resize(astronaut(), (size, size), anti_aliasing=True).astype(np.float32)
        image = torch.from_numpy(photo).permute(2, 0, 1)[None] * 2 - 1
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        row["estimate_mib"] = round((inpainter.check_memory(size, size) or 0) / 2**20, 1)
        run = lambda: inpainter(image, mask)  # noqa: E731
    with torch.inference_mode():
        _reset_peak_rss()
        before = _status_kib("VmRSS") or 0
        t0 = time.perf_counter()
        run()
        row["seconds"] = round(time.perf_counter() - t0, 2)
    peak = _status_kib("VmHWM") or 0
    row["peak_rss_mib"] = round(peak / 1024, 1)
    row["rise_mib"] = round((peak - before) / 1024, 1)
    row["rise_bytes_per_pixel"] = round((peak - before) * 1024 / (size * size), 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=("net8", "attention"), default="net8")
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    p.add_argument("--checkpoint", default=None, help="a kdinpaint checkpoint instead of the random-weight Net8")
    p.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.what, args.child, args.checkpoint)))
        return
    rows = []
    print(f"| {args.what} | size | N at H/2 | peak RSS (MiB) | rise (MiB) | bytes / pixel | s | estimate (MiB) |\n|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--what", args.what, "--child", str(size)]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            print(f"| {args.what} | {size} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        n = (size // 2) ** 2 if args.what == "net8" else size * size
        print(f"| {args.what} | {size} | {n} | {r['peak_rss_mib']} | {r['rise_mib']} | {r['rise_bytes_per_pixel']} | "
              f"{r['seconds']} | {r.get('estimate_mib', '')} |", flush=True)
    print(f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs; each size in a fresh process")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
