"""The ``edgeconnect`` adapter: EdgeConnect (Nazeri et al., "EdgeConnect: Generative Image Inpainting with
Adversarial Edge Learning", ICCV Workshops 2019), EC of Table 4 of Suin et al. (ICCV 2021).

Files, one concept each (imports go downwards only):

==================  =========================================================================================
``conventions.py``  toolkit <-> EdgeConnect: ``[0, 1]`` images, white holes, gray, input checks
``canny.py``        Canny edges as skimage computes them, batched in torch
``model.py``        the official generators and discriminator; :class:`EdgeConnect`, :class:`EdgeConnectInpaint`
``weights.py``      the official checkpoints in and out, ``checkpoint_filter_fn``, constructors
``loss.py``         EdgeConnect's own inpainting-stage loss and training objective
``__init__.py``     the adapter's spec, its student / teacher builders and their registration (this file)
==================  =========================================================================================

Adapter ``edgeconnect`` (registered through the ``kdinpaint`` entry points):

=============  ==========================================================================================
``edgeconnect`` EC as released: both stages, nothing attached (the control of EC* / EC#)
``:star``      EC*: cross- and self-distillation (Eq. 2, 3) coupled with completion blocks (Eq. 5) on G2's
               encoder, edge stage kept (§4.2: "CD, SD coupled with CB"); the blocks add about 0.1 M
               parameters (0.5 %), the same recipe as GC* and SF*
``:hash``      EC#: the edge stage removed (:class:`EdgeConnectInpaint`, zero edge channel), completion
               blocks (Eq. 5) and distillation on the same three levels
=============  ==========================================================================================

The teacher of every variant is :class:`EdgeConnectInpaint` fed the ground truth with an empty mask (an
autoencoder of G2's architecture). Stride 4: the models pad any size to a multiple of 4 themselves and crop
back, so the adapter's stride only makes the framework hand them sizes where hole masks and encoder
features line up. :func:`edgeconnect_loss` is EdgeConnect's own G2 objective, registered as the loss
``"edgeconnect"``; :class:`EdgeConnectObjective` adds its discriminator (``"edgeconnect-gan"``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

from .canny import canny
from .conventions import (
    EC_SIZE_MULTIPLE,
    RGB2GRAY_COEFFS,
    check_inputs,
    edge_generator_input,
    from_unit,
    inpaint_generator_input,
    rgb_to_gray,
    to_unit,
)
from .loss import EC_LOSS_WEIGHTS, EdgeConnectObjective, edgeconnect_loss, edgeconnect_loss_terms
from .model import Discriminator, EdgeConnect, EdgeConnectInpaint, EdgeGenerator, InpaintGenerator, ResnetBlock
from .weights import (
    OFFICIAL_FILES,
    build_edgeconnect,
    build_edgeconnect_discriminator,
    build_edgeconnect_inpaint,
    checkpoint_filter_fn,
    identify_state_dict,
    load_official,
    pack_official,
    save_official,
)

__all__ = [
    "ResnetBlock",
    "EdgeGenerator",
    "InpaintGenerator",
    "Discriminator",
    "EdgeConnect",
    "EdgeConnectInpaint",
    "RGB2GRAY_COEFFS",
    "EC_SIZE_MULTIPLE",
    "to_unit",
    "from_unit",
    "rgb_to_gray",
    "canny",
    "check_inputs",
    "edge_generator_input",
    "inpaint_generator_input",
    "OFFICIAL_FILES",
    "identify_state_dict",
    "checkpoint_filter_fn",
    "load_official",
    "save_official",
    "build_edgeconnect",
    "build_edgeconnect_inpaint",
    "build_edgeconnect_discriminator",
    "pack_official",
    "edgeconnect_student",
    "edgeconnect_teacher",
    "EC_LOSS_WEIGHTS",
    "edgeconnect_loss_terms",
    "edgeconnect_loss",
    "EdgeConnectObjective",
    "ENCODER_LEVELS",
    "ADAPTER_SPEC",
    "VARIANT_BUILDERS",
    "register_adapters",
    "register_losses",
]


_EDGE_STAGE_OPTIONS = ("sigma", "merge_edges", "detach_edges")


def _check_inpaint_only_kwargs(kwargs: dict[str, Any], who: str) -> None:
    """Accept (and ignore) the edge-stage options: recipe kwargs are shared by every variant and the teacher."""
    unknown = [k for k in kwargs if k not in _EDGE_STAGE_OPTIONS]
    if unknown:
        raise TypeError(
            f"{who} got unknown keyword argument(s) {unknown}; it takes residual_blocks, pretrained and the "
            f"edge-stage options {list(_EDGE_STAGE_OPTIONS)} (ignored without an edge stage)"
        )


def edgeconnect_student(
    edge_stage: bool = True,
    residual_blocks: int = 8,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> EdgeConnect | EdgeConnectInpaint:
    """The student of the ``edgeconnect`` adapter: :class:`EdgeConnect` (EC, EC*) or, with
    ``edge_stage=False``, :class:`EdgeConnectInpaint` (EC#; ``variant_builders['hash']``).

    ``pretrained``: the official checkpoints folder (EC# also takes ``InpaintingModel_gen.pth`` itself).
    ``kwargs``: :class:`EdgeConnect` options (``sigma``, ``merge_edges``, ``detach_edges``); ignored by EC#.
    """
    if not isinstance(edge_stage, bool):
        raise TypeError(f"edge_stage must be true or false, got {edge_stage!r}")
    if edge_stage:
        return build_edgeconnect(pretrained, residual_blocks=residual_blocks, **kwargs)
    _check_inpaint_only_kwargs(kwargs, "edgeconnect_student(edge_stage=False)")
    return build_edgeconnect_inpaint(pretrained, residual_blocks=residual_blocks)


def edgeconnect_teacher(
    edge_stage: bool = True,
    residual_blocks: int = 8,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> EdgeConnectInpaint:
    """The teacher (auxiliary network) of every variant: :class:`EdgeConnectInpaint`, G2's architecture fed the
    ground truth with an empty mask and a zero edge channel. Takes the student's keyword arguments so one
    recipe builds both; ``edge_stage`` and the edge-stage options do not apply to it."""
    del edge_stage
    _check_inpaint_only_kwargs(kwargs, "edgeconnect_teacher")
    return build_edgeconnect_inpaint(pretrained, residual_blocks=residual_blocks)


# ----------------------------------------------------------------------------------------------------------
# Spec and registration
# ----------------------------------------------------------------------------------------------------------

ENCODER_LEVELS = ["inpaint.encoder.3", "inpaint.encoder.6", "inpaint.encoder.9"]  # G2: 64 @ 1, 128 @ 1/2, 256 @ 1/4

ADAPTER_SPEC: dict[str, Any] = {
    "name": "edgeconnect",
    "description": "EdgeConnect (two stages): EC of Table 4; star = EC* (G2's encoder), hash = EC# (G2 alone + CB)",
    # EC as released: nothing attached (fine-tuning it with the same recipe is the control for EC* / EC#).
    "encoder_levels": [],
    "completion_sites": [],
    "image_arg": "image",
    "mask_arg": "mask",
    "output": None,  # forward returns G2's prediction; return_edges=True adds the edge maps
    "teacher_input": "empty_mask",  # EdgeConnectInpaint on the ground truth: an autoencoder of G2
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        # EC*: cross- and self-distillation coupled with completion blocks on G2's encoder (§4.2).
        "star": {"encoder_levels": ENCODER_LEVELS, "completion_sites": ENCODER_LEVELS},
        # EC#: the first stage removed (variant_builders), completion blocks and distillation.
        "hash": {"encoder_levels": ENCODER_LEVELS, "completion_sites": ENCODER_LEVELS},
    },
}

VARIANT_BUILDERS: dict[str, dict[str, Any]] = {"hash": {"edge_stage": False}}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="edgeconnect",
            spec=ADAPTER_SPEC,
            build_student=edgeconnect_student,
            build_teacher=edgeconnect_teacher,
            description=ADAPTER_SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=EC_SIZE_MULTIPLE,
            variant_builders=VARIANT_BUILDERS,
        )
    )


@hookimpl
def register_losses(register: Callable[[str, Callable[..., torch.Tensor]], None]) -> None:
    register("edgeconnect", edgeconnect_loss)
    register("edgeconnect-gan", EdgeConnectObjective)
