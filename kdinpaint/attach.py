"""``attach()`` and the ``Distiller``: the paper's training-time additions, hooked into an unmodified model.

    kd = kdinpaint.attach(student, teacher, spec)
    pred = student(masked_image, mask)        # the user's own call; completion blocks act inside it
    losses = kd.losses(target=gt)             # teacher on gt; {"cross", "self", "total", ...}
    kd.detach()                               # the model exactly as before

What the hooks do, per forward of the student:

1. a pre-hook on the student's root binds the call, validates the mask (:func:`kdinpaint.masking.check_mask`)
   and opens a capture session (every buffer reset);
2. a forward hook on each encoder level records ``x_l``; at a completion site it first replaces the output
   by ``x'_l + f_ada-conv(x'_l) ⊙ M`` (Eq. 5), which is what the rest of the model sees;
3. a forward hook on the root (``always_call``) closes the session, even when the forward raised.

``losses()`` runs the frozen teacher under ``no_grad`` on the ground truth (teacher hooks record ``x*_l``),
evaluates Eq. (2) and (3) with the meta-networks, and clears every captured tensor before returning.

A black-box teacher (:mod:`kdinpaint.blackbox`: a TorchScript or ONNX file, or a function) has no modules to
hook: it teaches through its prediction only (``output_distillation``), and a spec asking it for features is
refused at attach time, naming the fields to switch off.

Nothing is registered on the student: its ``state_dict`` and parameters are untouched, the added modules
live in the Distiller. Theta (trained with the student) = completion blocks + alignment convs ``f_l``;
Psi (trained by Algorithm 1) = gamma, rho, phi.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from kdinpaint import _modules
import torch.nn.functional as F

from kdinpaint.blackbox import is_blackbox
from kdinpaint.blocks import CompletionBlock, GlobalLocalFusion, build_completion_blocks, build_fusions
from kdinpaint.calling import convention, select_output
from kdinpaint.losses._target import target as as_target
from kdinpaint.losses.attention_transfer import attention_transfer, attention_transfer_from_affinity
from kdinpaint.losses.distillation import cross_distillation, output_distillation_terms, self_distillation
from kdinpaint.masking import check_mask, mask_at, masked
from kdinpaint.meta import ChannelWeights, FeatureTransform, PixelWeights
from kdinpaint.plugins import resolve_spec
from kdinpaint.spec import AdapterSpec, SpecLike, TeacherCall

__all__ = ["attach", "Distiller"]

log = logging.getLogger(__name__)

BLACKBOX_CALL = TeacherCall("separate", 0, 1, None)  # how a black-box teacher is called: teacher(image, mask)
MAX_RESAMPLE = 8  # teacher and student levels further apart than this are refused as a wrong pairing
PLAUSIBLE_LEVELS = 6  # more encoder levels than this (and than resolutions) is warned about

# models that currently carry a Distiller (to refuse a second attach and deep copies of hooked models)
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Distiller]" = weakref.WeakKeyDictionary()


def is_attached(model: nn.Module) -> bool:
    return _modules.unwrap(model) in _ATTACHED


@dataclass
class _AttentionSite:
    """A resolved attention site: ``module`` (D in, att(D) out) and ``capture``, whose output is the affinity
    (``layout``) or, for a kdinpaint PixelAttention, the ``(q, k)`` pair (``from_qk``)."""

    module: str
    capture: str | None
    from_qk: bool
    layout: str
    transfer: bool
    fusion: bool


@dataclass
class _Session:
    """What one student forward (and the teacher pass of ``losses``) captured."""

    active: bool = False
    call: tuple[tuple, dict] | None = None
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    # level features by path; attention captures by ("att", i) and teacher attention inputs by ("d", i)
    student: dict[Any, Any] = field(default_factory=dict)
    teacher: dict[Any, Any] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    teacher_running: bool = False
    output: Any = None  # the student's output (kept only for output-level distillation)
    grad: bool = False  # whether the student's call computes gradients (taps run without them under checkpointing)

    def reset(self) -> None:
        self.active = False
        self.grad = False
        self.call = None
        self.image = None
        self.mask = None
        self.student.clear()
        self.teacher.clear()
        self.calls.clear()
        self.teacher_running = False
        self.output = None


@contextlib.contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a shape probe, restoring every module's training flag afterwards."""
    with _modules.training_mode(model, False), torch.no_grad():
        yield


