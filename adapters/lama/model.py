"""LaMa in the toolkit's conventions: one concatenated tensor in, the prediction in ``[-1, 1]`` out.

The toolkit speaks :mod:`kdinpaint.masking` (images in ``[-1, 1]``, mask ``1 = hole``). LaMa speaks:

* images RGB in ``[0, 1]``; the network input is ``cat([image * (1 - mask), mask], 1)`` (holes black, the
  mask as a fourth channel; LaMa's ``DefaultInpaintingTrainingModule.forward`` with ``concat_mask``);
* the output is the sigmoid prediction in ``(0, 1)`` for every pixel; LaMa's ``inpainted`` is the composite
  ``mask * prediction + (1 - mask) * image`` (the toolkit composites itself, so the model returns the
  prediction);
* sizes a multiple of 8 (three stride-2 levels; LaMa's prediction config pads with ``pad_out_to_modulo: 8``).

:class:`LaMa` is called as the spec's ``input: concat`` says: ``model(torch.cat([image * (1 - mask), mask], 1))``
with the image in ``[-1, 1]``. It maps the image to ``[0, 1]``, blanks the holes again (so whatever the
caller left under them does not matter), pads the bottom/right by reflection to a multiple of the stride,
runs the generator and crops back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdinpaint.padding import crop_top_left, pad_bottom_right

from .ffc import FFCResNetGenerator, generator_config

__all__ = ["LaMa", "to_unit", "from_unit", "network_input"]


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """Toolkit ``[-1, 1]`` to LaMa's ``[0, 1]``: ``(x + 1) / 2``."""
    return (image + 1) * 0.5


def from_unit(image: torch.Tensor) -> torch.Tensor:
    """LaMa's ``[0, 1]`` to the toolkit's ``[-1, 1]``: ``2 x - 1``."""
    return image * 2 - 1


def network_input(image01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LaMa's 4-channel input ``cat([image * (1 - mask), mask], 1)``.

    ``image01``: ``(B, 3, H, W)`` in ``[0, 1]``; ``mask``: ``(B, 1, H, W)``, 1 = hole. Returns ``(B, 4, H, W)``.
    """
    mask = mask.to(image01.dtype)
    return torch.cat([image01 * (1 - mask), mask], dim=1)


class LaMa(nn.Module):
    """LaMa's FFC ResNet generator behind the toolkit's conventions.

    Args:
        config: ``"big-lama"`` (18 residual blocks), ``"lama-fourier"`` (9), or the ``generator:`` mapping of a
            LaMa ``config.yaml`` (:func:`~kdinpaint_adapters.lama.ffc.generator_config`).
        dft: ``"fft"`` (torch.fft, LaMa's) or ``"matmul"`` (the same transform as matrix products, for
            exporters and runtimes without an FFT operator).
        overrides: generator options on top of the config, e.g. ``ngf=8, n_blocks=2`` (a tiny LaMa for tests and
            CPU recipes) or ``global_ratio=0.5``.

    ``forward(x)``: ``x`` ``(B, 4, H, W)`` float, ``cat([image * (1 - mask), mask], 1)`` with the image in
    ``[-1, 1]`` and the mask in {0, 1} (1 = hole); any ``H, W`` (small or odd sizes are padded). Returns the prediction ``(B, 3, H, W)`` in
    ``[-1, 1]`` for every pixel, **not** composited. The generator is ``self.generator`` (LaMa's parameter
    names below it, so ``self.state_dict()`` is the ``generator.*`` part of a LaMa checkpoint).
    """

    def __init__(self, config: str | Mapping[str, Any] = "big-lama", dft: str = "fft", **overrides: Any) -> None:
        super().__init__()
        cfg = generator_config(config, **overrides)
        if cfg.get("input_nc", 4) != 4 or cfg.get("output_nc", 3) != 3:
            raise ValueError(
                f"LaMa in the toolkit takes RGB + mask (input_nc=4) and predicts RGB (output_nc=3), got input_nc="
                f"{cfg.get('input_nc')}, output_nc={cfg.get('output_nc')}; build FFCResNetGenerator directly for others"
            )
        if cfg.get("add_out_act", "sigmoid") != "sigmoid":
            raise ValueError(f"LaMa's output is a sigmoid in [0, 1]; add_out_act={cfg['add_out_act']!r} is not supported here")
        self.config = cfg
        self.generator = FFCResNetGenerator(**cfg, dft=dft)
        self.stride = self.generator.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 4:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"LaMa takes one float tensor (B, 4, H, W) = torch.cat([image * (1 - mask), mask], 1) (image in "
                f"[-1, 1], mask 1 = hole), got {got}"
            )
        size = x.shape[-2:]
        net_in = network_input(to_unit(x[:, :3]), x[:, 3:])
        # reflection padding needs >= 2 pixels at the deepest level and > 3 at the 7x7 ends
        out = self.generator(pad_bottom_right(net_in, self.stride, min_size=max(4, 2 * self.stride)))
        return from_unit(crop_top_left(out, size))
