"""Table 3 over seeds: the paper's ablation variants trained with the same budget and seeds, against the floor.

    python recipes/ablation.py                                   # baseline net3 net4 net6 net7 net8, seeds 0 1 2
    python recipes/ablation.py --variants baseline net8 --seeds 0 1 train.steps=160
    python recipes/ablation.py --seeds 0 1 2 data.size=128 'model.kwargs={width: 32, prefill: true}'

Every (variant, seed) runs ``recipes/train.py`` with ``--config`` (default ``recipes/demo.yaml``), the
overrides, ``model.adapter=reference:<variant>`` and ``train.seed=<seed>`` in its own run folder
``<out>/<variant>/seed<seed>``, one run at a time, each with ``OMP_NUM_THREADS=--threads`` (torch's default
for ``set_num_threads``; two training processes sharing the cores run many times slower). Variants whose
teacher has the same architecture share the teacher pre-trained in the first of them with the same seed.
Every student is scored by ``train.py`` on the recipe's held-out images and masks beside the weight-free
floor (``report.json``: ``buckets`` and ``floor``); the floor is the same for every run and is taken from the
first one.

The table (printed, and written to ``--results`` with the command, the machine and the wall times): per
variant the mean ± standard deviation over seeds of PSNR and SSIM (all images, and the 30-40 % hole bucket,
Table 3's column), the floor methods, each variant's gap to biharmonic, and the paired difference to the
baseline of the same seed with a 95 % confidence interval (t distribution, n - 1 degrees of freedom,
``scipy.stats.t.ppf``; scipy comes with scikit-image).

Devices: ``train.py`` runs on what accelerate finds (a GPU when there is one, also without ``accelerate
launch``); ``--device cpu`` forces the CPU (``ACCELERATE_USE_CPU``), ``--device cuda`` insists on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from kdinpaint_adapters.reference import ADAPTER_SPEC, VARIANT_BUILDERS

HERE = Path(__file__).resolve().parent
VARIANTS = ["baseline", "net3", "net4", "net6", "net7", "net8"]
SEEDS = [0, 1, 2]
BUCKET = "30-40%"  # Table 3's column
FLOOR_ROWS = ("biharmonic", "mean", "telea")
# keys the harness sets for every run: the option that replaces each
RESERVED = {"train.seed": "--seeds", "model.adapter": "--variants", "checkpoint.dir": "--out"}
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


# ---- statistics ------------------------------------------------------------------------------------
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; NaN below two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """``a - b`` paired by position (the same seed): ``{"n", "mean", "std", "half", "lo", "hi"}``, the interval
    ``mean ± t_{(1+level)/2, n-1} * std / sqrt(n)`` (NaN with fewer than two pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "half": half, "lo": mean - half, "hi": mean + half}


# ---- runs ------------------------------------------------------------------------------------------
def run_training(cmd: list[str], env: dict[str, str]) -> int:
    """One training run as a subprocess (the tests replace this); its exit status."""
    return subprocess.run(cmd, env=env).returncode


def metric(report: dict, bucket: str, key: str) -> float:
    """``report["buckets"][bucket][key]``, NaN when the run diverged, the bucket is absent or empty."""
    value = report.get("buckets", {}).get(bucket, {}).get(key)
    return math.nan if value is None else float(value)


def teacher_key(variant: str) -> bool:
    """Variants whose teachers have the same architecture (with or without decoder attention) share one."""
    return bool(VARIANT_BUILDERS.get(variant, {}).get("attention", True))