class Distiller(nn.Module):
    """Owns every module and hook that :func:`attach` adds; see the module docstring.

    Submodules: ``student`` (the user's model, registered so one ``accelerator.prepare(kd)`` puts all
    trainable parameters under one DDP), ``blocks`` (completion blocks), ``align`` (``f_l``), ``gamma``,
    ``rho``, ``phi``. The teacher is held outside the module tree: frozen, in eval, not in ``state_dict``;
    ``kd.to(...)`` moves it along.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        spec: AdapterSpec,
        example_inputs: tuple | None = None,
        allow_empty: bool = False,
    ):
        super().__init__()
        if teacher is not None and (not isinstance(teacher, nn.Module) or isinstance(teacher, torch.jit.ScriptModule)):
            raise TypeError(
                f"the teacher is a {type(teacher).__name__}: a function or TorchScript module is a black box; wrap it "
                "with kdinpaint.blackbox.load_blackbox(teacher, range=..., channels=..., mask=...), which declares its "
                "conventions"
            )
        self._blackbox = teacher is not None and is_blackbox(_modules.unwrap(teacher))
        if self._blackbox:
            spec = _blackbox_spec(spec)
        _check_not_empty(spec, allow_empty)
        self.spec = spec
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule on purpose
        # plain references, not submodules (the student is already registered as `student`)
        object.__setattr__(self, "_root", _modules.unwrap(student))
        object.__setattr__(self, "_teacher_root", _modules.unwrap(teacher) if teacher is not None else None)
        if self._root in _ATTACHED:
            raise RuntimeError(
                f"{type(self._root).__name__} already has a Distiller attached; call kd.detach() on it first"
            )
        if teacher is not None and self._teacher_root is self._root:
            raise ValueError("the teacher must be a separate model; build one with kdinpaint.build_teacher(student)")
        if spec.needs_teacher and teacher is None:
            raise ValueError(
                f"spec {spec.name!r} uses cross-distillation or attention transfer, which need a teacher; "
                "pass one (kdinpaint.build_teacher(student) builds it from the student's architecture) or "
                "switch them off in the spec"
            )
        self._call = convention(self._root, spec)
        self._teacher_call = convention(self._teacher_root, spec, teacher=True) if teacher is not None else None
        self.levels = _modules.resolve(self._root, spec.encoder_levels, what=f"spec {spec.name!r} encoder_levels")
        self.sites = _modules.resolve(self._root, spec.sites, what=f"spec {spec.name!r} completion_sites") if spec.sites else []
        self.teacher_levels: list[str] = []
        if teacher is not None and self.levels and not self._blackbox:  # a black box has no levels to tap
            self.teacher_levels = _modules.resolve(
                self._teacher_root, spec.teacher_paths, what=f"spec {spec.name!r} teacher_levels"
            )
            if len(self.teacher_levels) != len(self.levels):
                raise ValueError(
                    f"spec {spec.name!r}: encoder_levels resolve to {len(self.levels)} student modules but "
                    f"{len(self.teacher_levels)} teacher modules; give teacher_levels explicitly"
                )
        self.attention = self._resolve_attention()
        self._session = _Session()
        self._handles: list[Any] = []
        self._teacher_flags: dict[nn.Parameter, bool] = {}

        shapes, teacher_shapes = self._probe(example_inputs)
        self._build(shapes, teacher_shapes)
        self._install()
        _ATTACHED[self._root] = self
        if teacher is not None:
            self._freeze_teacher()

    # ---- attach time ----------------------------------------------------------------------------
    def _resolve_attention(self) -> list[_AttentionSite]:
        sites = []
        for site in self.spec.attention_sites:
            what = f"spec {self.spec.name!r} attention_sites"
            for path in _modules.resolve(self._root, [site.module], what=what):
                capture, from_qk = None, False
                module_path = _modules.split_index(path)[0]  # the affinity is a submodule of the module itself
                if site.transfer:
                    if site.affinity is None:
                        capture, from_qk = f"{module_path}.qk", True
                        if not isinstance(getattr(_modules.get(self._root, path), "qk", None), nn.Module):
                            raise ValueError(
                                f"{what}: {path!r} is not a kdinpaint PixelAttention (it has no 'qk' submodule); "
                                "set `affinity` to the submodule (relative to the attention module) whose output "
                                "is the affinity, and its `layout`"
                            )
                    else:
                        # an element of the module's own output ("[1]": (out, weights) as nn.MultiheadAttention returns)
                        own = site.affinity.startswith("[")
                        joined = module_path + site.affinity if own else f"{module_path}.{site.affinity}"
                        capture = _modules.resolve(self._root, [joined], what=f"{what} affinity")[0]
                    if self.teacher is not None:
                        _modules.resolve(self._teacher_root, [path, capture], what=f"{what} (in the teacher)")
                sites.append(_AttentionSite(path, capture, from_qk, site.layout, site.transfer, site.fusion))
        return sites

    def _probe_inputs(self, example_inputs: tuple | None) -> tuple[tuple, dict]:
        if example_inputs is not None:
            if isinstance(example_inputs, dict):
                return (), dict(example_inputs)
            return tuple(example_inputs), {}
        ref = next(iter(self._root.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        B, C, H, W = self.spec.probe_shape
        image = torch.zeros(B, C, H, W, device=device, dtype=dtype)
        mask = torch.zeros(B, 1, H, W, device=device, dtype=dtype)
        mask[..., H // 4 : H // 2, W // 4 : W // 2] = 1
        return self._call.build(image, mask)

    def _probe(self, example_inputs: tuple | None) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
        """One forward of student and teacher with temporary taps: every tap fires once; record shapes."""
        args, kwargs = self._probe_inputs(example_inputs)
        image = self._call.get(args, kwargs, "image")
        mask = check_mask(self._call.get(args, kwargs, "mask"), image)

        def run(root: nn.Module, taps: list[str], a: tuple, kw: dict, who: str, loose: tuple[str, ...] = ()) -> dict:
            paths = list(dict.fromkeys([*taps, *loose]))  # a module may be both (a level and an affinity)
            shapes: dict[Any, Any] = {}
            counts: dict[str, int] = {p: 0 for p in paths}
            handles = []
            for path in paths:
                def hook(module, inputs, output, path=path):
                    counts[path] += 1
                    output = _tapped_element(output, path, who)
                    if path in loose:  # attention modules and captures: checked by _check_attention
                        shapes[("out", path)] = output
                        shapes[("in", path)] = inputs[0] if inputs else None
                        if path not in taps:
                            return
                    if isinstance(output, (tuple, list)):
                        raise TypeError(_untapped_tuple(output, path, who, "a (B, C, H, W) feature map"))
                    if not isinstance(output, torch.Tensor) or output.dim() != 4:
                        module_path, index = _modules.split_index(path)
                        what = (f"{who} module {path!r} returns" if index is None else
                                f"element [{index}] of {who} module {module_path!r} is")
                        raise TypeError(
                            f"{what} {type(output).__name__}"
                            f"{'' if not isinstance(output, torch.Tensor) else f' of shape {tuple(output.shape)}'}; "
                            "tap a module (or an element of its tuple output) that is a (B, C, H, W) feature map"
                        )
                    shapes[path] = output.shape

                handles.append(_modules.get(root, path).register_forward_hook(hook))
            problem = _binding_problem(root, a, kw)
            if problem is not None:
                raise ValueError(self._call_problem(who, root, a, kw, problem, binding=True))
            try:
                with _probing(root):
                    shapes["__output__"] = root(*a, **kw)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError) as e:  # e.g. a teacher of another channel count than it is given
                raise ValueError(self._call_problem(who, root, a, kw, f"{type(e).__name__}: {e}")) from e
            finally:
                for h in handles:
                    h.remove()
            never = [p for p, n in counts.items() if n == 0]
            if never:
                raise ValueError(
                    f"{who} module(s) {never} never ran in a forward of {type(root).__name__} with "
                    f"{tuple(image.shape)} inputs; name modules that the forward calls"
                )
            twice = {p: n for p, n in counts.items() if n > 1}
            if twice:
                raise ValueError(
                    f"{who} module(s) {twice} ran more than once in one forward (calls per module shown); "
                    "a tap must name a module called exactly once, e.g. a per-level block rather than a shared one"
                )
            return shapes

        att_paths = [p for site in self.attention for p in (site.module, site.capture) if p]
        shapes = run(self._root, list(dict.fromkeys(self.levels + self.sites)), args, kwargs, "student", tuple(att_paths))
        teacher_shapes: dict[Any, Any] = {}
        teacher_att = [p for site in self.attention if site.transfer for p in (site.module, site.capture)]
        # a black box is first called on the first batch (it may serve only the training size); it checks itself there
        probe_teacher = self.teacher_levels or teacher_att or self.spec.output_distillation > 0
        if self.teacher is not None and probe_teacher and not self._blackbox:
            ta, tkw = self._teacher_args(args, kwargs, image, mask)
            teacher_shapes = run(self._teacher_root, list(self.teacher_levels), ta, tkw, "teacher", tuple(teacher_att))
        self._check_pairs(shapes, teacher_shapes)
        for a, b in zip(self.levels, self.levels[1:]):
            (ha, wa), (hb, wb) = shapes[a][-2:], shapes[b][-2:]
            if self.spec.self_distillation and (ha % hb or wa % wb or ha // hb != wa // wb):
                raise ValueError(
                    f"self-distillation needs each level to shrink by an integer factor: {a!r} is {(ha, wa)}, "
                    f"{b!r} is {(hb, wb)}; order encoder_levels shallow to deep or switch self_distillation off"
                )
        self._check_attention(shapes, teacher_shapes)
        self._check_output(shapes, teacher_shapes)
        self._warn_implausible_levels(shapes)
        return shapes, teacher_shapes

    def _call_problem(self, who: str, root: nn.Module, args: tuple, kwargs: dict, problem: str, binding: bool = False) -> str:
        """The message for a probe call that ``root`` (the student or the teacher) refuses: the call, the problem, and
        the spec fields that made the call (for a teacher: teacher_input and teacher_call) with their fix."""
        spec, name = self.spec, type(root).__name__
        call = f"{name}({_describe_args(args, kwargs)})"
        required = _required_positional(root)
        two_args = len(required) >= 2
        if who == "student":
            if binding and self._call.concat and two_args:
                fix = (f"the spec's input is {spec.input!r} (one tensor torch.cat([image * (1 - mask), mask], 1)), but "
                       f"{name}.forward takes the image and the mask apart: set input: separate, image_arg: "
                       f"{required[0]!r}, mask_arg: {required[1]!r}")
            else:
                fix = (f"the spec's input={spec.input!r}, image_arg={spec.image_arg!r}, mask_arg={spec.mask_arg!r} and "
                       f"probe_shape={spec.probe_shape} say how it is called: fix them, or pass example_inputs= (a real call)")
            return f"the student {call} fails at attach time ({problem}); {fix}"
        how = (f"teacher_call={dataclasses.asdict(spec.teacher_call)}" if spec.teacher_call is not None else
               f"teacher_call is null, so it is called like the student (input={spec.input!r}, image_arg={spec.image_arg!r}, "
               f"mask_arg={spec.mask_arg!r})")
        field_ = "teacher_call.input: separate" if spec.teacher_call is not None else "teacher_call: {input: separate}"
        if binding and spec.teacher_input == "image_only" and two_args:
            fix = (f"teacher_input: image_only calls it with the image alone, but {name}.forward takes the image and the "
                   "mask: set teacher_input to empty_mask (the ground truth and no hole), same_mask or student_input")
        elif binding and spec.teacher_convention.input != "separate" and two_args:
            fix = (f"it is given one concatenated tensor ({how}), but {name}.forward takes the image and the mask apart: "
                   f"set {field_}, image_arg: {required[0]!r}, mask_arg: {required[1]!r}")
        else:
            channels = (f"the teacher expects another channel count than the {args[0].shape[1] if args and torch.is_tensor(args[0]) else ''} "
                        "it is given; " if "channels" in problem else "")
            fix = (f"{channels}teacher_input={spec.teacher_input!r} says what it sees and {how}: a teacher that takes other "
                   "inputs (another channel count, one concatenated tensor, no mask) needs teacher_call set to its own "
                   "convention (input, image_arg, mask_arg) and teacher_input to what it is fed")
        return f"the teacher {call} fails on the call the spec gives it ({problem}); {fix}"

    def _check_pairs(self, shapes: dict, teacher_shapes: dict) -> None:
        """A teacher of another architecture (class) may have levels of another resolution: they are resampled
        to the student's (bilinear, antialiased when shrinking) up to :data:`MAX_RESAMPLE` times apart. A
        teacher of the student's own class must match level for level (a mismatch is a wrong pairing)."""
        self._resampled: list[str] = []
        same_class = type(self._teacher_root) is type(self._root)
        for s_path, t_path in zip(self.levels, self.teacher_levels):
            (hs, ws), (ht, wt) = shapes[s_path][-2:], teacher_shapes[t_path][-2:]
            if (hs, ws) == (ht, wt):
                continue
            ratio = max(hs / ht, ht / hs, ws / wt, wt / ws)
            if same_class:
                raise ValueError(
                    f"student level {s_path!r} is {(hs, ws)} (H, W) but teacher level {t_path!r} is {(ht, wt)}; "
                    "pair levels of the same resolution (only a teacher of another architecture is resampled)"
                )
            if ratio > MAX_RESAMPLE:
                raise ValueError(
                    f"student level {s_path!r} is {(hs, ws)} (H, W) but teacher level {t_path!r} is {(ht, wt)}: "
                    f"{ratio:g} times apart; pair levels of the same (or a close) resolution in teacher_levels"
                )
            self._resampled.append(s_path)
        if self._resampled:
            log.info("teacher features resampled to the student's size at levels %s", self._resampled)

    def _check_output(self, shapes: dict, teacher_shapes: dict) -> None:
        if self.spec.output_distillation <= 0 or "__output__" not in teacher_shapes:  # a black box: at the first batch
            return
        pred = select_output(shapes["__output__"], self.spec.output)
        t_pred = select_output(teacher_shapes["__output__"], self.spec.teacher_convention.output)
        if pred.shape != t_pred.shape:
            raise ValueError(
                f"output_distillation compares the predictions, but the student returns {tuple(pred.shape)} and "
                f"the teacher {tuple(t_pred.shape)}; set teacher_call.output to the teacher's image prediction"
            )

    def _warn_implausible_levels(self, shapes: dict) -> None:
        """More encoder levels than resolutions: usually a glob that matched every layer of a level."""
        sizes = [tuple(shapes[p][-2:]) for p in self.levels]
        distinct = list(dict.fromkeys(sizes))
        if len(self.levels) > max(len(distinct), PLAUSIBLE_LEVELS):
            globbed = [p for p in self.spec.encoder_levels if _modules.is_glob(_modules.normalise_path(p))]
            warnings.warn(
                f"spec {self.spec.name!r}: encoder_levels expand to {len(self.levels)} modules at only {len(distinct)} "
                f"resolutions {distinct}"
                + (f" (from the glob(s) {globbed}; `*` matches one path segment, `**` any depth)" if globbed else "")
                + "; the paper's levels are one module per resolution, the last before it halves: name those "
                "(kdinpaint.suggest_spec proposes them)",
                UserWarning,
                stacklevel=4,
            )

    def _check_attention(self, shapes: dict, teacher_shapes: dict) -> None:
        """Affinity layouts as the spec says, teacher and student alike; record each site's widths."""
        self._att_info: list[dict[str, Any]] = []
        for site in self.attention:
            d, out = shapes[("in", site.module)], shapes[("out", site.module)]
            where = f"attention site {site.module!r}"
            if not isinstance(d, torch.Tensor) or d.dim() != 4:
                raise ValueError(f"{where}: its first positional input must be a (B, C, H, W) feature map")
            info: dict[str, Any] = {"channels": d.shape[1], "teacher_channels": None}
            if site.fusion and isinstance(out, (tuple, list)):
                raise ValueError(_untapped_tuple(out, site.module, f"{where}: the attention", "att(D), of D's shape "
                                                 f"{tuple(d.shape)}, for global-local fusion", key="attention_sites[].module"))
            if site.fusion and (not isinstance(out, torch.Tensor) or out.shape != d.shape):
                raise ValueError(
                    f"{where}: global-local fusion needs an output of the input's shape {tuple(d.shape)}, got "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                )
            if site.transfer:
                cap, t_cap = shapes[("out", site.capture)], teacher_shapes[("out", site.capture)]
                n_query = d.shape[-2] * d.shape[-1]
                if site.from_qk:
                    ok = isinstance(cap, tuple) and len(cap) == 2 and cap[0].dim() == 3 and cap[0].shape[1] == n_query
                    if not ok:
                        raise ValueError(f"{where}: {site.capture!r} must return (q, k) of shape (B, {n_query}, C)")
                    t_ok = isinstance(t_cap, tuple) and len(t_cap) == 2 and t_cap[0].shape[:2] == cap[0].shape[:2]
                    if not t_ok:
                        raise ValueError(f"{where}: teacher and student queries differ in shape; feed the teacher the same size")
                else:
                    if isinstance(cap, (tuple, list)):
                        raise ValueError(_untapped_tuple(cap, site.capture, f"{where}: the affinity", "the affinity",
                                                         key="attention_sites[].affinity"))
                    if not isinstance(cap, torch.Tensor):
                        raise ValueError(f"{where}: affinity {site.capture!r} returns {type(cap).__name__}, not a tensor")
                    if site.layout == "queries_keys" and (cap.dim() != 3 or cap.shape[1] != n_query):
                        raise ValueError(
                            f"{where}: affinity {site.capture!r} has shape {tuple(cap.shape)}, which is not the spec's "
                            f"layout queries_keys (B, {n_query} queries = {tuple(d.shape[-2:])}, keys); fix `layout`"
                        )
                    if site.layout == "keys_hw" and cap.dim() != 4:
                        raise ValueError(
                            f"{where}: affinity {site.capture!r} has shape {tuple(cap.shape)}, which is not the "
                            "spec's layout keys_hw (B, keys, H, W); fix `layout`"
                        )
                    if not isinstance(t_cap, torch.Tensor) or t_cap.shape != cap.shape:
                        raise ValueError(
                            f"{where}: teacher affinity {tuple(getattr(t_cap, 'shape', ()))} and student affinity "
                            f"{tuple(cap.shape)} differ; the teacher must see the same size (and, for patch "
                            "attention, the same mask: teacher_input: same_mask)"
                        )
                info["teacher_channels"] = teacher_shapes[("in", site.module)].shape[1]
            self._att_info.append(info)

    def _build(self, shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        spec = self.spec
        ref = next(iter(self._root.parameters()), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None and ref.is_floating_point() else {}
        # theta: completion blocks (predictors shared between equal widths if asked) and f_l
        c = spec.completion
        self.blocks = build_completion_blocks(
            [shapes[p][1] for p in self.sites], c.kernel_size, c.share_predictors, c.kernel_limit, c.offset_limit
        )
        self.align = nn.ModuleDict()
        self.gamma = nn.ModuleDict()
        self.rho = nn.ModuleDict()
        self.phi = nn.ModuleDict()
        hidden = spec.meta.hidden
        if spec.self_distillation:
            for i, (a, b) in enumerate(zip(self.levels, self.levels[1:])):
                stride = shapes[a][-2] // shapes[b][-2]
                self.align[str(i)] = nn.Conv2d(shapes[a][1], shapes[b][1], 3, stride=stride, padding=1)
                reader = teacher_shapes[self.teacher_levels[i + 1]][1] if teacher_shapes else shapes[b][1]
                self.phi[str(i)] = ChannelWeights(reader, shapes[b][1], hidden)
        if spec.cross_distillation and teacher_shapes:
            for i, (s_path, t_path) in enumerate(zip(self.levels, self.teacher_levels)):
                cs, ct = shapes[s_path][1], teacher_shapes[t_path][1]
                self.gamma[str(i)] = FeatureTransform(ct, cs, spec.meta.gamma_kernel_size)
                self.rho[str(i)] = ChannelWeights(ct, cs, hidden)
        fusion_sites = [i for i, site in enumerate(self.attention) if site.fusion]
        self.fusion = build_fusions(
            [self._att_info[i]["channels"] for i in fusion_sites], c.kernel_size, c.kernel_limit, c.offset_limit
        )
        self._fusion_index = {i: str(j) for j, i in enumerate(fusion_sites)}
        self.t = nn.ModuleDict(
            {str(i): PixelWeights(info["teacher_channels"]) for i, info in enumerate(self._att_info) if self.attention[i].transfer}
        )
        if factory:
            for name in ("blocks", "align", "gamma", "rho", "phi", "fusion", "t"):
                getattr(self, name).to(**factory)

    def _install(self) -> None:
        """Register every hook; the handles are owned here and removed by :meth:`_uninstall`."""
        root = self._root
        self._handles.append(root.register_forward_pre_hook(self._on_student_call, with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._on_student_return, always_call=True))
        block_of = {path: self.blocks[str(i)] for i, path in enumerate(self.sites)}
        for path in dict.fromkeys(self.levels + self.sites):
            module = _modules.get(root, path)
            hook = self._make_student_hook(path, block_of.get(path), record=path in self.levels)
            self._handles.append(module.register_forward_hook(hook))
        for i, site in enumerate(self.attention):
            fusion = self.fusion[self._fusion_index[i]] if site.fusion else None
            module = _modules.get(root, site.module)
            self._handles.append(module.register_forward_hook(self._make_attention_hook(site.module, fusion)))
            if site.transfer:
                capture = _modules.get(root, site.capture)
                self._handles.append(capture.register_forward_hook(self._make_capture_hook(("att", i), student=True)))
        if self.teacher is not None:
            for path in self.teacher_levels:
                module = _modules.get(self._teacher_root, path)
                self._handles.append(module.register_forward_hook(self._make_teacher_hook(path)))
            for i, site in enumerate(self.attention):
                if site.transfer:
                    t_root = self._teacher_root
                    hook = self._make_capture_hook(("d", i), student=False, take_input=True)
                    self._handles.append(_modules.get(t_root, site.module).register_forward_hook(hook))
                    hook = self._make_capture_hook(("att", i), student=False)
                    self._handles.append(_modules.get(t_root, site.capture).register_forward_hook(hook))

    def _uninstall(self) -> None:
        """Remove the hooks (captures of the call in progress stay: ``export()`` reinstalls right after)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _freeze_teacher(self) -> None:
        for p in self.teacher.parameters():
            self._teacher_flags[p] = p.requires_grad
            p.requires_grad_(False)
        self.teacher.eval()

    # ---- hooks ----------------------------------------------------------------------------------
    def _on_student_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        s = self._session
        s.reset()
        image = self._call.get(args, kwargs, "image")
        s.mask = check_mask(self._call.get(args, kwargs, "mask"), image)
        s.image = image
        s.call = (args, kwargs)
        s.grad = torch.is_grad_enabled()
        s.active = True

    def _on_student_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        s = self._session
        if s.active and self.spec.output_distillation > 0:
            s.output = output
        s.active = False

    def _make_student_hook(self, path: str, block: CompletionBlock | None, record: bool):
        clone = self.spec.clone_taps
        index = _modules.split_index(path)[1]  # an element of a tuple output: read, and replaced at a completion site

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            s = self._session
            if not s.active:
                if block is not None and _in_backward():
                    raise RuntimeError(
                        f"completion site {path!r} ran again in the backward pass: torch.utils.checkpoint recomputes the "
                        "block that holds it there, where the mask of its forward is unknown (a tapped module recomputed "
                        "under checkpointing is captured twice or not at all); checkpoint a block that holds no "
                        "completion site, or set completion_sites to modules outside the checkpointed block"
                    )
                if block is not None:
                    raise RuntimeError(
                        f"completion site {path!r} ran outside a call of the attached model, so the mask is "
                        "unknown; call the whole model with (image, mask)"
                    )
                return None  # an encoder level recomputed by non-reentrant checkpointing: its forward's capture stands
            _check_gradients(s, path, block is not None)
            n = s.calls.get(path, 0) + 1
            s.calls[path] = n
            if n > 1:
                raise RuntimeError(
                    f"module {path!r} ran {n} times in one forward; a tapped module must run once per forward "
                    "(tap a per-level module instead of a shared one)"
                )
            value = _modules.element(output, index)
            if block is not None:
                value = block(value, s.mask)
            if record:
                s.student[path] = value.clone() if clone else value
            return _modules.replace_element(output, index, value) if block is not None else None

        return hook

    def _make_attention_hook(self, path: str, fusion: GlobalLocalFusion | None):
        index = _modules.split_index(path)[1]  # fusion replaces that element of a tuple output

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            s = self._session
            if s.active:
                n = s.calls.get(path, 0) + 1
                s.calls[path] = n
                if n > 1:
                    raise RuntimeError(f"attention module {path!r} ran {n} times in one forward; name a module called once")
            if fusion is None:
                return None
            return _modules.replace_element(output, index, fusion(inputs[0], _modules.element(output, index)))

        return hook

    def _make_capture_hook(self, key: tuple, student: bool, take_input: bool = False):
        index = None if take_input else _modules.split_index(self.attention[key[1]].capture)[1]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            s = self._session
            if s.active and student:
                _check_gradients(s, self.attention[key[1]].module, False)  # key: ("att", site index)
            if (s.active and student) or (s.teacher_running and not student):
                (s.student if student else s.teacher)[key] = inputs[0] if take_input else _modules.element(output, index)

        return hook

    def _make_teacher_hook(self, path: str):
        clone = self.spec.clone_taps
        index = _modules.split_index(path)[1]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            s = self._session
            if s.teacher_running:
                if path in s.teacher:
                    raise RuntimeError(f"teacher module {path!r} ran twice in one forward; tap a module called once")
                value = _modules.element(output, index)
                s.teacher[path] = value.clone() if clone else value

        return hook

    # ---- training-time API ----------------------------------------------------------------------
    def _teacher_args(self, args: tuple, kwargs: dict, target: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, dict]:
        """The teacher's call: ``teacher_input`` says what it sees; called like the student (its other arguments
        kept) unless ``teacher_call`` gives its own convention."""
        mode = self.spec.teacher_input
        if mode == "image_only":
            return (target,), {}
        image = masked(target, mask) if mode == "student_input" else target
        hole = torch.zeros_like(mask) if mode == "empty_mask" else mask
        call = self._teacher_call
        if self.spec.teacher_call is not None:
            return call.build(image, hole)
        args, kwargs = call.replace(args, kwargs, "image", image)
        return call.replace(args, kwargs, "mask", hole)

    def run_teacher(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the frozen teacher on the ground truth of the last student call; its level features by path."""
        s = self._session
        if s.call is None:
            raise RuntimeError("call the attached model on (image, mask) before kd.losses()")
        if target.shape != s.image.shape:
            raise ValueError(
                f"target has shape {tuple(target.shape)} but the student's image was {tuple(s.image.shape)}; "
                "pass the ground truth of the same batch"
            )
        cache = getattr(self, "_teacher_cache", None)
        key = (id(target), id(s.mask))
        if cache is not None and key in cache:
            features = dict(cache[key][2])
            if not torch.is_autocast_enabled(target.device.type):  # features cached under autocast (e.g. bf16),
                # read by a full-precision pass (Algorithm 1's hypergradient): in the target's dtype
                features = {k: _cast_floats(v, target.dtype) for k, v in features.items()}
            return features
        args, kwargs = self._teacher_args(*s.call, target, s.mask)
        self.teacher.eval()
        s.teacher.clear()
        s.teacher_running = True
        try:
            with torch.no_grad():
                output = self.teacher(*args, **kwargs)
        finally:
            s.teacher_running = False
        if self.spec.output_distillation > 0:
            s.teacher["__output__"] = select_output(output, self.spec.teacher_convention.output)
        missing = [p for p in self.teacher_levels if p not in s.teacher]
        missing += [self.attention[i].module for i in range(len(self.attention)) if str(i) in self.t and ("att", i) not in s.teacher]
        if missing:
            raise RuntimeError(f"teacher module(s) {missing} did not run; check the spec's teacher_levels")
        if cache is not None:  # the tensors are kept in the entry, so their ids cannot be reused meanwhile
            cache[key] = (target, s.mask, dict(s.teacher))
        return dict(s.teacher)

    def losses(self, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Distillation losses of the last student forward; clears every captured tensor.

        Returns a dict of scalar tensors: ``cross`` (sum over levels of Eq. 2), ``self`` (sum of Eq. 3),
        ``att`` (Eq. 9), ``total`` (their sum, R_distil of Eq. 4, plus ``output_distillation`` times
        ``output`` when the spec asks for it), and per level ``cross/<path>``, ``self/<path>``,
        ``att/<path>``. With ``distill_scale: feature`` each level's term is divided by the mean square of
        its target (the teacher feature for Eq. 2, the deeper feature for Eq. 3).
        ``target``: the ground truth ``(B, C, H, W)`` in [-1, 1]; needed when the spec uses the teacher.
        """
        s = self._session
        try:
            if s.call is None:
                raise RuntimeError("call the attached model on (image, mask) before kd.losses()")
            missing = [p for p in self.levels if p not in s.student]
            if missing:
                raise RuntimeError(f"encoder level(s) {missing} did not run in the last forward of the student")
            missing = [site.module for i, site in enumerate(self.attention) if site.transfer and ("att", i) not in s.student]
            if missing:
                raise RuntimeError(f"attention site(s) {missing} did not run in the last forward of the student")
            teacher: dict[Any, Any] = {}
            if self.spec.output_distillation > 0 and s.output is None:
                raise RuntimeError("output_distillation needs the student's prediction: call the attached model itself")
            if self.teacher is not None and (self.teacher_levels or len(self.t) or self.spec.output_distillation > 0):
                if target is None:
                    raise ValueError("kd.losses(target=...) needs the ground truth: the teacher is fed with it")
                teacher = self.run_teacher(target)
            return self._compute(s, teacher)
        finally:
            s.reset()

    def _compute(self, s: _Session, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        zero = s.mask.new_zeros((), dtype=torch.promote_types(s.mask.dtype, torch.float32))
        feats = [s.student[p] for p in self.levels]
        t_feats = [teacher[p] for p in self.teacher_levels] if self.teacher_levels and teacher else []
        t_feats = [_resample(t, f.shape[-2:]) for t, f in zip(t_feats, feats)]
        scaled = self.spec.distill_scale == "feature"
        cross = zero
        for i, path in enumerate(self.levels):
            if str(i) not in self.gamma:
                continue
            term = cross_distillation(feats[i], self.gamma[str(i)](t_feats[i]), self.rho[str(i)](t_feats[i]), s.mask)
            if scaled:  # relative to the teacher feature's mean square (a constant: the teacher is frozen)
                term = term / _mean_square(t_feats[i])
            out[f"cross/{path}"] = term
            cross = cross + term
        self_term = zero
        for i, path in enumerate(self.levels[:-1]):
            if str(i) not in self.align:
                continue
            deeper = feats[i + 1]
            reader = t_feats[i + 1] if t_feats else as_target(deeper)
            term = self_distillation(self.align[str(i)](feats[i]), deeper, self.phi[str(i)](reader), s.mask)
            if scaled:  # relative to the deeper feature's mean square, a target like the feature itself
                term = term / _mean_square(as_target(deeper))
            out[f"self/{path}"] = term
            self_term = self_term + term
        att = zero
        for i, site in enumerate(self.attention):
            if not site.transfer:
                continue
            weights = self.t[str(i)](teacher[("d", i)])  # t(d^AN), (B, 1, h, w) on D's grid
            grid = weights.shape[-2:] if site.from_qk or site.layout == "queries_keys" else s.student[("att", i)].shape[-2:]
            if weights.shape[-2:] != grid:  # patch attention on a coarser grid than D
                weights = F.interpolate(weights, size=grid, mode="bilinear", align_corners=False)
            if site.from_qk:
                (q, k), (q_t, k_t) = s.student[("att", i)], teacher[("att", i)]
                term = attention_transfer(q, k, q_t, k_t, weights, s.mask)
            else:
                term = attention_transfer_from_affinity(s.student[("att", i)], teacher[("att", i)], weights, s.mask, site.layout)
            out[f"att/{site.module}"] = term
            att = att + term
        out["cross"] = cross
        out["self"] = self_term
        out["att"] = att
        out["total"] = cross + self_term + att
        if self.spec.output_distillation > 0:
            pred = select_output(s.output, self.spec.output)
            t_pred = teacher["__output__"]
            if pred.shape != t_pred.shape:
                who = "black-box teacher" if self._blackbox else "teacher"
                raise ValueError(f"student prediction {tuple(pred.shape)} and {who} prediction {tuple(t_pred.shape)} differ")
            # L1 between the predictions in the holes, per hole cell and channel, at output_scales resolutions
            terms = output_distillation_terms(pred, t_pred, mask_at(s.mask, pred.shape[-2:]), self.spec.output_scales)
            if len(terms) > 1:
                out.update({f"output/{2**k}": t for k, t in enumerate(terms)})  # keyed by the pooling factor
            term = torch.stack(terms).sum()
            out["output"] = term
            out["total"] = out["total"] + self.spec.output_distillation * term
        return out

    def forward(self, *args: Any, kd_target: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Calls the student (hooks active); with ``kd_target`` returns ``(output, kd.losses(kd_target))``.

        Use it when the Distiller itself is wrapped (DDP, ``torch.func.functional_call``): the losses are then
        computed inside the wrapped call, with the wrapped parameters.
        """
        out = self.student(*args, **kwargs)
        return out if kd_target is None else (out, self.losses(kd_target))

    @contextlib.contextmanager
    def reusing_teacher(self) -> Iterator[None]:
        """Within this block, run the teacher once per ground-truth tensor and reuse its features.

        Valid while the batch and the mask stay the same (the T steps of Algorithm 1 on one batch); the
        teacher is frozen, so its features do not change.
        """
        if getattr(self, "_teacher_cache", None) is not None:  # already inside such a block
            yield
            return
        self._teacher_cache = {}
        try:
            yield
        finally:
            self._teacher_cache = None

    # ---- what training and export use ------------------------------------------------------------
    @property
    def call(self) -> Any:
        """The student's calling convention (:class:`kdinpaint.calling.Convention`): ``call.build(image, mask)``
        gives the ``(args, kwargs)`` of one call in toolkit conventions, ``call.get(args, kwargs, "mask")`` finds
        an input again."""
        return self._call

    def student_copy(self) -> nn.Module:
        """A deep copy of the student's root module without the Distiller's hooks (the hooks stay on the original)."""
        attached = self.attached
        self._uninstall()
        try:
            return copy.deepcopy(self._root)
        finally:
            if attached:
                self._install()

    def drop_captures(self) -> None:
        """Forget the features captured by the last call (a call whose losses are not wanted)."""
        self._session.reset()

    # ---- parameters -----------------------------------------------------------------------------
    def student_parameters(self) -> Iterator[nn.Parameter]:
        """Theta added by kdinpaint (completion blocks, f_l, PGL); optimise them with ``student.parameters()``."""
        seen: set[int] = set()
        for name in ("blocks", "align", "fusion"):
            for p in getattr(self, name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        """Psi: gamma, rho, phi (and t); trained by the bilevel scheme of Algorithm 1."""
        for name in ("gamma", "rho", "phi", "t"):
            yield from getattr(self, name).parameters()

    # ---- modes, devices, lifecycle --------------------------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval whatever train() is called
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn)
        return self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> nn.Module:
        """Remove every hook and restore the teacher's flags; returns the student, exactly as before."""
        self._uninstall()
        self._session.reset()
        for p, flag in self._teacher_flags.items():
            p.requires_grad_(flag)
        self._teacher_flags.clear()
        if _ATTACHED.get(self._root) is self:
            del _ATTACHED[self._root]
        return self.student

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def export(self) -> nn.Module:
        """A standalone copy: student + completion blocks, nothing training-only (:mod:`kdinpaint.export`)."""
        from kdinpaint.export import CompletedModel

        return CompletedModel.from_distiller(self)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, levels={self.levels}, sites={self.sites}, attached={self.attached}"


def _blackbox_spec(spec: AdapterSpec) -> AdapterSpec:
    """``spec`` for a black-box teacher, called ``teacher(image, mask)``; a ``ValueError`` naming every field that
    asks it for what it cannot give (features, or nothing at all)."""
    problems = []
    if spec.encoder_levels and spec.cross_distillation:
        problems.append("cross_distillation: false (Eq. 2 reads the teacher's encoder features)")
    if spec.teacher_levels is not None:
        problems.append("teacher_levels: null (there are no modules inside a black box to tap; self-distillation's phi "
                        "then reads the student's deeper feature)")
    transfer = [a.module for a in spec.attention_sites if a.transfer]
    if transfer:
        problems.append(f"transfer: false in attention_sites {transfer} (Eq. 9 reads the teacher's affinities)")
    if spec.output_distillation <= 0:
        problems.append("output_distillation > 0 (its prediction is all a black box can teach)")
    if spec.teacher_input in ("empty_mask", "image_only"):
        problems.append(f"teacher_input: student_input, not {spec.teacher_input} (a trained inpainting network must "
                        "see the student's holes to fill them)")
    if spec.teacher_call is not None and spec.teacher_call != BLACKBOX_CALL:
        problems.append("teacher_call: null (a black box is called teacher(image, mask) in the toolkit's conventions; "
                        "its own range, channels and mask go to load_blackbox)")
    if problems:
        raise ValueError(
            f"spec {spec.name!r} cannot distil from a black-box teacher; set " + "; ".join(problems)
            + ". spec.for_blackbox() makes these changes"
        )
    return dataclasses.replace(spec, teacher_call=BLACKBOX_CALL)


def _in_backward() -> bool:
    """Whether this code runs inside autograd's backward pass (where torch.utils.checkpoint recomputes its blocks)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _check_gradients(s: _Session, path: str, completion: bool) -> None:
    """Refuse a tap that runs without gradients inside a student call that computes them: reentrant checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)`` runs its block under ``no_grad`` and again in the backward
    pass) would leave the captured feature, and a completion block there, without any gradient."""
    if s.grad and not torch.is_grad_enabled():
        what = "its captured feature and its completion block" if completion else "its captured feature"
        raise RuntimeError(
            f"tapped module {path!r} ran without gradients inside a forward that computes them: torch.utils.checkpoint "
            "with use_reentrant=True (or a torch.no_grad() region of the model) runs it so, and recomputes it in the "
            f"backward pass, so {what} would get no gradient (a tapped module recomputed under checkpointing is "
            "captured twice or not at all); pass use_reentrant=False (encoder levels inside the block are then "
            "captured once, correctly; completion sites must stay outside it), or tap a module outside the "
            "checkpointed block"
        )


def _describe_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)}"
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__} of {len(v)}"
    return type(v).__name__


def _describe_elements(output: tuple | list) -> str:
    """``[0] tensor (1, 8, 16, 16), [1] tensor (1, 3)``: the elements of a tuple output by index and shape."""
    return ", ".join(f"[{i}] {_describe_value(v)}" for i, v in enumerate(output))


def _tapped_element(output: Any, path: str, who: str) -> Any:
    """The element of ``output`` that the tap ``path`` names (``output`` itself without an index); a ``TypeError`` /
    ``IndexError`` naming the elements when the module's output has no such element."""
    module_path, index = _modules.split_index(path)
    if index is None:
        return output
    if not isinstance(output, (tuple, list)):
        raise TypeError(
            f"{who} tap {path!r} names element [{index}], but module {module_path!r} returns {_describe_value(output)}, "
            f"not a tuple or list; name the module alone: {module_path!r}"
        )
    if index >= len(output):
        raise IndexError(
            f"{who} tap {path!r} names element [{index}], but module {module_path!r} returns a {type(output).__name__} "
            f"of {len(output)}: {_describe_elements(output)}; index one of them, counting from 0"
        )
    return output[index]


