"""Automatic draft specs: find a model's encoder levels and attention modules from one traced forward.

:func:`suggest_spec` runs the model once (eval mode, no grad) with temporary hooks on every module and a
``TorchFunctionMode`` that sees every softmax, then removes them all. From that trace:

- **Encoder levels** (the paper's level boundaries, Eq. 2, 3, 5): along the order in which modules finish,
  the feature-map size first shrinks (encoder) and then grows (decoder). For each resolution of the
  encoder, the breakpoint is the last module at that resolution before it halves (at the deepest
  resolution, which never halves, the first module to reach it: later ones there are bottleneck or
  decoder, e.g. the reference network's ``dec3``/``att3``); the level is the
  outermost module that ends there and produces only maps of that resolution (``down1``, not the
  ``encoder`` container around all levels). Levels at the input resolution are left out by default
  (``min_reduction=2``); global ``1×1`` maps (squeeze-excitation, pooling), softmax outputs (affinities) and maps
  not shrunk alike in height and width (a Fourier unit's half spectrum, ``W // 2 + 1`` wide) are ignored. A
  module returning a tuple or list is proposed at its first element that is a feature map (``down1[0]``); one
  with no such element is not proposed. Every proposed level is one :func:`kdinpaint.attach` accepts: called once
  per forward, each shrinking the one before by one integer factor in height and width (self-distillation); a
  candidate that is not is left out, with a note saying why. A model of several encoder-decoder stages (e.g.
  coarse and refinement networks) gets the stage with the most levels (the last one on a tie); the others are
  reported in the notes.
- **Attention candidates** (Eq. 7-10): modules in whose forward a softmax runs over as many entries as a
  feature map of the forward has spatial positions. When the softmax is an ``nn.Softmax`` submodule, the
  spec gets an :class:`~kdinpaint.spec.AttentionSite` with that submodule as its affinity (when the module's input
  is a feature map and the affinity has the layout attach reads; otherwise a note says why not); a functional
  softmax or a fused ``scaled_dot_product_attention`` (which never materialises the affinity) is only
  reported in the notes, since kdinpaint cannot tap it as it is.

- **Call convention**: a model called with one tensor whose last (or first) channel is a binary mask gets
  ``input: concat`` (``concat_mask_first``), the convention ``torch.cat([image * (1 - mask), mask], 1)``.

The result is a draft to read and edit (``kdinpaint spec suggest`` prints it as YAML with the notes).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kdinpaint._modules import training_mode
from kdinpaint.calling import CallConvention
from kdinpaint.masking import masked
from kdinpaint.spec import AdapterSpec, AttentionSite

__all__ = ["suggest_spec", "analyse", "example_call", "Suggestion", "SoftmaxSite"]

log = logging.getLogger(__name__)

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_FUSED = {F.scaled_dot_product_attention}
_NORMALISERS = (nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin)  # their outputs are distributions, not features


@dataclass
class _Call:
    """One module call: nesting interval [start, end] in the hook order, and its output's (H, W)."""

    path: str
    start: int
    end: int = -1
    size: tuple[int, int] | None = None
    index: int | None = None  # the element of a tuple / list output that is the feature map
    elements: str | None = None  # a tuple / list output described by index (for the notes)
    maps: list[int] = field(default_factory=list)  # the indices of its elements that are feature maps
    input_shape: tuple[int, ...] | None = None  # of the first positional argument, when a tensor

    @property
    def tap(self) -> str:
        """The path as a spec names it: ``down1``, or ``down1[0]`` for an element of a tuple output."""
        return self.path if self.index is None else f"{self.path}[{self.index}]"