def train_all(args: argparse.Namespace, overrides: list[str], env: dict[str, str]) -> dict[tuple[str, int], dict]:
    """Train every (variant, seed), seed by seed; ``{(variant, seed): {"report", "wall_s", "reused", "run"}}``."""
    out = Path(args.out)
    teachers: dict[tuple[int, bool], Path] = {}  # (seed, attention) -> a teacher trained in this harness
    runs = {}
    for seed in args.seeds:
        for variant in args.variants:
            run = out / variant / f"seed{seed}"
            key = (seed, teacher_key(variant))
            cached = out / "teachers" / f"seed{seed}-attention-{key[1]}.safetensors"
            if args.reuse and key not in teachers and cached.is_file():
                teachers[key] = cached
            if args.reuse and (run / "report.json").is_file():
                print(f"== {variant} seed {seed}: reusing {run / 'report.json'}", flush=True)
                meta = json.loads((run / "ablation.json").read_text()) if (run / "ablation.json").is_file() else {}
                wall, reused = meta.get("wall_s", math.nan), True
            else:
                if run.exists():  # stale outputs (a teacher, a report, appended metrics) of an earlier run
                    shutil.rmtree(run)
                shared = [f"teacher.weights={teachers[key]}"] if key in teachers else []
                cmd = [sys.executable, str(HERE / "train.py"), "--config", args.config, *overrides,
                       f"model.adapter=reference:{variant}", f"train.seed={seed}", f"checkpoint.dir={run}",
                       "checkpoint.resume=false", "train.threads=null", *shared,  # OMP_NUM_THREADS=--threads decides
                       *(["train.control=false"] if variant == "baseline" else [])]  # nothing distils: no twin
                print(f"== {variant} seed {seed}: {shlex.join(cmd[2:])}", flush=True)
                t0 = time.time()
                status = run_training(cmd, env)
                wall, reused = time.time() - t0, False
                if status not in (0, 2):  # 2: stopped as diverged by train.py's guard (report.json says so)
                    raise SystemExit(f"{variant} seed {seed} failed with exit status {status}: {shlex.join(cmd)}")
                (run / "ablation.json").write_text(json.dumps({"wall_s": wall, "command": cmd}, indent=2) + "\n")
            if key not in teachers and (run / "teacher.safetensors").is_file():  # for the next variants of this seed
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / "teacher.safetensors", cached)
                teachers[key] = cached
            report = json.loads((run / "report.json").read_text())
            runs[(variant, seed)] = {"report": report, "wall_s": wall, "reused": reused, "run": run}
    return runs


# ---- tables ----------------------------------------------------------------------------------------
def _fmt(value: float, digits: int, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, f"{'+' if sign else ''}.{digits}f")


def _pm(values: Sequence[float], digits: int, sign: bool = False) -> str:
    values = [v for v in values if not math.isnan(v)]
    mean, std = mean_std(values)
    return "-" if not values else _fmt(mean, digits, sign) + ("" if math.isnan(std) else f" ± {_fmt(std, digits)}")


def _ci(d: dict[str, float], digits: int) -> str:
    if math.isnan(d["mean"]):
        return "-"
    ci = "" if math.isnan(d["half"]) else f" [{_fmt(d['lo'], digits, True)}, {_fmt(d['hi'], digits, True)}]"
    return _fmt(d["mean"], digits, True) + ci