def _untapped_tuple(output: tuple | list, path: str, who: str, wanted: str, key: str = "") -> str:
    """The refusal of a tap on a module returning a tuple or list without an element index: its elements with their
    shapes (from the attach-time probe) and the ``path[N]`` syntax, with the first element that fits as example."""
    maps = [i for i, v in enumerate(output) if isinstance(v, torch.Tensor) and v.dim() == 4]
    where = key or "encoder_levels, teacher_levels or completion_sites"
    fix = (f"name the element that is {wanted} by its index, e.g. '{path}[{maps[0]}]' in {where}" if maps else
           "none of them is a (B, C, H, W) feature map: tap another module")
    note = "" if key else " (a completion site on an element replaces that element only)"
    return f"{who} module {path!r} returns a {type(output).__name__} of {len(output)}: {_describe_elements(output)}; {fix}{note}"


def _describe_args(args: tuple, kwargs: dict) -> str:
    """``tensor (1, 3, 64, 64), mask=tensor (1, 1, 64, 64)``: a call's arguments by shape."""
    def one(v: Any) -> str:
        return f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    return ", ".join([*(one(a) for a in args), *(f"{k}={one(v)}" for k, v in kwargs.items())])


def _required_positional(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module.forward`` that must be given (positional, no default)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _binding_problem(module: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why ``module(*args, **kwargs)`` does not fit the signature of its ``forward`` (None when it fits or has none)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # builtins or C extensions without a signature
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        return f"{type(module).__name__}.forward{signature}: {e}"
    return None


def _check_not_empty(spec: AdapterSpec, allow_empty: bool) -> None:
    """Refuse a spec that taps nothing (no encoder level, completion site or attention site, no output term) unless
    ``allow_empty``: attached, it would add nothing and ``kd.losses()["total"]`` would be 0 for every batch."""
    if allow_empty or spec.encoder_levels or spec.sites or spec.output_distillation > 0:
        return
    if any(a.transfer or a.fusion for a in spec.attention_sites):
        return
    raise ValueError(
        f"spec {spec.name!r} taps no module: encoder_levels, completion_sites and attention_sites (with transfer or "
        "fusion) are empty and output_distillation is 0, so attach would add nothing and every distillation loss would "
        "be 0. Name the encoder levels (kdinpaint spec suggest drafts them from the model), or pass allow_empty=True "
        "to attach the network as it is (a baseline trained without distillation)"
    )


def _resample(t: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """A teacher feature at the student's (H, W): bilinear, antialiased when shrinking (no gradient flows
    into the frozen teacher, so the antialiased kernel's missing double backward does not matter)."""
    if t.shape[-2:] == size:
        return t
    shrink = t.shape[-2] > size[0] or t.shape[-1] > size[1]
    return F.interpolate(t.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink).to(t.dtype)


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x**2`` over every element, in at least float32, kept away from 0."""
    return x.float().pow(2).mean().clamp_min(1e-8)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (also inside tuples and lists) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_cast_floats(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def attach(
    model: nn.Module,
    teacher: nn.Module | None = None,
    spec: SpecLike | None = None,
    *,
    example_inputs: tuple | dict | None = None,
    allow_empty: bool = False,
) -> Distiller:
    """Attach the paper's distillation to ``model`` with forward hooks; returns the :class:`Distiller`.

    Args:
        model: the inpainting network (student), possibly wrapped by DDP or ``torch.compile``.
        teacher: the auxiliary network fed the ground truth (frozen while attached); ``None`` only when the
            spec uses neither cross-distillation nor attention transfer.
        spec: an :class:`AdapterSpec`, a dict, a YAML path, or a registered adapter name ``name[:variant]``.
        example_inputs: arguments of one call of ``model`` for the attach-time probe (a tuple of positional
            arguments or a dict of keyword arguments); default: zeros of the spec's ``probe_shape``.
        allow_empty: accept a spec that taps nothing (a network trained as released, e.g. ``reference:baseline``);
            without it such a spec is refused, since its losses would be 0 for every batch.
    """
    if spec is None:
        raise ValueError("attach() needs a spec: an AdapterSpec, a dict like {'encoder_levels': [...]}, a YAML path or an adapter name")
    return Distiller(model, teacher, resolve_spec(spec), example_inputs, allow_empty)
