"""The ``reference`` adapter: the paper's own network (Fig. 2) and its Table 3 ablation variants.

Suin, Purohit & Rajagopalan, "Distillation-guided Image Inpainting", ICCV 2021. The network and its teacher
are in :mod:`.model`; this file holds the adapter's spec and its registration.

Table 3 variants (``reference:<variant>``; the default is Net8):

=========  ==================================================================================
baseline   backbone without attention, trained with reconstruction + style only; parameter-matched to
           Net8 by residual 1×1 bottlenecks (``comp*``) at every level, as the paper says
net1       + cross-distillation (Eq. 2)
net2       + self-distillation (Eq. 3)
net3       + both
net4       net3 + completion blocks (Eq. 5-6)
net5       baseline + completion blocks, no distillation
net6       net4 + attention in the decoder (Eq. 7-8)
net7       net6 + attention transfer (Eq. 9)
net8       net7 + PGL (Eq. 10): the paper's final model
=========  ==================================================================================
"""

from __future__ import annotations

from typing import Callable

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

from .model import (
    Compensation,
    ReferenceNet,
    border_ramp,
    exact_biharmonic_fill,
    reference_net,
    reference_teacher,
)

__all__ = [
    "ReferenceNet",
    "Compensation",
    "reference_net",
    "reference_teacher",
    "border_ramp",
    "exact_biharmonic_fill",
    "ADAPTER_SPEC",
    "VARIANT_BUILDERS",
    "register_adapters",
]


_LEVELS = ["enc1", "enc2", "enc3"]
_ATTENTION = [{"module": m, "fusion": True} for m in ("att3", "att2", "att1")]
_NO_ATTENTION = {"attention_sites": []}

ADAPTER_SPEC = {
    "name": "reference",
    "description": "the paper's own network (Fig. 2), Net8 of Table 3 by default; variants baseline, net1..net8",
    "encoder_levels": _LEVELS,
    "attention_sites": _ATTENTION,
    "image_arg": "image",
    "mask_arg": "mask",
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        "baseline": {"encoder_levels": [], "completion_sites": [], **_NO_ATTENTION},
        "net1": {"self_distillation": False, "completion_sites": [], **_NO_ATTENTION},
        "net2": {"cross_distillation": False, "completion_sites": [], **_NO_ATTENTION},
        "net3": {"completion_sites": [], **_NO_ATTENTION},
        "net4": dict(_NO_ATTENTION),
        "net5": {"encoder_levels": [], "completion_sites": _LEVELS, **_NO_ATTENTION},
        "net6": {"attention_sites": [{"module": m, "transfer": False} for m in ("att3", "att2", "att1")]},
        "net7": {"attention_sites": [{"module": m} for m in ("att3", "att2", "att1")]},
        "net8": {},
    },
}

VARIANT_BUILDERS = {
    "baseline": {"attention": False, "compensate": True},
    **{v: {"attention": False} for v in ("net1", "net2", "net3", "net4", "net5")},
}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="reference",
            spec=ADAPTER_SPEC,
            build_student=reference_net,
            build_teacher=reference_teacher,
            description=ADAPTER_SPEC["description"],
            stride=ReferenceNet.stride,
            variant_builders=VARIANT_BUILDERS,
        )
    )
