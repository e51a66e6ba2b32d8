"""StructureFlow: Image Inpainting via Structure-aware Appearance Flow.

Ren, Yu, Zhang, Li, Liu, Li, ICCV 2019 (arXiv:1908.03852); official code RenYurui/StructureFlow. Two
generators: the **structure reconstructor** ``s_gen`` completes an edge-preserving smoothing (RTV) of the
image; the **texture generator** ``f_gen`` paints the image from the corrupted input and that structure,
with a *flow column* predicting an appearance flow at 1/4 resolution and a *conv column* whose 1/4-resolution
features are warped by the flow with Gaussian sampling (:mod:`kdinpaint.ops.gaussian_resample`, K=16/sigma=4
and K=4/sigma=2, pure PyTorch here instead of the official CUDA op).

The module trees reproduce the official ones index for index, so the released ``latest_net_s_gen.pth`` and
``latest_net_f_gen.pth`` (plain state_dicts) load with ``strict=True``; the structure reconstructor's
spectral norm is the legacy ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``, ``weight_u``,
``weight_v``). The texture generator's conv column normalises with a per-sample layer norm over (C, H, W)
whose affine parameters have shape ``(C, 1, 1)``, kept for the keys. Deliberate differences, outputs
unchanged: activations and the residual sum are not in-place (a forward hook that keeps a module's output is
not overwritten later), and the resampler has a CPU implementation.

Toolkit entry points (images in ``[-1, 1]``, mask 1 = hole; conventions in :mod:`.structureflow_io`):
:class:`StructureFlow` (both stages, SF) and :class:`StructureFlowTexture` (the texture generator alone,
SF#). Both keep the texture generator under the submodule ``texture``, so its encoder levels have the same
paths in both: ``texture.conv_column.down_sample.0.2`` (64 ch, 1/2), ``texture.conv_column.down_sample.0``
(128 ch, 1/4, the features the flow warps), ``texture.conv_column.down_sample.1`` (512 ch, 1/8); the flow
column's ``texture.flow_column.down_sample_flow.{0,1,2,3}`` (64/128/256/512 ch at 1/2 ... 1/16); the flow is the
output of ``texture.flow_column.location`` and the warped features those of
``texture.conv_column.resample16`` / ``.resample4``.

The ``structureflow`` adapter (entry point ``kdinpaint_adapters.structureflow``, stride 16), Table 4 of the
distillation paper:

=========  ===========================================================================================
(default)  SF as released: :class:`StructureFlow`, nothing attached (92.5 M parameters at dim 64)
``star``   SF*: :class:`StructureFlow` with cross- and self-distillation (Eq. 2, 3) and completion blocks
           (Eq. 5) on :data:`TEXTURE_LEVELS`, the texture generator's encoder: the paper supervises the final
           stage only. The blocks add 171 k parameters (0.2 %); the paper keeps the count equal, we do not
           compensate so small a difference
``hash``   SF#: :class:`StructureFlowTexture`, the structure stage removed (56.5 M, 61 %), with the same
           distillation and completion blocks
=========  ===========================================================================================

Teacher ("the texture generator fed the ground truth"): for SF and SF* a :class:`StructureFlowTeacher`, the
texture generator on ``[gt, RTV(gt), empty mask]`` — the input the student's texture generator would get
from a perfect first stage with nothing missing, and the convention ``f_gen`` was trained with (official
stage 2), so released ``f_gen`` weights can start its pre-training; for SF# the student's own class, whose
structure slot then reads the ground truth itself, keeping SF# free of handcrafted structure. Without a
precomputed ``structure`` argument, SF computes the mask-aware RTV of the corrupted input in its forward,
and the SF/SF* teacher the RTV of the ground truth (about 1.5 s each per 256x256 image on CPU; SF# none).
The network's own generator loss is :func:`kdinpaint_adapters.structureflow_loss.structureflow_loss`; its
whole training objective (that loss and both discriminators) is
:class:`kdinpaint_adapters.structureflow_loss.StructureFlowObjective`, registered as the loss ``"structureflow"``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn as nn

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl
from kdinpaint.layers import legacy_spectral_norm_key
from kdinpaint.weights import load_reported, read_weights, strip_wrapper_prefixes
from kdinpaint.masking import masked

from .structureflow_io import SF_SIZE_MULTIPLE, check_inputs, crop_to, pad_to_multiple, rtv_structure
from .structureflow_nets import MultiScaleDiscriminator, StructureReconstructor, TextureGenerator, init_weights

__all__ = [
    "StructureReconstructor",
    "TextureGenerator",
    "MultiScaleDiscriminator",
    "StructureFlow",
    "StructureFlowTexture",
    "StructureFlowTeacher",
    "StructureFlowOutput",
    "OFFICIAL_FILES",
    "identify_state_dict",
    "checkpoint_filter_fn",
    "load_official",
    "build_structureflow",
    "build_structureflow_texture",
    "build_structureflow_teacher",
    "pack_official",
    "init_weights",
    "TEXTURE_LEVELS",
    "ADAPTER_SPEC",
    "structureflow_student",
    "structureflow_teacher",
    "register_adapters",
    "register_losses",
]

_logger = logging.getLogger(__name__)

#: which -> (network, official file name)
OFFICIAL_FILES: dict[str, tuple[str, str]] = {
    "structure": ("structure reconstructor s_gen", "latest_net_s_gen.pth"),
    "texture": ("texture (flow) generator f_gen", "latest_net_f_gen.pth"),
    "discriminator": ("discriminator s_dis / f_dis", "latest_net_f_dis.pth"),
}

# ----------------------------------------------------------------------------------------------------------
# Toolkit-facing models
# ----------------------------------------------------------------------------------------------------------


class StructureFlowOutput(NamedTuple):
    """Everything one SF pass computes (``return_all=True``), all cropped to the input size.

    ``image``: texture generator output ``(B, 3, H, W)`` in [-1, 1], not composited. ``structure``: the
    structure fed to the texture generator ``(B, 3, H, W)`` in [-1, 1] (the reconstructor's raw output for SF;
    the stand-in for SF#). ``structure_target``: the smoothed ground truth ``(B, 3, H, W)`` (the reconstructor's
    L1 target; ``None`` for SF#). ``flow``: ``(B, 2, ceil(H/4), ceil(W/4))`` in pixels of the 1/4 grid.
    """

    image: torch.Tensor
    structure: torch.Tensor
    structure_target: torch.Tensor | None
    flow: torch.Tensor


_STRUCTURE_FROM = ("ground_truth", "masked")
_STRUCTURE_FILL = ("input", "zeros")


def _structure_of(image: torch.Tensor, mask: torch.Tensor | None, rtv_kwargs: dict) -> torch.Tensor:
    """The structure image, without gradient: the RTV smoothing of ``image`` (``mask`` None) or the
    mask-aware RTV of the corrupted image ``image * (1 - mask)``."""
    with torch.no_grad():
        return rtv_structure(image, **rtv_kwargs) if mask is None else rtv_structure(masked(image, mask), mask, **rtv_kwargs)


def _texture_pass(
    texture: nn.Module,
    x: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor,
    size: torch.Size,
    return_all: bool,
    structure: torch.Tensor,
    structure_target: torch.Tensor | None,
) -> torch.Tensor | StructureFlowOutput:
    """The texture generator on padded ``[x, s, m]``; its output cropped to ``size`` (with ``return_all``,
    a :class:`StructureFlowOutput` holding ``structure``, ``structure_target`` and the cropped flow)."""
    out, flow = texture(torch.cat((x, s, m), 1))
    out = crop_to(out, size)
    if not return_all:
        return out
    return StructureFlowOutput(out, structure, structure_target, crop_to(flow, (math.ceil(size[0] / 4), math.ceil(size[1] / 4))))


class StructureFlow(nn.Module):
    """SF, both stages, called with toolkit ``(image, mask)``.

    ``forward(image, mask, structure=None)``: ``image`` ``(B, 3, H, W)`` in [-1, 1] (with the default
    ``structure_from`` its hole content is never read, so the ground truth or a masked image give the same
    result), ``mask``
    ``(B, 1, H, W)`` with 1 = hole, any H, W (padded at the bottom/right by reflection to a multiple of 16 and
    at least 48, and cropped back). ``structure``: the structure image in [-1, 1] when precomputed (the
    official data pipeline reads the RTV smoothing of the *ground truth* from disk, for training and for its
    published test numbers). ``None`` computes it here under ``no_grad`` with
    :func:`.structureflow_io.rtv_structure`, from what the network may see: by default
    (``structure_from="masked"``) the authors' mask-aware RTV of the corrupted image ``image * (1 - mask)``,
    gradients inside the hole ignored — the ground truth is not available at inference, and the toolkit's
    training script and :class:`kdinpaint.inference.Inpainter` pass masked images. ``"ground_truth"``
    smooths ``image`` as given (the official protocol when ``image`` is the ground truth; the hole is zeroed
    afterwards, but smoothing carries a little hole content across its border). Cost: three sparse solves
    per image, about 1.5 s for a 256x256 image on two CPU threads (a SciPy LU; ``rtv_kwargs={"solver":
    "cg"}`` runs batched conjugate gradients on a GPU instead) — more than both networks together, so
    precompute structures for long CPU runs. Steps as the official ``sample()``:
    ``s = s_gen([x*(1-m), S*(1-m), m])``, ``(out, flow) = f_gen([x*(1-m), s, m])`` with the raw ``s``.
    ``detach_structure=True`` stops gradients from the texture stage into the reconstructor (the official
    stage 3 trains ``f_gen`` alone). Returns ``out`` ``(B, 3, H, W)`` in [-1, 1], not composited, or a
    :class:`StructureFlowOutput` with ``return_all=True``.
    """

    def __init__(
        self,
        dim: int = 64,
        structure_from: Literal["ground_truth", "masked"] = "masked",
        detach_structure: bool = False,
        input_grad: Literal["exact", "cuda"] = "exact",
        rtv_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if structure_from not in _STRUCTURE_FROM:
            raise ValueError(f"structure_from must be one of {_STRUCTURE_FROM}, got {structure_from!r}")
        self.structure = StructureReconstructor(dim)
        self.texture = TextureGenerator(dim, input_grad=input_grad)
        self.structure_from = structure_from
        self.detach_structure = detach_structure
        self.rtv_kwargs = dict(rtv_kwargs or {})

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        structure: torch.Tensor | None = None,
        *,
        return_all: bool = False,
    ) -> torch.Tensor | StructureFlowOutput:
        mask = check_inputs(image, mask, structure)
        size = image.shape[-2:]
        if structure is None:
            structure = _structure_of(image, None if self.structure_from == "ground_truth" else mask, self.rtv_kwargs)
        x, s_gt, m = (pad_to_multiple(t, SF_SIZE_MULTIPLE) for t in (masked(image, mask), structure, mask))
        s_gt_in = masked(s_gt, m)
        s_out = self.structure(torch.cat((x, s_gt_in, m), 1))  # (B, 3, H', W')
        s_feed = s_out.detach() if self.detach_structure else s_out
        return _texture_pass(self.texture, x, s_feed, m, size, return_all, crop_to(s_out, size), structure)


class StructureFlowTexture(nn.Module):
    """SF#: the texture generator alone; the structure stage is removed.

    Its structure channels are kept (so released ``latest_net_f_gen.pth`` weights load) and fed, in place of
    a reconstructed structure, the corrupted image itself (``structure_fill="input"``: known pixels, holes 0 —
    the closest thing to a structure image that needs no extra stage) or zeros (``"zeros"``).
    ``forward(image, mask)``: ``(B, 3, H, W)`` in [-1, 1] and ``(B, 1, H, W)`` (1 = hole), any H, W ->
    the raw output ``(B, 3, H, W)`` in [-1, 1], not composited (a :class:`StructureFlowOutput` with
    ``return_all=True``). With an all-zero mask it is the autoencoder teacher fed the ground truth.
    """

    def __init__(
        self,
        dim: int = 64,
        structure_fill: Literal["input", "zeros"] = "input",
        input_grad: Literal["exact", "cuda"] = "exact",
    ) -> None:
        super().__init__()
        if structure_fill not in _STRUCTURE_FILL:
            raise ValueError(f"structure_fill must be one of {_STRUCTURE_FILL}, got {structure_fill!r}")
        self.texture = TextureGenerator(dim, input_grad=input_grad)
        self.structure_fill = structure_fill

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, *, return_all: bool = False
    ) -> torch.Tensor | StructureFlowOutput:
        mask = check_inputs(image, mask)
        size = image.shape[-2:]
        x, m = pad_to_multiple(masked(image, mask), SF_SIZE_MULTIPLE), pad_to_multiple(mask, SF_SIZE_MULTIPLE)
        s = x if self.structure_fill == "input" else torch.zeros_like(x)
        return _texture_pass(self.texture, x, s, m, size, return_all, crop_to(s, size), None)


def _drop_structure_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state pre-hook: a StructureFlow state_dict's structure-reconstructor keys are not the teacher's."""
    for key in [k for k in state_dict if k.startswith(prefix + "structure.")]:
        del state_dict[key]


class StructureFlowTeacher(nn.Module):
    """The auxiliary network (teacher) of SF and SF*: the texture generator fed the ground truth.

    The paper's teacher is the student's own backbone, fed the ground truth and pre-trained as an L1
    autoencoder (§4); for SF it distils into the final stage only (Table 4). So the teacher is a texture
    generator (submodule ``texture``, same paths as the student's) whose input is what the student's texture
    generator would see with a perfect first stage and nothing missing: ``[x*(1-m), S, m]`` with ``S`` the
    structure image of ``image`` — the official stage-2 input convention (``f_gen`` was trained on
    ground-truth structures), so released ``latest_net_f_gen.pth`` weights are a sensible start.

    ``forward(image, mask, structure=None, *, return_all=False)``: the student's call (kdinpaint replaces
    ``image`` by the ground truth and ``mask`` by zeros, and passes ``structure`` unchanged). ``structure``
    ``None`` computes :func:`.structureflow_io.rtv_structure` of ``image * (1 - mask)`` (mask-aware; with the
    empty mask, the plain RTV of the ground truth) under ``no_grad``, about 1.5 s per 256x256 image on CPU;
    pass precomputed structures to avoid it. Returns ``(B, 3, H, W)`` in [-1, 1] (a
    :class:`StructureFlowOutput` with ``return_all=True``).

    ``load_state_dict`` ignores ``structure.*`` keys, so a :class:`StructureFlow` state_dict (the student's)
    initialises the teacher's texture generator.
    """

    def __init__(
        self, dim: int = 64, input_grad: Literal["exact", "cuda"] = "exact", rtv_kwargs: dict | None = None
    ) -> None:
        super().__init__()
        self.texture = TextureGenerator(dim, input_grad=input_grad)
        self.rtv_kwargs = dict(rtv_kwargs or {})
        self.register_load_state_dict_pre_hook(_drop_structure_keys)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        structure: torch.Tensor | None = None,
        *,
        return_all: bool = False,
    ) -> torch.Tensor | StructureFlowOutput:
        mask = check_inputs(image, mask, structure)
        size = image.shape[-2:]
        if structure is None:
            structure = _structure_of(image, mask, self.rtv_kwargs)
        x, s, m = (pad_to_multiple(t, SF_SIZE_MULTIPLE) for t in (masked(image, mask), structure, mask))
        return _texture_pass(self.texture, x, s, m, size, return_all, structure, None)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------

