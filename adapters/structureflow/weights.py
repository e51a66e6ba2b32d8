"""StructureFlow's official checkpoints: identified, filtered into the toolkit's models, loaded strictly; and
the constructors that start from them.

The released ``latest_net_s_gen.pth`` / ``latest_net_f_gen.pth`` / ``latest_net_*_dis.pth`` are plain
state_dicts (:data:`OFFICIAL_FILES`); every file is read with ``torch.load(weights_only=True)`` (no pickled
code runs). Without weights the constructors apply the official initialisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import save_file

from kdinpaint._files import usual_permissions
from kdinpaint.layers import legacy_spectral_norm_key
from kdinpaint.weights import load_reported, read_weights, strip_wrapper_prefixes

from .model import StructureFlow, StructureFlowTeacher, StructureFlowTexture
from .networks import MultiScaleDiscriminator, StructureReconstructor, TextureGenerator, init_weights

__all__ = [
    "OFFICIAL_FILES",
    "identify_state_dict",
    "checkpoint_filter_fn",
    "load_official",
    "build_structureflow",
    "build_structureflow_texture",
    "build_structureflow_teacher",
    "pack_official",
]

_logger = logging.getLogger(__name__)

#: which -> (network, official file name)
OFFICIAL_FILES: dict[str, tuple[str, str]] = {
    "structure": ("structure reconstructor s_gen", "latest_net_s_gen.pth"),
    "texture": ("texture (flow) generator f_gen", "latest_net_f_gen.pth"),
    "discriminator": ("discriminator s_dis / f_dis", "latest_net_f_dis.pth"),
}

_TEXTURE_OWNERS = (StructureFlowTexture, StructureFlowTeacher)  # toolkit models holding only ``texture``

_SIGNATURE = {  # the first module names of each official network's state_dict
    "structure": ("input_layer.", "content_param.", "image_net."),
    "texture": ("flow_column.", "conv_column."),
    "discriminator": ("model_1.", "model_2."),
}


def _which_of(model: nn.Module) -> str:
    for which, cls in (("structure", StructureReconstructor), ("texture", TextureGenerator),
                       ("discriminator", MultiScaleDiscriminator)):
        if isinstance(model, cls):
            return which
    raise TypeError(
        "StructureFlow checkpoints load into StructureReconstructor, TextureGenerator or MultiScaleDiscriminator, "
        f"got {type(model).__name__}; for StructureFlow / StructureFlowTexture / StructureFlowTeacher load into "
        ".structure / .texture"
    )


def identify_state_dict(state_dict: Mapping[str, object]) -> str | None:
    """Which official network a prefix-free state_dict belongs to: ``'structure'`` (s_gen), ``'texture'``
    (f_gen), ``'discriminator'`` (s_dis / f_dis) or ``None``."""
    keys = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor)]
    scores = {w: sum(k.startswith(sig) for k in keys for sig in sigs) for w, sigs in _SIGNATURE.items()}
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    return best if scores[best] > 0 else None


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn official StructureFlow weights into a state_dict ``model`` loads strictly.

    The official files are plain state_dicts. Strips ``module.`` (DataParallel) and ``_orig_mod.``
    (torch.compile) prefixes and maps new-style spectral-norm keys (``parametrizations.weight.original`` /
    ``.0._u`` / ``.0._v``) to the legacy ones. Raises ``ValueError`` naming the right file when the weights
    belong to the other stage. For the toolkit models: :class:`StructureFlowTexture` and
    :class:`StructureFlowTeacher` take the ``latest_net_f_gen.pth`` contents; :class:`StructureFlow` takes
    ``{'structure': <s_gen contents>, 'texture': <f_gen contents>}``; all take a toolkit model's
    ``state_dict()`` (the texture-only ones keep its ``texture.*`` keys). Keys come back prefixed.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    if isinstance(model, (StructureFlow, *_TEXTURE_OWNERS)):
        parts = ("structure", "texture") if isinstance(model, StructureFlow) else ("texture",)
        if all(isinstance(state_dict.get(p), Mapping) for p in parts):
            return {f"{p}.{k}": v for p in parts
                    for k, v in checkpoint_filter_fn(state_dict[p], getattr(model, p)).items()}  # type: ignore[arg-type]
        flat = {strip_wrapper_prefixes(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        if any(k.startswith(p + ".") for p in parts for k in flat):  # a toolkit model's state_dict
            return {k: v for k, v in flat.items() if k.split(".", 1)[0] in parts}
        if parts == ("texture",):
            return {f"texture.{k}": v for k, v in checkpoint_filter_fn(state_dict, model.texture).items()}
        raise ValueError(
            "StructureFlow has two stages: pass {'structure': <latest_net_s_gen.pth contents>, 'texture': "
            "<latest_net_f_gen.pth contents>}, or build it with build_structureflow(pretrained=<checkpoints folder>)"
        )
    expected = _which_of(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            key = legacy_spectral_norm_key(strip_wrapper_prefixes(key))
            out[key] = value
    found = identify_state_dict(out)
    if found is None:
        shown = ", ".join(list(out)[:5]) or "no tensors"
        raise ValueError(
            f"these weights are not a StructureFlow {OFFICIAL_FILES[expected][0]}: their keys start with {shown}; "
            f"expected keys such as {next(iter(model.state_dict()))!r} ({OFFICIAL_FILES[expected][1]})"
        )
    if found != expected:
        raise ValueError(
            f"these weights are the {OFFICIAL_FILES[found][0]} ({OFFICIAL_FILES[found][1]}), but the model is the "
            f"{OFFICIAL_FILES[expected][0]}; pass the {OFFICIAL_FILES[expected][1]} file "
            f"(or load these with which={found!r})"
        )
    return out


def load_official(
    path: str | os.PathLike[str],
    which: Literal["structure", "texture", "discriminator"] | None = None,
    *,
    model: nn.Module | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an official StructureFlow file (``latest_net_s_gen.pth``, ``latest_net_f_gen.pth``, ``*_dis.pth``).

    ``which``: ``'structure'``, ``'texture'`` or ``'discriminator'``; ``None`` infers it from the keys.
    ``model``: load into this network (a :class:`StructureReconstructor`, :class:`TextureGenerator`,
    :class:`MultiScaleDiscriminator`, or the texture of a :class:`StructureFlowTexture` /
    :class:`StructureFlowTeacher`) instead of building
    one at the official width. ``torch.load(weights_only=True)``: no pickled code runs. With ``strict`` every
    missing / unexpected key and shape mismatch is named in a ``ValueError``; without, they are logged and the
    matching tensors loaded. A file of the other stage raises ``ValueError`` naming the right file. Returns
    the model.
    """
    if which is not None and which not in OFFICIAL_FILES:
        raise ValueError(f"which must be one of {sorted(OFFICIAL_FILES)} or None, got {which!r}")
    path = Path(path)
    ckpt = read_weights(path, "StructureFlow checkpoint", map_location)
    owner = model
    if isinstance(model, _TEXTURE_OWNERS):
        model = model.texture
    elif isinstance(model, StructureFlow):
        if which is None:
            raise ValueError("loading one file into StructureFlow needs which='structure' or which='texture'")
        model = getattr(model, which)
    if model is None:
        if which is None:
            which = identify_state_dict({strip_wrapper_prefixes(k): v for k, v in ckpt.items()})  # type: ignore[assignment]
            if which is None:
                files = ", ".join(f for _, f in OFFICIAL_FILES.values())
                raise ValueError(f"{path} is not a StructureFlow checkpoint; expected one of {files}")
        model = {"structure": StructureReconstructor, "texture": TextureGenerator,
                 "discriminator": MultiScaleDiscriminator}[which]()
    elif which is not None and _which_of(model) != which:
        raise ValueError(f"which={which!r} but the model given is the {OFFICIAL_FILES[_which_of(model)][0]}")
    try:
        state_dict = checkpoint_filter_fn(ckpt, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    load_reported(model, state_dict, path, OFFICIAL_FILES[_which_of(model)][0], strict, _logger)
    _logger.info("loaded %s from %s", OFFICIAL_FILES[_which_of(model)][0], path)
    return owner if owner is not None else model


# ----------------------------------------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------------------------------------


def _resolve(pretrained: str | os.PathLike[str], which: str) -> Path:
    p = Path(pretrained)
    return p / OFFICIAL_FILES[which][1] if p.is_dir() else p


def build_structureflow(pretrained: str | os.PathLike[str] | None = None, **kwargs: object) -> StructureFlow:
    """SF, both stages. ``pretrained``: the official checkpoints folder holding ``latest_net_s_gen.pth`` and
    ``latest_net_f_gen.pth``. ``kwargs`` go to :class:`StructureFlow`. Without weights, the official init."""
    model = StructureFlow(**kwargs)  # type: ignore[arg-type]
    init_weights(model)
    if pretrained is not None:
        if not Path(pretrained).is_dir():
            raise ValueError(
                "build_structureflow(pretrained=...) takes the folder holding latest_net_s_gen.pth and "
                f"latest_net_f_gen.pth, got {pretrained}"
            )
        load_official(_resolve(pretrained, "structure"), "structure", model=model.structure)
        load_official(_resolve(pretrained, "texture"), "texture", model=model.texture)
    return model


def build_structureflow_texture(
    pretrained: str | os.PathLike[str] | None = None, **kwargs: object
) -> StructureFlowTexture:
    """SF#, the texture generator alone. ``pretrained``: ``latest_net_f_gen.pth`` or its folder."""
    model = StructureFlowTexture(**kwargs)  # type: ignore[arg-type]
    init_weights(model)
    if pretrained is not None:
        load_official(_resolve(pretrained, "texture"), "texture", model=model.texture)
    return model


def pack_official(
    folder: str | os.PathLike[str], path: str | os.PathLike[str], **kwargs: object
) -> Path:
    """Write both released generators of a checkpoints folder (``latest_net_s_gen.pth``,
    ``latest_net_f_gen.pth``) as one safetensors file of the :class:`StructureFlow` state_dict, the single
    file a recipe's ``model.init`` reads (SF, SF*; the teacher takes its ``texture.*`` part). Loaded strictly
    (:func:`load_official`); ``kwargs`` go to :class:`StructureFlow` (``dim`` 64 for the released files).
    Returns the written path."""
    model = build_structureflow(folder, **kwargs)
    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    usual_permissions(path)  # safetensors writes 0600
    return path


def build_structureflow_teacher(
    pretrained: str | os.PathLike[str] | None = None, **kwargs: object
) -> StructureFlowTeacher:
    """The SF / SF* teacher. ``pretrained``: ``latest_net_f_gen.pth`` or its folder (a start for the L1
    autoencoder pre-training). ``kwargs`` go to :class:`StructureFlowTeacher`. Without weights, the official init."""
    model = StructureFlowTeacher(**kwargs)  # type: ignore[arg-type]
    init_weights(model)
    if pretrained is not None:
        load_official(_resolve(pretrained, "texture"), "texture", model=model.texture)
    return model

