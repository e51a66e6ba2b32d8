"""Training recipes: YAML -> validated dataclasses (unknown keys and wrong types rejected) -> arguments.

Only ``recipes/train.py`` reads a whole recipe; library code receives plain arguments. A recipe has fixed
sections; every key has a default, so a recipe names only what differs. Command-line overrides are dotted
``key=value`` pairs parsed as YAML scalars (``optim.lr=3e-4``, ``train.steps=100``, ``losses.vgg=null``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from kdinpaint.data.training import AUGMENTATIONS, valid_augment
from kdinpaint.spec import META_MODES

__all__ = ["Recipe", "load_recipe", "apply_overrides"]


@dataclass
class ModelSection:
    """The network: a registered adapter (``name:variant``) and keyword arguments of its builder."""

    adapter: Optional[str] = None  # a registered adapter, name[:variant]; null: reference (unless target is given)
    kwargs: dict = field(default_factory=dict)
    init: Optional[str] = None  # fine-tune from these weights (the adapter's checkpoint_filter_fn remaps official ones)
    target: Optional[str] = None  # or your own network by import path, "package.module:Class" (no plugin needed) ...
    spec: Optional[Union[dict, str]] = None  # ... with its spec: a mapping or a YAML file (kdinpaint spec suggest drafts one)
    stride: int = 1  # ... and the multiple its image sides must be (the framework pads and crops back)

    @property
    def name(self) -> str:
        """What the run trains, for messages and file metadata: the adapter's name[:variant], or the target."""
        return self.target or self.adapter or "reference"


@dataclass
class TeacherSection:
    """The auxiliary network (Eq. 2, 3, 9): pre-trained as an L1 autoencoder of the ground truth (§4); or a trained
    inpainting network of another architecture, ``file`` (a black box) or ``adapter`` (a white box), which teaches
    the student through its prediction in the holes (compression; the teacher stage is skipped)."""

    steps: int = 1000  # stage "teacher"; 0 with `weights` given skips it
    lr: float = 1e-4
    weights: Optional[str] = None  # a pre-trained teacher (safetensors state_dict)
    file: Optional[str] = None  # a black box: TorchScript or ONNX file, (image, mask) -> image (kdinpaint.blackbox)
    range: list = field(default_factory=lambda: [0, 1])  # the black box's image values: [0, 1] | [-1, 1] | [0, 255]
    channels: str = "rgb"  # the black box's channel order: rgb | bgr
    mask: str = "hole_is_1"  # the black box's mask: hole_is_1 | hole_is_0
    adapter: Optional[str] = None  # or a white box: a registered adapter name:variant (its encoder_levels are tapped)
    kwargs: dict = field(default_factory=dict)  # its builder's arguments, e.g. {pretrained: /path/to/big-lama}
    output_distillation: float = 1.0  # with file / adapter: the weight of the output term in R_distil (times lambda_d)
    output_scales: int = 4  # ... at full size and average-pooled 1/2, 1/4, 1/8 (MI-GAN)

    @property
    def trained(self) -> bool:
        """Whether the teacher is a trained network given by ``file`` or ``adapter`` (no teacher stage)."""
        return self.file is not None or self.adapter is not None


@dataclass
class DataSection:
    """Images: ``sample`` = the photographs bundled with scikit-image / scikit-learn, or a folder / .flist."""

    images: str = "sample"
    eval_images: str = "sample"
    size: int = 256
    crop: str = "random"
    sample_count: int = 10  # crops per bundled photo set when images = sample
    eval_count: int = 10
    workers: int = 2
    augment: list = field(default_factory=lambda: ["flip"])  # of the training images: flip | rot90 | channels


@dataclass
class MaskSection:
    """Masks: ``freeform`` / ``rect`` generators or an NVIDIA irregular-mask folder (its path)."""

    train: str = "freeform"
    eval: str = "freeform"
    hole: str = "auto"  # hole colour of a mask folder: white | black | auto
    train_ratio: str = "any"  # training holes: any (the generator's own spread) | table1 (the 4 Table 1 buckets evenly)
    seed: int = 0


