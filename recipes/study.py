"""Does distillation pay? The study of issue 29: named tables of (arm, seed) runs, each distilled student beside
its twin trained without distillation (``train.control=true``), compared image by image on one held-out set.

    python recipes/study.py paper32                 # Table 3's core rows in the paper's regime at 32x32
    python recipes/study.py paper32-long            # net3 and its twin where the baseline's curve is flat
    python recipes/study.py compress32              # a wide inpainting teacher distilled into the demo-size student
    python recipes/study.py compress64-demo         # the same in the main job's setting (64x64, biharmonic prefill)
    python recipes/study.py lambda32                # lambda_d over a decade each way, plain and feature scale
    python recipes/study.py levels32                # which encoder levels carry the compression teacher
    python recipes/study.py teacher32               # the autoencoder teacher's quality against the student's gain
    python recipes/study.py paper128 --device cuda --jobs 4 --seeds 0 1     # recipes/gpu_study.sh
    python recipes/study.py paper32 --table-only    # the table from the runs finished so far, no training

Each study (``STUDIES``) is a recipe, overrides shared by its runs, and arms: a name, its own overrides and
whether it trains with its twin. Every (arm, seed) is one ``kdinpaint`` training run in
``<out>/<study>/<arm>/seed<S>`` with ``train.seed=S``; a run whose folder has a ``report.json`` is done and
skipped, an unfinished one resumes from its last checkpoint (the Trainer's), so running the same command again
picks up where a cut-off session stopped. Arms may depend on others (``{arm}`` in an override is that arm's
run folder of the same seed, or of its only seed): a teacher stage shared by several variants, or a wide
inpainter trained first and then used as the teacher (its exported weights rewritten as a plain state dict,
``teacher.safetensors`` in its folder). At most ``--jobs`` runs go at once, each with ``OMP_NUM_THREADS`` and
``train.threads`` at ``--threads``.

The tables (printed, and written into the study's section of ``--results``, by default
``recipes/results/2026-12-07-distillation-study.md``, between ``<!-- study:NAME -->`` markers):

- per distilled arm, the student and its twin on the held-out set and the paired gap student - twin per image,
  averaged over the seeds and given with its 95 % interval over the images
  (``pooled_interval`` of :mod:`kdinpaint.evaluation.compare`), the gap of every seed, and each network's gap to biharmonic
  (pooled the same way);
- arm against arm (``versus``): the students of two arms of the same seed, paired per image the same way;
- the held-out curves (``log.eval_every``): PSNR of each student and twin against the step, mean over seeds;
- the runs: wall time (measured on a machine that may have been shared: the load average is recorded), the
  teacher's reconstruction error where the arm has a teacher.

The study's own networks (``study-compress``: the demo-size student taught by a wider reference network fed the
student's input, with output and feature distillation; ``study-feature``: the reference network's Table 3
variants with ``distill_scale: feature``) are registered by this script in every run it starts
(``python recipes/study.py train ...`` is the Trainer's command line with them registered).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUCKET = "30-40%"  # Table 3's column


# ---- the study's networks ----------------------------------------------------------------------------
def _compress_student(width: int = 8, teacher_width: int = 16, prefill: bool | str = False, prefill_ramp: int = 0,
                      teacher_prefill: bool | str | None = None, **kwargs):
    """The demo-size student: the reference backbone without attention or compensation layers."""
    from kdinpaint_adapters.reference import reference_net

    return reference_net(width=width, attention=False, compensate=False, prefill=prefill, prefill_ramp=prefill_ramp, **kwargs)


def _compress_teacher(width: int = 8, teacher_width: int = 16, prefill: bool | str = False, prefill_ramp: int = 0,
                      teacher_prefill: bool | str | None = None, **kwargs):
    """The teacher: ``reference:baseline`` at ``teacher_width`` (what the teacher arm trains as an inpainter)."""
    from kdinpaint_adapters.reference import reference_net

    fill = prefill if teacher_prefill is None else teacher_prefill
    return reference_net(width=teacher_width, attention=False, compensate=True, prefill=fill,
                         prefill_ramp=prefill_ramp if fill else 0, **kwargs)


_LEVELS = ["enc1", "enc2", "enc3"]
COMPRESS_SPEC = {
    "name": "study-compress",
    "description": "demo-size reference backbone taught by a wider reference:baseline inpainter fed the student's input",
    "encoder_levels": _LEVELS,
    "teacher_levels": _LEVELS,
    "completion_sites": [],
    "attention_sites": [],
    "cross_distillation": True,
    "self_distillation": False,
    "image_arg": "image",
    "mask_arg": "mask",
    "teacher_input": "student_input",
    "distill_scale": "feature",
    "output_distillation": 1.0,
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        "outfeat": {},  # output and feature (cross) distillation on enc1-enc3, the default
        "out": {"encoder_levels": [], "teacher_levels": [], "cross_distillation": False},
        "feat": {"output_distillation": 0.0},
        "plain": {"distill_scale": "plain"},  # Eq. 2 as written (the teacher's feature scale decides the weight)
        **{lv: {"encoder_levels": [lv], "teacher_levels": [lv], "output_distillation": 0.0} for lv in _LEVELS},
    },
}


def register_study_adapters() -> None:
    """Register ``study-compress`` and ``study-feature`` (the reference variants with ``distill_scale: feature``)."""
    import copy

    from kdinpaint.adapter import Adapter
    from kdinpaint.hookspecs import hookimpl
    from kdinpaint import plugins
    from kdinpaint_adapters.reference import ADAPTER_SPEC, VARIANT_BUILDERS, ReferenceNet, reference_net, reference_teacher

    feature = {**copy.deepcopy(ADAPTER_SPEC), "name": "study-feature", "distill_scale": "feature",
               "description": "the reference network's Table 3 variants with distill_scale: feature"}

    class StudyAdapters:
        __name__ = "StudyAdapters"

        @staticmethod
        @hookimpl
        def register_adapters(register) -> None:
            register(Adapter(name="study-compress", spec=COMPRESS_SPEC, build_student=_compress_student,
                             build_teacher=_compress_teacher, description=COMPRESS_SPEC["description"],
                             stride=ReferenceNet.stride))
            register(Adapter(name="study-feature", spec=feature, build_student=reference_net,
                             build_teacher=reference_teacher, description=feature["description"],
                             stride=ReferenceNet.stride, variant_builders=VARIANT_BUILDERS))

    plugins.load_plugins()
    if not plugins.pm.has_plugin("recipes-study"):
        plugins.pm.register(StudyAdapters(), name="recipes-study")


# ---- studies ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of a study: ``overrides`` after the study's, ``control`` trains the twin beside it,
    ``stage`` ``teacher`` runs the teacher stage only, ``seeds`` fixes the seeds (a shared teacher), ``export_teacher``
    rewrites the exported student as a plain state dict (``teacher.safetensors``) for arms that learn from it,
    ``same_as`` (``"study/arm"``) reuses another study's arm trained with the same settings."""

    name: str
    overrides: tuple[str, ...] = ()
    control: bool = False
    stage: str = "all"
    seeds: tuple[int, ...] | None = None
    export_teacher: bool = False
    same_as: str | None = None  # "study/arm": that study's runs (the same settings), read here and never retrained

    @property
    def scored(self) -> bool:
        return self.stage != "teacher"


