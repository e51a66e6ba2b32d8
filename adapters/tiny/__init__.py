"""``tiny-unet``: a small three-level U-Net for inpainting, the smallest complete kdinpaint adapter.

It is a built-in adapter registered exactly as a third-party plugin is: this package implements the
``register_adapters`` hook and ``pyproject.toml`` exposes it in the ``kdinpaint`` entry-point group
(``tiny = "kdinpaint_adapters.tiny"``). It is meant for smoke tests, examples and CPU experiments, not for
quality: a few tens of thousands of parameters, any input size divisible by 8. The network is in
:mod:`.model`; this file holds the adapter's spec and its registration.
"""

from __future__ import annotations

from typing import Callable

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

from .model import TinyInpaintUNet, tiny_unet

__all__ = ["TinyInpaintUNet", "tiny_unet", "ADAPTER_SPEC", "register_adapters"]


ADAPTER_SPEC = {
    "name": "tiny-unet",
    "description": "a small three-level U-Net (smoke tests, examples, CPU experiments)",
    "encoder_levels": ["enc1", "enc2", "enc3"],
    "image_arg": "image",
    "mask_arg": "mask",
    "probe_shape": [1, 3, 32, 32],
    "variants": {
        "no-cb": {"completion_sites": []},  # distillation only, no completion blocks
        "no-self": {"self_distillation": False},  # cross-distillation (Eq. 2) only
        "wide": {},  # same spec, a wider network (see variant_builders)
    },
}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="tiny-unet",
            spec=ADAPTER_SPEC,
            build_student=tiny_unet,
            description=ADAPTER_SPEC["description"],
            stride=8,
            variant_builders={"wide": {"width": 32}},
        )
    )
