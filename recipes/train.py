"""Train an inpainting network with distillation-guided supervision (Suin et al., ICCV 2021).

    accelerate launch recipes/train.py                                   # recipes/demo.yaml: bundled photos, minutes on CPU
    accelerate launch recipes/train.py --config recipes/reference.yaml data.images=/data/places2/train.flist
    torchrun --nproc_per_node 2 recipes/train.py train.steps=20         # two processes (gloo on CPU)

Stages (``--stage``): ``teacher`` pre-trains the auxiliary network as an L1 autoencoder of the ground
truth (§4); ``student`` trains the inpainting network, the meta-networks by Algorithm 1 (the Psi step on
every ``meta.every``-th batch) and the discriminators, with the objective ``losses.objective`` names
(:mod:`kdinpaint.objective`): ``eq11``, the paper's Eq. (11), by default, or an adapter's own; ``all``
(default) runs the teacher stage when no teacher weights exist yet, then the student. Overrides are dotted ``section.key=value`` pairs; unknown keys
are refused.

A run folder (``checkpoint.dir``) gets: ``recipe.yaml`` (resolved), ``teacher.safetensors``,
``checkpoints/step_XXXXXXX`` (accelerate ``save_state``, written to a temporary folder and renamed, so a
killed run resumes from the last complete one), ``metrics.jsonl``, ``samples/step_XXXXXXX.png``
(masked | output | ground truth), ``student.safetensors`` (the exported network) and ``report.md`` /
``report.json`` (the Table 1 layout on the evaluation set, beside the weight-free floor on the same images and
masks: biharmonic, Telea with OpenCV, mean fill, and for a network with a prefill that fill itself).

A batch whose loss or gradient is NaN/inf or explodes is skipped (``train.guard``; ``skipped`` in
``metrics.jsonl``); after ``train.max_bad_steps`` in a row the run stops as diverged: ``report.md`` and
``report.json`` say so, nothing is exported, the checkpoints written before stay, and the exit status is 2.

Everything is checked before the first step (recipe values, data, evaluation images and masks, weight files,
the run folder): a folder with checkpoints is resumed only with the recipe it was trained with
(``--resume-changed`` resumes with the new values; logging, checkpoint frequency and evaluation keys may always
change) and never overwritten (``checkpoint.resume: false`` there is refused). A bad input ends the run with
one ``train.py: error: ...`` line and exit status 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import kdinpaint
from kdinpaint import data as kdata
from kdinpaint.averaging import WeightAverage
from kdinpaint.bilevel import MetaLearner, TrainingDiverged
from kdinpaint.calling import convention, select_output
from kdinpaint.data.training import images_from, mask_source
from kdinpaint.inference import Inpainter, evaluate_model, save_image
from kdinpaint.masking import composite, masked
from kdinpaint.metrics import TABLE1_BUCKETS
from kdinpaint.objective import build_objective, resolve_objective, total_of
from kdinpaint.plugins import PluginError
from kdinpaint.recipe import Recipe, load_recipe
from kdinpaint.report import write_divergence_report, write_evaluation_report
from kdinpaint.runs import (
    MetricsLog, average_gradients, build_models, check_random_states, check_run_folder, check_teacher_weights,
    checkpoints_in, cpu_threads, eval_set, no_accelerator, process_group_kwargs, save_checkpoint, tensorboard_installed,
)
from kdinpaint.teacher import autoencoder_call

log = logging.getLogger("kdinpaint.train")
DEFAULT_RECIPE = Path(__file__).with_name("demo.yaml")
DIVERGED_EXIT = 2  # the exit status of a run stopped by the divergence guard (report.json tells it from a usage error)
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, PluginError)  # one line and exit status 1, unless --debug


# ---- stages ----------------------------------------------------------------------------------------
def sample_grid(masked_image: torch.Tensor, output: torch.Tensor, target: torch.Tensor, path: Path) -> None:
    """Rows of masked | output | ground truth, as PNG."""
    rows = torch.cat([masked_image, output, target], dim=-1)[:4]  # (B, 3, H, 3W)
    save_image(path, torch.cat(list(rows), dim=-2))  # (3, B*H, 3W)


def train_teacher(recipe: Recipe, teacher: torch.nn.Module, spec, stream: kdata.TrainingStream, path: Path) -> None:
    """Stage ``teacher``: L1 autoencoder of the ground truth (empty mask), as the paper pre-trains the AN
    (the loop of :func:`kdinpaint.teacher.pretrain`, with accelerate's devices, mixed precision and processes).

    It has an Accelerator of its own, so the student stage's checkpoints hold only the student's state. Its
    DDP looks for unused parameters: fed the whole ground truth, a teacher may leave mask-driven parts idle
    (the reference network's hole-refining attention computes nothing without a hole).
    """
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
        os.replace(str(path) + ".tmp", path)
    accelerator.wait_for_everyone()


def train_student(
    recipe: Recipe, accelerator: Accelerator, parts: tuple, loader: DataLoader, run: Path, stop_after: int | None,
    inject_nan_at: int | None = None,
) -> None:
    adapter, variant, spec, student, teacher = parts
    if spec.uses_teacher:
        teacher.load_state_dict(load_file(str(run / "teacher.safetensors")))
    L = recipe.losses
    cls, objective_kwargs = resolve_objective(L.objective, L.objective_kwargs)
    # the call returns more than the prediction: the objective says where the prediction is
    train_spec = dataclasses.replace(spec, output=cls.output_key) if cls.call_kwargs else spec
    kd = kdinpaint.attach(student, teacher if spec.uses_teacher else None, train_spec)
    kd.to(accelerator.device)
    objective = build_objective(cls, objective_kwargs, {k: getattr(L, k) for k in cls.recipe_keys}).to(accelerator.device)
    name = type(objective).__name__
    lambda_r = 1.0 if "lambda_r" in cls.recipe_keys else L.lambda_r  # an adapter's objective: lambda_r scales it

    theta = [*student.parameters(), *kd.student_parameters()]
    theta_opt = torch.optim.Adam(theta, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas))
    meta_params = list(kd.meta_parameters())
    meta_opt = torch.optim.Adam(meta_params, lr=recipe.meta.lr) if meta_params else None
    # the discriminators are prepared (for checkpoints) but called unwrapped: see average_gradients
    d_params = objective.discriminator_parameters()
    disc = objective.discriminators if d_params else None
    d_betas = objective.discriminator_betas or tuple(recipe.optim.betas)
    disc_opt = torch.optim.Adam(d_params, lr=recipe.optim.lr * L.d_lr_ratio, betas=d_betas) if d_params else None

    prepared = accelerator.prepare(kd, theta_opt, *[x for x in (meta_opt, disc, disc_opt) if x is not None], loader)
    wrapped, theta_opt, *rest, loader = prepared
    meta_opt = rest.pop(0) if meta_opt is not None else None
    disc_opt = rest[1] if disc is not None else None
    # stepped by MetaLearner once per theta step; not through prepare, whose scheduler steps once per process
    schedule = torch.optim.lr_scheduler.LambdaLR(theta_opt, lambda k: recipe.optim.lr_factor(k, recipe.train.steps))

    def inpaint_loss(output: Any, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_inp of Eq. (11) without the distillation terms (or an adapter's own generator loss)."""
        return lambda_r * total_of(objective.generator_loss(output, target, mask), name + ".generator_loss")

    learner = MetaLearner(
        kd, theta_opt, inpaint_loss, meta_opt, mode=recipe.meta.mode, steps=recipe.meta.steps, every=recipe.meta.every,
        inner_lr=recipe.meta.inner_lr, lambda_d=L.lambda_d, max_hypergrad_norm=recipe.meta.max_hypergrad_norm,
        forward_module=wrapped, backward=accelerator.backward, autocast=accelerator.autocast,
        loss_input=objective.loss_input, scheduler=schedule,
        guard=recipe.train.guard, max_bad_steps=recipe.train.max_bad_steps, explode_factor=recipe.train.explode_factor,
    )
    accelerator.register_for_checkpointing(schedule)  # a resumed run continues the schedule exactly
    # the weights evaluated and exported: an average over the last blocks (train.average), else the last ones
    average = WeightAverage(theta, recipe.train.average) if recipe.train.average > 0 else None
    if average is not None:
        accelerator.register_for_checkpointing(average)
    exported_weights = average.applied if average is not None else contextlib.nullcontext  # evaluated and exported
    if learner.guard is not None:
        accelerator.register_for_checkpointing(learner.guard)  # ... and the guard's loss history
    call_kwargs = dict(objective.call_kwargs)

    start = 0
    done = checkpoints_in(run)
    if recipe.checkpoint.resume and done:
        accelerator.load_state(str(done[-1]))
        start = int(done[-1].name.split("_")[1])
        accelerator.print(f"resumed from {done[-1]} (step {start})")
    total = recipe.train.steps // recipe.meta.steps  # each loader batch is one Algorithm-1 block of meta.steps theta steps
    learner.batches = start // recipe.meta.steps  # ... and meta.every counts blocks
    loader = accelerator.skip_first_batches(loader, learner.batches) if start else loader
    metrics_log = MetricsLog(run / "metrics.jsonl", accelerator.is_main_process)
    progress = tqdm(total=total, initial=learner.batches, disable=not accelerator.is_main_process, desc="student", unit="block")
    skipped = 0  # batches the guard skipped since the last metrics record
    for block, batch in enumerate(loader, start=learner.batches + 1):
        image, mask = batch["image"], batch["mask"]
        step = block * recipe.meta.steps
        if inject_nan_at is not None and step >= inject_nan_at:  # --inject-nan-at: a data fault, for the tests
            image = torch.full_like(image, float("nan"))
        args, kwargs = kd._call.build(masked(image, mask), mask)
        try:
            logs = learner.step(args, image, {**kwargs, **call_kwargs})
        except TrainingDiverged as e:
            progress.close()
            metrics_log.write(step, e.logs, skipped=skipped + 1, skipped_total=learner.guard.skipped_total, diverged=True)
            if accelerator.is_main_process:
                done = checkpoints_in(run)
                resume = write_divergence_report(run, e, step, f"checkpoints/{done[-1].name}" if done else None)
                accelerator.print(f"\nDIVERGED at step {step}: {e}\n{resume}\nrun folder: {run}")
            accelerator.end_training()
            raise SystemExit(DIVERGED_EXIT) from None
        bad = bool(logs.get("skipped"))  # the same on every rank: the guard decides jointly
        skipped += bad
        if average is not None and not bad:
            average.update()
        if disc is not None and not bad:  # the discriminator step, on the block's last output (detached)
            with accelerator.autocast():
                d_terms = objective.discriminator_loss(learner.last_loss_input, image, mask)
                d_loss = total_of(d_terms, name + ".discriminator_loss")
            logs.update({f"d/{k}": v.item() for k, v in d_terms.items() if k != "total"})
            disc_opt.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            average_gradients(accelerator, d_params)
            disc_opt.step()
            logs["loss_d"] = d_loss.item()
        progress.update(1)
        if step % recipe.log.every == 0 or block == total or bad:  # skipped batches since the last record
            guarded = dict(skipped=skipped, skipped_total=learner.guard.skipped_total) if learner.guard is not None else {}
            record = metrics_log.write(step, logs, **guarded)
            accelerator.log({k: v for k, v in record.items() if k not in ("step", "time") and v is not None}, step=step)
            progress.set_postfix(loss=f"{logs['loss_inp']:.3f}")
            skipped = 0
        if accelerator.is_main_process and recipe.log.eval_every and step % recipe.log.eval_every == 0 and not bad:
            with exported_weights(), torch.no_grad():
                summary = held_out(recipe, kd.export().eval(), spec, adapter, accelerator.device)[-1]["buckets"]["all"]
            metrics_log.write(step, {"eval/psnr": float(summary["psnr"]), "eval/ssim": float(summary["ssim"])})
        if accelerator.is_main_process and recipe.log.sample_every and step % recipe.log.sample_every == 0 and not bad:
            sample_grid(masked(image, mask), composite(learner.last_output, image, mask), image, run / "samples" / f"step_{step:07d}.png")
        if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and not bad:  # only good states get saved
            save_checkpoint(accelerator, run, step, recipe.checkpoint.keep)
        if stop_after is not None and step >= start + stop_after:
            accelerator.print(f"stopping abruptly after step {step} (--stop-after)")
            sys.stdout.flush()
            os._exit(3)  # as if killed: nothing after the last checkpoint is saved
        if block >= total:
            break
    progress.close()
    accelerator.wait_for_everyone()
    with exported_weights():
        finish(recipe, accelerator, kd, spec, adapter, variant, run)


@torch.no_grad()
def held_out(recipe: Recipe, model: torch.nn.Module, spec, adapter, device, name: str | None = None):
    """``(inpainter, images, masks, names, rows, summary)``: ``model`` scored on the held-out set (:func:`eval_set`)."""
    images, masks = eval_set(recipe)
    inpainter = Inpainter(model, stride=adapter.stride, spec=spec, device=device, batch_size=4, name=name)
    names = [f"eval_{i}" for i in range(len(images))]
    return inpainter, images, masks, names, *evaluate_model(inpainter, images, masks, names=names)


@torch.no_grad()
def finish(recipe: Recipe, accelerator: Accelerator, kd, spec, adapter, variant: str, run: Path) -> None:
    """Export the student, evaluate it on the held-out set beside the weight-free floor (biharmonic, Telea when
    OpenCV is installed, mean fill; same images and masks), write report.md / report.json (main process).
    ``spec``: the adapter's, whose ``output`` selects the prediction of a plain call."""
    from kdinpaint.inference import FLOOR_METHODS, evaluate_floor

    if not accelerator.is_main_process:
        return
    exported = kd.export().eval()
    name = f"{adapter.name}:{variant}" if variant else adapter.name
    kdinpaint.save_exported(exported, run / "student.safetensors", adapter=name, builder_kwargs=recipe.model.kwargs)
    inpainter, images, masks, names, rows, summary = held_out(recipe, exported, spec, adapter, accelerator.device, name)
    # a network that starts from the pyramid fill is also shown beside that fill (what training added); one that
    # starts from the biharmonic fill is compared with its start by the floor's first row
    methods = (*FLOOR_METHODS, "pyramid") if getattr(kd.student, "prefill_mode", None) == "pyramid" else FLOOR_METHODS
    floor = evaluate_floor(images, masks, methods=methods, names=names)  # biharmonic: ~0.3 s per 64x64 image
    floor = floor.compare(summary, name=name, network_rows=rows)
    first = slice(0, 4)
    sample_grid(masked(images[first], masks[first]), inpainter(images[first], masks[first]), images[first], run / "samples" / "final.png")
    text = write_evaluation_report(run, name, len(images), summary, rows, floor)
    accelerator.print(f"\n{name} on {len(images)} held-out images ({recipe.data.eval_images}, masks {recipe.masks.eval}):\n{text}")
    accelerator.print(f"run folder: {run}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML recipe (default: recipes/demo.yaml)")
    parser.add_argument("--stage", choices=("all", "teacher", "student"), default="all")
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # resume tests: die after N steps
    parser.add_argument("--inject-nan-at", type=int, default=None, help=argparse.SUPPRESS)  # guard tests: NaN images from step N
    parser.add_argument("--resume-changed", action="store_true", help="resume a run folder whose recipe.yaml differs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config, args.overrides)

    run = Path(recipe.checkpoint.dir)
    changed = check_run_folder(run, recipe, allow_changed=args.resume_changed)  # before anything is written
    log_with = "tensorboard" if recipe.log.tensorboard and tensorboard_installed() else None
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision, log_with=log_with, project_dir=str(run), cpu=no_accelerator(),
        kwargs_handlers=process_group_kwargs(recipe.train.process_group_timeout),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    set_seed(recipe.train.seed)
    if accelerator.is_main_process:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    if log_with:
        accelerator.init_trackers("kdinpaint", config={k: str(v) for k, v in recipe.to_dict().items()})

    threads = cpu_threads(recipe.train.threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    if threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    on_cpu = f" ({n} thread{'s' * (n != 1)})" if accelerator.device.type == "cpu" else ""
    accelerator.print(
        f"{recipe.model.adapter}: world size {accelerator.num_processes}, device {accelerator.device}{on_cpu}, "
        f"mixed precision {recipe.train.mixed_precision}, run folder {run}"
    )
    if changed:
        accelerator.print(f"resuming with changed recipe keys {changed} (recipe.yaml rewritten)")
    parts = build_models(recipe)
    eval_set(recipe)  # evaluation images and masks are read now, not after training
    if recipe.checkpoint.resume and checkpoints_in(run):
        check_random_states(checkpoints_in(run)[-1], accelerator.process_index)
    d, m = recipe.data, recipe.masks
    images = images_from(d.images, d.size, d.sample_count, d.crop, held_out=False)
    train_masks = mask_source(m.train, d.size, m.hole, buckets=TABLE1_BUCKETS if m.train_ratio == "table1" else None)
    world = accelerator.num_processes
    teacher_path = run / "teacher.safetensors"
    if recipe.teacher.weights:
        if not Path(recipe.teacher.weights).is_file():
            raise FileNotFoundError(f"teacher.weights {recipe.teacher.weights!r} does not exist")
        teacher_path = Path(recipe.teacher.weights)
    if parts[2].uses_teacher and teacher_path.is_file():  # refused before it is copied or trained with
        check_teacher_weights(teacher_path, parts[4], parts[0].name)
    if args.stage in ("all", "teacher") and parts[2].uses_teacher and not teacher_path.is_file():
        stream = kdata.TrainingStream(images, train_masks, recipe.teacher.steps * recipe.optim.batch_size * world,
                                      seed=recipe.train.seed + 1, augment=d.augment)
        train_teacher(recipe, parts[4], parts[2], stream, teacher_path)
    if args.stage in ("all", "student"):
        if parts[2].uses_teacher and not teacher_path.is_file():
            raise FileNotFoundError(f"no teacher weights at {teacher_path}: run --stage teacher first or set teacher.weights")
        if parts[2].uses_teacher and teacher_path != run / "teacher.safetensors" and accelerator.is_main_process:
            shutil.copyfile(teacher_path, run / "teacher.safetensors")
        accelerator.wait_for_everyone()
        blocks = recipe.train.steps // recipe.meta.steps
        stream = kdata.TrainingStream(images, train_masks, blocks * recipe.optim.batch_size * world, seed=recipe.train.seed,
                                      augment=d.augment)
        loader = DataLoader(stream, batch_size=recipe.optim.batch_size, num_workers=d.workers)
        set_seed(recipe.train.seed + 2)  # the added modules start the same whether or not the teacher stage ran
        try:
            train_student(recipe, accelerator, parts, loader, run, args.stop_after, args.inject_nan_at)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(
                f"out of GPU memory at optim.batch_size={recipe.optim.batch_size} and data.size={d.size}: lower them, "
                "e.g. optim.batch_size=2"
            ) from None
    accelerator.end_training()


def cli(argv: list[str] | None = None) -> int:
    """``main`` with an input error (USER_ERRORS) printed as one line and exit status 1; other errors are bugs
    and keep their traceback, as does every error with ``--debug``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"train.py: error: {e}  (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