@dataclasses.dataclass(frozen=True)
class Study:
    title: str
    config: str
    common: tuple[str, ...]
    arms: tuple[Arm, ...]
    versus: str | None = None  # every scored arm's student against this arm's, same seed
    note: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)  # train.seed of the runs unless --seeds says otherwise


def _arm(name: str, *overrides: str, **kw) -> Arm:
    return Arm(name, tuple(overrides), **kw)


# The paper's regime: zero-filled holes (no prefill), its objective (R_recon, no SSIM term), batches of 6, the last
# weights scored; a cosine schedule at the demo recipe's learning rate so that a CPU budget reaches the flat part
# of the curve. 32x32 crops of the bundled photos; the demo's training crops, masks and augmentations.
PAPER_COMMON = (
    "model.kwargs={width: 8}", "data.size=32", "optim.batch_size=6", "train.average=0", "losses.ssim=0",
    "losses.recon_padding=zeros", "meta.every=4", "log.sample_every=0", "log.tensorboard=false",
    "checkpoint.every=500", "checkpoint.keep=1",
)
PAPER_STEPS = 3000  # the budget of the six rows; the baseline gains 1.7 dB more by 12000 (PAPER_LONG_STEPS)
PAPER_TEACHER = 1000  # L1 autoencoder steps of the shared teacher
PAPER_LONG_STEPS = 12000  # where the baseline's curve is flat (its last 2000 steps within 0.2 dB)
PAPER_EVAL = 250


def _paper(steps: int, teacher_steps: int, eval_every: int, extra: Sequence[str] = ()) -> tuple[str, ...]:
    return (*PAPER_COMMON, f"train.steps={steps}", f"teacher.steps={teacher_steps}", f"log.eval_every={eval_every}", *extra)


def _table3_arms(adapter: str = "reference") -> tuple[Arm, ...]:
    teach = f"teacher.weights={{teacher}}/teacher.safetensors"
    teach_att = f"teacher.weights={{teacher-att}}/teacher.safetensors"
    return (  # in the order they run: the cheap core rows first, so that a cut-off study has whole rows
        _arm("teacher", f"model.adapter={adapter}:net3", stage="teacher"),  # shared by net1-net4 (no attention)
        _arm("baseline", "model.adapter=reference:baseline"),
        _arm("net3", f"model.adapter={adapter}:net3", teach, control=True),
        _arm("teacher-att", f"model.adapter={adapter}:net8", stage="teacher"),  # net8's (with attention)
        _arm("net8", f"model.adapter={adapter}:net8", teach_att, control=True),
        *(_arm(v, f"model.adapter={adapter}:{v}", teach, control=True) for v in ("net4", "net1", "net2")),
    )


COMPRESS_TEACHER_WIDTH = 16  # width 32 took 5.7 s per block of 2 steps here (4.7 hours for 6000 steps)
COMPRESS_TEACHER_STEPS = 6000
COMPRESS_STEPS = 3000


def _compress_common(steps: int = COMPRESS_STEPS) -> tuple[str, ...]:
    return _paper(steps, 0, PAPER_EVAL, (f"model.kwargs={{width: 8, teacher_width: {COMPRESS_TEACHER_WIDTH}}}",))


def _compress_teacher_arm() -> Arm:
    # the wide network trained as an inpainter (reference:baseline at teacher_width, no distillation), once (seed 0)
    return _arm("teacher", "model.adapter=reference:baseline", f"model.kwargs={{width: {COMPRESS_TEACHER_WIDTH}}}",
                f"train.steps={COMPRESS_TEACHER_STEPS}", seeds=(0,), export_teacher=True)


TEACHER_OF_COMPRESS = "teacher.weights={teacher}/teacher.safetensors"