_TEXTURE_OWNERS = (StructureFlowTexture, StructureFlowTeacher)  # toolkit models holding only ``texture``

_SIGNATURE = {  # the first module names of each official network's state_dict
    "structure": ("input_layer.", "content_param.", "image_net."),
    "texture": ("flow_column.", "conv_column."),
    "discriminator": ("model_1.", "model_2."),
}


def _which_of(model: nn.Module) -> str:
    for which, cls in (("structure", StructureReconstructor), ("texture", TextureGenerator),
                       ("discriminator", MultiScaleDiscriminator)):
        if isinstance(model, cls):
            return which
    raise TypeError(
        "StructureFlow checkpoints load into StructureReconstructor, TextureGenerator or MultiScaleDiscriminator, "
        f"got {type(model).__name__}; for StructureFlow / StructureFlowTexture / StructureFlowTeacher load into "
        ".structure / .texture"
    )


def identify_state_dict(state_dict: Mapping[str, object]) -> str | None:
    """Which official network a prefix-free state_dict belongs to: ``'structure'`` (s_gen), ``'texture'``
    (f_gen), ``'discriminator'`` (s_dis / f_dis) or ``None``."""
    keys = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor)]
    scores = {w: sum(k.startswith(sig) for k in keys for sig in sigs) for w, sigs in _SIGNATURE.items()}
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    return best if scores[best] > 0 else None


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn official StructureFlow weights into a state_dict ``model`` loads strictly.

    The official files are plain state_dicts. Strips ``module.`` (DataParallel) and ``_orig_mod.``
    (torch.compile) prefixes and maps new-style spectral-norm keys (``parametrizations.weight.original`` /
    ``.0._u`` / ``.0._v``) to the legacy ones. Raises ``ValueError`` naming the right file when the weights
    belong to the other stage. For the toolkit models: :class:`StructureFlowTexture` and
    :class:`StructureFlowTeacher` take the ``latest_net_f_gen.pth`` contents; :class:`StructureFlow` takes
    ``{'structure': <s_gen contents>, 'texture': <f_gen contents>}``; all take a toolkit model's
    ``state_dict()`` (the texture-only ones keep its ``texture.*`` keys). Keys come back prefixed.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    if isinstance(model, (StructureFlow, *_TEXTURE_OWNERS)):
        parts = ("structure", "texture") if isinstance(model, StructureFlow) else ("texture",)
        if all(isinstance(state_dict.get(p), Mapping) for p in parts):
            return {f"{p}.{k}": v for p in parts
                    for k, v in checkpoint_filter_fn(state_dict[p], getattr(model, p)).items()}  # type: ignore[arg-type]
        flat = {strip_wrapper_prefixes(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        if any(k.startswith(p + ".") for p in parts for k in flat):  # a toolkit model's state_dict
            return {k: v for k, v in flat.items() if k.split(".", 1)[0] in parts}
        if parts == ("texture",):
            return {f"texture.{k}": v for k, v in checkpoint_filter_fn(state_dict, model.texture).items()}
        raise ValueError(
            "StructureFlow has two stages: pass {'structure': <latest_net_s_gen.pth contents>, 'texture': "
            "<latest_net_f_gen.pth contents>}, or build it with build_structureflow(pretrained=<checkpoints folder>)"
        )
    expected = _which_of(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            key = legacy_spectral_norm_key(strip_wrapper_prefixes(key))
            out[key] = value
    found = identify_state_dict(out)
    if found is None:
        shown = ", ".join(list(out)[:5]) or "no tensors"
        raise ValueError(
            f"these weights are not a StructureFlow {OFFICIAL_FILES[expected][0]}: their keys start with {shown}; "
            f"expected keys such as {next(iter(model.state_dict()))!r} ({OFFICIAL_FILES[expected][1]})"
        )
    if found != expected:
        raise ValueError(
            f"these weights are the {OFFICIAL_FILES[found][0]} ({OFFICIAL_FILES[found][1]}), but the model is the "
            f"{OFFICIAL_FILES[expected][0]}; pass the {OFFICIAL_FILES[expected][1]} file "
            f"(or load these with which={found!r})"
        )
    return out



def load_official(
    path: str | os.PathLike[str],
    which: Literal["structure", "texture", "discriminator"] | None = None,
    *,
    model: nn.Module | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an official StructureFlow file (``latest_net_s_gen.pth``, ``latest_net_f_gen.pth``, ``*_dis.pth``).

    ``which``: ``'structure'``, ``'texture'`` or ``'discriminator'``; ``None`` infers it from the keys.
    ``model``: load into this network (a :class:`StructureReconstructor`, :class:`TextureGenerator`,
    :class:`MultiScaleDiscriminator`, or the texture of a :class:`StructureFlowTexture` /
    :class:`StructureFlowTeacher`) instead of building
    one at the official width. ``torch.load(weights_only=True)``: no pickled code runs. With ``strict`` every
    missing / unexpected key and shape mismatch is named in a ``ValueError``; without, they are logged and the
    matching tensors loaded. A file of the other stage raises ``ValueError`` naming the right file. Returns
    the model.
    """
    if which is not None and which not in OFFICIAL_FILES:
        raise ValueError(f"which must be one of {sorted(OFFICIAL_FILES)} or None, got {which!r}")
    path = Path(path)
    ckpt = read_weights(path, "StructureFlow checkpoint", map_location)
    owner = model
    if isinstance(model, _TEXTURE_OWNERS):
        model = model.texture
    elif isinstance(model, StructureFlow):
        if which is None:
            raise ValueError("loading one file into StructureFlow needs which='structure' or which='texture'")
        model = getattr(model, which)
    if model is None:
        if which is None:
            which = identify_state_dict({strip_wrapper_prefixes(k): v for k, v in ckpt.items()})  # type: ignore[assignment]
            if which is None:
                files = ", ".join(f for _, f in OFFICIAL_FILES.values())
                raise ValueError(f"{path} is not a StructureFlow checkpoint; expected one of {files}")
        model = {"structure": StructureReconstructor, "texture": TextureGenerator,
                 "discriminator": MultiScaleDiscriminator}[which]()
    elif which is not None and _which_of(model) != which:
        raise ValueError(f"which={which!r} but the model given is the {OFFICIAL_FILES[_which_of(model)][0]}")
    try:
        state_dict = checkpoint_filter_fn(ckpt, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    load_reported(model, state_dict, path, OFFICIAL_FILES[_which_of(model)][0], strict, _logger)
    _logger.info("loaded %s from %s", OFFICIAL_FILES[_which_of(model)][0], path)
    return owner if owner is not None else model


def _resolve(pretrained: str | os.PathLike[str], which: str) -> Path:
    p = Path(pretrained)
    return p / OFFICIAL_FILES[which][1] if p.is_dir() else p


def build_structureflow(pretrained: str | os.PathLike[str] | None = None, **kwargs: object) -> StructureFlow:
    """SF, both stages. ``pretrained``: the official checkpoints folder holding ``latest_net_s_gen.pth`` and
    ``latest_net_f_gen.pth``. ``kwargs`` go to :class:`StructureFlow`. Without weights, the official init."""
    model = StructureFlow(**kwargs)  # type: ignore[arg-type]
    init_weights(model)
    if pretrained is not None:
        if not Path(pretrained).is_dir():
            raise ValueError(
                "build_structureflow(pretrained=...) takes the folder holding latest_net_s_gen.pth and "
                f"latest_net_f_gen.pth, got {pretrained}"
            )
        load_official(_resolve(pretrained, "structure"), "structure", model=model.structure)
        load_official(_resolve(pretrained, "texture"), "texture", model=model.texture)
    return model


def build_structureflow_texture(
    pretrained: str | os.PathLike[str] | None = None, **kwargs: object
) -> StructureFlowTexture:
    """SF#, the texture generator alone. ``pretrained``: ``latest_net_f_gen.pth`` or its folder."""
    model = StructureFlowTexture(**kwargs)  # type: ignore[arg-type]
    init_weights(model)
    if pretrained is not None:
        load_official(_resolve(pretrained, "texture"), "texture", model=model.texture)
    return model


def pack_official(
    folder: str | os.PathLike[str], path: str | os.PathLike[str], **kwargs: object
) -> Path:
    """Write both released generators of a checkpoints folder (``latest_net_s_gen.pth``,
    ``latest_net_f_gen.pth``) as one safetensors file of the :class:`StructureFlow` state_dict, the single
    file a recipe's ``model.init`` reads (SF, SF*; the teacher takes its ``texture.*`` part). Loaded strictly
    (:func:`load_official`); ``kwargs`` go to :class:`StructureFlow` (``dim`` 64 for the released files).
    Returns the written path."""
    from safetensors.torch import save_file  # lazy: only packing writes safetensors

    model = build_structureflow(folder, **kwargs)
    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def build_structureflow_teacher(
    pretrained: str | os.PathLike[str] | None = None, **kwargs: object
) -> StructureFlowTeacher:
    """The SF / SF* teacher. ``pretrained``: ``latest_net_f_gen.pth`` or its folder (a start for the L1
    autoencoder pre-training). ``kwargs`` go to :class:`StructureFlowTeacher`. Without weights, the official init."""
    model = StructureFlowTeacher(**kwargs)  # type: ignore[arg-type]
    init_weights(model)
    if pretrained is not None:
        load_official(_resolve(pretrained, "texture"), "texture", model=model.texture)
    return model


# ----------------------------------------------------------------------------------------------------------
# The kdinpaint adapter
# ----------------------------------------------------------------------------------------------------------

#: the texture generator's conv-column encoder levels, shallow to deep (the same paths in SF, SF# and the
#: teacher). ``down_sample.0.2`` lies inside ``down_sample.0``: its hook fires first and its completion block
#: acts before the rest of that Sequential runs; each module runs once per forward.
TEXTURE_LEVELS = [
    "texture.conv_column.down_sample.0.2",  # dim channels, 1/2
    "texture.conv_column.down_sample.0",  # 2 dim, 1/4 (the features the flow warps)
    "texture.conv_column.down_sample.1",  # 8 dim, 1/8
]

ADAPTER_SPEC = {
    "name": "structureflow",
    "description": (
        "StructureFlow (ICCV 2019): structure reconstructor + appearance-flow texture generator, as released; "
        "variants star (SF*: distillation in the texture generator) and hash (SF#: texture generator alone)"
    ),
    "encoder_levels": [],  # as released: nothing attached
    "completion_sites": [],
    "image_arg": "image",
    "mask_arg": "mask",
    "teacher_input": "empty_mask",
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        "star": {"encoder_levels": TEXTURE_LEVELS, "completion_sites": TEXTURE_LEVELS},
        "hash": {"encoder_levels": TEXTURE_LEVELS, "completion_sites": TEXTURE_LEVELS},
    },
}

VARIANT_BUILDERS = {"hash": {"texture_only": True}}

_STUDENT_ONLY = ("structure_from", "detach_structure")  # options of StructureFlow the teacher has no use for


def structureflow_student(texture_only: bool = False, **kwargs: object) -> StructureFlow | StructureFlowTexture:
    """The adapter's student: SF, both stages (:func:`build_structureflow`), or with ``texture_only`` SF#, the
    texture generator alone (:func:`build_structureflow_texture`). ``kwargs`` go to that builder."""
    return build_structureflow_texture(**kwargs) if texture_only else build_structureflow(**kwargs)


def structureflow_teacher(texture_only: bool = False, **kwargs: object) -> StructureFlowTeacher | StructureFlowTexture:
    """The adapter's teacher, from the student's builder arguments: the texture generator fed the ground truth.

    SF and SF*: a :class:`StructureFlowTeacher` (texture generator on ``[gt, RTV(gt), 0]``); ``pretrained``
    (the student's checkpoints folder) gives it the released ``latest_net_f_gen.pth``; ``structure_from`` and
    ``detach_structure`` are accepted and ignored (the teacher sees the whole ground truth and has no first
    stage). SF# (``texture_only``): the student's own class, :class:`StructureFlowTexture`, which with the empty
    mask reads the ground truth in its image and structure slots — no handcrafted structure anywhere in SF#.
    """
    if texture_only:
        return build_structureflow_texture(**kwargs)
    for key in _STUDENT_ONLY:
        kwargs.pop(key, None)
    return build_structureflow_teacher(**kwargs)


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="structureflow",
            spec=ADAPTER_SPEC,
            build_student=structureflow_student,
            build_teacher=structureflow_teacher,
            description=ADAPTER_SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=SF_SIZE_MULTIPLE,
            variant_builders=VARIANT_BUILDERS,
        )
    )


@hookimpl
def register_losses(register: Callable[[str, Callable[..., object]], None]) -> None:
    from .structureflow_loss import StructureFlowObjective  # it imports this module's networks lazily

    register("structureflow", StructureFlowObjective)