@dataclass
class LossSection:
    """Eq. (11): lambda_r R_recon + lambda_d (R_distil + R_att) + lambda_s R_style, plus the adversarial term."""

    objective: str = "eq11"  # eq11 = the paper's (kdinpaint.train.objective.Eq11Objective); or a registered loss (kdinpaint.plugins.get_loss)
    objective_kwargs: dict = field(default_factory=dict)  # arguments of a registered TrainingObjective class
    lambda_r: float = 1.0
    lambda_d: float = 20.0
    lambda_s: float = 150.0
    recon_padding: str = "reflect"  # GMCNN's PyTorch release; "zeros" (its TF release) also works below 64×64
    style_preset: str = "pconv"
    vgg: Optional[str] = "vgg16.tv_in1k"  # timm name or a local weights file
    allow_random_vgg: bool = False  # random VGG weights (demos and tests only)
    adversarial: float = 0.1  # Region Normalization's discriminator; 0 switches it off
    ssim: float = 0.0  # weight of 1 - SSIM of the composite (not in the paper; kdinpaint.train.objective.Eq11Objective)
    gan_loss: str = "nsgan"
    d_lr_ratio: float = 0.1


@dataclass
class MetaSection:
    """Algorithm 1: how Psi is trained (``reverse_hg`` | ``first_order`` | ``frozen``), T, and its optimiser."""

    mode: str = "reverse_hg"
    steps: int = 2
    every: int = 1  # the Psi step on every k-th batch (block of `steps` theta steps), theta steps alone on the others
    lr: float = 1e-4
    inner_lr: Optional[float] = None  # alpha of the differentiable SGD steps (default: optim.lr)
    max_hypergrad_norm: Optional[float] = 1.0  # clip the hypergradient (non-finite ones are skipped)


@dataclass
class OptimSection:
    """The paper: Adam, learning rate 1e-4 (constant), batch size 6."""

    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 6
    schedule: str = "constant"  # theta's learning rate: constant (the paper) | cosine (to min_lr_ratio * lr at train.steps)
    warmup_steps: int = 0  # linear warm-up from 0 over these theta steps (either schedule)
    min_lr_ratio: float = 0.05  # where cosine ends, relative to lr

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The theta learning rate of theta step ``step`` (0-based) as a fraction of ``lr``: a linear warm-up
        from 0 over ``warmup_steps``, then 1 (``constant``) or a half cosine from 1 down to ``min_lr_ratio`` at
        ``total_steps`` (``cosine``). A warm-up longer than half the run is cut to half of it (a short test run
        of a recipe still reaches ``lr``)."""
        warmup = min(self.warmup_steps, total_steps // 2)
        if step < warmup:
            return step / warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainSection:
    steps: int = 1000  # optimiser steps of the student stage (theta steps)
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    guard: bool = True  # skip a batch whose loss or gradient is NaN/inf or explodes (MetaLearner's DivergenceGuard)
    max_bad_steps: int = 5  # consecutive skipped batches that stop the run as diverged (exit status 2)
    explode_factor: Optional[float] = 50.0  # loss_total above this times its recent median is skipped; null: NaN/inf only
    process_group_timeout: int = 600  # seconds a process waits for the others in a collective before failing (torch: 1800)
    average: float = 0.0  # decay of an average of the student's weights (per block), evaluated and exported; 0: off
    threads: Optional[int] = None  # torch's CPU threads per process; null: the launcher's (accelerate: 1); 0: the cores shared
    control: bool = False  # also train the student's twin without distillation (same weights, data, steps) and compare


@dataclass
class CheckpointSection:
    dir: str = "runs/reference"
    every: int = 500  # steps between checkpoints (accelerate save_state, written atomically)
    keep: int = 2
    resume: bool = True


@dataclass
class LogSection:
    every: int = 10
    sample_every: int = 500  # sample grids (masked | output | ground truth) as PNG
    eval_every: int = 0  # held-out PSNR / SSIM of the exported weights (eval/psnr, eval/ssim); 0: at the end only
    tensorboard: bool = True  # when tensorboard is installed


@dataclass
class Recipe:
    """A training recipe; see ``recipes/reference.yaml`` for every key with a comment."""

    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    masks: MaskSection = field(default_factory=MaskSection)
    losses: LossSection = field(default_factory=LossSection)
    meta: MetaSection = field(default_factory=MetaSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    ("data", "crop"): ("random", "center", "resize"),
    ("meta", "mode"): META_MODES,
    ("train", "mixed_precision"): ("no", "fp16", "bf16"),
    ("optim", "schedule"): ("constant", "cosine"),
    ("masks", "hole"): ("white", "black", "auto"),
    ("masks", "train_ratio"): ("any", "table1"),
    ("losses", "gan_loss"): ("nsgan", "lsgan", "hinge"),
    ("losses", "recon_padding"): ("reflect", "zeros"),
    ("teacher", "channels"): ("rgb", "bgr"),
    ("teacher", "mask"): ("hole_is_1", "hole_is_0"),
}


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to the annotated type, or a TypeError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type the value has; the last one's error otherwise
            try:
                return _check(value, option, where)
            except TypeError:
                continue
        return _check(value, options[-1], where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML reads 3e-4 (no dot) as a string (YAML 1.1); it is the number everyone means
    if hint in (int, float, str, bool, list, dict) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise TypeError(f"recipe key {where} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _field_hints(cls: type, data: dict, unknown_error: Callable[[list[str], list[str]], str]) -> dict[str, Any]:
    """The type hints of dataclass ``cls``; a ``ValueError(unknown_error(unknown, valid))`` if ``data`` has
    keys that are not its fields."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(unknown_error(unknown, valid))
    return hints


