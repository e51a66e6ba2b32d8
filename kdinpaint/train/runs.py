"""The run folder of ``recipes/train.py``: what may be resumed, and accelerate's settings for it.

* :func:`check_run_folder` refuses, before any model or data is built, a folder with checkpoints that the
  run would collide with (``checkpoint.resume: false``) or continue with another recipe (resuming mixes two
  runs; the ``allow_changed`` override resumes anyway and the caller rewrites ``recipe.yaml``).
* :func:`check_teacher_weights` refuses a ``teacher.weights`` file that does not load into the teacher,
  before it is copied into the run folder.
* :func:`process_group_kwargs` gives accelerate the recipe's process-group timeout (how long a rank waits
  in a collective for the others before it fails, instead of torch's 30 minutes).
* :func:`checkpoints_in` lists a run's complete checkpoints; :func:`save_checkpoint` writes one atomically.
* :func:`check_random_states` warns when a checkpoint's random-state file of this process cannot be loaded:
  accelerate then resumes with fresh random states and logs that only at INFO level.
* :func:`build_models` builds a recipe's adapter, spec, student and teacher; :func:`eval_set` its held-out
  images and fixed masks.
* :class:`MetricsLog` appends the records of ``metrics.jsonl``; :func:`average_gradients`,
  :func:`no_accelerator` and :func:`tensorboard_installed` are the small pieces of accelerate plumbing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import InitProcessGroupKwargs
from accelerate.utils.other import load as accelerate_load
from safetensors.torch import load_file, save_file
from torch import nn

from kdinpaint._files import usual_permissions
from kdinpaint.adapter import Adapter
from kdinpaint.data import EvalMasks
from kdinpaint.data.protocols import is_protocol, protocol_masks
from kdinpaint.data.training import images_from, mask_source
from kdinpaint.evaluation import metrics
from kdinpaint.plugins import adapter_from_target, get_adapter
from kdinpaint.train.recipe import Recipe, load_yaml
from kdinpaint.weights import load_weights

__all__ = [
    "RESUME_MAY_CHANGE", "TRAINER_STATE", "RunLock", "checkpoints_in", "load_trainer_state", "restart_metrics", "check_run_folder", "check_teacher_weights", "process_group_kwargs",
    "check_random_states", "build_network", "build_models", "eval_set", "MetricsLog", "average_gradients", "no_accelerator",
    "cpu_threads", "user_threads", "tensorboard_installed",
]

log = logging.getLogger(__name__)

# recipe keys a resumed run may change: where the folder is (it may have moved), where and how often it logs and
# saves, and what it evaluates at the end
RESUME_MAY_CHANGE = (
    "log.*", "checkpoint.dir", "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "data.workers", "data.eval_images",
    "data.eval_count", "masks.eval", "train.process_group_timeout", "train.threads",
)


def checkpoints_in(run: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of a run folder (``checkpoints/step_XXXXXXX``), oldest first."""
    return sorted((Path(run) / "checkpoints").glob("step_*"))


TRAINER_STATE = "trainer_state"  # <checkpoint>/trainer_state.json and .safetensors: states beside accelerate's


