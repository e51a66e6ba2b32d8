"""The builder the ``lama`` adapter registers: LaMa in the toolkit's conventions, optionally from a released file.

It sits apart from :mod:`.model` (the network) and :mod:`.official` (reading LaMa's checkpoints, which builds
:class:`~.model.LaMa` itself), so that neither of those imports the other in both directions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .ffc import set_dft
from .model import LaMa
from .official import load_official

__all__ = ["lama_student"]


def lama_student(
    config: str | Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    dft: str = "fft",
    **overrides: Any,
) -> LaMa:
    """The student (and, fed the ground truth with an empty mask, the teacher) of the ``lama`` adapter.

    ``pretrained``: a LaMa ``best.ckpt`` or model folder (or any file :func:`~kdinpaint_adapters.lama.official.load_official`
    reads), loaded strictly: a checkpoint of another config is refused naming the differing keys.
    ``config``, ``dft`` and ``overrides``: as :class:`~kdinpaint_adapters.lama.model.LaMa`; without ``config``
    and ``overrides``, the config of ``pretrained`` (its folder's ``config.yaml``, else read from the weights'
    shapes), or ``big-lama`` when there is no file.
    """
    if config is None and pretrained is not None and not overrides:
        return set_dft(load_official(pretrained), dft)
    model = LaMa("big-lama" if config is None else config, dft=dft, **overrides)
    if pretrained is not None:
        load_official(pretrained, model=model)
    return model