def _section(cls: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"recipe section {name!r} must be a mapping, got {data!r}")
    hints = _field_hints(
        cls, data,
        lambda unknown, valid: f"unknown key(s) {[f'{name}.{k}' for k in unknown]} in the recipe; valid keys of {name}: {valid}",
    )
    values = {}
    for key, value in data.items():
        values[key] = _check(value, hints[key], f"{name}.{key}")
        choices = _CHOICES.get((name, key))
        if choices and values[key] not in choices:
            raise ValueError(f"recipe key {name}.{key}={values[key]!r} is not one of {list(choices)}")
    return cls(**values)


def recipe_from_dict(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise TypeError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    hints = _field_hints(
        Recipe, data, lambda unknown, sections: f"unknown recipe section(s) {unknown}; valid sections: {sections}"
    )
    recipe = Recipe(**{k: _section(hints[k], v or {}, k) for k, v in data.items()})
    m = recipe.model
    if m.target is not None and m.adapter is not None:
        raise ValueError(
            f"model.adapter ({m.adapter!r}) and model.target ({m.target!r}) both name the network: keep one "
            "(on the command line, model.adapter=null with model.target=...)"
        )
    if (m.spec is not None) != (m.target is not None):
        raise ValueError("model.spec goes with model.target (your own network and its spec); a registered adapter "
                         "brings its own spec: remove model.spec, or give model.target")
    if recipe.losses.objective == "eq11" and recipe.losses.objective_kwargs:
        raise ValueError(
            "losses.objective_kwargs applies to a registered objective class; losses.objective is eq11, whose "
            "options are the other losses keys: remove objective_kwargs or name an objective"
        )
    _check_ranges(recipe)
    _check_teacher(recipe.teacher)
    return recipe


def _check_teacher(t: TeacherSection) -> None:
    """The teacher is one of: the student's architecture (trained here or ``weights``), ``file`` or ``adapter``."""
    if t.file is not None and t.adapter is not None:
        raise ValueError(f"teacher.file ({t.file!r}) and teacher.adapter ({t.adapter!r}) both name the teacher: keep "
                         "one (file: a TorchScript / ONNX black box; adapter: a network whose features are tapped)")
    if t.trained and t.weights is not None:
        raise ValueError("teacher.weights is a pre-trained auxiliary network of the student's architecture; with "
                         "teacher.file or teacher.adapter the teacher is that network: remove teacher.weights")
    if t.kwargs and t.adapter is None:
        raise ValueError("teacher.kwargs are the arguments of teacher.adapter's builder; set teacher.adapter or remove them")
    if t.trained and t.output_distillation == 0 and t.file is not None:
        raise ValueError("teacher.output_distillation is 0, but a black-box teacher (teacher.file) teaches only through "
                         "its prediction: set teacher.output_distillation > 0")


# ---- value ranges: one table, checked when the recipe is loaded, before any model or data is built ----
_Range = tuple[str, Callable[[Any], bool], str]  # (the valid range in words, its test, what the key is)


def _ge(lo: int | float, what: str = "") -> _Range:
    return f">= {lo}", lambda v: v >= lo, what


def _gt(lo: int | float, what: str = "") -> _Range:
    return f"> {lo}", lambda v: v > lo, what


def _within(lo: float, hi: float, what: str = "") -> _Range:
    return f"in [{lo}, {hi}]", lambda v: lo <= v <= hi, what


def _betas(v: list) -> bool:
    return len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)