def save_checkpoint(accelerator: Any, run: str | os.PathLike[str], step: int, keep: int,
                    states: dict[str, Any] | None = None) -> Path:
    """accelerate ``save_state`` into ``checkpoints/.tmp_step_XXXXXXX`` with the ``state_dict()`` of each of
    ``states`` (learning-rate schedule, weight average, divergence guard) as ``trainer_state.json`` and
    ``trainer_state.safetensors``, then an atomic rename to ``checkpoints/step_XXXXXXX``: only complete checkpoints
    get a name (a killed run resumes from the last one); all but the newest ``keep`` are removed. Every process
    calls it; returns the checkpoint's path.

    A full disk (or any failure while writing) leaves the earlier checkpoints as they were and raises an
    ``OSError`` that says so."""
    final = Path(run) / "checkpoints" / f"step_{step:07d}"
    tmp = Path(run) / "checkpoints" / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process and states:
            _write_states(tmp, states)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        done = checkpoints_in(run)
        kept = f"the last complete checkpoint, {done[-1]}, is kept" if done else "no earlier checkpoint exists"
        try:
            free = f"{shutil.disk_usage(run).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        raise OSError(
            f"writing the checkpoint of step {step} into {tmp} failed ({type(e).__name__}: {e}); is the disk full? "
            f"(the disk holding {run}: {free}) {kept}; free some space and resume the run"
        ) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        usual_permissions(tmp)  # accelerate's safetensors files are written 0600
        os.replace(tmp, final)
        for old in checkpoints_in(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _split(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """``value`` with every tensor replaced by ``{"tensor": name}`` (the tensor goes to ``tensors[name]``)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {str(k): _split(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: a {type(value).__name__} cannot be saved as JSON or safetensors")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"tensor"} and isinstance(value["tensor"], str):
            return tensors[value["tensor"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _write_states(folder: Path, states: dict[str, Any]) -> None:

    tensors: dict[str, torch.Tensor] = {}
    plain = {name: _split(obj.state_dict(), tensors, name) for name, obj in states.items()}
    (folder / f"{TRAINER_STATE}.json").write_text(json.dumps(plain))
    save_file(tensors, str(folder / f"{TRAINER_STATE}.safetensors"))
    usual_permissions(folder / f"{TRAINER_STATE}.safetensors")


def load_trainer_state(checkpoint: str | os.PathLike[str], states: dict[str, Any]) -> None:
    """Load the ``trainer_state`` files of ``checkpoint`` into ``states`` (see :func:`save_checkpoint`).

    JSON and safetensors only: nothing in a run folder is unpickled with code. A checkpoint that holds pickled
    states instead (``custom_checkpoint_*.pkl``, which accelerate loads with ``weights_only=False``) is refused:
    a crafted one would run code on resume."""

    checkpoint = Path(checkpoint)
    pickles = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds pickled training states ({', '.join(pickles)}); they are not loaded, "
            "because a pickle can run code: resume only checkpoints written by this version (JSON and safetensors), "
            "or start a new run (another checkpoint.dir)"
        )
    if not states:
        return
    js, st = checkpoint / f"{TRAINER_STATE}.json", checkpoint / f"{TRAINER_STATE}.safetensors"
    if not js.is_file() or not st.is_file():
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} has no {js.name} / {st.name} (the learning-rate schedule, weight average "
            "and divergence guard of the run): it is incomplete or from another program; resume from another "
            "checkpoint or start a new run"
        )
    try:
        plain = json.loads(js.read_text())
        tensors = load_file(str(st))
        for name, obj in states.items():
            obj.load_state_dict(_join(plain[name], tensors))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(
            f"{js} / {st.name} do not fit this run ({type(e).__name__}: {e}); resume with the recipe that wrote the "
            "checkpoint, or start a new run"
        ) from None


def _flat(data: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in data.items() if isinstance(section, dict) for k, v in section.items()}


def _may_change(key: str) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in RESUME_MAY_CHANGE)


def check_run_folder(run: str | os.PathLike[str], recipe: Recipe, *, allow_changed: bool = False) -> list[str]:
    """Refuse a run folder the recipe cannot safely use; returns the changed keys a resume accepts.

    ``ValueError`` when the folder holds checkpoints and ``checkpoint.resume`` is false (they would collide
    with the new run's), and when it holds checkpoints and a ``recipe.yaml`` that differs from ``recipe`` in a
    key outside :data:`RESUME_MAY_CHANGE` or no ``recipe.yaml``, unless ``allow_changed``; the message lists the
    differences.
    """
    run = Path(run)
    done = checkpoints_in(run)
    if not done:
        _check_finished_folder(run, recipe)
        return []
    if not recipe.checkpoint.resume:
        raise ValueError(
            f"run folder {str(run)!r} already holds checkpoints (up to {done[-1].name}) and checkpoint.resume is false: "
            f"a new run would collide with them; use another checkpoint.dir, delete {str(run / 'checkpoints')!r}, "
            "or set checkpoint.resume=true to continue that run"
        )
    saved = run / "recipe.yaml"
    if not saved.is_file():
        if allow_changed:
            return []
        raise ValueError(
            f"run folder {str(run)!r} holds checkpoints (up to {done[-1].name}) but no recipe.yaml: nothing tells whether "
            "they are of this recipe, and resuming another run's would mix two runs. Restore its recipe.yaml, use "
            "another checkpoint.dir, or pass --resume-changed to resume them with this recipe"
        )
    try:
        old = load_yaml(saved.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{saved} (the recipe of the run to resume) cannot be read ({e}); restore it or use another checkpoint.dir") from None
    if not isinstance(old, dict):
        raise ValueError(f"{saved} (the recipe of the run to resume) is not a mapping of sections; restore it or use another checkpoint.dir")
    before, now = _flat(old), _flat(recipe.to_dict())
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k, "<absent>") != now.get(k, "<absent>")]
    refused = [k for k in changed if not _may_change(k)]
    if refused and not allow_changed:
        shown = ", ".join(f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in refused[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ValueError(
            f"run folder {str(run)!r} holds checkpoints (up to {done[-1].name}) of another recipe ({shown}{more}): resuming "
            "would mix two runs; use another checkpoint.dir, or pass --resume-changed to resume with the new values"
        )
    return changed


def _check_finished_folder(run: Path, recipe: Recipe) -> None:
    """A folder without checkpoints but with a run's outputs (a finished run, or one stopped before its first
    checkpoint) is refused when its ``recipe.yaml`` differs from ``recipe`` outside :data:`RESUME_MAY_CHANGE`: the
    new run would reuse its ``teacher.safetensors`` and append to its ``metrics.jsonl`` while ``recipe.yaml`` named
    the new settings."""
    saved = run / "recipe.yaml"
    outputs = [n for n in ("teacher.safetensors", "metrics.jsonl", "student.safetensors") if (run / n).exists()]
    if not saved.is_file() or not outputs:
        return
    try:
        old = load_yaml(saved.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        old = {}
    before, now = _flat(old) if isinstance(old, dict) else {}, _flat(recipe.to_dict())
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k, "<absent>") != now.get(k, "<absent>") and not _may_change(k)]
    if changed:
        raise ValueError(
            f"run folder {str(run)!r} holds the outputs ({', '.join(outputs)}) of a run with another recipe "
            f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ): a new run there would reuse its "
            "teacher and mix both runs' metrics; use another checkpoint.dir or delete the folder"
        )


class RunLock:
    """An exclusive lock on a run folder (``run/.lock``, ``fcntl.flock``) for the life of a run: a second run on the
    same folder is refused at once instead of colliding with the first's checkpoints. The operating system
    releases it when the process ends, however it ends."""

    def __init__(self, run: str | os.PathLike[str]):
        self.path = Path(run) / ".lock"
        self._file = None

    def acquire(self) -> "RunLock":

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(
                f"run folder {str(self.path.parent)!r} is in use by {holder}: two runs in one folder would mix their "
                "checkpoints; wait for it to end, or use another checkpoint.dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def restart_metrics(path: str | os.PathLike[str], step: int, checkpoint: str) -> None:
    """On resume from ``checkpoint`` at ``step``: drop the records of ``metrics.jsonl`` after ``step`` (the killed run
    logged them; the resumed one logs them again) and mark the resume with ``{"step", "resumed_from"}``."""
    path = Path(path)
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short by the kill
    kept.append(json.dumps({"step": step, "resumed_from": checkpoint}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.replace(tmp, path)


def check_teacher_weights(path: str | os.PathLike[str], teacher: nn.Module, adapter: str) -> None:
    """A ``ValueError`` naming ``path`` unless it is a readable teacher of ``adapter`` (every key and shape)."""
    load_weights(teacher, path, f"{adapter} teacher (teacher.weights)")


def process_group_kwargs(timeout_s: int) -> list:
    """accelerate ``kwargs_handlers`` that set the process-group timeout to ``timeout_s`` seconds."""

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]


def check_random_states(checkpoint: str | os.PathLike[str], process_index: int) -> bool:
    """Whether this process's random-state file of ``checkpoint`` loads the way accelerate loads it
    (``torch.load(weights_only=True)``, then Python's, numpy's and torch's generator states); a warning naming
    the file when not (accelerate would continue with fresh random states, logged at INFO level only)."""

    path = Path(checkpoint) / f"random_states_{process_index}.pkl"
    try:
        states = accelerate_load(path)
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception as e:  # noqa: BLE001 - any refusal is reported the same way
        log.warning(
            "%s cannot be loaded (%s: %s): the run resumes with fresh random states, so it will not repeat an "
            "uninterrupted run exactly; resume from an earlier checkpoint for that", path, type(e).__name__,
            (str(e).splitlines() or [""])[0],
        )
        return False
    return True


# ---- what a recipe builds ------------------------------------------------------------------------------
def build_network(adapter: Adapter, variant: str | None, kwargs: dict, key: str, teacher: bool = False) -> nn.Module:
    """``adapter``'s student (or ``teacher``) of ``variant`` built with the recipe's ``kwargs`` (at ``key``, e.g.
    ``model.kwargs``). Every way the builder refuses them is a ``ValueError`` naming ``key``: an unknown keyword
    (with the valid ones), a value of another type than its default (``width: "8"``), and what the builder itself
    raises for a value (``width: 0``)."""
    adapter.check_kwargs(kwargs, key)
    build = adapter.teacher if teacher else adapter.student
    try:
        return build(variant or None, **kwargs)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise ValueError(f"{key} {kwargs} do not build the {adapter.name} network ({type(e).__name__}: {e}); "
                             f"fix {key} in the recipe") from e
        valid = adapter.keyword_names(str(e))
        unknown = [k for k in kwargs if k not in valid] or sorted(kwargs)
        raise ValueError(f"{key} {unknown} not accepted by the {adapter.name} builder ({e}); valid keyword names: {valid}") from None
    except (ValueError, RuntimeError) as e:  # the builder's own checks, or torch refusing a layer of that size
        raise ValueError(f"{key} {kwargs} do not build the {adapter.name} network ({type(e).__name__}: {e}); "
                         f"fix {key} in the recipe") from e


def build_models(recipe: Recipe):
    """``(adapter, variant, spec, student, teacher)`` of ``recipe.model``: the adapter's builders with
    ``model.kwargs`` (an unknown keyword is refused with the valid ones), both networks loaded from
    ``model.init`` when it is set (the teacher starts from the same weights, then learns to reconstruct)."""
    if recipe.model.target is not None:  # your own network by import path
        adapter, variant = adapter_from_target(recipe.model.target, recipe.model.spec, recipe.model.stride), ""
        name = adapter.name
    else:
        name, _, variant = (recipe.model.adapter or "reference").partition(":")
        adapter = get_adapter(name)
    spec = adapter.spec.variant(variant or None)
    student = build_network(adapter, variant, recipe.model.kwargs, "model.kwargs")
    teacher = build_network(adapter, variant, recipe.model.kwargs, "model.kwargs", teacher=True)
    if recipe.model.init:
        for net, role in ((student, "student"), (teacher, "teacher")):
            load_weights(net, recipe.model.init, f"{adapter.name} {role} (model.init)", adapter.checkpoint_filter_fn)
    return adapter, variant, spec, student, teacher


_EVAL_SETS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def eval_set(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images of ``data.eval_images`` and their fixed masks, spread over the Table 1 buckets
    (image ``i`` gets bucket ``i % 4``), or mask ``i`` of the protocol ``masks.eval`` names; built once per
    ``(data, masks)`` setting, so a run can build it before training (a bad evaluation setting fails before the first
    step) and reuse it at the end."""

    key = repr((recipe.data, recipe.masks))
    if key not in _EVAL_SETS:
        d, m = recipe.data, recipe.masks
        images = images_from(d.eval_images, d.size, d.eval_count, d.crop, held_out=True)
        if not isinstance(images, torch.Tensor):
            images = torch.stack([images[i]["image"] for i in range(min(len(images), d.eval_count))])
        if is_protocol(m.eval):  # the field's fixed masks: mask i of the protocol's set, whatever its hole ratio
            masks = list(protocol_masks(m.eval, len(images), d.size))
        else:
            sources = [mask_source(m.eval, d.size, m.hole, lo_hi) for lo_hi in metrics.TABLE1_BUCKETS]  # a folder is read once
            masks = [EvalMasks(sources[i % len(sources)], 1, size=d.size, seed=m.seed * 1000 + i)[0]
                     for i in range(len(images))]
        _EVAL_SETS[key] = (images, torch.stack(masks))
    return _EVAL_SETS[key]


# ---- logging and accelerate plumbing -------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON record per call to ``path`` (``metrics.jsonl``) on the main process: ``step``, the
    seconds since the log was made, and the values (floats rounded to 6 digits; a non-finite one as null,
    which the record's ``skipped`` explains)."""

    def __init__(self, path: str | os.PathLike[str], main_process: bool = True):
        self.path, self.main_process, self.t0 = Path(path), main_process, time.time()

    def write(self, step: int, logs: dict, **extra: Any) -> dict:
        """The record written (also on other processes, where nothing is written)."""
        clean = {k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in logs.items()}
        record = {"step": step, "time": round(time.time() - self.t0, 2), **clean, **extra}
        if self.main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def average_gradients(accelerator: Any, params: list[nn.Parameter]) -> None:
    """Average the gradients over processes: an objective calls its discriminators unwrapped (its losses are
    methods, not a DDP forward), so DDP does not synchronise them."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def no_accelerator() -> bool:
    """On a machine without GPU, several processes (torchrun, accelerate launch) become gloo ranks on the CPU."""
    return not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def cpu_threads(setting: int | None, local_processes: int, cores: int | None = None,
                runnable: Callable[[], int] | None = None) -> int | None:
    """torch's CPU threads per process for ``train.threads``: ``None`` leaves the launcher's setting (``accelerate
    launch`` exports ``OMP_NUM_THREADS=1`` unless given ``--num_cpu_threads_per_process``), a positive number is
    taken as it is, ``0`` shares the cores that are free among the ``local_processes`` of this machine, at least one
    each: the cores this process may run on (``cores``, default its CPU affinity) less those that other work keeps
    busy when the run starts (``runnable``: tasks ready to run now, this machine's processes of the run included,
    default :func:`runnable_tasks`). OpenMP threads that wait for a core another process holds make every step
    several times slower (recipes/decisions.md, "Threads on a shared machine")."""
    if setting is None:
        return None
    if setting > 0:
        return setting
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    others = max(0, (runnable or runnable_tasks)() - max(1, local_processes))
    return max(1, (cores - others) // max(1, local_processes))


def runnable_tasks(samples: int = 5, interval: float = 0.05) -> int:
    """Tasks ready to run on this machine now (``/proc/loadavg``'s running count, the median of a few samples;
    the caller's own included); 1 where it cannot be read."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return 1
        if i < samples - 1:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def user_threads(environ: dict[str, str] | None = None) -> int | None:
    """The ``OMP_NUM_THREADS`` the user set, which wins over ``train.threads: 0`` (all cores), or ``None``: unset, not
    a positive number, or the ``1`` that ``accelerate launch`` exports by itself when the user set none (a run under
    it takes ``--num_cpu_threads_per_process N``, or an ``OMP_NUM_THREADS`` other than 1)."""
    environ = os.environ if environ is None else environ
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if not value.isdigit() or int(value) < 1:
        return None
    if value == "1" and "ACCELERATE_MIXED_PRECISION" in environ:  # set by accelerate launch, not necessarily the user
        return None
    return int(value)


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