STUDIES: dict[str, Study] = {
    "paper32": Study(
        title="Table 3's core rows in the paper's regime (zero-filled holes) at 32x32, each against its twin",
        config="recipes/demo.yaml",
        common=_paper(PAPER_STEPS, PAPER_TEACHER, PAPER_EVAL),
        arms=(
            *_table3_arms(),
            # net2 at the paper's lambda_d 20 stopped as diverged on every seed (its self-distillation term grew
            # 100-fold within 140 steps): the same row a decade lower, and on the feature scale
            _arm("net2-lambda2", "model.adapter=reference:net2", "teacher.weights={teacher}/teacher.safetensors",
                 "losses.lambda_d=2", control=True),
            _arm("net2-feature", "model.adapter=study-feature:net2", "teacher.weights={teacher}/teacher.safetensors",
                 "losses.lambda_d=1", control=True),
        ),
        versus="baseline",
        note="The twin of a distilled variant is the same network trained without its distillation terms (net4's "
             "and net8's keep their completion blocks, attention and PGL untaught); baseline is Table 3's "
             "parameter-matched backbone, trained once per seed. net2 (self-distillation alone) at lambda_d 20 "
             "stopped as diverged on every seed; net2-lambda2 is it at lambda_d 2, net2-feature on the feature "
             "scale (each level's term a relative error) at lambda_d 1.",
    ),
    "paper32-long": Study(
        title="net3 against its twin in the paper's regime at 32x32 with the schedule on which the baseline's curve flattens",
        config="recipes/demo.yaml",
        common=_paper(PAPER_LONG_STEPS, PAPER_TEACHER, 1000),
        arms=(
            _arm("teacher", "model.adapter=reference:net3", stage="teacher", same_as="paper32/teacher"),
            _arm("net3", "model.adapter=reference:net3", "teacher.weights={teacher}/teacher.safetensors", control=True),
        ),
        note=f"{PAPER_LONG_STEPS} steps: the baseline's held-out PSNR (one run, seed 0) rose to 25.6 dB by step 10000 "
             "of a 12000-step cosine schedule and stayed within 0.2 dB of it to the end, where 3000 steps end at 24.0. "
             "The twin of net3 is the backbone without distillation; the teacher is paper32's.",
    ),
    "compress32": Study(
        title="Compression at 32x32: a wider inpainter (reference:baseline, width 16) taught to the width-8 backbone",
        config="recipes/demo.yaml",
        common=_compress_common(),
        arms=(
            _compress_teacher_arm(),
            _arm("outfeat", "model.adapter=study-compress:outfeat", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True),
            _arm("out", "model.adapter=study-compress:out", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True),
            _arm("feat", "model.adapter=study-compress:feat", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True),
        ),
        note="The teacher sees the student's input (teacher_input: student_input); feature distillation is Eq. 2 "
             "with distill_scale feature on enc1-enc3 (gamma projects 32/64/128 channels to 16/32/64), output "
             "distillation an L1 to the teacher's prediction in the holes (weight 1 inside the distillation total); "
             "lambda_d 1. The twin is the same width-8 backbone trained alone. Six seeds: the first three put every "
             "seed's gap above zero but their spread left the interval over seeds across it.",
        seeds=(0, 1, 2, 3, 4, 5),
    ),
    "compress64-demo": Study(
        title="Compression in the main job's setting: the demo recipe's student taught by a width-16 inpainter",
        config="recipes/demo.yaml",
        common=("model.kwargs={width: 8, teacher_width: 16, prefill: biharmonic, prefill_ramp: 8}", "teacher.steps=0",
                "log.eval_every=100", "log.sample_every=0", "log.tensorboard=false", "checkpoint.every=300",
                "checkpoint.keep=1"),
        arms=(
            _arm("teacher", "model.adapter=reference:baseline",
                 "model.kwargs={width: 16, prefill: biharmonic, prefill_ramp: 8}", "train.steps=2400", seeds=(0,),
                 export_teacher=True),
            _arm("outfeat", "model.adapter=study-compress:outfeat", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True),
            _arm("out", "model.adapter=study-compress:out", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True),
        ),
        note="recipes/demo.yaml as it is (64x64, the biharmonic prefill and its ramp, SSIM term, batches of 16, "
             "cosine schedule, averaged weights, 600 steps) with the demo-size backbone (no completion blocks or "
             "attention) as the student. The teacher is the same recipe's reference:baseline at width 16 trained as "
             "an inpainter for 2400 steps (four times the student's).",
    ),
    "lambda32": Study(
        title="lambda_d over a decade each way: net3 in the paper's regime, plain and feature scale",
        config="recipes/demo.yaml",
        common=_paper(PAPER_STEPS, PAPER_TEACHER, PAPER_EVAL),
        arms=(
            _arm("teacher", "model.adapter=reference:net3", stage="teacher", same_as="paper32/teacher"),
            *(_arm(f"net3-plain-{lam:g}", "model.adapter=reference:net3", "teacher.weights={teacher}/teacher.safetensors",
                   f"losses.lambda_d={lam:g}", control=True, same_as="paper32/net3" if lam == 20 else None)
              for lam in (0.2, 2, 20, 200)),
            *(_arm(f"net3-feature-{lam:g}", "model.adapter=study-feature:net3", "teacher.weights={teacher}/teacher.safetensors",
                   f"losses.lambda_d={lam:g}", control=True) for lam in (0.1, 1, 10)),
        ),
        note="net3 (cross- and self-distillation from the 1000-step autoencoder teacher of paper32). Plain scale "
             "(Eq. 2/3 as written): the paper's lambda_d 20 (paper32's net3 runs), a decade each way and 0.2. Feature "
             "scale: each level's term is a relative error, so 1 and a decade each way.",
    ),
    "levels32": Study(
        title="The compression teacher: which encoder levels carry it (feature distillation alone), and lambda_d",
        config="recipes/demo.yaml",
        common=_compress_common(),
        arms=(
            _arm("teacher", *_compress_teacher_arm().overrides, seeds=(0,), export_teacher=True, same_as="compress32/teacher"),
            *(_arm(lv, f"model.adapter=study-compress:{lv}", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True)
              for lv in _LEVELS),
            _arm("enc1-3", "model.adapter=study-compress:feat", TEACHER_OF_COMPRESS, "losses.lambda_d=1", control=True,
                 same_as="compress32/feat"),
            *(_arm(f"outfeat-{lam:g}", "model.adapter=study-compress:outfeat", TEACHER_OF_COMPRESS,
                   f"losses.lambda_d={lam:g}", control=True, same_as="compress32/outfeat" if lam == 1 else None)
              for lam in (0.1, 1, 10)),
        ),
        note="compress32's teacher; enc1-3 and outfeat-1 are compress32's feat and outfeat runs.",
    ),
    "teacher32": Study(
        title="The autoencoder teacher's quality against the student's gain: net3 taught by teachers of 1-3000 L1 steps",
        config="recipes/demo.yaml",
        common=_paper(PAPER_STEPS, PAPER_TEACHER, PAPER_EVAL),
        arms=tuple(
            arm for t in (1, 100, 1000, 3000) for arm in (
                _arm(f"teacher-{t}", "model.adapter=reference:net3", f"teacher.steps={t}", stage="teacher",
                     same_as="paper32/teacher" if t == PAPER_TEACHER else None),
                _arm(f"net3-teacher-{t}", "model.adapter=reference:net3", f"teacher.weights={{teacher-{t}}}/teacher.safetensors",
                     control=True, same_as="paper32/net3" if t == PAPER_TEACHER else None),
            )
        ),
        note="teacher.steps 1 is the teacher one L1 step from its random weights (a run refuses a teacher of 0 steps "
             "without weights); the 1000-step teacher and its students are paper32's. Teacher L1: its reconstruction "
             "error on the held-out images (ground truth in, empty mask).",
    ),
    "paper128": Study(
        title="Table 3's core rows in the paper's regime at 128x128 (GPU), each against its twin",
        config="recipes/demo.yaml",
        common=(
            "model.kwargs={width: 32}", "data.size=128", "optim.batch_size=6", "train.average=0", "losses.ssim=0",
            "meta.every=4", "log.sample_every=0", "log.tensorboard=false", "checkpoint.every=200", "checkpoint.keep=1",
            "train.steps=400", "teacher.steps=200", "log.eval_every=100", "data.workers=2",
        ),
        arms=_table3_arms(),
        versus="baseline",
        note="Sized for one H100/H200 in at most 8 minutes with 4 runs at once (recipes/gpu_study.sh), from an "
             "estimate of the step times; too slow for the CPU (one Net8 step at width 32 and 128x128 took 41 s there).",
    ),
}