_RANGES: dict[tuple[str, str], _Range] = {
    ("teacher", "steps"): _ge(0, "L1 steps of the teacher stage; 0 with teacher.weights skips it"),
    ("teacher", "lr"): _gt(0, "Adam's learning rate of the teacher"),
    ("teacher", "range"): ("one of [0, 1], [-1, 1], [0, 255]", lambda v: list(v) in ([0, 1], [-1, 1], [0, 255]),
                           "the black box's image values"),
    ("teacher", "output_distillation"): _ge(0, "the weight of the output term of a trained teacher"),
    ("teacher", "output_scales"): _ge(1, "resolutions of the output term: 1 full size, 4 adds 1/2, 1/4, 1/8"),
    ("data", "size"): (">= 8 and a multiple of 8", lambda v: v >= 8 and v % 8 == 0, "the crop side; the networks downsample by 8"),
    ("data", "sample_count"): _ge(1, "crops per bundled photo"),
    ("data", "eval_count"): _ge(1, "held-out images scored after training"),
    ("data", "workers"): _ge(0, "DataLoader worker processes; 0 loads in the main process"),
    ("data", "augment"): (f"a list of distinct names from [{', '.join(AUGMENTATIONS)}]", valid_augment,
                          "what is done to each training image; [] trains on the images as they are"),
    ("masks", "seed"): _ge(0),
    ("losses", "lambda_r"): _ge(0, "the weight of R_recon, Eq. 11"),
    ("losses", "lambda_d"): _ge(0, "the weight of R_distil + R_att, Eq. 11"),
    ("losses", "lambda_s"): _ge(0, "the weight of R_style, Eq. 11"),
    ("losses", "adversarial"): _ge(0, "the weight of the adversarial term; 0 switches it off"),
    ("losses", "ssim"): _ge(0, "the weight of 1 - SSIM of the composite; 0 switches it off"),
    ("losses", "d_lr_ratio"): _gt(0, "the discriminator's learning rate relative to optim.lr"),
    ("meta", "steps"): _ge(1, "T, the theta steps of one Algorithm-1 block"),
    ("meta", "every"): _ge(1, "a Psi step on every k-th batch; 1 is Algorithm 1"),
    ("meta", "lr"): _gt(0, "Adam's learning rate of Psi"),
    ("meta", "inner_lr"): _gt(0, "alpha of the differentiable SGD steps; a negative one would ascend the loss"),
    ("meta", "max_hypergrad_norm"): _gt(0, "the clipping norm of the hypergradient"),
    ("optim", "lr"): _gt(0, "Adam's learning rate of theta"),
    ("optim", "betas"): ("two numbers in [0, 1)", _betas, "Adam's (beta1, beta2), e.g. [0.9, 0.999]"),
    ("optim", "batch_size"): _ge(1),
    ("optim", "warmup_steps"): _ge(0, "theta steps of linear warm-up"),
    ("optim", "min_lr_ratio"): _within(0, 1, "a fraction of optim.lr"),
    ("model", "stride"): _ge(1, "the multiple of the image sides the network needs"),
    ("train", "steps"): _ge(1, "theta steps of the student stage"),
    ("train", "seed"): ("in [0, 2**31)", lambda v: 0 <= v < 2**31, "numpy takes seeds below 2**32"),
    ("train", "max_bad_steps"): _ge(1, "consecutive skipped batches before stopping"),
    ("train", "explode_factor"): _gt(1, "a multiple of the recent median loss; null checks only for NaN/inf"),
    ("train", "process_group_timeout"): _ge(1, "seconds a process waits for the others before failing"),
    ("train", "threads"): _ge(0, "torch's CPU threads per process; 0 shares this machine's cores among its processes"),
    ("train", "average"): ("in [0, 1)", lambda v: 0 <= v < 1, "the decay of the weight average per block; 0 switches it off"),
    ("checkpoint", "every"): _ge(0, "steps between checkpoints; 0 saves none during the run"),
    ("checkpoint", "keep"): _ge(1, "checkpoints kept; 0 would delete every one"),
    ("log", "every"): _ge(1, "steps between log lines"),
    ("log", "sample_every"): _ge(0, "steps between sample grids; 0 writes none"),
    ("log", "eval_every"): _ge(0, "steps between held-out evaluations; 0 evaluates at the end only"),
}


