"""DeepFill v2's official weights: the converted checkpoints in, checked; the same layout out; the constructors.

The official TensorFlow weights reach PyTorch as nipponjo/deepfillv2-pytorch's ``states_tf_places2.pth`` /
``states_tf_celebahq.pth`` (``{'G': generator, 'D': discriminator}``, keys of ``model/networks_tf.py``, which
:class:`~kdinpaint_adapters.gatedconv.model.GatedConvInpaint` reproduces). :func:`checkpoint_filter_fn` also
takes TF variables read into tensors. Loading is strict: every missing / unexpected key and shape mismatch is
named. Files are read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn

from kdinpaint.weights import key_mismatches, read_weights, strip_wrapper_prefixes

from .model import OFFICIAL_COMPAT, GatedConvInpaint, GatedConvTeacher, SNPatchGANDiscriminator

__all__ = [
    "checkpoint_filter_fn",
    "load_checked",
    "load_official",
    "save_official",
    "build_gatedconv",
    "build_gatedconv_teacher",
    "build_gatedconv_discriminator",
]

_logger = logging.getLogger(__name__)


def _tf_to_torch_name(name: str) -> str | None:
    """``inpaint_net/<layer>/kernel`` -> ``<layer>.conv.weight``; up-convs gain ``.conv.conv``."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != "inpaint_net" or parts[-1] not in ("kernel", "bias"):
        return None
    param = "weight" if parts[-1] == "kernel" else "bias"
    if len(parts) == 3:
        return f"{parts[1]}.conv.{param}"
    if len(parts) == 4 and parts[2] == f"{parts[1]}_conv":
        return f"{parts[1]}.conv.conv.{param}"
    return None


