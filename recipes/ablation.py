"""A small Table 3 on real images: Baseline, Net3, Net4, Net7 and Net8 trained briefly on the bundled photos.

    python recipes/ablation.py                       # the demo recipe, same seed and steps for every variant
    python recipes/ablation.py train.steps=600       # longer (any recipe override applies to every variant)

Each variant runs ``recipes/train.py`` with ``recipes/demo.yaml`` (its own run folder under
``runs/ablation/``; variants with the same teacher architecture share one pre-trained teacher) and is evaluated on the same held-out photos and
masks. The table lists PSNR / SSIM / mean L1 over all evaluation images and the 30-40 % bucket (Table 3's
column). With a few hundred steps on a handful of photos the differences are small and noisy: this checks that
every variant trains end to end, it does not reproduce the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kdinpaint_adapters.reference import VARIANT_BUILDERS

HERE = Path(__file__).resolve().parent
VARIANTS = ["baseline", "net3", "net4", "net7", "net8"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "demo.yaml"))
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--reuse", action="store_true", help="keep variants whose run folder already has a report")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for variant in args.variants:
        run = out / variant
        # variants whose teacher has the same architecture (with or without attention) share one teacher
        builder = VARIANT_BUILDERS.get(variant, {})
        teacher = out / f"teacher-attention-{builder.get('attention', True)}.safetensors"
        shared = [f"teacher.weights={teacher}"] if teacher.is_file() else []
        cmd = [sys.executable, str(HERE / "train.py"), "--config", args.config, *args.overrides,
               f"model.adapter=reference:{variant}", f"checkpoint.dir={run}", "checkpoint.resume=false", *shared]
        t0 = time.time()
        if args.reuse and (run / "report.json").is_file():
            print(f"== {variant}: reusing {run / 'report.json'}", flush=True)
        else:
            print(f"== {variant}: {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)
        if not teacher.is_file() and (run / "teacher.safetensors").is_file():  # reuse it for the next variants
            teacher.write_bytes((run / "teacher.safetensors").read_bytes())
        summary = json.loads((run / "report.json").read_text())["buckets"]
        rows.append((variant, summary, time.time() - t0))
    print("\n| variant | PSNR (all) | SSIM (all) | L1 % (all) | PSNR 30-40% | wall s |\n|---|---|---|---|---|---|")
    for variant, s, seconds in rows:
        a, b = s["all"], s.get("30-40%", {})
        fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"| {variant} | {fmt(a['psnr'], 2)} | {fmt(a['ssim'], 3)} | {fmt(a['l1'] * 100, 2)} | {fmt(b.get('psnr'), 2)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