def _check_ranges(recipe: Recipe) -> None:
    """``ValueError`` naming the key, its value and the valid range for the first value out of range.

    Every number of the recipe must be finite; the keys of ``_RANGES`` must lie in their range (``null``
    where the key is optional); ``train.steps`` must cover at least one block of ``meta.steps``.
    """
    for section in dataclasses.fields(recipe):
        values = getattr(recipe, section.name)
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            if isinstance(value, str) and not value.strip():  # a path "" is the working directory: not what anyone means
                raise ValueError(f"{key} is an empty string (an unset variable on the command line?); give a value "
                                 f"or leave the key out (default: {f.default!r})")
            rule = _RANGES.get((section.name, f.name))
            if rule is None or (value is None and _optional(type(values), f.name)):
                continue
            text, ok, what = rule
            if not ok(value):
                null = " or null" if _optional(type(values), f.name) else ""
                raise ValueError(f"{key} must be {text}{null}, got {value!r}" + (f" ({what})" if what else ""))
    if recipe.train.steps < recipe.meta.steps:
        raise ValueError(
            f"train.steps={recipe.train.steps} is below meta.steps={recipe.meta.steps}: the student trains in blocks "
            "of meta.steps theta steps, so it would train 0 steps; raise train.steps or lower meta.steps"
        )


def _optional(cls: type, name: str) -> bool:
    """Whether field ``name`` of dataclass ``cls`` may be ``None`` (``Optional[...]``)."""
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` with dotted ``section.key=value`` overrides applied (values parsed as YAML scalars). A key whose
    value is a mapping (``model.kwargs``, ``losses.objective_kwargs``) takes deeper paths:
    ``model.kwargs.prefill=true`` sets one entry and keeps the others."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
        node = data
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                what = "a section" if depth == 0 else "a mapping"
                raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])!r} is not {what}")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            where = f" ({e.problem})" if getattr(e, "problem", None) else ""
            raise ValueError(
                f"override {item!r}: the value {raw!r} is not a YAML value{where}; quote it as a whole on the command "
                "line, e.g. 'model.kwargs={width: 8}'"
            ) from None
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key twice (plain YAML keeps the last one silently: a
    repeated ``optim:`` section would reset the first one's keys to their defaults). Merge keys (``<<: *anchor``)
    work as in YAML: the mapping's own keys override the merged ones."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by construct_mapping, own keys win
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> object:
    """YAML as recipes are read: safe loading, a key given twice refused (``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (safe loading; a key given twice is refused), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe {str(path)!r} is a YAML {type(data).__name__}, not a mapping of sections "
                             "(model:, data:, train: ...); see recipes/demo.yaml")
    try:
        return recipe_from_dict(apply_overrides(data, list(overrides)))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {e}" if path else str(e)) from None