@dataclass
class SoftmaxSite:
    """A softmax over spatial positions seen in the forward.

    ``module``: the module whose forward ran it (the attention module); ``affinity``: the ``nn.Softmax``
    submodule that computed it, or ``None`` (functional softmax / fused attention); ``length``: the number
    of positions normalised over; ``layout``: ``queries_keys`` (… × N_q × N_k) or ``keys_hw`` (B × N_k × H × W).
    """

    module: str
    affinity: str | None
    length: int
    layout: str
    fused: bool = False
    shape: tuple[int, ...] = ()  # of the softmax's output


@dataclass
class Suggestion:
    """What :func:`analyse` found: the draft spec and the evidence behind it."""

    spec: AdapterSpec
    level_sizes: list[tuple[int, int]] = field(default_factory=list)
    attention: list[SoftmaxSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _SoftmaxWatch(TorchFunctionMode):
    def __init__(self, on_softmax):  # noqa: ANN001
        super().__init__()
        self.on_softmax = on_softmax

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in _SOFTMAX or func in _FUSED:
            self.on_softmax(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _traced(model: nn.Module) -> Iterator[tuple[list[_Call], list[tuple[Any, tuple, dict, list[_Call]]]]]:
    """Temporary hooks on every module recording call intervals and output sizes; softmaxes with their stack."""
    calls: list[_Call] = []
    softmaxes: list[tuple[Any, tuple, dict, list[_Call]]] = []
    stack: list[_Call] = []
    clock = [0]

    def pre(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            clock[0] += 1
            stack.append(_Call(path, clock[0]))
            if args and isinstance(args[0], torch.Tensor):
                stack[-1].input_shape = tuple(args[0].shape)
            calls.append(stack[-1])
        return hook

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        clock[0] += 1
        call = stack.pop()
        call.end = clock[0]
        if isinstance(output, (tuple, list)):  # tapped by index: the first element that is a feature map
            call.maps = [i for i, v in enumerate(output) if _is_map(v)]
            call.elements = ", ".join(
                f"[{i}] {f'tensor {tuple(v.shape)}' if isinstance(v, torch.Tensor) else type(v).__name__}"
                for i, v in enumerate(output)
            )
            if call.maps:
                call.index = call.maps[0]
                output = output[call.index]
        if _is_map(output):
            call.size = (int(output.shape[-2]), int(output.shape[-1]))

    handles = []
    try:
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(path)))
            handles.append(module.register_forward_hook(post, always_call=True))
        with training_mode(model, False), torch.no_grad():
            with _SoftmaxWatch(lambda f, a, kw: softmaxes.append((f, a, kw, list(stack)))):
                yield calls, softmaxes
    finally:
        for h in handles:
            h.remove()


def _is_map(v: Any) -> bool:
    """A ``(B, C, H, W)`` tensor with more than one position (global ``1×1`` maps are not resolutions)."""
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-2:].numel() > 1


def _alike(size: tuple[int, int], input_size: tuple[int, int]) -> bool:
    """Whether ``size`` is ``input_size`` shrunk about alike in H and W (within 25 %, which rounding and padding
    stay within): a Fourier unit's half spectrum (H, W // 2 + 1) is not; its smallest case, 4 -> 3, is a third off."""
    fh, fw = input_size[0] / size[0], input_size[1] / size[1]
    return max(fh, fw) <= 1.25 * min(fh, fw)


