"""StructureFlow's toolkit-facing models: SF (both stages), SF# (the texture generator alone) and the teacher.

Ren, Yu, Zhang, Li, Liu, Li, "StructureFlow: Image Inpainting via Structure-aware Appearance Flow", ICCV 2019
(arXiv:1908.03852); official code RenYurui/StructureFlow. Two generators (:mod:`.networks`): the **structure
reconstructor** ``s_gen`` completes an edge-preserving smoothing (RTV, :mod:`.rtv`) of the image; the
**texture generator** ``f_gen`` paints the image from the corrupted input and that structure, with a *flow
column* predicting an appearance flow at 1/4 resolution and a *conv column* whose 1/4-resolution features
are warped by the flow with Gaussian sampling.

Conventions. StructureFlow speaks the toolkit's own: RGB in ``[-1, 1]``, mask 1 = hole, holes of the network
inputs filled with 0 (:func:`kdinpaint.masking.masked`). The networks need sides that are multiples of 16
and at least 48 pixels (the flow column's 5x5 reflect pads at 1/16 resolution need 3 pixels): the models
pad at the bottom/right by reflection (:func:`kdinpaint.padding.pad_bottom_right`) and crop back.

:class:`StructureFlow` (SF) and :class:`StructureFlowTexture` (SF#) keep the texture generator under the
submodule ``texture``, so its encoder levels have the same paths in both: ``texture.conv_column.down_sample.0.2``
(64 ch, 1/2), ``texture.conv_column.down_sample.0`` (128 ch, 1/4, the features the flow warps),
``texture.conv_column.down_sample.1`` (512 ch, 1/8); the flow column's
``texture.flow_column.down_sample_flow.{0,1,2,3}`` (64/128/256/512 ch at 1/2 ... 1/16); the flow is the
output of ``texture.flow_column.location`` and the warped features those of
``texture.conv_column.resample16`` / ``.resample4``.

Teacher ("the texture generator fed the ground truth"): for SF and SF* a :class:`StructureFlowTeacher`, the
texture generator on ``[gt, RTV(gt), empty mask]`` — the input the student's texture generator would get
from a perfect first stage with nothing missing, and the convention ``f_gen`` was trained with (official
stage 2), so released ``f_gen`` weights can start its pre-training; for SF# the student's own class, whose
structure slot then reads the ground truth itself, keeping SF# free of handcrafted structure. Without a
precomputed ``structure`` argument, SF computes the mask-aware RTV of the corrupted input in its forward,
and the SF/SF* teacher the RTV of the ground truth (about 1.5 s each per 256x256 image on CPU; SF# none).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn as nn

from kdinpaint.masking import check_image_range, check_mask, check_rgb_image, masked, warn_if_inverted
from kdinpaint.padding import crop_top_left, pad_bottom_right

from .networks import StructureReconstructor, TextureGenerator
from .rtv import rtv_structure

__all__ = [
    "SF_SIZE_MULTIPLE",
    "SF_MIN_SIZE",
    "check_inputs",
    "StructureFlowOutput",
    "StructureFlow",
    "StructureFlowTexture",
    "StructureFlowTeacher",
]

# ----------------------------------------------------------------------------------------------------------
# Conventions
# ----------------------------------------------------------------------------------------------------------

SF_SIZE_MULTIPLE = 16
SF_MIN_SIZE = 48


def check_inputs(image: torch.Tensor, mask: torch.Tensor, structure: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a toolkit ``(image, mask[, structure])`` and return the mask as ``(B, 1, H, W)`` in the image dtype.

    ``image``: ``(B, 3, H, W)`` float in [-1, 1]; ``mask``: ``(B or 1, 1, H, W)``, 1 = hole
    (:func:`kdinpaint.masking.check_mask`); ``structure``: like ``image``. Raises ``TypeError``/``ValueError``
    naming the fix; warns when a mask is more than 60 % hole (an inverted mask, 1 = known, looks like that).
    """
    check_rgb_image(image, "StructureFlow")
    check_mask(mask, image)
    if structure is not None and (not isinstance(structure, torch.Tensor) or structure.shape != image.shape):
        got = tuple(structure.shape) if isinstance(structure, torch.Tensor) else type(structure).__name__
        raise ValueError(
            f"structure must be the smoothed ground truth with the image's shape {tuple(image.shape)}, got {got}; "
            "pass None to compute it with rtv_structure"
        )
    check_image_range(image)
    warn_if_inverted(mask)
    return mask.to(image.dtype).expand(image.shape[0], 1, *image.shape[-2:])


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
    out = crop_top_left(out, size)
    if not return_all:
        return out
    flow = crop_top_left(flow, (math.ceil(size[0] / 4), math.ceil(size[1] / 4)))
    return StructureFlowOutput(out, structure, structure_target, flow)


class StructureFlow(nn.Module):
    """SF, both stages, called with toolkit ``(image, mask)``.

    ``forward(image, mask, structure=None)``: ``image`` ``(B, 3, H, W)`` in [-1, 1] (with the default
    ``structure_from`` its hole content is never read, so the ground truth or a masked image give the same
    result), ``mask``
    ``(B, 1, H, W)`` with 1 = hole, any H, W (padded at the bottom/right by reflection to a multiple of 16 and
    at least 48, and cropped back). ``structure``: the structure image in [-1, 1] when precomputed (the
    official data pipeline reads the RTV smoothing of the *ground truth* from disk, for training and for its
    published test numbers). ``None`` computes it here under ``no_grad`` with
    :func:`.rtv.rtv_structure`, from what the network may see: by default
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
        x, s_gt, m = (
            pad_bottom_right(t, SF_SIZE_MULTIPLE, SF_MIN_SIZE) for t in (masked(image, mask), structure, mask)
        )
        s_gt_in = masked(s_gt, m)
        s_out = self.structure(torch.cat((x, s_gt_in, m), 1))  # (B, 3, H', W')
        s_feed = s_out.detach() if self.detach_structure else s_out
        return _texture_pass(self.texture, x, s_feed, m, size, return_all, crop_top_left(s_out, size), structure)


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
        x = pad_bottom_right(masked(image, mask), SF_SIZE_MULTIPLE, SF_MIN_SIZE)
        m = pad_bottom_right(mask, SF_SIZE_MULTIPLE, SF_MIN_SIZE)
        s = x if self.structure_fill == "input" else torch.zeros_like(x)
        return _texture_pass(self.texture, x, s, m, size, return_all, crop_top_left(s, size), None)


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
    ``None`` computes :func:`.rtv.rtv_structure` of ``image * (1 - mask)`` (mask-aware; with the
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
        x, s, m = (pad_bottom_right(t, SF_SIZE_MULTIPLE, SF_MIN_SIZE) for t in (masked(image, mask), structure, mask))
        return _texture_pass(self.texture, x, s, m, size, return_all, structure, None)