def checkpoint_filter_fn(checkpoint: Mapping, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Turn an official checkpoint into a :class:`GatedConvInpaint` ``state_dict``.

    Accepts nipponjo's converted file (``{'G': ..., 'D': ...}``), a bare generator state_dict (with
    ``module.`` / ``_orig_mod.`` prefixes stripped), or TF variables already read into tensors
    (``inpaint_net/conv1/kernel`` in HWIO layout, permuted to OIHW). ``model`` is unused (timm's
    signature). Raises ``ValueError`` for anything else, e.g. nipponjo's ``states_pt_*.pth``, whose
    ``stage1.*`` layout belongs to a port with different numerics.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint["G"] if "G" in checkpoint else checkpoint
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(map(str, checkpoint))[:8]
        raise ValueError(
            f"not a DeepFill v2 generator checkpoint: expected the converted official weights with the "
            f"generator under 'G' (states_tf_places2.pth / states_tf_celebahq.pth), found keys {top}"
        )
    tf_names = any(str(k).startswith("inpaint_net/") for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = strip_wrapper_prefixes(key)
        if tf_names:
            name = _tf_to_torch_name(key)
            if name is None:
                continue  # discriminator, optimizer slots, global step: not generator weights
            key, value = name, (value.permute(3, 2, 0, 1) if value.dim() == 4 else value)
        out[key] = value
    if any(k.startswith(("stage1.", "stage2.")) for k in out):
        raise ValueError(
            "this checkpoint has nipponjo's networks.py layout (states_pt_*.pth: stage1.* / stage2.*, PyTorch "
            "padding, fine-tuned for it); this adapter reproduces the official graph and loads "
            "states_tf_places2.pth / states_tf_celebahq.pth"
        )
    return out


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` strictly, or raise ``ValueError`` naming the missing and unexpected keys
    and the shape mismatches of the ``what`` weights (``"generator"``, ``"discriminator"``)."""
    expected = module.state_dict()
    missing, unexpected, wrong_shape = key_mismatches(state, module)
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong_shape]
    if missing or unexpected or wrong:

        def few(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        raise ValueError(
            f"{what} weights do not match {type(module).__name__}: missing keys [{few(missing)}]; "
            f"unexpected keys [{few(unexpected)}]; shape mismatches [{few(wrong)}]"
            + ("; the converted official weights need cnum=48" if wrong else "")
        )
    module.load_state_dict(state, strict=True)


def load_official(
    path: str | PathLike,
    *,
    model: GatedConvInpaint | None = None,
    discriminator: SNPatchGANDiscriminator | None = None,
    map_location: str | torch.device = "cpu",
) -> GatedConvInpaint:
    """Load ``states_tf_places2.pth`` / ``states_tf_celebahq.pth`` (generator under ``'G'``) strictly.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs). ``model`` defaults
    to a new ``GatedConvInpaint(compat=OFFICIAL_COMPAT)`` (``"tf"``: the numerics the weights were
    trained in; pass ``model=GatedConvInpaint(compat="nipponjo")`` to reproduce nipponjo's port instead);
    a ``discriminator`` is filled from ``'D'`` (the file must have one).
    Raises ``ValueError`` naming the problem (unreadable file, no generator, missing/unexpected keys,
    shape mismatches). Returns the generator.
    """
    checkpoint = read_weights(
        path, "DeepFill v2 checkpoint (the converted official states_tf_places2.pth / states_tf_celebahq.pth)", map_location
    )
    model = GatedConvInpaint(compat=OFFICIAL_COMPAT) if model is None else model
    try:
        load_checked(model, checkpoint_filter_fn(checkpoint), "generator")
        if discriminator is not None:
            if not isinstance(checkpoint, Mapping) or "D" not in checkpoint:
                raise ValueError("no discriminator weights under 'D'; load the generator alone")
            load_checked(discriminator, checkpoint["D"], "discriminator")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    _logger.info("loaded DeepFill v2 weights from %s", path)
    return model


def save_official(
    model: GatedConvInpaint, path: str | PathLike, *, discriminator: SNPatchGANDiscriminator | None = None
) -> None:
    """Write ``{'G': generator, 'D': discriminator}`` in the layout of the converted official files,
    readable by :func:`load_official` and by nipponjo's ``networks_tf``. Atomic (temporary file + rename)."""
    payload: dict[str, object] = {"G": model.state_dict()}
    if discriminator is not None:
        payload["D"] = discriminator.state_dict()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Constructors


def build_gatedconv(pretrained: str | PathLike | None = None, **kwargs: object) -> GatedConvInpaint:
    """GC, the DeepFill v2 generator. ``pretrained``: a converted official file (``states_tf_*.pth``);
    ``kwargs`` go to :class:`GatedConvInpaint` (e.g. ``compat``, ``channel_order``); ``compat`` defaults
    to :data:`OFFICIAL_COMPAT` (``"tf"``, the numerics the official weights were trained in)."""
    kwargs.setdefault("compat", OFFICIAL_COMPAT)
    model = GatedConvInpaint(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_official(pretrained, model=model)
    return model


def build_gatedconv_teacher(pretrained: str | PathLike | None = None, **kwargs: object) -> GatedConvTeacher:
    """The AN for GC* / GC†: :class:`GatedConvTeacher` with the student's keyword arguments (``compat``
    defaults to :data:`OFFICIAL_COMPAT`, as the student's)."""
    kwargs.setdefault("compat", OFFICIAL_COMPAT)
    model = GatedConvTeacher(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_official(pretrained, model=model)
    return model


def build_gatedconv_discriminator(
    pretrained: str | PathLike | None = None, **kwargs: object
) -> SNPatchGANDiscriminator:
    """The SN-PatchGAN discriminator; ``pretrained``: a file with ``'D'`` (as written by a trainer)."""
    model = SNPatchGANDiscriminator(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        path = Path(pretrained)
        state = read_weights(path, "DeepFill v2 discriminator checkpoint")
        if "D" not in state:
            raise ValueError(f"{path} has no discriminator weights under 'D'")
        load_checked(model, state["D"], "discriminator")
    return model