# ---- runs -------------------------------------------------------------------------------------------
def seeds_of(arm: Arm, seeds: Sequence[int]) -> list[int]:
    return list(arm.seeds) if arm.seeds is not None else list(seeds)


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    """``<out>/<arm>/seed<S>``; an arm ``same_as`` another study's is read from that study's folder beside ``out``."""
    return (out.parent / arm.same_as if arm.same_as else out / arm.name) / f"seed{seed}"


def is_done(arm: Arm, run: Path) -> bool:
    if arm.stage == "teacher":
        return (run / "teacher.safetensors").is_file()
    done = (run / "report.json").is_file()
    return done and (not arm.export_teacher or (run / "teacher.safetensors").is_file() or _diverged(run))


def _diverged(run: Path) -> bool:
    try:
        return bool(json.loads((run / "report.json").read_text()).get("diverged"))
    except (OSError, ValueError):
        return False


def dependencies(study: Study, arm: Arm) -> list[str]:
    names = {a.name for a in study.arms}
    return [n for n in names if any("{" + n + "}" in o for o in arm.overrides)]


def resolve(study: Study, arm: Arm, seed: int, out: Path) -> list[str]:
    """``arm``'s overrides with ``{other}`` replaced by ``other``'s run folder (the same seed, or its only seed)."""
    resolved = []
    for item in arm.overrides:
        for other in study.arms:
            key = "{" + other.name + "}"
            if key in item:
                s = seed if other.seeds is None else other.seeds[0]
                item = item.replace(key, str(run_dir(out, other, s)))
        resolved.append(item)
    return resolved


def selected(study: Study, names: Sequence[str] | None) -> set[str]:
    """``names`` and the arms they depend on, recursively (every arm when ``names`` is None)."""
    if not names:
        return {a.name for a in study.arms}
    by_name = {a.name: a for a in study.arms}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"arms {unknown} are not in this study; its arms: {list(by_name)}")
    chosen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo += dependencies(study, by_name[name])
    return chosen


def train_command(study: Study, arm: Arm, seed: int, out: Path, overrides: Sequence[str], threads: int) -> list[str]:
    run = run_dir(out, arm, seed)
    return [sys.executable, str(HERE / "study.py"), "train", "--config", str(ROOT / study.config), "--stage", arm.stage,
            *study.common, *resolve(study, arm, seed, out), *overrides, f"train.seed={seed}", f"checkpoint.dir={run}",
            f"train.threads={threads}", f"train.control={'true' if arm.control else 'false'}"]


