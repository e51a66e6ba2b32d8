"""The ``structureflow`` adapter: StructureFlow (Ren, Yu, Zhang, Li, Liu, Li, "StructureFlow: Image Inpainting
via Structure-aware Appearance Flow", ICCV 2019), SF of Table 4 of Suin et al. (ICCV 2021).

Files, one concept each (imports go downwards only):

================  ===========================================================================================
``networks.py``   the official structure reconstructor, texture generator and two-scale discriminator
``rtv.py``        the structure image: Relative Total Variation smoothing (``tsmooth``)
``model.py``      the toolkit-facing models SF, SF# and the teacher; input checks and padding
``weights.py``    the official checkpoints in, ``checkpoint_filter_fn``, constructors
``loss.py``       StructureFlow's own generator loss and training objective
``__init__.py``   the adapter's spec, its student / teacher builders and their registration (this file)
================  ===========================================================================================

The module trees reproduce the official ones index for index, so the released ``latest_net_s_gen.pth`` and
``latest_net_f_gen.pth`` (plain state_dicts) load with ``strict=True``; the structure reconstructor's
spectral norm is the legacy ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``, ``weight_u``,
``weight_v``). The texture generator's conv column normalises with a per-sample layer norm over (C, H, W)
whose affine parameters have shape ``(C, 1, 1)``, kept for the keys. Deliberate differences, outputs
unchanged: activations and the residual sum are not in-place (a forward hook that keeps a module's output is
not overwritten later), and the Gaussian resampler (:mod:`kdinpaint.ops.gaussian_resample`, K=16/sigma=4 and
K=4/sigma=2) is pure PyTorch with a CPU implementation instead of the official CUDA op.

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

The teacher of SF and SF* is :class:`StructureFlowTeacher`, that of SF# the student's own class (see
:mod:`.model`). The network's own generator loss is :func:`structureflow_loss`; its whole training objective
(that loss and both discriminators) is :class:`StructureFlowObjective`, registered as the loss
``"structureflow"``.
"""

from __future__ import annotations

from collections.abc import Callable

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

from .loss import (
    SF_CORRECTNESS_LAYER,
    SF_LOSS_WEIGHTS,
    SF_PERCEPTUAL_LAYERS,
    SF_STYLE_LAYERS,
    StructureFlowObjective,
    StructureFlowVGG,
    lsgan_discriminator_loss,
    sampling_correctness_loss,
    structureflow_loss,
)
from .model import (
    SF_MIN_SIZE,
    SF_SIZE_MULTIPLE,
    StructureFlow,
    StructureFlowOutput,
    StructureFlowTeacher,
    StructureFlowTexture,
    check_inputs,
)
from .networks import MultiScaleDiscriminator, StructureReconstructor, TextureGenerator, init_weights
from .rtv import rtv_structure
from .weights import (
    OFFICIAL_FILES,
    build_structureflow,
    build_structureflow_teacher,
    build_structureflow_texture,
    checkpoint_filter_fn,
    identify_state_dict,
    load_official,
    pack_official,
)

__all__ = [
    "StructureReconstructor",
    "TextureGenerator",
    "MultiScaleDiscriminator",
    "init_weights",
    "SF_SIZE_MULTIPLE",
    "SF_MIN_SIZE",
    "check_inputs",
    "rtv_structure",
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
    "SF_LOSS_WEIGHTS",
    "SF_STYLE_LAYERS",
    "SF_PERCEPTUAL_LAYERS",
    "SF_CORRECTNESS_LAYER",
    "StructureFlowVGG",
    "StructureFlowObjective",
    "lsgan_discriminator_loss",
    "sampling_correctness_loss",
    "structureflow_loss",
    "TEXTURE_LEVELS",
    "ADAPTER_SPEC",
    "VARIANT_BUILDERS",
    "structureflow_student",
    "structureflow_teacher",
    "register_adapters",
    "register_losses",
]


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
    register("structureflow", StructureFlowObjective)