def _shrinks(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether ``b`` is ``a`` divided by one integer factor in H and W: what attach's self-distillation needs."""
    return a[0] % b[0] == 0 and a[1] % b[1] == 0 and a[0] // b[0] == a[1] // b[1]


def _stages(events: list[_Call]) -> list[list[_Call]]:
    """Split the finishing order into encoder stages: runs where the map size does not grow."""
    stages: list[list[_Call]] = []
    growing, prev = True, None
    for e in events:
        area = e.size[0] * e.size[1]
        if growing and prev is not None and area >= prev:
            prev = area  # still in a decoder (or before the first encoder)
            continue
        if growing:
            stages.append([])
            growing = False
        if stages[-1] and area > min(c.size[0] * c.size[1] for c in stages[-1]):
            growing, prev = True, area
            continue
        stages[-1].append(e)
        prev = area
    return [s for s in stages if s]


def _levels(stage: list[_Call], calls: list[_Call], once: set[str], input_size: tuple[int, int], min_reduction: int,
            notes: list[str]) -> list[_Call]:
    sizes = list(dict.fromkeys(e.size for e in stage))
    levels = []
    for i, size in enumerate(sizes):
        if input_size[0] < min_reduction * size[0] and input_size[1] < min_reduction * size[1]:
            continue
        smaller = [e.end for e in stage if sizes.index(e.size) > i]
        at_size = [e for e in stage if e.size == size]
        if smaller:  # the last module at this resolution before it halves
            b = max((e for e in at_size if e.end < min(smaller)), key=lambda e: e.end)
        else:  # the deepest resolution: the module that reaches it (what follows there is bottleneck/decoder)
            b = min(at_size, key=lambda e: e.end)
        outer = [
            c for c in calls
            if c.path and c.path in once and c.size == size and c.start <= b.start and c.end >= b.end
            and all(d.size == size for d in calls if d.size and c.start <= d.start and d.end <= c.end)
        ]
        level = min(outer, key=lambda c: c.start) if outer else b
        for c in calls:  # a wrapper that would be the level but returns a tuple with no feature map in it
            if (c.path and c.path in once and c.elements is not None and not c.maps and c.start < level.start
                    and c.end >= level.end
                    and all(d.size == size for d in calls if d.size and c.start <= d.start and d.end <= c.end)):
                notes.append(f"{c.path!r} returns a tuple with no (B, C, H, W) element ({c.elements}), so attach cannot "
                             f"tap it; proposed {level.tap!r} inside it")
        levels.append(level)
    return levels


def _attachable(levels: list[_Call], counts: dict[str, int], notes: list[str]) -> list[_Call]:
    """The levels that attach accepts as a chain (called once, each shrinking the one before by one integer factor
    in H and W); a note for each one left out, saying why."""
    kept: list[_Call] = []
    for c in levels:
        if counts.get(c.path, 0) != 1:
            notes.append(f"level candidate {c.tap!r} is called {counts.get(c.path, 0)} times per forward; left out (attach "
                         "taps a module called once): name a per-level module there yourself")
        elif kept and not _shrinks(kept[-1].size, c.size):
            notes.append(f"level candidate {c.tap!r} ({c.size[0]}x{c.size[1]}) is not {kept[-1].tap!r} "
                         f"({kept[-1].size[0]}x{kept[-1].size[1]}) shrunk by one integer factor in H and W, as "
                         "self-distillation needs; left out")
        else:
            kept.append(c)
    for c in kept:
        if c.index is not None:
            others = [i for i in c.maps if i != c.index]
            notes.append(f"level {c.tap!r}: {c.path!r} returns a tuple ({c.elements}); element [{c.index}] is tapped"
                         + (f" (element(s) {others} are feature maps too: name another with {c.path}[N])" if others else ""))
    return kept


def _bind(model: nn.Module, example_inputs: tuple | dict) -> tuple[tuple, dict, list[str]]:
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return args, kwargs, names


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all()) and bool((x == 1).any())


def _concat_input(maps: list[tuple[Any, torch.Tensor]], mask_arg: Any) -> str | None:
    """``concat`` / ``concat_mask_first`` when the call is one map with a binary last / first channel and no
    separate 1-channel mask; ``None`` otherwise."""
    if mask_arg is not None or any(v.shape[1] == 1 for _, v in maps) or len(maps) != 1 or maps[0][1].shape[1] < 2:
        return None
    x = maps[0][1]
    if _is_binary(x[:, -1:]):
        return "concat"
    if _is_binary(x[:, :1]):
        return "concat_mask_first"
    return None


