"""EdgeConnect's official checkpoints: identified, filtered into the toolkit's models, loaded strictly, written
back in the official layout; and the constructors that start from them.

The released files (``EdgeModel_gen.pth``, ``InpaintingModel_gen.pth``, ``EdgeModel_dis.pth``,
``InpaintingModel_dis.pth``; :data:`OFFICIAL_FILES`) hold ``{'iteration', 'generator'}`` or
``{'discriminator'}``. Every file is read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from kdinpaint._files import usual_permissions
from kdinpaint.layers import legacy_spectral_norm_key
from kdinpaint.weights import load_reported, read_weights, strip_wrapper_prefixes

from .model import Discriminator, EdgeConnect, EdgeConnectInpaint, EdgeGenerator, InpaintGenerator

__all__ = [
    "OFFICIAL_FILES",
    "identify_state_dict",
    "checkpoint_filter_fn",
    "load_official",
    "save_official",
    "build_edgeconnect",
    "build_edgeconnect_inpaint",
    "build_edgeconnect_discriminator",
    "pack_official",
]

_logger = logging.getLogger(__name__)

# which -> (network class name, official file name, key of the state_dict inside the file)
OFFICIAL_FILES: dict[str, tuple[str, str, str]] = {
    "edge": ("EdgeGenerator", "EdgeModel_gen.pth", "generator"),
    "inpaint": ("InpaintGenerator", "InpaintingModel_gen.pth", "generator"),
    "edge_dis": ("Discriminator(in_channels=2)", "EdgeModel_dis.pth", "discriminator"),
    "inpaint_dis": ("Discriminator(in_channels=3)", "InpaintingModel_dis.pth", "discriminator"),
}


def _which_of(model: nn.Module) -> str:
    if isinstance(model, EdgeGenerator):
        return "edge"
    if isinstance(model, InpaintGenerator):
        return "inpaint"
    if isinstance(model, Discriminator) and model.in_channels in (2, 3):
        return "edge_dis" if model.in_channels == 2 else "inpaint_dis"
    raise TypeError(
        f"EdgeConnect checkpoints load into EdgeGenerator, InpaintGenerator or Discriminator(in_channels=2|3), "
        f"got {type(model).__name__}; for EdgeConnect / EdgeConnectInpaint load into .edge / .inpaint"
    )


def _describe(which: str) -> str:
    net, fname, _ = OFFICIAL_FILES[which]
    return f"{net} ({fname})"


def identify_state_dict(state_dict: Mapping[str, object]) -> str | None:
    """Which official network a (bare, prefix-free) state_dict belongs to: a key of :data:`OFFICIAL_FILES`
    (``'edge'``, ``'inpaint'``, ``'edge_dis'``, ``'inpaint_dis'``) or ``None`` if it is none of them."""

    def shape(key: str) -> tuple[int, ...] | None:
        v = state_dict.get(key)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    stem_sn, stem = shape("encoder.1.weight_orig"), shape("encoder.1.weight")
    if stem_sn is not None and stem_sn[:2] == (64, 3):
        return "edge"
    if stem is not None and stem[:2] == (64, 4):
        return "inpaint"
    d = shape("conv1.0.weight_orig") or shape("features.0.weight_orig") or shape("conv1.0.weight")
    if d is not None and d[0] == 64 and d[1] in (2, 3) and shape("conv5.0.weight_orig") is not None:
        return "edge_dis" if d[1] == 2 else "inpaint_dis"
    return None


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn an official EdgeConnect checkpoint (or its state_dict) into a state_dict ``model`` loads strictly.

    Unwraps ``{'iteration', 'generator'}`` / ``{'discriminator'}``; strips ``module.`` (DataParallel) and
    ``_orig_mod.`` (torch.compile) prefixes; maps the new-style spectral-norm keys
    (``parametrizations.weight.original`` / ``.0._u`` / ``.0._v``) to the legacy ones; fills the
    discriminator's ``conv1`` / ``features`` alias from whichever is present. Raises ``ValueError`` naming the
    expected file when the weights belong to the other stage or to the other network.

    For the toolkit models: :class:`EdgeConnectInpaint` takes the ``InpaintingModel_gen.pth`` contents;
    :class:`EdgeConnect` takes ``{'edge': <EdgeModel_gen.pth contents>, 'inpaint': <InpaintingModel_gen.pth
    contents>}`` (the file :func:`pack_official` writes); both also take their own ``state_dict()``
    (prefixes stripped), and :class:`EdgeConnectInpaint` the two-stage ones too (keeping G2 only). Keys come
    back prefixed.
    """
    if isinstance(model, (EdgeConnect, EdgeConnectInpaint)):
        return _filter_wrapped(state_dict, model)
    expected = _which_of(model)
    section = OFFICIAL_FILES[expected][2]
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a checkpoint dict or state_dict, got {type(state_dict).__name__}")
    other = "discriminator" if section == "generator" else "generator"
    if isinstance(state_dict.get(section), Mapping):
        state_dict = state_dict[section]  # type: ignore[assignment]
    elif isinstance(state_dict.get(other), Mapping):
        state_dict = state_dict[other]  # type: ignore[assignment]  # the check below names the right file

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = strip_wrapper_prefixes(key)
        key = legacy_spectral_norm_key(key)
        out[key] = value
    if isinstance(model, Discriminator):
        for a, b in (("conv1.", "features."), ("features.", "conv1.")):
            for key in [k for k in out if k.startswith(a)]:
                out.setdefault(b + key[len(a) :], out[key])

    found = identify_state_dict(out)
    if found is not None and found != expected:
        raise ValueError(
            f"these weights are the {_describe(found)}, but the model is the {_describe(expected)}; "
            f"pass the {OFFICIAL_FILES[expected][1]} file (or load these into the {OFFICIAL_FILES[found][0]})"
        )
    if found is None:
        shown = ", ".join(list(out)[:5]) or "no tensors"
        raise ValueError(
            f"these weights are not an EdgeConnect {_describe(expected)}: its keys start with {shown}; "
            f"expected keys such as {next(iter(model.state_dict()))!r}"
        )
    return out


