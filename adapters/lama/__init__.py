"""LaMa: Resolution-robust Large Mask Inpainting with Fourier Convolutions.

Suvorov, Logacheva, Mashikhin, Remizova, Ashukha, Silvestrov, Kong, Goka, Park, Lempitsky, WACV 2022; official
code advimman/lama. The generator is a ResNet of fast Fourier convolutions (:mod:`.ffc`): a 7x7 stem, three
stride-2 down-samplings to 1/8, residual FFC blocks whose channels are 75 % global (a pointwise convolution in
the frequency domain), three transposed convolutions back up, a 7x7 head and a sigmoid. Configs
(:data:`.ffc.CONFIGS`): ``big-lama`` (18 blocks, 64 base channels, 51.0 M parameters; the released Places
model that IOPaint runs) and ``lama-fourier`` (9 blocks, 27.0 M). The module tree reproduces the official one, so the
generator of a released ``best.ckpt`` loads strictly (:func:`.official.load_official`).

Toolkit model (:class:`.model.LaMa`): called with one tensor, ``model(torch.cat([image * (1 - mask), mask], 1))``,
image in ``[-1, 1]``, mask 1 = hole (the spec's ``input: concat``); returns the prediction in ``[-1, 1]``, not
composited. LaMa's own ``[0, 1]`` convention is converted inside (:mod:`.model`).

Adapter ``lama`` (registered through the ``kdinpaint`` entry points, stride 8):

=========  ==========================================================================================
(default)  LaMa as released, nothing attached (the control when fine-tuning LaMa*)
``star``   LaMa*: cross- and self-distillation (Eq. 2, 3) coupled with completion blocks (Eq. 5) on the
           encoder, the output of each down-sampling: ``generator.model.2`` (2 ngf channels, 1/2),
           ``generator.model.3`` (4 ngf, 1/4) and ``generator.model.4`` (8 ngf at 1/8, channels
           ``[local | global]``: the residual blocks' input), in the style of EC* / GC* of Table 4
=========  ==========================================================================================

The teacher is LaMa's architecture fed the ground truth with an empty mask (an autoencoder), built by the
same builder. Builder options (``model.kwargs`` of a recipe): ``config`` (``big-lama`` | ``lama-fourier`` |
a generator mapping), ``pretrained`` (a ``best.ckpt``), ``dft`` (``fft`` | ``matmul``) and generator
overrides such as ``ngf=8, n_blocks=2``. Exports: :mod:`.export` (ONNX with the FFT inside; TorchScript
with the call IOPaint makes to its ``big-lama.pt``).

LaMa as the teacher of a small student (``recipes/compress-lama.yaml``): a ``best.ckpt`` or model folder read here
is a white box (recipe ``teacher.adapter: lama:star``, ``teacher.kwargs.pretrained``: cross-distillation from the
three levels above, plus the output term); a TorchScript or ONNX big-lama is a black box
(:mod:`kdinpaint.blackbox`, recipe ``teacher.file``: the output term only).
"""

from __future__ import annotations

from typing import Any, Callable

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl

from .ffc import CONFIGS, FFC, FFCBnAct, FFCResNetGenerator, FFCResnetBlock, FourierUnit, SpectralTransform, generator_config, set_dft
from .builder import lama_student
from .model import LaMa
from .official import checkpoint_filter_fn, infer_config, load_official, read_checkpoint, save_official

__all__ = [
    "CONFIGS",
    "FFC",
    "FFCBnAct",
    "FFCResNetGenerator",
    "FFCResnetBlock",
    "FourierUnit",
    "SpectralTransform",
    "LaMa",
    "generator_config",
    "set_dft",
    "lama_student",
    "read_checkpoint",
    "checkpoint_filter_fn",
    "infer_config",
    "load_official",
    "save_official",
    "ENCODER_LEVELS",
    "ADAPTER_SPEC",
    "register_adapters",
]

LAMA_STRIDE = 8  # three stride-2 levels
# the output of each down-sampling FFC layer: 2 ngf @ 1/2, 4 ngf @ 1/4, 8 ngf @ 1/8 ([local | global])
ENCODER_LEVELS = ["generator.model.2", "generator.model.3", "generator.model.4"]

ADAPTER_SPEC: dict[str, Any] = {
    "name": "lama",
    "description": "LaMa (FFC ResNet, big-lama / lama-fourier): LaMa of Table 4's style; star = LaMa* (encoder CD + SD + CB)",
    "encoder_levels": [],  # LaMa as released: the control of LaMa*
    "completion_sites": [],
    "input": "concat",  # model(torch.cat([image * (1 - mask), mask], 1)), LaMa's own input layout
    "image_arg": 0,
    "mask_arg": None,
    "output": None,
    "teacher_input": "empty_mask",  # LaMa's architecture on the ground truth: an autoencoder
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        # LaMa*: cross- and self-distillation coupled with completion blocks on the three down-sampling levels
        "star": {"encoder_levels": ENCODER_LEVELS, "completion_sites": ENCODER_LEVELS},
    },
}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="lama",
            spec=ADAPTER_SPEC,
            build_student=lama_student,
            description=ADAPTER_SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=LAMA_STRIDE,
        )
    )
