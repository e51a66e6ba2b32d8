"""``AdapterSpec``: what kdinpaint hooks in a model, as validated data.

A spec names modules by dotted path (as in ``model.named_modules()``) and says how the model is called.
Globs: ``*`` matches within one path segment (``encoder.layer*`` is ``encoder.layer1`` … ``encoder.layer4``,
not their submodules), ``?`` one character of a segment, ``[...]`` a character class, and a whole segment
``**`` any number of segments (``encoder.**.conv2``: every ``conv2`` below ``encoder``). A module whose forward returns a
tuple or list is tapped at one element by its index: ``down1[0]`` (a trailing ``[N]`` of digits is an index, not a
glob class): an encoder level reads that element, a completion site replaces it (the other elements pass unchanged),
an attention ``module`` fuses into it and an ``affinity`` reads it. A plain dict ``{"encoder_levels": [...]}`` is
a complete spec; every other field has a default. Specs round-trip through YAML (``yaml.safe_load`` only),
unknown keys are rejected with the list of valid ones, and named variants (the paper's ``*``, ``#``, ``†``
of Table 4) are overrides applied with :meth:`AdapterSpec.variant`.

Example (YAML)::

    name: my-unet
    encoder_levels: [down1, down2, down3]   # the last module of each encoder level (Eq. 2, 3, 5)
    mask_arg: mask                          # the model is called as model(image, mask=...)
    # input: concat                         # or: model(torch.cat([image * (1 - mask), mask], 1))
    variants:
      no-cb: {completion_sites: []}         # distillation without completion blocks
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from kdinpaint._modules import split_index

__all__ = ["AdapterSpec", "AttentionSite", "CompletionOptions", "MetaOptions", "TeacherCall", "load_spec"]

# how the image and the mask reach the model: two arguments, or one tensor of image channels and the mask
INPUTS = ("separate", "concat", "concat_mask_first")
TEACHER_INPUTS = ("empty_mask", "same_mask", "image_only", "student_input")
DISTILL_SCALES = ("plain", "feature")  # Eq. 2/3 as written, or each level normalised by its target's scale
AFFINITY_LAYOUTS = ("queries_keys", "keys_hw")
META_MODES = ("reverse_hg", "first_order", "frozen")  # Algorithm 1's Psi update: exact, first-order, none


def _reject_unknown(cls: type, data: dict, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {valid}")


def _check_type(value: Any, types: tuple, key: str, where: str, what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{where}.{key} must be {what}, got {value!r} ({type(value).__name__})")


def _path_list(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{where}.{key} must be a list of dotted module paths (strings), got {value!r}")
    for path in value:
        _check_index(path, f"{where}.{key}")
    return list(value)


def _check_index(path: str, where: str) -> None:
    """Refuse a negative element index (``down1[-1]``): taps name an element by its position from the start."""
    module, index = split_index(path)
    if index is not None and index < 0:
        raise ValueError(
            f"{where}: {path!r} has a negative element index; count from 0 (the attach-time refusal of an un-indexed "
            f"tuple lists its elements), e.g. '{module}[0]'"
        )


@dataclass
class CompletionOptions:
    """Completion blocks (Eq. 5-6): adaptive convolution kernel size, predictor sharing and bounds.

    ``share_predictors``: one kernel/offset predictor pair for all blocks of equal width (the paper shares
    them across blocks); blocks of another width get their own. ``kernel_limit`` / ``offset_limit``: soft
    bounds of the predicted kernel weights and offsets (pixels) of every adaptive convolution (completion
    blocks and PGL), ``null`` for none (Eq. 6 as written); why: :class:`kdinpaint.blocks.AdaptiveConv`.
    """

    kernel_size: int = 3
    share_predictors: bool = True
    kernel_limit: Optional[float] = 1.0
    offset_limit: Optional[float] = 3.0

    def __post_init__(self) -> None:
        _check_type(self.kernel_size, (int,), "kernel_size", "completion", "an odd int >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"completion.kernel_size must be odd and >= 1, got {self.kernel_size}")
        _check_type(self.share_predictors, (bool,), "share_predictors", "completion", "true or false")
        for key in ("kernel_limit", "offset_limit"):
            value = getattr(self, key)
            if value is not None:
                _check_type(value, (int, float), key, "completion", "a number > 0, or null for no bound")
                if not value > 0:
                    raise ValueError(f"completion.{key} must be > 0 (or null for no bound), got {value}")
                setattr(self, key, float(value))


@dataclass
class MetaOptions:
    """Meta-networks (Psi): gamma's kernel size and the hidden width of rho/phi.

    ``hidden``: width of the two-layer MLPs rho and phi (Eq. 2, 3); ``None`` = max(16, C // 4).
    ``mode``: how Psi is trained (Algorithm 1): ``reverse_hg`` | ``first_order`` | ``frozen``.
    """

    gamma_kernel_size: int = 1
    hidden: int | None = None
    mode: str = "reverse_hg"
    steps: int = 2

    def __post_init__(self) -> None:
        _check_type(self.gamma_kernel_size, (int,), "gamma_kernel_size", "meta", "an odd int")
        if self.gamma_kernel_size < 1 or self.gamma_kernel_size % 2 == 0:
            raise ValueError(f"meta.gamma_kernel_size must be odd and >= 1, got {self.gamma_kernel_size}")
        if self.hidden is not None:
            _check_type(self.hidden, (int,), "hidden", "meta", "a positive int or null")
        if self.mode not in META_MODES:
            raise ValueError(f"meta.mode {self.mode!r} is not one of {list(META_MODES)}")
        _check_type(self.steps, (int,), "steps", "meta", "a positive int (T of Algorithm 1)")
        if self.steps < 1:
            raise ValueError(f"meta.steps (T of Algorithm 1) must be >= 1, got {self.steps}")


def _check_call(owner: Any, where: str) -> None:
    """``input``, ``image_arg``, ``mask_arg`` and ``output`` of a spec or a :class:`TeacherCall`."""
    if owner.input not in INPUTS:
        raise ValueError(
            f"{where}.input {owner.input!r} is not one of {list(INPUTS)} (separate: model(image, mask); concat: "
            "model(torch.cat([image * (1 - mask), mask], 1)); concat_mask_first: the mask channel first)"
        )
    _check_type(owner.image_arg, (str, int), "image_arg", where, "a parameter name or a position")
    if owner.input == "separate":
        if owner.mask_arg is None:
            raise TypeError(
                f"{where}.mask_arg must be a parameter name or a position, got None; a model called with one "
                "tensor torch.cat([image * (1 - mask), mask], 1) needs `input: concat` instead"
            )
        _check_type(owner.mask_arg, (str, int), "mask_arg", where, "a parameter name or a position")
    elif owner.mask_arg is not None:
        _check_type(owner.mask_arg, (str, int), "mask_arg", where, "a parameter name, a position or null")
    if owner.output is not None:
        _check_type(owner.output, (str, int), "output", where, "an index, a key or null")


@dataclass
class TeacherCall:
    """How a teacher of another architecture is called (fields as in :class:`AdapterSpec`).

    ``None`` in the spec (the default): the teacher is called like the student. A compression teacher (a
    trained network of another architecture teaching a small one) usually has its own convention.
    """

    input: str = "separate"
    image_arg: Union[str, int] = 0
    mask_arg: Union[str, int, None] = "mask"
    output: Union[str, int, None] = None

    def __post_init__(self) -> None:
        _check_call(self, "teacher_call")


@dataclass
class AttentionSite:
    """A decoder attention whose affinity is transferred (Eq. 9) and/or fused with PGL (Eq. 10).

    ``module``: the attention module (PGL wraps it: input D, output att(D)).
    ``affinity``: the submodule whose forward output is the affinity, as a path relative to ``module``, or an
    element of the attention module's own tuple output (``"[1]"``: ``(output, weights)`` as ``nn.MultiheadAttention``
    returns); ``module`` itself may end in an index for fusion (``attn[0]``: the element that is ``att(D)``)
    (``None``: the attention module is a :class:`kdinpaint.pixel_attention.PixelAttention`; its ``qk`` output is
    captured and only the hole rows of the affinity are ever computed).
    ``layout``: ``queries_keys`` (B × N_q × N_k, pixel attention) or ``keys_hw`` (B × N_k × H × W, the
    patch-based contextual attention of DeepFill).
    ``transfer`` / ``fusion``: use this site for attention transfer / global-local fusion.
    """

    module: str
    affinity: str | None = None
    layout: str = "queries_keys"
    transfer: bool = True
    fusion: bool = False

    def __post_init__(self) -> None:
        _check_type(self.module, (str,), "module", "attention_sites[]", "a dotted module path")
        _check_index(self.module, "attention_sites[].module")
        if self.affinity is not None:
            _check_type(self.affinity, (str,), "affinity", "attention_sites[]", "a dotted module path or null")
            _check_index(self.affinity, "attention_sites[].affinity")
        if self.layout not in AFFINITY_LAYOUTS:
            raise ValueError(f"attention_sites[].layout {self.layout!r} is not one of {list(AFFINITY_LAYOUTS)}")


@dataclass
class AdapterSpec:
    """Everything :func:`kdinpaint.attach` needs to know about a model.

    Fields:
        encoder_levels: the last module of each encoder level, shallow to deep (the paper's breakpoints).
            Their outputs are ``x_l`` of Eq. 2-3.
        teacher_levels: the matching modules of the teacher (default: the same paths).
        completion_sites: where completion blocks (Eq. 5) go (default: the encoder levels; ``[]`` for none).
        cross_distillation / self_distillation: switch Eq. 2 / Eq. 3 on or off (Table 3's Net1/Net2/...).
        attention_sites: decoder attention modules (Eq. 7-10).
        input: ``separate`` (the model takes the image and the mask as two arguments, ``image_arg`` and
            ``mask_arg``), ``concat`` (one tensor ``torch.cat([image * (1 - mask), mask], 1)`` at
            ``image_arg``; LaMa's convention) or ``concat_mask_first`` (the mask channel first).
        image_arg / mask_arg: where the image and the mask are in the model's call: a parameter name
            (by position or keyword) or a position. With ``input: concat`` ``image_arg`` places the one
            tensor and ``mask_arg`` is unused.
        output: index or key of the prediction when the model returns a tuple or dict.
        teacher_input: what the teacher is fed: ``empty_mask`` (ground truth, mask of zeros),
            ``same_mask`` (ground truth, the student's mask; for patch attention that needs it),
            ``image_only`` (``teacher(ground_truth)``) or ``student_input`` (the student's input: the ground
            truth with the holes zeroed and the mask; a trained inpainting network as compression teacher).
        teacher_call: how the teacher is called when its convention differs from the student's
            (:class:`TeacherCall`); ``None``: like the student.
        distill_scale: ``plain`` (Eq. 2/3 as written) or ``feature`` (each level's term divided by the mean
            square of its target: the teacher feature for Eq. 2, the deeper feature for Eq. 3), so that
            ``lambda_d`` weighs a relative error whatever the network's feature scale.
        output_distillation: weight of an output-level term in ``total``: the L1 distance between the
            student's and the teacher's predictions in the holes (0: off).
        output_scales: at how many resolutions the output term compares the predictions: 1 (full size) or
            more, adding the average-pooled 1/2, 1/4, 1/8 ... each normalised by its hole count (MI-GAN's
            recipe; :func:`kdinpaint.losses.distillation.output_distillation`).
        clone_taps: clone every tapped feature (needed when an in-place op such as ``ReLU(inplace=True)``
            follows a tapped module and the pre-activation value is wanted; otherwise tap the activation).
        probe_shape: ``[B, C, H, W]`` of the dummy input used at attach time when no example is given.
        variants: named overrides, e.g. ``{"star": {"completion_sites": []}}``.
    """

    encoder_levels: list[str] = field(default_factory=list)
    teacher_levels: list[str] | None = None
    completion_sites: list[str] | None = None
    cross_distillation: bool = True
    self_distillation: bool = True
    attention_sites: list[AttentionSite] = field(default_factory=list)
    input: str = "separate"
    image_arg: Union[str, int] = 0
    mask_arg: Union[str, int, None] = "mask"
    output: Union[str, int, None] = None
    teacher_input: str = "empty_mask"
    teacher_call: TeacherCall | None = None
    distill_scale: str = "plain"
    output_distillation: float = 0.0
    output_scales: int = 1
    clone_taps: bool = False
    completion: CompletionOptions = field(default_factory=CompletionOptions)
    meta: MetaOptions = field(default_factory=MetaOptions)
    probe_shape: list[int] = field(default_factory=lambda: [1, 3, 64, 64])
    name: str = "custom"
    description: str = ""
    variants: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"spec {self.name!r}"
        self.encoder_levels = _path_list(self.encoder_levels, "encoder_levels", where)
        if self.teacher_levels is not None:
            self.teacher_levels = _path_list(self.teacher_levels, "teacher_levels", where)
            if len(self.teacher_levels) != len(self.encoder_levels):
                raise ValueError(
                    f"{where}: teacher_levels has {len(self.teacher_levels)} entries but encoder_levels has "
                    f"{len(self.encoder_levels)}; give one teacher module per encoder level"
                )
        if self.completion_sites is not None:
            self.completion_sites = _path_list(self.completion_sites, "completion_sites", where)
        for key in ("cross_distillation", "self_distillation", "clone_taps"):
            _check_type(getattr(self, key), (bool,), key, where, "true or false")
        _check_call(self, where)
        if self.teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"{where}.teacher_input {self.teacher_input!r} is not one of {list(TEACHER_INPUTS)}")
        if isinstance(self.teacher_call, dict):
            _reject_unknown(TeacherCall, self.teacher_call, f"{where}.teacher_call")
            self.teacher_call = TeacherCall(**self.teacher_call)
        if self.teacher_call is not None and not isinstance(self.teacher_call, TeacherCall):
            raise TypeError(f"{where}.teacher_call must be a mapping (input, image_arg, mask_arg, output) or null, "
                            f"got {self.teacher_call!r}")
        if self.distill_scale not in DISTILL_SCALES:
            raise ValueError(f"{where}.distill_scale {self.distill_scale!r} is not one of {list(DISTILL_SCALES)}")
        _check_type(self.output_distillation, (int, float), "output_distillation", where, "a weight >= 0")
        if not self.output_distillation >= 0 or self.output_distillation == float("inf"):
            raise ValueError(f"{where}.output_distillation must be a finite weight >= 0, got {self.output_distillation!r}")
        self.output_distillation = float(self.output_distillation)
        _check_type(self.output_scales, (int,), "output_scales", where, "an int >= 1 (1: full size only)")
        if self.output_scales < 1:
            raise ValueError(f"{where}.output_scales must be >= 1 (1: full size only), got {self.output_scales}")
        if isinstance(self.completion, dict):
            _reject_unknown(CompletionOptions, self.completion, f"{where}.completion")
            self.completion = CompletionOptions(**self.completion)
        if isinstance(self.meta, dict):
            _reject_unknown(MetaOptions, self.meta, f"{where}.meta")
            self.meta = MetaOptions(**self.meta)
        sites = []
        for i, site in enumerate(self.attention_sites or []):
            if isinstance(site, str):
                site = {"module": site}
            if isinstance(site, dict):
                _reject_unknown(AttentionSite, site, f"{where}.attention_sites[{i}]")
                site = AttentionSite(**site)
            if not isinstance(site, AttentionSite):
                raise TypeError(f"{where}.attention_sites[{i}] must be a mapping with a 'module' key, got {site!r}")
            sites.append(site)
        self.attention_sites = sites
        shape = self.probe_shape
        if not (isinstance(shape, (list, tuple)) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"{where}.probe_shape must be four positive ints [B, C, H, W], got {shape!r}")
        self.probe_shape = list(shape)
        if not isinstance(self.variants, dict):
            raise TypeError(f"{where}.variants must be a mapping of name -> overrides, got {self.variants!r}")
        for vname, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                raise TypeError(f"{where}.variants[{vname!r}] must be a mapping of overrides, got {overrides!r}")
            bad = [k for k in overrides if k not in self._field_names() or k in ("variants", "name")]
            if bad:
                raise ValueError(
                    f"{where}.variants[{vname!r}] overrides unknown or fixed key(s) {bad}; "
                    f"valid keys: {[k for k in self._field_names() if k not in ('variants', 'name')]}"
                )

    # ---- derived views -------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """Completion-block sites (the encoder levels unless given)."""
        return list(self.encoder_levels if self.completion_sites is None else self.completion_sites)

    @property
    def teacher_convention(self) -> TeacherCall:
        """How the teacher is called: :attr:`teacher_call`, or the student's own convention."""
        if self.teacher_call is not None:
            return self.teacher_call
        return TeacherCall(self.input, self.image_arg, self.mask_arg, self.output)

    @property
    def teacher_paths(self) -> list[str]:
        return list(self.encoder_levels if self.teacher_levels is None else self.teacher_levels)

    @property
    def needs_teacher(self) -> bool:
        """Cross-distillation and attention transfer read the teacher; self-distillation alone does not."""
        return (
            (bool(self.encoder_levels) and self.cross_distillation)
            or any(s.transfer for s in self.attention_sites)
            or self.output_distillation > 0
        )

    @property
    def uses_teacher(self) -> bool:
        """A teacher is worth training and attaching: :attr:`needs_teacher`, or self-distillation, whose phi
        reads the teacher's next level when there is one (without, the student's own)."""
        return self.needs_teacher or (self.self_distillation and bool(self.encoder_levels))

    # ---- construction and serialisation ---------------------------------------------------------
    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterSpec":
        if not isinstance(data, dict):
            raise TypeError(f"a spec must be a mapping, got {type(data).__name__}")
        _reject_unknown(cls, data, f"spec {data.get('name', 'custom')!r}")
        return cls(**copy.deepcopy(data))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AdapterSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f)
        try:
            return cls.from_dict(data or {})
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @property
    def distills(self) -> bool:
        """Whether any distillation term is on: cross (Eq. 2), self (Eq. 3), attention transfer (Eq. 9), output."""
        return self.needs_teacher or (self.self_distillation and len(self.encoder_levels) > 1)

    def without_distillation(self) -> "AdapterSpec":
        """The same network with every distillation term off (cross, self, attention transfer, output) and the
        completion blocks and global-local fusion kept, untaught, as Net5 of Table 3 has them: the control of a
        distilled student. It needs no teacher."""
        sites = list(self.encoder_levels) if self.completion_sites is None else list(self.completion_sites)
        return dataclasses.replace(
            self, cross_distillation=False, self_distillation=False, output_distillation=0.0, completion_sites=sites,
            attention_sites=[dataclasses.replace(a, transfer=False) for a in self.attention_sites],
            name=f"{self.name} (no distillation)",
        )

    def for_trained_teacher(
        self,
        teacher_levels: list[str] | None = None,
        teacher_call: TeacherCall | dict | None = None,
        output_distillation: float = 1.0,
        output_scales: int = 4,
    ) -> "AdapterSpec":
        """This spec for distilling from a trained inpainting network of another architecture (compression).

        The teacher sees the student's input (``teacher_input: student_input``) and teaches through its
        prediction in the holes at ``output_scales`` resolutions with weight ``output_distillation``, plus, when
        ``teacher_levels`` names its encoder levels (one per student level), cross-distillation; self-distillation
        and completion blocks stay as they are. Attention transfer is switched off (a teacher of another
        architecture has no attention of the student's form; the attention modules and PGL stay).
        ``teacher_levels=None``: a black box (:mod:`kdinpaint.blackbox`): no feature term, cross-distillation off,
        self-distillation's phi reads the student's deeper feature. ``teacher_call``: how the teacher is called
        (a black box: ``teacher(image, mask)``, the default).
        """
        if teacher_levels is not None and len(teacher_levels) != len(self.encoder_levels):
            raise ValueError(
                f"spec {self.name!r} has {len(self.encoder_levels)} encoder levels {self.encoder_levels} but the teacher "
                f"{len(teacher_levels)} {list(teacher_levels)}; pair one teacher level with each student level"
            )
        if teacher_call is None:
            teacher_call = TeacherCall("separate", 0, 1, None)
        data = self.to_dict()
        data.update(
            teacher_levels=None if teacher_levels is None else list(teacher_levels),
            cross_distillation=self.cross_distillation and teacher_levels is not None,
            attention_sites=[{**a, "transfer": False} for a in data["attention_sites"]],
            teacher_input="student_input",
            teacher_call=dataclasses.asdict(teacher_call) if isinstance(teacher_call, TeacherCall) else dict(teacher_call),
            output_distillation=output_distillation,
            output_scales=output_scales,
            name=f"{self.name} (taught by a {'black box' if teacher_levels is None else 'trained network'})",
            variants={},
        )
        return AdapterSpec.from_dict(data)

    def for_blackbox(self, output_distillation: float = 1.0, output_scales: int = 4) -> "AdapterSpec":
        """This spec for a black-box teacher (:func:`kdinpaint.blackbox.load_blackbox`): no feature term (cross-
        distillation and attention transfer off), the teacher fed the student's input and compared in the holes
        at ``output_scales`` resolutions (:meth:`for_trained_teacher` with no teacher levels)."""
        return self.for_trained_teacher(None, None, output_distillation, output_scales)

    def variant(self, name: str | None) -> "AdapterSpec":
        """The spec with the named variant's overrides applied (``None`` or ``""``: this spec)."""
        if not name:
            return self
        if name not in self.variants:
            raise ValueError(f"spec {self.name!r} has no variant {name!r}; variants: {sorted(self.variants)}")
        data = self.to_dict()
        for key, value in self.variants[name].items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = copy.deepcopy(value)
        data["name"] = f"{self.name}:{name}"
        data["variants"] = {}
        return AdapterSpec.from_dict(data)


SpecLike = Union[AdapterSpec, dict, str, Path]


def load_spec(spec: SpecLike) -> AdapterSpec:
    """An ``AdapterSpec`` from a spec, a dict or a YAML path (a registered adapter's name: :func:`kdinpaint.plugins.resolve_spec`)."""
    if isinstance(spec, AdapterSpec):
        return spec
    if isinstance(spec, dict):
        return AdapterSpec.from_dict(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and (spec.endswith((".yaml", ".yml")) or Path(spec).is_file())):
        return AdapterSpec.from_yaml(spec)
    if isinstance(spec, str):
        raise ValueError(
            f"spec {spec!r} is not a YAML file; for a registered adapter's spec use kdinpaint.load_spec (which "
            "resolves names such as 'reference' or 'gatedconv:star')"
        )
    raise TypeError(
        f"spec must be an AdapterSpec, a dict, a YAML path or a registered adapter name, got {type(spec).__name__}"
    )
