"""The ``gatedconv`` adapter: DeepFill v2 (Yu et al., "Free-Form Image Inpainting with Gated Convolution",
ICCV 2019), GC of Table 4 of Suin et al. (ICCV 2021), with the converted official weights.

Files, one concept each (imports go downwards only):

==========================  =================================================================================
``layers.py``               TF ``"SAME"`` padding, gated convolution, the spectral-normalised convolution
``contextual_attention.py`` contextual attention (Yu et al., CVPR 2018), batched, per-sample patch validity
``model.py``                the two-stage generator, its teacher, the SN-PatchGAN discriminator, conventions
``weights.py``              the converted official checkpoints in and out, ``checkpoint_filter_fn``, constructors
``channel_order.py``        which channel order the official weights expect: evidence and a check on photos
``loss.py``                 DeepFill v2's own generator loss and training objective
``__init__.py``             the adapter's spec and its registration (this file)
==========================  =================================================================================

Adapter ``gatedconv``, called as ``model(image, mask)``, stride 8:

=========  ==========================================================================================
(default)  GC: DeepFill v2 as released, nothing attached (the control when fine-tuning GC* / GC†).
star       GC*: cross-distillation (Eq. 2), self-distillation (Eq. 3) and completion blocks (Eq. 5)
           on the coarse network's encoder, the last layer of each resolution before the dilated
           block: ``conv1`` (H, cnum/2 ch), ``conv3`` (H/2, cnum), ``conv6`` (H/4, 2 cnum). The paper
           puts GC's supervision in the coarse network and applies "CD, SD coupled with CB while
           keeping the total no. of parameters same"; the released generator has to stay loadable,
           so nothing is removed to pay for the three completion blocks: the deployed GC* has
           40,905 more parameters than GC's 4,052,478 (+1.0 %). The alignment convolutions ``f_l``
           and the meta-networks are training-only.
dagger     GC†: attention transfer (Eq. 9) on ``contextual_attention``, its affinity captured at the
           ``affinity`` submodule, layout ``keys_hw`` (``B x keys x H/8 x W/8``); nothing else (GC†
           scores below GC* in Table 4, so it does not include GC*'s terms).
=========  ==========================================================================================

The teacher is :class:`GatedConvTeacher` (same ``state_dict``; ``model.init`` loads the official weights
into both) with ``teacher_input: same_mask``: it reconstructs the whole ground truth and uses the
student's mask only for contextual attention's patch validity. DeepFill v2's own generator loss is
:func:`gatedconv_loss`, also registered as the loss ``"gatedconv"``; its whole training objective (that
loss and the SN-PatchGAN discriminator) is :class:`GatedConvObjective`, registered as ``"gatedconv-gan"``.
"""

from __future__ import annotations

from typing import Callable

import torch

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

from .channel_order import ChannelOrderCheck, check_channel_order, hole_psnr, load_for_check
from .contextual_attention import COMPATS, ContextualAttention, resize_nearest_tf
from .layers import GatedConv2d, GatedUpConv2d, SNConv2d, tf_same_pad
from .loss import GC_LOSS_WEIGHTS, GatedConvObjective, gatedconv_loss
from .model import (
    COMPAT_PRESETS,
    GRID,
    OFFICIAL_COMPAT,
    GatedConvInpaint,
    GatedConvTeacher,
    SNPatchGANDiscriminator,
    from_network_output,
    to_network_input,
)
from .weights import (
    build_gatedconv,
    build_gatedconv_discriminator,
    build_gatedconv_teacher,
    checkpoint_filter_fn,
    load_checked,
    load_official,
    save_official,
)

__all__ = [
    "GatedConv2d",
    "GatedUpConv2d",
    "GatedConvInpaint",
    "SNConv2d",
    "SNPatchGANDiscriminator",
    "ContextualAttention",
    "COMPATS",
    "resize_nearest_tf",
    "tf_same_pad",
    "to_network_input",
    "from_network_output",
    "checkpoint_filter_fn",
    "load_checked",
    "load_official",
    "save_official",
    "build_gatedconv",
    "build_gatedconv_discriminator",
    "GatedConvTeacher",
    "build_gatedconv_teacher",
    "gatedconv_loss",
    "GC_LOSS_WEIGHTS",
    "GatedConvObjective",
    "ChannelOrderCheck",
    "check_channel_order",
    "hole_psnr",
    "load_for_check",
    "GRID",
    "COARSE_LEVELS",
    "COMPAT_PRESETS",
    "OFFICIAL_COMPAT",
    "ADAPTER_SPEC",
    "register_adapters",
    "register_losses",
]


COARSE_LEVELS = ["conv1", "conv3", "conv6"]  # coarse encoder: H (cnum/2 ch), H/2 (cnum), H/4 (2 cnum)

ADAPTER_SPEC = {
    "name": "gatedconv",
    "description": "DeepFill v2 (gated convolution): GC of Table 4; star = GC* (coarse encoder), dagger = GC† (attention transfer)",
    # GC as released: nothing attached (fine-tuning it with the same recipe is the control for GC* / GC†).
    "encoder_levels": [],
    "completion_sites": [],
    "attention_sites": [],
    "image_arg": "image",
    "mask_arg": "mask",
    "output": None,  # forward returns the refined prediction; return_coarse=True adds the coarse one
    "teacher_input": "same_mask",  # with GatedConvTeacher: ground truth whole, the mask for patch validity
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        # GC*: cross- and self-distillation with completion blocks on the coarse network's encoder.
        "star": {"encoder_levels": COARSE_LEVELS, "completion_sites": COARSE_LEVELS},
        # GC†: attention transfer (Eq. 9) on contextual attention, nothing else.
        "dagger": {
            "attention_sites": [
                {"module": "contextual_attention", "affinity": "affinity", "layout": "keys_hw", "transfer": True, "fusion": False}
            ]
        },
    },
}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="gatedconv",
            spec=ADAPTER_SPEC,
            build_student=build_gatedconv,
            build_teacher=build_gatedconv_teacher,
            description=ADAPTER_SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=GRID,
        )
    )


@hookimpl
def register_losses(register: Callable[[str, Callable[..., torch.Tensor]], None]) -> None:
    register("gatedconv", gatedconv_loss)
    register("gatedconv-gan", GatedConvObjective)