def _find_args(
    args: tuple, kwargs: dict, names: list[str], image_arg: Any, mask_arg: Any, input: str | None = None
) -> tuple[Any, Any, torch.Tensor, str]:
    """The spec's image_arg / mask_arg (parameter names where known), the image tensor and the input
    convention (for ``concat``: the one tensor's place, ``mask_arg`` None, and its image channels)."""
    slots: list[tuple[Any, torch.Tensor]] = [(names[i] if i < len(names) else i, a) for i, a in enumerate(args)]
    slots += list(kwargs.items())
    maps = [(k, v) for k, v in slots if isinstance(v, torch.Tensor) and v.dim() == 4]
    lookup = dict(slots)
    lookup.update({i: a for i, a in enumerate(args)})
    if input is None:
        input = _concat_input(maps, mask_arg) or "separate"
    if input != "separate":
        if image_arg is None:
            if not maps:
                raise ValueError("no (B, C + 1, H, W) tensor among example_inputs; pass image_arg= (a parameter name or position)")
            image_arg = maps[0][0]
        if image_arg not in lookup:
            raise ValueError(f"image_arg={image_arg!r} is not among the example inputs ({list(dict(slots))})")
        x = lookup[image_arg]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] < 2:
            raise ValueError(f"input: {input} needs one (B, C + 1, H, W) tensor at image_arg={image_arg!r}")
        return image_arg, None, (x[:, :-1] if input == "concat" else x[:, 1:]), input
    if mask_arg is None:
        found = [k for k, v in maps if v.shape[1] == 1]
        if not found:
            raise ValueError(
                "no (B, 1, H, W) mask among example_inputs; pass mask_arg= (a parameter name or position), or, for a "
                "model called with one tensor torch.cat([image * (1 - mask), mask], 1), input='concat'"
            )
        mask_arg = found[0]
    if image_arg is None:
        found = [k for k, v in maps if k != mask_arg]
        if not found:
            raise ValueError("no (B, C, H, W) image among example_inputs; pass image_arg= (a parameter name or position)")
        image_arg = found[0]
    for arg, what in ((image_arg, "image_arg"), (mask_arg, "mask_arg")):
        if arg not in lookup:
            raise ValueError(f"{what}={arg!r} is not among the example inputs ({list(dict(slots))})")
    return image_arg, mask_arg, lookup[image_arg], input


def _takes_one_tensor(model: nn.Module) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params)


def example_call(
    model: nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    image_arg: str | int | None = None,
    mask_arg: str | int | None = None,
    input: str | None = None,
) -> tuple[tuple | dict, str]:
    """Example inputs of one call of ``model`` on ``(image, mask)`` for :func:`analyse`, and the convention.

    ``input=None``: ``concat`` when the model's ``forward`` takes one required argument (and no mask place
    is given), else ``separate``; the image is passed masked, as kdinpaint passes it.
    """
    if input is None:
        input = "concat" if mask_arg is None and _takes_one_tensor(model) else "separate"
    call = CallConvention(model, 0 if image_arg is None else image_arg, 1 if mask_arg is None else mask_arg, input)
    args, kwargs = call.build(masked(image, mask), mask)
    if args and kwargs:
        raise ValueError("the example call mixes positional and keyword arguments; give image_arg and mask_arg alike")
    return (kwargs if kwargs and not args else args), input


def _output_key(output: Any, image: torch.Tensor) -> tuple[Any, str | None]:
    if isinstance(output, torch.Tensor):
        return None, None
    items = list(output.items()) if isinstance(output, dict) else list(enumerate(output)) if isinstance(output, (tuple, list)) else []
    for key, value in reversed(items):  # the last image-shaped output: the refined one of multi-stage nets
        if isinstance(value, torch.Tensor) and value.shape == image.shape:
            return key, f"output: the model returns {type(output).__name__}; picked {key!r}, the last one shaped like the image"
    return None, f"output: could not find an image-shaped tensor in the model's {type(output).__name__}; set `output`"