def _filter_wrapped(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    parts = ("edge", "inpaint") if isinstance(model, EdgeConnect) else ("inpaint",)
    if all(isinstance(state_dict.get(p), Mapping) for p in parts):  # one official checkpoint per stage
        sub = {p: checkpoint_filter_fn(state_dict[p], getattr(model, p)) for p in parts}  # type: ignore[arg-type]
        return {f"{p}.{k}": v for p, sd in sub.items() for k, v in sd.items()}
    flat = {strip_wrapper_prefixes(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(p + ".") for p in parts for k in flat):  # this model's own state_dict
        if parts == ("inpaint",):  # or a two-stage EC's: EC# keeps its G2
            return {k: v for k, v in flat.items() if not k.startswith("edge.")}
        return flat
    if parts == ("inpaint",):
        return {f"inpaint.{k}": v for k, v in checkpoint_filter_fn(state_dict, model.inpaint).items()}
    raise ValueError(
        "EdgeConnect has two stages: pass {'edge': <EdgeModel_gen.pth contents>, 'inpaint': "
        "<InpaintingModel_gen.pth contents>} (one file: pack_official(<checkpoints folder>, 'ec.safetensors'), "
        "e.g. for a recipe's model.init), or build it with build_edgeconnect(pretrained=<checkpoints folder>)"
    )


def load_official(
    path: str | os.PathLike[str],
    which: str | None = None,
    *,
    model: nn.Module | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an official EdgeConnect file (``EdgeModel_gen.pth``, ``InpaintingModel_gen.pth``, ``*_dis.pth``).

    ``which``: ``'edge'``, ``'inpaint'``, ``'edge_dis'`` or ``'inpaint_dis'``; ``None`` infers it from the
    weights. ``model``: load into this network (a generator, a discriminator or an
    :class:`EdgeConnectInpaint`) instead of building one; for :class:`EdgeConnect` load each stage into
    ``model.edge`` / ``model.inpaint`` (or use :func:`build_edgeconnect`). Uses ``torch.load(weights_only=True)``
    (no pickled code runs). With ``strict`` every missing / unexpected key and shape mismatch is reported by
    name in a ``ValueError``; without it they are logged and the matching tensors loaded. Returns the model.
    """
    if which is not None and which not in OFFICIAL_FILES:
        raise ValueError(f"which must be one of {sorted(OFFICIAL_FILES)} or None, got {which!r}")
    path = Path(path)
    ckpt = read_weights(path, "EdgeConnect checkpoint", map_location)
    owner = model
    if isinstance(model, EdgeConnectInpaint):
        model = model.inpaint
    if model is None:
        if which is None:
            inner = next((ckpt[k] for k in ("generator", "discriminator") if isinstance(ckpt.get(k), Mapping)), ckpt)
            which = identify_state_dict({strip_wrapper_prefixes(k): v for k, v in inner.items()})
            if which is None:
                files = ", ".join(f for _, f, _ in OFFICIAL_FILES.values())
                raise ValueError(f"{path} is not an EdgeConnect checkpoint; expected one of {files}")
        model = _build(which)
    elif which is not None and _which_of(model) != which:
        raise ValueError(f"which={which!r} but the model given is the {_describe(_which_of(model))}")
    try:
        state_dict = checkpoint_filter_fn(ckpt, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    load_reported(model, state_dict, path, _describe(_which_of(model)), strict, _logger)
    _logger.info("loaded %s from %s (iteration %s)", _describe(_which_of(model)), path, ckpt.get("iteration", "n/a"))
    return owner if owner is not None else model


def save_official(model: nn.Module, path: str | os.PathLike[str], iteration: int = 0) -> None:
    """Write ``model`` in the official file layout (``{'iteration', 'generator'}`` or ``{'discriminator'}``),
    readable by the official code and by :func:`load_official`. Written atomically (temporary file + rename)."""
    which = _which_of(model)
    section = OFFICIAL_FILES[which][2]
    payload: dict[str, object] = {section: model.state_dict()}
    if section == "generator":
        payload = {"iteration": int(iteration), **payload}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _build(which: str) -> nn.Module:
    if which == "edge":
        return EdgeGenerator()
    if which == "inpaint":
        return InpaintGenerator()
    return Discriminator(in_channels=2 if which == "edge_dis" else 3)


def _resolve(pretrained: str | os.PathLike[str], which: str) -> Path:
    p = Path(pretrained)
    return p / OFFICIAL_FILES[which][1] if p.is_dir() else p


# ----------------------------------------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------------------------------------


def build_edgeconnect(pretrained: str | os.PathLike[str] | None = None, **kwargs: object) -> EdgeConnect:
    """EC, both stages. ``pretrained``: the official checkpoints folder holding ``EdgeModel_gen.pth`` and
    ``InpaintingModel_gen.pth``. ``kwargs`` go to :class:`EdgeConnect`."""
    model = EdgeConnect(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        if not Path(pretrained).is_dir():
            raise ValueError(
                f"build_edgeconnect(pretrained=...) takes the folder holding EdgeModel_gen.pth and "
                f"InpaintingModel_gen.pth, got {pretrained}"
            )
        load_official(_resolve(pretrained, "edge"), "edge", model=model.edge)
        load_official(_resolve(pretrained, "inpaint"), "inpaint", model=model.inpaint)
    return model


def build_edgeconnect_inpaint(
    pretrained: str | os.PathLike[str] | None = None, **kwargs: object
) -> EdgeConnectInpaint:
    """EC#, the inpainting generator alone. ``pretrained``: ``InpaintingModel_gen.pth`` or its folder."""
    model = EdgeConnectInpaint(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_official(_resolve(pretrained, "inpaint"), "inpaint", model=model.inpaint)
    return model


def build_edgeconnect_discriminator(
    stage: str = "inpaint", pretrained: str | os.PathLike[str] | None = None, use_sigmoid: bool = True
) -> Discriminator:
    """The discriminator of ``stage`` (``'edge'``: 2 input channels, ``'inpaint'``: 3). ``pretrained``: the
    ``*_dis.pth`` file or its folder. ``use_sigmoid=False`` for a hinge / LSGAN-logit loss."""
    if stage not in ("edge", "inpaint"):
        raise ValueError(f"stage must be 'edge' or 'inpaint', got {stage!r}")
    model = Discriminator(in_channels=2 if stage == "edge" else 3, use_sigmoid=use_sigmoid)
    if pretrained is not None:
        load_official(_resolve(pretrained, f"{stage}_dis"), f"{stage}_dis", model=model)
    return model


def pack_official(
    checkpoints: str | os.PathLike[str], path: str | os.PathLike[str], *, residual_blocks: int = 8
) -> Path:
    """Write both released generators of an official checkpoints folder into one file, for ``model.init``.

    ``checkpoints``: the folder holding ``EdgeModel_gen.pth`` and ``InpaintingModel_gen.pth`` (both are
    loaded strictly first). ``path``: ``*.safetensors`` gets the flat ``state_dict()`` of :class:`EdgeConnect`
    (``edge.*``, ``inpaint.*``); any other name gets ``{'edge': {'generator': ...}, 'inpaint': {'generator':
    ...}}`` via ``torch.save`` (tensors only, so ``torch.load(weights_only=True)`` reads it). Either is accepted
    by :func:`checkpoint_filter_fn` for :class:`EdgeConnect` and :class:`EdgeConnectInpaint`. Written
    atomically; returns ``path``. ``residual_blocks``: 8 in every release.
    """
    model = build_edgeconnect(pretrained=checkpoints, residual_blocks=residual_blocks)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        usual_permissions(tmp)  # safetensors writes 0600
    else:
        torch.save({p: {"generator": getattr(model, p).state_dict()} for p in ("edge", "inpaint")}, tmp)
    os.replace(tmp, path)
    return path