def export_teacher(run: Path) -> None:
    """``student.safetensors`` (an export: ``model.``-prefixed keys) rewritten as ``teacher.safetensors``, the plain
    state dict that ``teacher.weights`` loads; an export with completion blocks or fusion is refused."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "student.safetensors"))
    extra = [k for k in state if not k.startswith("model.")]
    if extra:
        raise SystemExit(f"{run / 'student.safetensors'} has parts outside the network ({extra[:3]} ...): a teacher arm "
                         "must train a network without completion blocks or fusion (e.g. reference:baseline)")
    tmp = run / "teacher.safetensors.tmp"
    save_file({k.removeprefix("model."): v for k, v in state.items()}, str(tmp))
    os.replace(tmp, run / "teacher.safetensors")


def train_all(study: Study, out: Path, args: argparse.Namespace, overrides: Sequence[str], env: Mapping[str, str]) -> None:
    """Every unfinished (arm, seed) in ``out`` (of ``args.arms`` and what they need, when given), up to ``args.jobs``
    at once, an arm after the arms its overrides name."""
    chosen = selected(study, getattr(args, "arms", None))
    pending = [(a, s) for a in study.arms if a.name in chosen for s in seeds_of(a, args.seeds)
               if not is_done(a, run_dir(out, a, s))]
    borrowed = [f"{a.same_as}/seed{s}" for a, s in pending if a.same_as]
    if borrowed:
        print(f"not finished in the study they belong to (run it first; they are left out here): {borrowed}", flush=True)
        pending = [(a, s) for a, s in pending if not a.same_as]
    running: list[tuple[Arm, int, subprocess.Popen, float, object]] = []
    failed: list[str] = []
    while pending or running:
        for item in list(pending):
            if len(running) >= args.jobs:
                break
            arm, seed = item
            deps = dependencies(study, arm)
            blocking = [d for d in deps for other in study.arms if other.name == d
                        for s in ([seed] if other.seeds is None else other.seeds[:1])
                        if not is_done(other, run_dir(out, other, s))]
            if any(f"{d}/seed" in f for d in blocking for f in failed):
                pending.remove(item)
                failed.append(f"{arm.name}/seed{seed} (needs a failed run)")
                continue
            if blocking and all(o.same_as for o in study.arms if o.name in blocking):
                pending.remove(item)  # it needs a borrowed run that is not there
                continue
            if blocking:
                continue
            pending.remove(item)
            run = run_dir(out, arm, seed)
            run.mkdir(parents=True, exist_ok=True)
            cmd = train_command(study, arm, seed, out, overrides, args.threads)
            print(f"== {arm.name} seed {seed}: {shlex.join(cmd[2:])}", flush=True)
            log = open(run / "train.log", "a")
            proc = subprocess.Popen(cmd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((arm, seed, proc, time.time(), log))
        if not running and pending:
            raise SystemExit(f"runs wait for arms that cannot finish: {[f'{a.name}/seed{s}' for a, s in pending]}")
        time.sleep(2)
        for entry in list(running):
            arm, seed, proc, t0, log = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            log.close()
            run = run_dir(out, arm, seed)
            record = _read_json(run / "study.json") or {"wall_s": 0.0, "sessions": []}
            wall = time.time() - t0
            record["wall_s"] += wall
            record["sessions"].append({"wall_s": round(wall, 1), "exit": proc.returncode, "load_end": os.getloadavg()[0],
                                       "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
            (run / "study.json").write_text(json.dumps(record, indent=2) + "\n")
            if proc.returncode == 0 and arm.export_teacher:
                export_teacher(run)
            state = "done" if proc.returncode == 0 else "DIVERGED" if proc.returncode == 2 else f"FAILED ({proc.returncode})"
            print(f"== {arm.name} seed {seed}: {state} in {wall:.0f} s (see {run / 'train.log'})", flush=True)
            if proc.returncode not in (0, 2):
                failed.append(f"{arm.name}/seed{seed}")
    if failed:
        print(f"failed runs: {failed}", flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- per-image gaps and the tables ---------------------------------------------------------------------
def _value(row: Mapping, key: str) -> float:
    v = row.get(key)
    return math.nan if v is None else float(v)


def network_rows(report: Mapping, which: str) -> list[Mapping]:
    """The per-image rows of ``which``: ``student``, ``control`` (its twin) or a floor method (``biharmonic``)."""
    if which == "student":
        return report["rows"]
    if which == "control":
        return report["control"]["rows"]
    return report["floor"]["methods"][which]["rows"]


def image_gaps(a: Sequence[Mapping], b: Sequence[Mapping], key: str, bucket: str = "all") -> list[float]:
    """``a - b`` of metric ``key`` per image (rows of the same images in the same order), in ``bucket``
    (``"all"`` or a Table 1 label such as ``"30-40%"``: ``lo <= mask_ratio < hi``)."""
    if len(a) != len(b) or any(x["name"] != y["name"] for x, y in zip(a, b)):
        raise ValueError("the two runs were scored on different images; compare runs of one held-out set")
    keep = _in_bucket(bucket)
    return [_value(x, key) - _value(y, key) for x, y in zip(a, b) if keep(x["mask_ratio"])]


def _in_bucket(bucket: str):
    if bucket == "all":
        return lambda r: True
    lo, hi = (float(p) / 100 for p in bucket.rstrip("%").split("-"))
    return lambda r: lo <= r < hi


def pooled(per_seed: Sequence[Sequence[float]]) -> dict[str, float]:
    """:func:`kdinpaint.compare.pooled_interval` of per-seed per-image gaps, plus ``seeds``: each seed's mean
    gap (its finite images) and ``n``: the number of seeds."""
    try:
        from kdinpaint.evaluation.compare import pooled_interval
    except ImportError:  # before kdinpaint.evaluation
        from kdinpaint.compare import pooled_interval

    if not per_seed:
        return {"gap": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan, "seeds": [], "n": 0}
    out = dict(pooled_interval(per_seed))
    out["seeds"] = [_finite_mean(g) for g in per_seed]
    out["n"] = len(per_seed)
    return out


def seed_interval(values: Sequence[float]) -> dict[str, float]:
    """The mean of per-seed gaps with a 95 % interval from Student's t with ``n - 1`` degrees of freedom: how far
    the gap moves with the training seed (NaN bounds below two seeds)."""
    from scipy import stats

    vals = [v for v in values if math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"gap": math.nan, "lo": math.nan, "hi": math.nan}
    mean = sum(vals) / n
    if n < 2:
        return {"gap": mean, "lo": math.nan, "hi": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"gap": mean, "lo": mean - half, "hi": mean + half}


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(v: float, digits: int, sign: bool = True) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, f"{'+' if sign else ''}.{digits}f")


def interval_text(p: Mapping, digits: int) -> str:
    """``+0.12 [+0.05, +0.19]`` (the interval left out with one image)."""
    if not math.isfinite(p["gap"]):
        return "-"
    ci = f" [{_fmt(p['lo'], digits)}, {_fmt(p['hi'], digits)}]" if math.isfinite(p["lo"]) else ""
    return _fmt(p["gap"], digits) + ci


def verdict(p: Mapping) -> str:
    if not math.isfinite(p.get("lo", math.nan)):
        return "-"
    return "**above**" if p["lo"] > 0 else "below" if p["hi"] < 0 else "level"


def verdicts(p: Mapping) -> str:
    """``images / seeds``: where the pooled interval over images and the interval over seeds lie."""
    return f"{verdict(p)} / {verdict(seed_interval(p['seeds']))}"


def mean_metric(reports: Sequence[Mapping], which: str, key: str) -> float:
    vals = [_finite_mean([_value(r, key) for r in network_rows(rep, which)]) for rep in reports]
    return _finite_mean(vals)


def control_table(runs: Mapping[tuple[str, int], Mapping], arms: Sequence[str],
                  teacher_l1: Mapping[str, float] | None = None) -> str:
    """Per arm with a twin: both networks' mean PSNR / SSIM over the held-out images and seeds, the paired gap
    student - twin pooled over seeds with its 95 % interval (PSNR all, SSIM all, PSNR in Table 3's bucket), each
    seed's gap, and both networks' gaps to biharmonic (pooled); with ``teacher_l1`` (arm -> the reconstruction
    error of its autoencoder teacher) a last column with it."""
    teacher_l1 = teacher_l1 or {}
    head = ("| arm | seeds | PSNR student | PSNR twin | Δ PSNR student − twin [95 % images] | Δ PSNR per seed "
            "| Δ PSNR [95 % seeds] | distillation (images / seeds) | Δ SSIM [95 % images] | Δ PSNR 30-40 % [95 % images] "
            "| student − biharmonic PSNR [95 % images] | twin − biharmonic PSNR [95 % images] |"
            + (" teacher L1 |" if teacher_l1 else ""))
    lines = [head, "|" + "---|" * (12 + bool(teacher_l1))]
    for arm in arms:
        reps = [runs[k] for k in sorted(runs) if k[0] == arm and "control" in runs[k]]
        if not reps:
            continue
        g = {(key, b): pooled([image_gaps(network_rows(r, "student"), network_rows(r, "control"), key, b) for r in reps])
             for key, b in (("psnr", "all"), ("ssim", "all"), ("psnr", BUCKET))}
        floor = {w: pooled([image_gaps(network_rows(r, w), network_rows(r, "biharmonic"), "psnr") for r in reps])
                 for w in ("student", "control")}
        p = g[("psnr", "all")]
        lines.append(
            f"| {arm} | {len(reps)} | {_fmt(mean_metric(reps, 'student', 'psnr'), 2, False)} | "
            f"{_fmt(mean_metric(reps, 'control', 'psnr'), 2, False)} | {interval_text(p, 2)} | "
            f"{' / '.join(_fmt(s, 2) for s in p['seeds'])} | {interval_text(seed_interval(p['seeds']), 2)} | {verdicts(p)} | "
            f"{interval_text(g[('ssim', 'all')], 4)} | "
            f"{interval_text(g[('psnr', BUCKET)], 2)} | {interval_text(floor['student'], 2)} | {interval_text(floor['control'], 2)} |"
            + (f" {_fmt(teacher_l1.get(arm, math.nan), 4, False)} |" if teacher_l1 else "")
        )
    return "\n".join(lines) + "\n"


def versus_table(runs: Mapping[tuple[str, int], Mapping], arms: Sequence[str], reference: str) -> str:
    """Each arm's student (and its twin) against ``reference``'s student of the same seed, paired per image and
    pooled over the seeds both have; ``reference`` against biharmonic last."""
    lines = [f"| network − {reference} | seeds | Δ PSNR [95 % images] | Δ PSNR per seed | Δ PSNR [95 % seeds] "
             "| Δ SSIM [95 % images] | Δ PSNR 30-40 % [95 % images] |", "|" + "---|" * 7]
    ref = {s: r for (a, s), r in runs.items() if a == reference and "rows" in r}
    for arm in arms:
        for which in ("student", "control"):
            need = "rows" if which == "student" else "control"
            pairs = [(runs[(arm, s)], ref[s]) for s in sorted(ref) if need in runs.get((arm, s), {})]
            if arm == reference or not pairs:
                continue
            g = {(key, b): pooled([image_gaps(network_rows(x, which), network_rows(y, "student"), key, b) for x, y in pairs])
                 for key, b in (("psnr", "all"), ("ssim", "all"), ("psnr", BUCKET))}
            label = arm if which == "student" else f"{arm} twin"
            p = g[("psnr", "all")]
            lines.append(f"| {label} | {len(pairs)} | {interval_text(p, 2)} | {' / '.join(_fmt(s, 2) for s in p['seeds'])} | "
                         f"{interval_text(seed_interval(p['seeds']), 2)} | {interval_text(g[('ssim', 'all')], 4)} | "
                         f"{interval_text(g[('psnr', BUCKET)], 2)} |")
    if ref:
        p = pooled([image_gaps(network_rows(r, "student"), network_rows(r, "biharmonic"), "psnr") for r in ref.values()])
        lines.append(f"| ({reference} − biharmonic) | {len(ref)} | {interval_text(p, 2)} | "
                     f"{' / '.join(_fmt(s, 2) for s in p['seeds'])} | {interval_text(seed_interval(p['seeds']), 2)} | | |")
    return "\n".join(lines) + "\n"


def curves(metrics: Mapping[tuple[str, int], Sequence[Mapping]], arms: Sequence[str]) -> str:
    """Held-out PSNR against the step (``eval/psnr`` and ``eval/control/psnr`` of ``metrics.jsonl``), the mean
    over the seeds that reached that step; one column per student and per twin."""
    columns: list[tuple[str, str, str]] = []
    for arm in arms:
        recs = [r for (a, _), rs in metrics.items() if a == arm for r in rs]
        for key, label in (("eval/psnr", arm), ("eval/control/psnr", f"{arm} twin")):
            if any(key in r for r in recs):
                columns.append((arm, key, label))
    if not columns:
        return ""
    steps = sorted({r["step"] for rs in metrics.values() for r in rs if any(k in r for _, k, _ in columns)})
    lines = ["| step | " + " | ".join(c[2] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for step in steps:
        cells = []
        for arm, key, _ in columns:
            vals = [r[key] for (a, _), rs in metrics.items() if a == arm for r in rs
                    if r["step"] == step and r.get(key) is not None]
            cells.append(_fmt(sum(vals) / len(vals), 2, False) if vals else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_metrics(path: Path) -> list[dict]:
    """The held-out records of a ``metrics.jsonl`` (a resumed run's later record of a step wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if any(k.startswith("eval/") for k in rec):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


@dataclasses.dataclass
class Collected:
    reports: dict[tuple[str, int], dict]
    metrics: dict[tuple[str, int], list[dict]]
    walls: dict[tuple[str, int], dict]
    teacher_errors: dict[tuple[str, int], float]


def collect(study: Study, out: Path, seeds: Sequence[int]) -> Collected:
    reports, metrics, walls, teacher_errors = {}, {}, {}, {}
    for arm in study.arms:
        for s in seeds_of(arm, seeds):
            run = run_dir(out, arm, s)
            record = _read_json(run / "study.json")
            if record:
                walls[(arm.name, s)] = record
            if arm.stage == "teacher" and (run / "teacher.safetensors").is_file():
                teacher_errors[(arm.name, s)] = teacher_error(run)
            rep = _read_json(run / "report.json") if arm.scored else None
            if rep is not None:
                reports[(arm.name, s)] = rep
                metrics[(arm.name, s)] = read_metrics(run / "metrics.jsonl")
    return Collected(reports, metrics, walls, teacher_errors)


def teacher_error(run: Path) -> float:
    """The L1 (on the [-1, 1] scale, per pixel and channel) of the autoencoder teacher of ``run`` reconstructing
    the held-out images as it was trained to (ground truth in, empty mask); cached in ``teacher_error.json``."""
    cache = run / "teacher_error.json"
    cached = _read_json(cache)
    if cached is not None:
        return cached["l1"]
    import torch
    from safetensors.torch import load_file

    from kdinpaint.calling import convention, select_output
    from kdinpaint.teacher import autoencoder_call
    from kdinpaint.train.recipe import load_recipe
    from kdinpaint.train.runs import build_models, eval_set

    register_study_adapters()
    recipe = load_recipe(run / "recipe.yaml")
    _, _, spec, _, teacher = build_models(recipe)
    teacher.load_state_dict(load_file(str(run / "teacher.safetensors")))
    teacher.eval()
    images, _ = eval_set(recipe)
    call = convention(teacher, spec, teacher=True)
    with torch.no_grad():
        args, kwargs = autoencoder_call(call, spec.teacher_input, images)
        pred = select_output(teacher(*args, **kwargs), spec.teacher_convention.output)
    l1 = float((pred - images).abs().mean())
    cache.write_text(json.dumps({"l1": l1, "images": len(images)}) + "\n")
    return l1


def runs_table(study: Study, got: Collected, seeds: Sequence[int]) -> str:
    lines = ["| arm | seed | state | PSNR student | PSNR twin | wall s (load avg at end) | teacher L1 |", "|" + "---|" * 7]
    for arm in study.arms:
        for s in seeds_of(arm, seeds):
            key = (arm.name, s)
            rep = got.reports.get(key)
            wall = got.walls.get(key)
            if rep is None and wall is None and key not in got.teacher_errors:
                continue
            state = "teacher stage" if arm.stage == "teacher" else (
                "diverged" if rep and rep.get("diverged") else "done" if rep else "unfinished")
            ps = _fmt(_finite_mean([_value(r, "psnr") for r in rep["rows"]]), 2, False) if rep and "rows" in rep else ""
            pt = _fmt(_finite_mean([_value(r, "psnr") for r in rep["control"]["rows"]]), 2, False) if rep and "control" in rep else ""
            loads = ", ".join(format(x["load_end"], ".1f") for x in wall["sessions"]) if wall else ""
            w = f"{wall['wall_s']:.0f} ({loads})" if wall else ""
            te = _fmt(got.teacher_errors[key], 4, False) if key in got.teacher_errors else ""
            lines.append(f"| {arm.name} | {s} | {state} | {ps} | {pt} | {w} | {te} |")
    return "\n".join(lines) + "\n"


def tables(study: Study, got: Collected, seeds: Sequence[int]) -> str:
    scored = [a.name for a in study.arms if a.scored]
    parts = []
    errors: dict[str, float] = {}
    for arm in study.arms:  # the autoencoder teacher each arm learns from, when the study trained it
        for dep in dependencies(study, arm):
            vals = [v for (a, _), v in got.teacher_errors.items() if a == dep]
            if vals:
                errors[arm.name] = sum(vals) / len(vals)
    ctl = control_table(got.reports, [a.name for a in study.arms if a.control], errors)
    if ctl.count("\n") > 2:
        parts += ["### Each distilled student against its twin (paired per image, pooled over seeds)", "", ctl]
    if study.versus:
        parts += [f"### Against {study.versus} (same seed, paired per image, pooled over seeds)", "",
                  versus_table(got.reports, scored, study.versus)]
    cur = curves(got.metrics, scored)
    if cur:
        parts += ["### Held-out PSNR against the step (mean over seeds)", "", cur]
    parts += ["### Runs", "", runs_table(study, got, seeds)]
    return "\n".join(parts)


LEGEND = (
    "Δ student − twin: the per-image gap of the two networks of one run (same initial weights, batches, masks and "
    "steps; the twin without distillation). [95 % images]: averaged over the seeds image by image, Student's t "
    "interval over the held-out images (`pooled_interval`): how sure the gap is on these images for these seeds. "
    "[95 % seeds]: Student's t interval (n − 1 degrees of freedom) over the per-seed mean gaps: how sure it is "
    "against the training noise of another seed; with 3 seeds its half-width is 2.48 times their standard "
    "deviation. \"above\": the whole interval is above zero. Gaps to biharmonic are pooled the same way.")


RESULTS = HERE / "results" / "2026-12-07-distillation-study.md"


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of study ``name`` in ``path`` (replacing what was there), or append it
    with its markers; the rest of the document is left as it is."""
    start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    doc = path.read_text() if path.is_file() else ""
    if start in doc and end in doc:
        head, _, rest = doc.partition(start)
        _, _, tail = rest.partition(end)
        doc = head + block + tail
    else:
        doc = (doc.rstrip() + "\n\n" if doc.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


# ---- command line -----------------------------------------------------------------------------------
def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    return [a for a in argv if a not in overrides], overrides


def machine() -> str:
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else ""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu or '?'}, {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # one run: the Trainer's command line with the study's adapters registered
        register_study_adapters()
        from kdinpaint.train.trainer import main as train_main

        return train_main(argv[1:], prog="study.py train", default_recipe=HERE / "demo.yaml")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=sorted(STUDIES), help="which table")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train.seed of the runs (default: the study's, 0 1 2 unless it says otherwise)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "study"), help="run folders <out>/<study>/<arm>/seed<S>")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and train.threads of each run (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="cpu forces the CPU")
    parser.add_argument("--table-only", action="store_true", help="write the table of the finished runs, train nothing")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help="train only these arms (and the arms they need) now; the table shows every finished run")
    parser.add_argument("--results", default=str(RESULTS),
                        help="markdown document whose section of this study is (re)written (default: %(default)s)")
    options, overrides = split_overrides(argv)
    args = parser.parse_args(options)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    if args.seeds is not None and len(set(args.seeds)) < len(args.seeds):
        parser.error("a seed is given twice")
    for item in overrides:
        if item.split("=", 1)[0] in ("train.seed", "checkpoint.dir", "train.control"):
            parser.error(f"{item.split('=', 1)[0]} is set by the study for every run")
    study = STUDIES[args.study]
    args.seeds = list(study.seeds) if args.seeds is None else args.seeds
    out = Path(args.out) / args.study
    try:
        selected(study, args.arms)
    except ValueError as e:
        parser.error(str(e))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch finds no GPU here")
    register_study_adapters()
    from kdinpaint.train.recipe import load_recipe

    try:  # every arm's recipe is checked before the first run
        for arm in study.arms:
            load_recipe(ROOT / study.config, [*study.common, *resolve(study, arm, 0, out), *overrides])
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    t0 = time.time()
    if not args.table_only:
        train_all(study, out, args, overrides, env)
    got = collect(study, out, args.seeds)
    command = shlex.join(["python", "recipes/study.py", *argv])
    text = "\n".join([
        f"## {study.title}", "",
        f"- command: `{command}`",
        f"- recipe: `{study.config}` with `{' '.join(study.common)}`" + (f" and `{' '.join(overrides)}`" if overrides else ""),
        f"- machine: {machine()}; {args.jobs} run(s) at once, {args.threads} thread(s) each; wall times measured "
        "while other work shared the machine (the load average at each run's end is given)",
        f"- written: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
        + ("" if args.table_only else f", this invocation {time.time() - t0:.0f} s"),
        "", study.note, "", LEGEND, "", tables(study, got, args.seeds)])
    print(text, flush=True)
    write_section(Path(args.results), args.study, text)
    print(f"written: {args.results} (section {args.study})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