def _attention_problem(site: SoftmaxSite, d_shape: tuple[int, ...] | None) -> str | None:
    """Why attach would refuse ``site`` as an attention site (its input D is not a feature map, or the affinity does
    not have the layout attach reads), or ``None``."""
    if d_shape is None or len(d_shape) != 4:
        return f"its first input is {'not a tensor' if d_shape is None else f'of shape {d_shape}'}, not a (B, C, H, W) feature map"
    shape = site.shape
    if site.layout == "queries_keys" and (len(shape) != 3 or shape[1] != d_shape[-2] * d_shape[-1]):
        return (f"its affinity {shape} is not (B, queries, keys) with one query per position of its input "
                f"{tuple(d_shape[-2:])}")
    if site.layout == "keys_hw" and len(shape) != 4:
        return f"its affinity {shape} is not (B, keys, H, W)"
    return None


def _softmax_site(func: Any, args: tuple, kwargs: dict, stack: list[_Call], modules: dict[str, nn.Module]) -> SoftmaxSite | None:
    frames = [c for c in stack if c.path]  # the root's own forward is not a candidate module
    if not frames:
        return None
    x = args[0] if args else kwargs.get("input")
    if func in _FUSED:
        k = args[1] if len(args) > 1 else kwargs.get("key")
        return SoftmaxSite(frames[-1].path, None, int(k.shape[-2]), "queries_keys", fused=True)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:
        dim = 0 if x.dim() in (0, 1, 3) else 1  # torch's legacy implicit dim
    dim = dim % x.dim()
    layout = "keys_hw" if x.dim() == 4 and dim == 1 else "queries_keys"
    if isinstance(modules[frames[-1].path], nn.Softmax):
        if len(frames) < 2:
            return None
        return SoftmaxSite(frames[-2].path, frames[-1].path, int(x.shape[dim]), layout, shape=tuple(x.shape))
    return SoftmaxSite(frames[-1].path, None, int(x.shape[dim]), layout, shape=tuple(x.shape))


