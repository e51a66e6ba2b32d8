"""The :class:`Trainer`: a recipe's teacher stage, student stage and report, with :class:`Callback` hooks.

    kdinpaint train recipes/demo.yaml train.seed=1             # the CLI
    accelerate launch recipes/train.py                         # the main job (recipes/demo.yaml)
    Trainer(load_recipe("recipes/demo.yaml")).fit()           # Python

Stages: ``teacher`` pre-trains the auxiliary network as an L1 autoencoder of the ground truth (§4);
``student`` trains the inpainting network, the meta-networks by Algorithm 1 (the Psi step on every
``meta.every``-th batch) and the discriminators; ``all`` (default) runs the teacher stage when no teacher
weights exist yet, then the student. The whole objective of Eq. (11) is the trainer's:

    L_tot = lambda_r * L_gen(output, target, mask) + lambda_d * (R_distil + R_att)

where ``L_gen`` is :class:`~kdinpaint.train.objective.Eq11Objective`'s generator loss (R_recon, lambda_s R_style,
adversarial, SSIM terms with their recipe weights) or an adapter's own objective (then ``lambda_r`` scales it as a
whole), and the distillation terms come from the :class:`~kdinpaint.attach.Distiller`. :meth:`Trainer.inpaint_loss`
is ``lambda_r * L_gen``, the loss Algorithm 1's outer step differentiates; :attr:`Trainer.lambda_d` weighs the rest.

A run folder (``checkpoint.dir``) gets: ``recipe.yaml`` (resolved), ``teacher.safetensors``,
``checkpoints/step_XXXXXXX`` (accelerate ``save_state`` plus ``trainer_state.json`` / ``.safetensors``, written to
a temporary folder and renamed), ``metrics.jsonl``, ``samples/``, ``student.safetensors`` and ``report.md`` /
``report.json`` (the Table 1 layout on the evaluation set beside the weight-free floor on the same images and masks).

A batch whose loss or gradient is NaN/inf or explodes is skipped (``train.guard``); after ``train.max_bad_steps``
in a row :class:`~kdinpaint.train.bilevel.TrainingDiverged` stops the run: ``report.md`` / ``report.json`` say so,
nothing is exported, and :func:`main` exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdinpaint import data as kdata
from kdinpaint._files import usual_permissions
from kdinpaint.attach import attach
from kdinpaint.blackbox import load_blackbox
from kdinpaint.calling import convention, select_output
from kdinpaint.evaluation.compare import paired_gap, paired_to_markdown, paired_verdict
from kdinpaint.data.training import images_from, mask_source
from kdinpaint.export import save_exported
from kdinpaint.evaluation.floor import FLOOR_METHODS, evaluate_floor
from kdinpaint.evaluation.perceptual import perceptual_report
from kdinpaint.inference import Inpainter, evaluate_model, save_image
from kdinpaint.masking import composite, masked
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS
from kdinpaint.plugins import PluginError, get_adapter, resolve_objective
from kdinpaint.spec import TeacherCall
from kdinpaint.teacher import autoencoder_call
from kdinpaint.train.averaging import WeightAverage
from kdinpaint.train.bilevel import MetaLearner, TrainingDiverged
from kdinpaint.train.objective import build_objective, total_of
from kdinpaint.train.recipe import Recipe, load_recipe
from kdinpaint.train.report import write_divergence_report, write_evaluation_report
from kdinpaint.train.report_html import write_report_html
from kdinpaint.train.runs import (
    MetricsLog, average_gradients, build_models, build_network, check_random_states, check_run_folder, check_teacher_weights,
    RunLock, checkpoints_in, cpu_threads, user_threads, eval_set, load_trainer_state, no_accelerator, process_group_kwargs,
    restart_metrics, save_checkpoint, tensorboard_installed,
)

RETHREAD_EVERY = 50
"""Blocks between two counts of the free cores under ``train.threads: 0`` (one process on the CPU)."""

__all__ = ["Trainer", "Callback", "main", "DIVERGED_EXIT"]

log = logging.getLogger("kdinpaint.train")
DIVERGED_EXIT = 2  # the exit status of a run stopped by the divergence guard (report.json tells it from a usage error)
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, PluginError)  # one line and exit status 1, unless --debug


@dataclasses.dataclass
class _Arm:
    """One network the student stage trains: the distilled student, or its control twin."""

    name: str
    kd: Any
    objective: Any
    learner: MetaLearner
    average: WeightAverage | None
    disc: Any
    disc_opt: Any
    d_params: list
    schedule: Any
    loader: DataLoader | None


class Callback:
    """Hooks into :meth:`Trainer.fit`; override what you need (every method does nothing by default).

    ``on_batch`` may return a replacement batch (a dict with ``image`` and ``mask``), e.g. to inject a fault.
    """

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_batch(self, trainer: "Trainer", step: int, batch: dict) -> dict | None: ...

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", step: int, path: Path) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


def check_control(recipe: Recipe, spec) -> None:
    """``train.control`` needs a distilled student: a ``ValueError`` when the recipe distils nothing."""
    if recipe.train.control and (recipe.losses.lambda_d == 0 or not spec.distills):
        why = "losses.lambda_d is 0" if recipe.losses.lambda_d == 0 else f"the spec {spec.name!r} has no distillation term"
        raise ValueError(
            f"train.control: true compares the distilled student with its twin trained without distillation, but {why}: "
            "there is nothing to compare; set train.control=false, or turn a distillation term on (losses.lambda_d > 0 "
            "with cross/self-distillation, attention transfer or output_distillation in the spec)"
        )


def sample_grid(masked_image: torch.Tensor, output: torch.Tensor, target: torch.Tensor, path: Path) -> None:
    """Rows of masked | output | ground truth, as PNG."""
    rows = torch.cat([masked_image, output, target], dim=-1)[:4]  # (B, 3, H, 3W)
    save_image(path, torch.cat(list(rows), dim=-2))  # (3, B*H, 3W)


class Trainer:
    """Trains what ``recipe`` describes in the run folder ``recipe.checkpoint.dir``.

    Args:
        recipe: a validated :class:`~kdinpaint.train.recipe.Recipe` (:func:`~kdinpaint.train.recipe.load_recipe`).
        callbacks: :class:`Callback` objects, called in order.
        stage: ``all`` | ``teacher`` | ``student``.
        resume_changed: resume a run folder whose ``recipe.yaml`` differs (``recipe.yaml`` is rewritten).
    """

    def __init__(self, recipe: Recipe, *, callbacks: Sequence[Callback] = (), stage: str = "all",
                 resume_changed: bool = False):
        if stage not in ("all", "teacher", "student"):
            raise ValueError(f"stage {stage!r} is not one of ['all', 'teacher', 'student']")
        self.recipe, self.callbacks, self.stage = recipe, list(callbacks), stage
        self.run = Path(recipe.checkpoint.dir)
        self.changed = check_run_folder(self.run, recipe, allow_changed=resume_changed)  # before anything is written
        self.accelerator: Accelerator | None = None
        self.step = 0  # the theta steps done (of train.steps)
        self.start_step = 0  # where this run started: 0, or the step of the checkpoint it resumed from

    def _callback(self, name: str, *args: Any) -> list:
        return [getattr(cb, name)(self, *args) for cb in self.callbacks]

    # ---- the whole run ---------------------------------------------------------------------------
    def fit(self) -> None:
        """Teacher stage (when needed), student stage and report. Raises :class:`TrainingDiverged` after the
        divergence report is written."""
        recipe, run = self.recipe, self.run
        log_with = "tensorboard" if recipe.log.tensorboard and tensorboard_installed() else None
        accelerator = self.accelerator = Accelerator(
            mixed_precision=recipe.train.mixed_precision, log_with=log_with, project_dir=str(run), cpu=no_accelerator(),
            kwargs_handlers=process_group_kwargs(recipe.train.process_group_timeout),
        )
        set_seed(recipe.train.seed)
        lock = RunLock(run).acquire() if accelerator.is_main_process else None  # one run per folder
        try:
            self._fit(accelerator, log_with)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, accelerator: Accelerator, log_with: str | None) -> None:
        recipe, run = self.recipe, self.run
        if accelerator.is_main_process:
            (run / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        accelerator.wait_for_everyone()
        if log_with:
            accelerator.init_trackers("kdinpaint", config={k: str(v) for k, v in recipe.to_dict().items()})
        self._set_threads()
        if self.changed:
            accelerator.print(f"resuming with changed recipe keys {self.changed} (recipe.yaml rewritten)")
        parts = self.trained_teacher(build_models(recipe))
        eval_set(recipe)  # evaluation images and masks are read now, not after training
        if recipe.checkpoint.resume and checkpoints_in(run):
            check_random_states(checkpoints_in(run)[-1], accelerator.process_index)
        d, m = recipe.data, recipe.masks
        images = images_from(d.images, d.size, d.sample_count, d.crop, held_out=False)
        train_masks = mask_source(m.train, d.size, m.hole, buckets=TABLE1_BUCKETS if m.train_ratio == "table1" else None)
        world = accelerator.num_processes
        spec, teacher = parts[2], parts[4]
        teacher_path = run / "teacher.safetensors"
        if recipe.teacher.weights:
            if not Path(recipe.teacher.weights).is_file():
                raise FileNotFoundError(f"teacher.weights {recipe.teacher.weights!r} does not exist")
            teacher_path = Path(recipe.teacher.weights)
        own_teacher = spec.uses_teacher and not recipe.teacher.trained  # the student's architecture, trained here
        if own_teacher and teacher_path.is_file():  # refused before it is copied or trained with
            check_teacher_weights(teacher_path, teacher, parts[0].name)
        if own_teacher and not teacher_path.is_file() and recipe.teacher.steps == 0:
            raise ValueError(
                f"{recipe.model.name} distils from a teacher, but teacher.steps is 0 and there is no teacher.weights: "
                "the student would learn from a network of random weights; set teacher.steps > 0 or teacher.weights=PATH"
            )
        self._callback("on_train_start")
        if self.stage in ("all", "teacher") and own_teacher and not teacher_path.is_file():
            stream = kdata.TrainingStream(images, train_masks, recipe.teacher.steps * recipe.optim.batch_size * world,
                                          seed=recipe.train.seed + 1, augment=d.augment)
            self.train_teacher(teacher, spec, stream, teacher_path)
        if self.stage in ("all", "student"):
            if own_teacher and not teacher_path.is_file():
                raise FileNotFoundError(f"no teacher weights at {teacher_path}: run --stage teacher first or set teacher.weights")
            if own_teacher and teacher_path != run / "teacher.safetensors" and accelerator.is_main_process:
                shutil.copyfile(teacher_path, run / "teacher.safetensors")
            accelerator.wait_for_everyone()
            blocks = recipe.train.steps // recipe.meta.steps
            stream = kdata.TrainingStream(images, train_masks, blocks * recipe.optim.batch_size * world,
                                          seed=recipe.train.seed, augment=d.augment)
            loader = DataLoader(stream, batch_size=recipe.optim.batch_size, num_workers=d.workers)
            set_seed(recipe.train.seed + 2)  # the added modules start the same whether or not the teacher stage ran
            try:
                self.train_student(parts, loader)
            except torch.cuda.OutOfMemoryError:
                raise SystemExit(
                    f"out of GPU memory at optim.batch_size={recipe.optim.batch_size} and data.size={d.size}: lower "
                    "them, e.g. optim.batch_size=2"
                ) from None
        self._callback("on_train_end")
        accelerator.end_training()

    def _set_threads(self) -> None:
        accelerator = self.accelerator
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = cpu_threads(self.recipe.train.threads, local)
        why = ("train.threads: 0, the cores free at the start" if self.recipe.train.threads == 0 else "train.threads") \
            if threads is not None else "the launcher's setting"
        mine = user_threads() if self.recipe.train.threads == 0 else None
        if mine is not None:  # the user's setting wins over "all"
            threads, why = mine, f"OMP_NUM_THREADS={mine} in the environment, over train.threads: 0"
        if threads is not None and accelerator.device.type == "cpu":
            torch.set_num_threads(threads)
        # the cores free at the start may be taken or freed later: re-counted every RETHREAD_EVERY blocks (one process)
        self._rethread = (self.recipe.train.threads == 0 and mine is None and accelerator.device.type == "cpu"
                          and local == 1)
        n = torch.get_num_threads()
        on_cpu = f" ({n} thread{'s' * (n != 1)}: {why})" if accelerator.device.type == "cpu" else ""
        accelerator.print(
            f"{self.recipe.model.name}: world size {accelerator.num_processes}, device {accelerator.device}{on_cpu}, "
            f"mixed precision {self.recipe.train.mixed_precision}, run folder {self.run}"
        )

    def _retune_threads(self, progress: tqdm) -> None:
        """``train.threads: 0`` on one process: the threads follow the cores free now (other work started or ended
        since the start), sampled between two blocks, when this process's own OpenMP threads wait asleep."""
        now, threads = torch.get_num_threads(), cpu_threads(0, 1)
        if threads is not None and threads != now:
            torch.set_num_threads(threads)
            progress.write(f"threads: {now} -> {threads} (train.threads: 0, the cores free now)")

    # ---- a trained teacher: teacher.file (black box) or teacher.adapter (white box) ----------------------
    def trained_teacher(self, parts: tuple) -> tuple:
        """``parts`` (:func:`~kdinpaint.train.runs.build_models`) with the recipe's trained teacher, if it names one:
        ``teacher.file`` loaded as a black box (:func:`~kdinpaint.blackbox.load_blackbox`, the spec's feature terms
        off: :meth:`~kdinpaint.spec.AdapterSpec.for_blackbox`), or ``teacher.adapter``'s network built with
        ``teacher.kwargs``, its variant's encoder levels paired with the student's
        (:meth:`~kdinpaint.spec.AdapterSpec.for_trained_teacher`). Either teaches through its prediction in the
        holes (``teacher.output_distillation`` at ``teacher.output_scales`` resolutions); no teacher stage runs."""
        t = self.recipe.teacher
        if not t.trained:
            return parts
        adapter, variant, spec, student, _ = parts
        if t.file is not None:
            teacher = load_blackbox(t.file, range=t.range, channels=t.channels, mask=t.mask)
            spec = spec.for_blackbox(t.output_distillation, t.output_scales)
            what = f"black box {t.file} (range {teacher.convention.range_name}, {t.channels}, {t.mask})"
        else:
            name, _, t_variant = t.adapter.partition(":")
            t_adapter = get_adapter(name)
            t_spec = t_adapter.spec.variant(t_variant or None)
            if not t_spec.encoder_levels:
                with_levels = [v for v in t_adapter.variants if t_adapter.spec.variant(v).encoder_levels]
                raise ValueError(f"teacher.adapter {t.adapter!r} names no encoder levels to tap; name a variant that does "
                                 f"({', '.join(f'{name}:{v}' for v in with_levels) or 'none has'}), or use teacher.file")
            teacher = build_network(t_adapter, t_variant, t.kwargs, "teacher.kwargs")  # errors name teacher.kwargs
            call = TeacherCall(t_spec.input, t_spec.image_arg, t_spec.mask_arg, t_spec.output)
            spec = spec.for_trained_teacher(t_spec.encoder_levels, call, t.output_distillation, t.output_scales)
            what = f"{t.adapter} {t.kwargs or '(random weights)'}, levels {t_spec.encoder_levels}"
        self.accelerator.print(
            f"teacher: {what}; no teacher stage. Distilled: output x {t.output_distillation} at {t.output_scales} "
            f"resolution(s), cross-distillation {'on' if spec.cross_distillation and spec.encoder_levels else 'off'}, "
            f"self-distillation {'on' if spec.self_distillation and len(spec.encoder_levels) > 1 else 'off'}"
        )
        return adapter, variant, spec, student, teacher

    # ---- stage teacher ---------------------------------------------------------------------------
    def train_teacher(self, teacher: torch.nn.Module, spec, stream: kdata.TrainingStream, path: Path) -> None:
        """L1 autoencoder of the ground truth (empty mask), as the paper pre-trains the AN (the loop of
        :func:`kdinpaint.teacher.pretrain`, with accelerate's devices, mixed precision and processes).

        It has an Accelerator of its own, so the student stage's checkpoints hold only the student's state. Its
        DDP looks for unused parameters: fed the whole ground truth, a teacher may leave mask-driven parts idle
        (the reference network's hole-refining attention computes nothing without a hole).
        """
        recipe = self.recipe
        unused = DistributedDataParallelKwargs(find_unused_parameters=True)
        accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=no_accelerator(), kwargs_handlers=[unused])
        opt = torch.optim.Adam(teacher.parameters(), lr=recipe.teacher.lr, betas=tuple(recipe.optim.betas))
        loader = DataLoader(stream, batch_size=recipe.optim.batch_size, num_workers=recipe.data.workers)
        model, opt, loader = accelerator.prepare(teacher, opt, loader)
        call = convention(teacher, spec, teacher=True)
        model.train()
        batches = iter(loader)
        for step in range(1, recipe.teacher.steps + 1):
            image = next(batches)["image"]
            args, kwargs = autoencoder_call(call, spec.teacher_input, image)
            with accelerator.autocast():
                pred = select_output(model(*args, **kwargs), spec.teacher_convention.output)
                loss = (pred - image).abs().mean()
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            if step % recipe.log.every == 0 or step == recipe.teacher.steps:
                accelerator.print(f"teacher {step}/{recipe.teacher.steps}  L1 {loss.item():.4f}")
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}, str(path) + ".tmp")
            usual_permissions(str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        accelerator.wait_for_everyone()

    # ---- Eq. (11) --------------------------------------------------------------------------------
    def _resolve_objective(self, spec) -> tuple[type, dict, Any]:
        """The objective class the recipe's ``losses`` section names, its keyword arguments, and the spec to train
        with; sets the weights of Eq. (11): ``lambda_r`` scales the generator loss (an adapter's own objective as a
        whole; Eq11Objective reads it as its R_recon weight), ``lambda_d`` the distillation terms."""
        L = self.recipe.losses
        cls, objective_kwargs = resolve_objective(L.objective, L.objective_kwargs)
        self.lambda_r = 1.0 if "lambda_r" in cls.recipe_keys else L.lambda_r  # inside the objective, or outside it
        self.lambda_d = L.lambda_d
        # the call returns more than the prediction: the objective says where the prediction is
        train_spec = dataclasses.replace(spec, output=cls.output_key) if cls.call_kwargs else spec
        # the recipe's meta section decides how Psi is trained (the spec's meta options otherwise)
        meta = dataclasses.replace(train_spec.meta, mode=self.recipe.meta.mode, steps=self.recipe.meta.steps)
        return cls, objective_kwargs, dataclasses.replace(train_spec, meta=meta)

    def inpaint_loss(self, objective: Any, output: Any, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``lambda_r * L_gen``: Eq. (11) without the distillation terms (or an adapter's own generator loss)."""
        return self.lambda_r * total_of(objective.generator_loss(output, target, mask),
                                        type(objective).__name__ + ".generator_loss")

    # ---- stage student ---------------------------------------------------------------------------
    def _arm(self, name: str, kd, objective, loader: DataLoader | None = None) -> "_Arm":
        """One trained network: its optimisers, schedule, Algorithm-1 learner and weight average, prepared by
        accelerate (with ``loader``, which comes back prepared as ``arm.loader``)."""
        recipe, accelerator = self.recipe, self.accelerator
        theta = [*kd.student.parameters(), *kd.student_parameters()]
        theta_opt = torch.optim.Adam(theta, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas))
        meta_params = list(kd.meta_parameters())
        meta_opt = torch.optim.Adam(meta_params, lr=recipe.meta.lr) if meta_params else None
        # the discriminators are prepared (for checkpoints) but called unwrapped: see average_gradients
        d_params = objective.discriminator_parameters()
        disc = objective.discriminators if d_params else None
        d_betas = objective.discriminator_betas or tuple(recipe.optim.betas)
        disc_opt = torch.optim.Adam(d_params, lr=recipe.optim.lr * recipe.losses.d_lr_ratio, betas=d_betas) if d_params else None
        extra = [loader] if loader is not None else []
        prepared = accelerator.prepare(kd, theta_opt, *[x for x in (meta_opt, disc, disc_opt) if x is not None], *extra)
        wrapped, theta_opt, *rest = prepared
        loader = rest.pop() if loader is not None else None
        meta_opt = rest.pop(0) if meta_opt is not None else None
        disc_opt = rest[1] if disc is not None else None
        # stepped by MetaLearner once per theta step; not through prepare, whose scheduler steps once per process
        schedule = torch.optim.lr_scheduler.LambdaLR(theta_opt, lambda k: recipe.optim.lr_factor(k, recipe.train.steps))
        lambda_d = self.lambda_d if kd.spec.distills else 0.0
        learner = MetaLearner(
            kd, theta_opt, lambda *a: self.inpaint_loss(objective, *a), meta_opt, every=recipe.meta.every,
            inner_lr=recipe.meta.inner_lr, lambda_d=lambda_d, max_hypergrad_norm=recipe.meta.max_hypergrad_norm,
            forward_module=wrapped, backward=accelerator.backward, autocast=accelerator.autocast,
            loss_input=objective.loss_input, scheduler=schedule,
            guard=recipe.train.guard, max_bad_steps=recipe.train.max_bad_steps, explode_factor=recipe.train.explode_factor,
        )
        # the weights evaluated and exported: an average over the last blocks (train.average), else the last ones
        average = WeightAverage(theta, recipe.train.average) if recipe.train.average > 0 else None
        return _Arm(name, kd, objective, learner, average, disc, disc_opt, d_params, schedule, loader)

    def train_student(self, parts: tuple, loader: DataLoader) -> None:
        recipe, accelerator, run = self.recipe, self.accelerator, self.run
        adapter, variant, spec, student, teacher = parts
        if spec.uses_teacher and not recipe.teacher.trained:  # a trained teacher (file / adapter) comes ready
            teacher.load_state_dict(load_file(str(run / "teacher.safetensors")))
        cls, objective_kwargs, train_spec = self._resolve_objective(spec)
        check_control(recipe, train_spec)
        twin = copy.deepcopy(student) if recipe.train.control else None  # the student's initial weights
        # a spec that taps nothing is the recipe's choice here: the network trained as released (reference:baseline)
        kd = self.kd = attach(student, teacher if spec.uses_teacher else None, train_spec, allow_empty=True)
        kd.to(accelerator.device)
        L = recipe.losses
        objective = build_objective(cls, objective_kwargs, {k: getattr(L, k) for k in cls.recipe_keys}).to(accelerator.device)
        twin_objective = copy.deepcopy(objective) if twin is not None else None  # its discriminators start alike
        arm = self._arm("student", kd, objective, loader)
        arms = [arm]
        if twin is not None:
            with torch.random.fork_rng(devices=[]):  # the student trains exactly as it would without its twin
                control = self.control = attach(twin, None, train_spec.without_distillation(), allow_empty=True)
                control.blocks.load_state_dict(kd.blocks.state_dict())  # the same initial completion blocks and PGL
                control.fusion.load_state_dict(kd.fusion.state_dict())
                control.to(accelerator.device)
                arms.append(self._arm("control", control, twin_objective))
        self.arms = arms
        loader = arm.loader
        # saved beside each checkpoint as JSON and safetensors (never a pickle: resume runs no code from the folder)
        states = {}
        for a in arms:
            prefix = "" if a.name == "student" else f"{a.name}/"
            states.update({f"{prefix}schedule": a.schedule, f"{prefix}average": a.average, f"{prefix}guard": a.learner.guard})
        states = {k: v for k, v in states.items() if v is not None}

        start = 0
        done = checkpoints_in(run)
        if recipe.checkpoint.resume and done:
            load_trainer_state(done[-1], states)  # refuses a checkpoint whose states are pickles, before loading
            accelerator.load_state(str(done[-1]))
            start = self.start_step = int(done[-1].name.split("_")[1])
            if accelerator.is_main_process:
                restart_metrics(run / "metrics.jsonl", start, f"checkpoints/{done[-1].name}")
            accelerator.print(f"resumed from {done[-1]} (step {start})")
        total = recipe.train.steps // recipe.meta.steps  # each loader batch is one Algorithm-1 block of meta.steps theta steps
        for a in arms:
            a.learner.batches = start // recipe.meta.steps  # ... and meta.every counts blocks
        loader = accelerator.skip_first_batches(loader, arm.learner.batches) if start else loader
        metrics_log = MetricsLog(run / "metrics.jsonl", accelerator.is_main_process)
        progress = tqdm(total=total, initial=arm.learner.batches, disable=not accelerator.is_main_process, desc="student", unit="block")
        skipped = {a.name: 0 for a in arms}  # batches the guard skipped since the last metrics record
        for block, batch in enumerate(loader, start=arm.learner.batches + 1):
            step = self.step = block * recipe.meta.steps
            for replaced in self._callback("on_batch", step, batch):
                batch = replaced if replaced is not None else batch
            image, mask = batch["image"], batch["mask"]
            args, kwargs = kd.call.build(masked(image, mask), mask)
            logs, bad = {}, False
            for a in arms:
                prefix = "" if a.name == "student" else f"{a.name}/"
                try:
                    arm_logs = a.learner.step(args, image, {**kwargs, **dict(a.objective.call_kwargs)})
                except TrainingDiverged as e:
                    progress.close()
                    metrics_log.write(step, {f"{prefix}{k}": v for k, v in e.logs.items()}, skipped=skipped[a.name] + 1,
                                      skipped_total=a.learner.guard.skipped_total, diverged=True)
                    if accelerator.is_main_process:
                        done = checkpoints_in(run)
                        resume = write_divergence_report(run, e, step, f"checkpoints/{done[-1].name}" if done else None,
                                                         who=a.name)
                        accelerator.print(f"\nDIVERGED ({a.name}) at step {step}: {e}\n{resume}\nrun folder: {run}")
                    accelerator.end_training()
                    raise
                a_bad = bool(arm_logs.get("skipped"))  # the same on every rank: the guard decides jointly
                skipped[a.name] += a_bad
                bad = bad or (a.name == "student" and a_bad)
                if a.average is not None and not a_bad:
                    a.average.update()
                if a.disc is not None and not a_bad:  # the discriminator step, on the block's last output (detached)
                    arm_logs.update(self._discriminator_step(a, image, mask))
                logs.update({f"{prefix}{k}": v for k, v in arm_logs.items()})
            progress.update(1)
            if getattr(self, "_rethread", False) and block % RETHREAD_EVERY == 0:
                self._retune_threads(progress)
            if step % recipe.log.every == 0 or block == total or bad:  # skipped batches since the last record
                guarded = {}
                for a in arms:
                    if a.learner.guard is not None:
                        prefix = "" if a.name == "student" else f"{a.name}/"
                        guarded.update({f"{prefix}skipped": skipped[a.name], f"{prefix}skipped_total": a.learner.guard.skipped_total})
                record = metrics_log.write(step, logs, **guarded)
                accelerator.log({k: v for k, v in record.items() if k not in ("step", "time") and v is not None}, step=step)
                progress.set_postfix(loss=f"{logs['loss_inp']:.3f}")
                skipped = {a.name: 0 for a in arms}
            if accelerator.is_main_process and recipe.log.eval_every and step % recipe.log.eval_every == 0 and not bad:
                scores = {}
                for a in arms:
                    with self._averaged(a), torch.no_grad():
                        summary = self.held_out(a.kd.export().eval(), spec, adapter)[-1]["buckets"]["all"]
                    key = "eval" if a.name == "student" else f"eval/{a.name}"
                    scores.update({f"{key}/psnr": float(summary["psnr"]), f"{key}/ssim": float(summary["ssim"])})
                metrics_log.write(step, scores)
            if accelerator.is_main_process and recipe.log.sample_every and step % recipe.log.sample_every == 0 and not bad:
                sample_grid(masked(image, mask), composite(arm.learner.last_output, image, mask), image, run / "samples" / f"step_{step:07d}.png")
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and not bad:  # only good states get saved
                path = save_checkpoint(accelerator, run, step, recipe.checkpoint.keep, states)
                self._callback("on_checkpoint", step, path)
            self._callback("on_step_end", step, logs)
            if block >= total:
                break
        progress.close()
        accelerator.wait_for_everyone()
        self.finish(arms, spec, adapter, variant)

    def _discriminator_step(self, arm: "_Arm", image: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        accelerator, objective = self.accelerator, arm.objective
        with accelerator.autocast():
            d_terms = objective.discriminator_loss(arm.learner.last_loss_input, image, mask)
            d_loss = total_of(d_terms, type(objective).__name__ + ".discriminator_loss")
        arm.disc_opt.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        average_gradients(accelerator, arm.d_params)
        arm.disc_opt.step()
        return {**{f"d/{k}": v.item() for k, v in d_terms.items() if k != "total"}, "loss_d": d_loss.item()}

    @staticmethod
    def _averaged(arm: "_Arm"):
        """The weights evaluated and exported: the average (``train.average``), else the trained ones."""
        return arm.average.applied() if arm.average is not None else contextlib.nullcontext()

    # ---- report ----------------------------------------------------------------------------------
    @torch.no_grad()
    def held_out(self, model: torch.nn.Module, spec, adapter, name: str | None = None):
        """``(inpainter, images, masks, names, rows, summary)``: ``model`` scored on the held-out set (:func:`eval_set`)."""
        images, masks = eval_set(self.recipe)
        inpainter = Inpainter(model, stride=adapter.stride, spec=spec, device=self.accelerator.device, batch_size=4, name=name)
        names = [f"eval_{i}" for i in range(len(images))]
        return inpainter, images, masks, names, *evaluate_model(inpainter, images, masks, names=names)

    @torch.no_grad()
    def finish(self, arms: Sequence[_Arm], spec, adapter, variant: str) -> None:
        """Export the student (and its control), evaluate them on the held-out set beside the weight-free floor
        (biharmonic, Telea when OpenCV is installed, mean fill; same images and masks), write report.md /
        report.json (main process). ``spec``: the adapter's, whose ``output`` selects the prediction of a plain call."""
        recipe, accelerator, run = self.recipe, self.accelerator, self.run
        if not accelerator.is_main_process:
            return
        name = f"{adapter.name}:{variant}" if variant else adapter.name
        scored = {}
        for a in arms:
            with self._averaged(a):
                exported = a.kd.export().eval()
            label = name if a.name == "student" else f"{name} ({a.name})"
            m = recipe.model  # a network named by import path is recorded by it, so the file alone rebuilds it
            save_exported(exported, run / f"{a.name}.safetensors", adapter=None if m.target else name,
                          builder_kwargs=m.kwargs, target=m.target, stride=m.stride)
            scored[a.name] = (label, *self.held_out(exported, spec, adapter, label))
        label, inpainter, images, masks, names, rows, summary = scored["student"]
        # a network that starts from the pyramid fill is also shown beside that fill (what training added); one that
        # starts from the biharmonic fill is compared with its start by the floor's first row
        prefill = getattr(arms[0].kd.student, "prefill_mode", None)
        methods = (*FLOOR_METHODS, "pyramid") if prefill == "pyramid" else FLOOR_METHODS
        floor = evaluate_floor(images, masks, methods=methods, names=names)  # biharmonic: ~0.3 s per 64x64 image
        floor_rows = floor.rows.get("biharmonic")  # before compare(), which returns the summary of the comparison
        control = None
        if "control" in scored:
            c_label, c_inpainter, _, _, _, c_rows, c_summary = scored["control"]
            gap = paired_gap(rows, c_rows)
            summaries = {label: summary, c_label: c_summary}
            reference = floor.summaries.get("biharmonic")
            if reference is not None:
                summaries["biharmonic"] = reference
            control = {"name": c_label, "summary": c_summary, "rows": c_rows, "gap": gap,
                       "verdict": paired_verdict(gap, label, c_label),
                       "table": paired_to_markdown(gap, summaries, label, c_label)}
        floor = floor.compare(summary, name=name, network_rows=rows)
        first = slice(0, 4)
        sample_grid(masked(images[first], masks[first]), inpainter(images[first], masks[first]), images[first], run / "samples" / "final.png")
        biharmonic = Inpainter.from_baseline("biharmonic", batch_size=8)
        # LPIPS and FID when their backbone files are here (else report.md names the missing file)
        perceptual = perceptual_report({name: inpainter, "biharmonic": biharmonic,
                                        **({control["name"]: c_inpainter} if control is not None else {})}, images, masks)
        text = write_evaluation_report(run, name, len(images), summary, rows, floor, control=control, perceptual=perceptual)
        if floor_rows is not None:  # report.html: per bucket, the crops where the network gains and loses most
            write_report_html(run, name, images, masks, inpainter(images, masks), biharmonic(images, masks), rows,
                              floor_rows, c_inpainter(images, masks) if control is not None else None)
        accelerator.print(f"\n{name} on {len(images)} held-out images ({recipe.data.eval_images}, masks {recipe.masks.eval}):\n{text}")
        accelerator.print(f"run folder: {run}")


# ---- command line ------------------------------------------------------------------------------------
def parser(prog: str, default_recipe: str | os.PathLike[str] | None) -> argparse.ArgumentParser:
    """The arguments of ``kdinpaint train RECIPE`` (``default_recipe`` None: the recipe is the first argument) and
    of ``recipes/train.py [--config RECIPE]``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if default_recipe is None:
        p.add_argument("config", metavar="RECIPE", help="YAML recipe, e.g. recipes/demo.yaml")
    else:
        p.add_argument("--config", default=str(default_recipe), help=f"YAML recipe (default: {default_recipe})")
    p.add_argument("--stage", choices=("all", "teacher", "student"), default="all")
    p.add_argument("--resume-changed", action="store_true", help="resume a run folder whose recipe.yaml differs")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu: train on the CPU even where a GPU is (accelerate's ACCELERATE_USE_CPU); cuda: refuse to "
                        "start without one (default: the GPU when there is one)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    return p


def _choose_device(device: str | None) -> None:
    """``--device``: ``cpu`` sets accelerate's own switch for this process (and the processes it starts); ``cuda``
    fails before anything is built when there is no GPU."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False here (a CPU build of PyTorch, or no "
                         "NVIDIA driver): pass --device cpu, or install the CUDA build of PyTorch")


def main(argv: Sequence[str] | None = None, *, prog: str = "kdinpaint train",
         default_recipe: str | os.PathLike[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """Parse ``argv`` and train; returns the exit status: 0, 1 for an input error (one line, unless ``--debug``;
    other errors are bugs and keep their traceback), 2 for a run the divergence guard stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(prog, default_recipe).parse_intermixed_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    try:
        _choose_device(args.device)
        recipe = load_recipe(args.config, args.overrides)
        Trainer(recipe, callbacks=callbacks, stage=args.stage, resume_changed=args.resume_changed).fit()
    except TrainingDiverged:
        return DIVERGED_EXIT
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"{prog}: error: {e}  (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0