def tables(runs: dict[tuple[str, int], dict], variants: Sequence[str], seeds: Sequence[int], baseline: str = "baseline") -> str:
    """The markdown of the scores (mean ± std over seeds, floor rows, gap to biharmonic), the paired differences
    to ``baseline`` with 95 % intervals, and the runs (one line each, with its wall time)."""
    scored = [r["report"] for r in runs.values() if "buckets" in r["report"]]  # not diverged
    floor = next((r["report"]["floor"] for r in runs.values() if "floor" in r["report"]), None)
    methods = {m: floor["methods"][m] for m in FLOOR_ROWS if floor and m in floor["methods"]}
    has_bucket = any(not math.isnan(metric(r["report"], BUCKET, "psnr")) for r in runs.values())
    columns = [("all", "psnr", 2), ("all", "ssim", 3)] + ([(BUCKET, "psnr", 2), (BUCKET, "ssim", 3)] if has_bucket else [])
    titles = [f"{k.upper()} {b}" for b, k, _ in columns]
    ref = methods.get("biharmonic")

    gap_titles = ["Δ PSNR all vs biharmonic", "Δ SSIM all vs biharmonic", "wall s / run"]
    lines = ["| method | seeds | " + " | ".join(titles + gap_titles) + " |", "|---|---|" + "---|" * (len(columns) + 3)]
    for v in variants:
        done = [runs[(v, s)] for s in seeds if (v, s) in runs]
        ok = [r for r in done if not r["report"].get("diverged")]
        cells = [_pm([metric(r["report"], b, k) for r in ok], d) for b, k, d in columns]
        gaps = [_pm([metric(r["report"], "all", k) - metric(ref, "all", k) for r in ok], d, sign=True) if ref else "-"
                for k, d in (("psnr", 2), ("ssim", 3))]
        wall = _pm([r["wall_s"] for r in done], 0)
        n = f"{len(ok)}" + (f" ({len(done) - len(ok)} diverged)" if len(ok) < len(done) else "")
        lines.append(f"| {v} | {n} | " + " | ".join(cells + gaps) + f" | {wall} |")
    for m, summary in methods.items():
        cells = [_fmt(metric(summary, b, k), d) for b, k, d in columns]
        gaps = [_fmt(metric(summary, "all", k) - metric(ref, "all", k), d, True) for k, d in (("psnr", 2), ("ssim", 3))]
        lines.append(f"| {m} (floor, no weights) | - | " + " | ".join(cells + gaps) + " | - |")
    count = metric(scored[0], "all", "count") if scored else math.nan
    lines += ["", f"Mean ± sample standard deviation over seeds; {_fmt(count, 0)} held-out images, "
              "the same masks for every run."]
    lines += perceptual_lines(runs, variants, seeds)

    if baseline in variants:
        lines += ["", f"Paired difference to {baseline} (same seed), mean [95 % confidence interval, t with n - 1 "
                  "degrees of freedom]:", "",
                  f"| variant − {baseline} | pairs | " + " | ".join(f"Δ {t}" for t in titles) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for v in variants:
            if v == baseline:
                continue
            pairs = [s for s in seeds if (v, s) in runs and (baseline, s) in runs
                     and not runs[(v, s)]["report"].get("diverged") and not runs[(baseline, s)]["report"].get("diverged")]
            cells = []
            for b, k, d in columns:
                a = [metric(runs[(v, s)]["report"], b, k) for s in pairs]
                c = [metric(runs[(baseline, s)]["report"], b, k) for s in pairs]
                cells.append(_ci(paired_difference(a, c), d))
            lines.append(f"| {v} | {len(pairs)} | " + " | ".join(cells) + " |")

    lines += ["", "Runs:", "", "| variant | seed | PSNR all | SSIM all | wall s | |", "|---|---|---|---|---|---|"]
    for s in seeds:
        for v in variants:
            if (v, s) not in runs:
                continue
            r = runs[(v, s)]
            note = "diverged" if r["report"].get("diverged") else ("reused" if r["reused"] else "")
            lines.append(f"| {v} | {s} | {_fmt(metric(r['report'], 'all', 'psnr'), 2)} | "
                         f"{_fmt(metric(r['report'], 'all', 'ssim'), 3)} | {_fmt(r['wall_s'], 0)} | {note} |")
    lines += consistency_notes(runs)
    return "\n".join(lines) + "\n"


def _perceptual(report: dict, key: str) -> float:
    """The network's LPIPS (all holes) or FID in a report.json written with the backbone files present, else NaN."""
    scores = report.get("perceptual") or {}
    own = next((v for k, v in scores.items() if k != "biharmonic" and "(control)" not in k), None)
    if own is None:
        return math.nan
    value = own["lpips"]["buckets"]["all"]["mean"] if key == "lpips" and own.get("lpips") else own.get(key)
    return math.nan if value is None else float(value)


def perceptual_lines(runs: dict[tuple[str, int], dict], variants: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """LPIPS and FID per variant (mean ± std over seeds) when the runs' reports have them (their backbone files
    were present); nothing otherwise."""
    if not any((r["report"].get("perceptual") or {}) for r in runs.values()):
        return []
    lines = ["", "Perceptual (lower is better; the runs' report.json):", "", "| method | LPIPS all | FID |", "|---|---|---|"]
    for v in variants:
        ok = [runs[(v, s)]["report"] for s in seeds if (v, s) in runs and not runs[(v, s)]["report"].get("diverged")]
        lines.append(f"| {v} | {_pm([_perceptual(r, 'lpips') for r in ok], 4)} | {_pm([_perceptual(r, 'fid') for r in ok], 2)} |")
    return lines


def consistency_notes(runs: dict[tuple[str, int], dict]) -> list[str]:
    """Warnings when runs were not scored on the same images and masks (per-image rows or floor differ)."""
    notes, seen_rows, seen_floor = [], None, None
    for (v, s), r in runs.items():
        report = r["report"]
        rows = [(x["name"], x["mask_ratio"]) for x in report.get("rows", [])] or None
        floor = report.get("floor", {}).get("methods")
        floor = {m: metric(x, "all", "psnr") for m, x in floor.items()} if floor else None
        if rows is not None:
            if seen_rows is not None and rows != seen_rows:
                notes.append(f"WARNING: {v} seed {s} was scored on other images or masks than the first run")
            seen_rows = seen_rows or rows
        if floor is not None:
            if seen_floor is not None and floor != seen_floor:
                notes.append(f"WARNING: {v} seed {s} has another floor than the first run (other evaluation set?)")
            seen_floor = seen_floor or floor
    return [""] + notes if notes else []


def machine(device: str) -> str:
    """Processor, cores, Python and torch versions, and the device the runs use."""
    import torch

    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").is_file():  # platform.processor() is empty on most Linux systems
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else ""
    if device != "cpu" and torch.cuda.is_available():
        used = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        used = "cpu"
    return (f"{cpu or '?'} / {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}, device {used}")


# ---- command line ----------------------------------------------------------------------------------
def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``section.key=value`` arguments (anywhere after the script name, so after ``--seeds 0 1 2`` too) and the rest."""
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    return [a for a in argv if a not in overrides], overrides


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    variants = list(ADAPTER_SPEC["variants"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "demo.yaml"), help="recipe of every run (default: recipes/demo.yaml)")
    parser.add_argument("--out", default="runs/ablation", help="run folders <out>/<variant>/seed<S>")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=variants, metavar="VARIANT",
                        help=f"Table 3 variants, of {', '.join(variants)} (default: {' '.join(VARIANTS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="train.seed of the runs (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of each run (default: all cores)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU when there is one (accelerate's choice); cpu forces the CPU")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="train.mixed_precision")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose folder already has a report.json")
    parser.add_argument("--results", default=str(HERE / "results" / f"{datetime.date.today().isoformat()}-table3.md"),
                        help="markdown written at the end (default: recipes/results/<today>-table3.md)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, section.key=value")
    options, overrides = split_overrides(argv)
    args = parser.parse_args(options + (["--", *overrides] if overrides else []))
    for item in args.overrides:
        if not OVERRIDE.match(item):
            parser.error(f"override {item!r} must look like section.key=value (a '.' and an '='), e.g. train.steps=160")
        key = item.split("=", 1)[0]
        if key in RESERVED:
            parser.error(f"{key} is set by the harness for every run: use {RESERVED[key]}")
    if len(set(args.variants)) < len(args.variants) or len(set(args.seeds)) < len(args.seeds):
        parser.error("a variant or seed is given twice")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch finds no GPU here")
    # --mixed-precision comes last, so it wins over a train.mixed_precision override
    overrides = list(args.overrides) + ([f"train.mixed_precision={args.mixed_precision}"] if args.mixed_precision else [])
    from kdinpaint.train.recipe import load_recipe

    try:  # unknown keys and bad values fail here, before the first run
        recipe = load_recipe(args.config, overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    t0 = time.time()
    runs = train_all(args, overrides, env)
    total = time.time() - t0
    table = tables(runs, args.variants, args.seeds)
    command = shlex.join(["python", "recipes/ablation.py", *argv])
    header = [
        "# Table 3 over seeds (`recipes/ablation.py`)", "",
        f"- command: `{command}`",
        f"- recipe: `{shown_path(args.config)}`; {recipe.data.size}×{recipe.data.size}, model.kwargs {recipe.model.kwargs}, "
        f"train.steps {recipe.train.steps}, teacher.steps {recipe.teacher.steps}, mixed precision {recipe.train.mixed_precision}",
        f"- machine: {machine(args.device)}; {args.threads} thread{'s' if args.threads != 1 else ''} per run, runs one at a time",
        f"- total wall time: {total:.0f} s ({total / 60:.1f} min) for {len(runs)} runs",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "- 95 % intervals: t quantile from scipy.stats.t.ppf", "", "",
    ]
    text = "\n".join(header) + table
    print("\n" + table + f"\ntotal wall time {total:.0f} s", flush=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(f"written: {results}")


def shown_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (results.md names no machine's folders)."""
    try:
        return Path(path).resolve().relative_to(HERE.parent).as_posix()
    except ValueError:
        return path


if __name__ == "__main__":
    main()