def analyse(
    model: nn.Module,
    example_inputs: tuple | dict,
    *,
    image_arg: str | int | None = None,
    mask_arg: str | int | None = None,
    input: str | None = None,
    min_reduction: int = 2,
    name: str = "suggested",
) -> Suggestion:
    """Trace one forward of ``model`` on ``example_inputs`` and draft its spec; see the module docstring.

    Args:
        model: the inpainting network (its forward must run on ``example_inputs``).
        example_inputs: one call's arguments, a tuple (positional) or a dict (keyword), e.g.
            ``(image, mask)`` with image ``(B, 3, H, W)`` in [-1, 1] and mask ``(B, 1, H, W)``, 1 = hole.
        image_arg / mask_arg: where the image / mask are (parameter name or position); ``None``: the mask is
            the first 1-channel map, the image the first other map.
        input: the spec's ``input`` (``separate``, ``concat``, ``concat_mask_first``); ``None``: ``concat``
            when the call is one tensor whose last channel is a binary mask (``concat_mask_first``: the first),
            else ``separate``.
        min_reduction: keep levels at least this many times smaller than the input (1: keep full resolution).
        name: the draft spec's name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(min_reduction, int) or min_reduction < 1:
        raise ValueError(f"min_reduction must be a positive int, got {min_reduction!r}")
    if not isinstance(example_inputs, (tuple, list, dict)):
        raise TypeError("example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                        f"got {type(example_inputs).__name__}; e.g. (image, mask)")
    args, kwargs, names = _bind(model, example_inputs)
    image_arg, mask_arg, image, input = _find_args(args, kwargs, names, image_arg, mask_arg, input)
    notes: list[str] = []
    if input != "separate":
        notes.append(f"input: {input}: the model takes one tensor of {image.shape[1]} image channels and the mask")
    with _traced(model) as (calls, softmaxes):
        output = model(*args, **kwargs)
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.path] = counts.get(c.path, 0) + 1
    once = {p for p, n in counts.items() if n == 1}
    input_size = (int(image.shape[-2]), int(image.shape[-1]))
    modules = dict(model.named_modules())
    features = [c for c in calls if c.size is not None and _alike(c.size, input_size)
                and not isinstance(modules[c.path], _NORMALISERS)]  # a (B, keys, H, W) affinity is no feature map
    events = sorted(features, key=lambda c: c.end)
    stages = _stages(events)
    level_notes: list[list[str]] = [[] for _ in stages]
    found = [_levels(s, calls, once, input_size, min_reduction, n) for s, n in zip(stages, level_notes)]
    best = max(range(len(found)), key=lambda i: (len(found[i]), i)) if found else None
    levels = found[best] if best is not None else []
    for i, other in enumerate(found):
        if i != best and other:
            notes.append(f"another encoder stage: {[c.tap for c in other]}")
    if best is not None:
        notes.extend(level_notes[best])
    levels = _attachable(levels, counts, notes)
    if not levels:
        notes.append("no down-sampling found: encoder_levels is empty; name the last module of each level yourself")

    inputs = {c.path: c.input_shape for c in calls}
    areas = {c.size[0] * c.size[1] for c in events}
    sites: list[SoftmaxSite] = []
    for func, a, kw, stack in softmaxes:
        site = _softmax_site(func, a, kw, stack, modules)
        if site is not None and (site.fused or site.length in areas) and site not in sites:
            sites.append(site)
    attention: list[AttentionSite] = []
    for s in sites:
        problem = _attention_problem(s, inputs.get(s.module)) if s.affinity is not None else None
        if s.affinity is not None and (s.affinity not in once or s.module not in once):
            twice = s.affinity if s.affinity not in once else s.module
            notes.append(f"attention {s.module!r} is not proposed: {twice!r} runs {counts.get(twice, 0)} times per "
                         "forward; attach taps an attention module and its affinity that run once")
        elif problem is not None:
            notes.append(f"attention {s.module!r} is not proposed: {problem}")
        elif s.affinity is not None:  # the spec names the affinity relative to the attention module
            attention.append(AttentionSite(module=s.module, affinity=s.affinity[len(s.module) + 1 :], layout=s.layout))
        elif s.fused:
            notes.append(f"attention {s.module!r} uses fused scaled_dot_product_attention (no affinity to tap); "
                         "disable fusion (timm: TIMM_FUSED_ATTN=0) or expose the softmax as an nn.Softmax submodule")
        else:
            notes.append(f"attention {s.module!r} applies a functional softmax over {s.length} positions; expose it "
                         "as an nn.Softmax submodule to transfer its affinity (Eq. 9)")
    out_key, note = _output_key(output, image)
    if note:
        notes.append(note)
    spec = AdapterSpec(
        name=name,
        description=f"draft from kdinpaint.suggest_spec ({type(model).__name__}); review before use",
        encoder_levels=[c.tap for c in levels],
        attention_sites=attention,
        input=input,
        image_arg=image_arg,
        mask_arg=mask_arg,
        output=out_key,
        probe_shape=[1, *[int(s) for s in image.shape[1:]]],
    )
    return Suggestion(spec, [c.size for c in levels], sites, notes)


def suggest_spec(model: nn.Module, example_inputs: tuple | dict, **kwargs: Any) -> AdapterSpec:
    """A draft :class:`AdapterSpec` for ``model`` from one traced forward (see :func:`analyse` for arguments).

    Example::

        spec = kdinpaint.suggest_spec(model, (image, mask))   # image (B, 3, H, W) in [-1, 1], mask (B, 1, H, W)
        print(spec.to_yaml())                                  # edit, then attach(model, teacher, spec)
    """
    result = analyse(model, example_inputs, **kwargs)
    for note in result.notes:
        log.info("suggest_spec: %s", note)
    return result.spec
