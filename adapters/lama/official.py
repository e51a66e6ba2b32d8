"""LaMa's released checkpoints: reading them without running pickled code, remapping and strict loading.

A LaMa ``best.ckpt`` (``big-lama/models/best.ckpt``) is a PyTorch Lightning checkpoint: ``{"state_dict":
{"generator.model.1.ffc.convl2l.weight": ..., "discriminator.*": ..., "loss_resnet_pl.*": ..., "val_evaluator.*":
...}, "epoch": ..., "global_step": ..., "hyper_parameters": <the training config>, "callbacks": ..., ...}``
(LaMa's ``bin/make_checkpoint.py`` removes ``optimizer_states`` and, by default, the discriminator and loss
entries). Only the ``generator.`` entries are the network.

Reading. ``torch.load(weights_only=True)`` refuses any class that is not a tensor or a plain container, and a
Lightning checkpoint holds some in its metadata: the config as an OmegaConf ``DictConfig``, the callbacks keyed
by their classes, NumPy scalars. :func:`read_checkpoint` first tries the plain weights-only load; if that is
refused, it lists the file's globals (``torch.serialization.get_unsafe_globals_in_checkpoint``, a static
read) and, when every one belongs to the metadata namespaces of :data:`INERT_NAMESPACES` (OmegaConf,
Lightning, typing, NumPy, collections, pathlib, argparse, enum) or is a builtin type (``dict``, ``int`` ...,
named by OmegaConf's node metadata), loads again with each of them replaced by an inert placeholder that stores
nothing and runs nothing (the builtin types stand for themselves): no code named by the file is imported or
called, and the metadata comes back as placeholders while the tensors load as tensors. A global outside those
namespaces is refused, naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdinpaint.weights import key_report, strip_wrapper_prefixes

from .ffc import FFCResNetGenerator
from .model import LaMa

__all__ = [
    "INERT_NAMESPACES",
    "read_checkpoint",
    "generator_state_dict",
    "checkpoint_filter_fn",
    "infer_config",
    "load_official",
    "save_official",
]

_logger = logging.getLogger(__name__)

# module prefixes of the metadata a Lightning checkpoint may pickle beside its tensors
INERT_NAMESPACES: tuple[str, ...] = (
    "omegaconf.",
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "typing.",
    "numpy.",
    "collections.",
    "pathlib.",
    "argparse.",
    "enum.",
)
# builtin types a checkpoint's metadata names as values (OmegaConf's node metadata: object_type=dict ...): themselves
_BUILTIN_TYPES = {f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, complex, bool, str,
                                                         bytes, bytearray, slice, range, object, type(None))}
# dict subclasses whose items must stay readable to the unpickler (it fills only real dicts)
_AS_DICT = {"pytorch_lightning.utilities.parsing.AttributeDict", "lightning.fabric.utilities.data.AttributeDict",
            "lightning_fabric.utilities.data.AttributeDict", "collections.defaultdict"}


class _Inert:
    """Stands in for a class or function named by a checkpoint's metadata: accepts any construction and any
    state, keeps none of it, and runs no code of the class it replaces."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<metadata not loaded>"


def _empty_dict(*args: Any, **kwargs: Any) -> dict:
    return {}


class _DictOf(dict):
    """Placeholder for a dict subclass built by NEWOBJ: the unpickler then fills a plain dict."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return {}


def _stand_in(name: str) -> Any:
    if name in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[name]
    if name == "collections.defaultdict":  # rebuilt by a call, then filled: a plain dict
        return _empty_dict
    return _DictOf if name in _AS_DICT else _Inert


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Mapping[str, Any]:
    """The mapping stored in a LaMa checkpoint (``.ckpt``/``.pth`` via weights-only unpickling, or ``.safetensors``).

    Lightning metadata that plain weights-only loading refuses is replaced by inert placeholders (module
    docstring); any other non-tensor global is refused with ``ValueError`` naming it. Missing files raise
    ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LaMa checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first:  # noqa: BLE001 - UnpicklingError, or a zip/format error re-raised below
        if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            raise ValueError(f"{path} cannot be read with weights_only=True ({first}); torch >= 2.5 reads Lightning "
                             "metadata safely") from first
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not a torch.save file at all
            raise ValueError(f"{path} is not a PyTorch checkpoint that weights_only=True can read: {first}") from first
        foreign = [n for n in names if not n.startswith(INERT_NAMESPACES) and n not in _BUILTIN_TYPES]
        if foreign or not names:
            raise ValueError(
                f"{path} pickles objects other than tensors and Lightning metadata: {foreign or first}; refusing to "
                "run code from it. Re-save the generator's weights alone (torch.save(ckpt['state_dict'], ...)) where "
                "you trust the file"
            ) from None
        stand_ins = [(_stand_in(n), n) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            try:
                data = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"{path} cannot be read with weights_only=True, even with its metadata "
                                 f"({', '.join(names)}) skipped: {err}") from err
        _logger.info("%s: skipped Lightning metadata (%s)", path, ", ".join(names))
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a LaMa checkpoint (a mapping with a state_dict)")
    return data


def generator_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The generator's own keys (``model.1.ffc.convl2l.weight`` ...) from a Lightning checkpoint, its
    ``state_dict``, a :class:`LaMa` state_dict (``generator.*``) or a bare generator state_dict.

    ``module.`` / ``_orig_mod.`` prefixes are stripped; the other sections (discriminator, losses, evaluators)
    are dropped and counted in the log. Raises ``ValueError`` when no generator weights are found.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint mapping or a state_dict, got {type(checkpoint).__name__}")
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, Mapping):
        raise ValueError(f"the checkpoint's 'state_dict' is a {type(sd).__name__}, not a mapping of tensors")
    flat = {strip_wrapper_prefixes(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    gen = {k.removeprefix("generator."): v for k, v in flat.items() if k.startswith("generator.")}
    if gen:
        others: dict[str, int] = {}
        for k in flat:
            if not k.startswith("generator."):
                section = k.split(".", 1)[0]
                others[section] = others.get(section, 0) + 1
        if others:
            _logger.info("LaMa checkpoint: kept %d generator tensors, dropped %s", len(gen), others)
        return gen
    if any(k.startswith("model.1.ffc.") for k in flat):  # a bare generator state_dict
        return flat
    shown = ", ".join(list(flat)[:5]) or "no tensors"
    raise ValueError(
        f"no LaMa generator weights found (keys start with {shown}); expected a LaMa best.ckpt with "
        "'generator.model.1.ffc.convl2l.weight' in its state_dict"
    )


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """A LaMa checkpoint (or state_dict) as a state_dict of ``model``: :class:`LaMa` gets ``generator.*`` keys,
    :class:`FFCResNetGenerator` the bare ones. Other sections are dropped (:func:`generator_state_dict`)."""
    gen = generator_state_dict(state_dict)
    if isinstance(model, FFCResNetGenerator):
        return gen
    if isinstance(model, LaMa):
        return {f"generator.{k}": v for k, v in gen.items()}
    raise TypeError(f"LaMa checkpoints load into LaMa or FFCResNetGenerator, got {type(model).__name__}")


def _index(key: str) -> int:
    return int(key.split(".")[1])


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The generator config (:func:`~kdinpaint_adapters.lama.ffc.generator_config` keys) of bare generator weights.

    Read from the shapes: ``ngf`` and ``input_nc`` (stem), ``n_downsampling`` (stride-2 FFC layers), ``n_blocks``
    (residual blocks), the residual blocks' global ratios (their global input and output channels over their
    width) and ``enable_lfu``, ``output_nc`` (last convolution). The output activation is not in the weights:
    ``sigmoid``, as in every released config.
    """
    try:
        stem = state_dict["model.1.ffc.convl2l.weight"]
    except KeyError:
        raise ValueError("not LaMa generator weights: no model.1.ffc.convl2l.weight (the 7x7 stem)") from None
    ffc_layers = sorted({_index(k) for k in state_dict if k.split(".")[2:3] == ["ffc"]})
    blocks = sorted({_index(k) for k in state_dict if k.split(".")[2:3] == ["conv1"]})
    cfg: dict[str, Any] = {"input_nc": int(stem.shape[1]), "ngf": int(stem.shape[0]),
                           "n_downsampling": len(ffc_layers) - 1, "n_blocks": len(blocks), "add_out_act": "sigmoid"}
    if blocks:
        p = f"model.{blocks[0]}.conv1.ffc."
        dim = sum(int(state_dict[p + n].shape[1]) for n in ("convl2l.weight", "convg2l.weight") if p + n in state_dict)
        in_g = int(state_dict[p + "convg2l.weight"].shape[1]) if p + "convg2l.weight" in state_dict else 0
        out_g = int(state_dict[p + "convl2g.weight"].shape[0]) if p + "convl2g.weight" in state_dict else 0
        lfu = any(k.startswith(p + "convg2g.lfu.") for k in state_dict)
        if dim:
            cfg["resnet_conv_kwargs"] = {"ratio_gin": in_g / dim, "ratio_gout": out_g / dim, "enable_lfu": lfu}
    convs = [k for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 4 and k.count(".") == 2]
    if convs:
        cfg["output_nc"] = int(state_dict[max(convs, key=_index)].shape[0])
    return cfg


def load_official(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    config: str | Mapping[str, Any] | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load LaMa's generator from a released ``best.ckpt`` (or a file :func:`save_official` wrote).

    ``model``: a :class:`LaMa` or :class:`FFCResNetGenerator` to load into; otherwise one is built from
    ``config`` (``"big-lama"``, ``"lama-fourier"`` or a generator mapping) or, without it, from the config the
    weights imply (:func:`infer_config`). With ``strict`` (the default) a checkpoint of another config (block
    count, width, global ratio, LFU) is refused with a ``ValueError`` naming the missing, unexpected and
    mis-shaped keys and the file's own config; without it the matching tensors are loaded and the rest logged.
    ``path`` may also be a LaMa model folder (``big-lama/``: ``config.yaml`` and ``models/best.ckpt``); its
    ``config.yaml`` then gives the config unless ``model`` or ``config`` does. Returns the model.
    """
    path = Path(path)
    if path.is_dir():
        folder, path = path, path / "models" / "best.ckpt"
        if model is None and config is None and (folder / "config.yaml").is_file():
            config = yaml.safe_load((folder / "config.yaml").read_text())
    checkpoint = read_checkpoint(path, map_location)
    try:
        gen = generator_state_dict(checkpoint)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if model is None:
        model = LaMa(config if config is not None else infer_config(gen))
    elif config is not None:
        raise ValueError("pass either a model to load into or a config to build, not both")
    target = model.generator if isinstance(model, LaMa) else model
    if not isinstance(target, FFCResNetGenerator):
        raise TypeError(f"LaMa checkpoints load into LaMa or FFCResNetGenerator, got {type(model).__name__}")
    problems = key_report(gen, target)
    if problems:
        found = infer_config(gen) if "model.1.ffc.convl2l.weight" in gen else "not a LaMa generator"
        message = (f"{path} does not match the model's LaMa config: " + "; ".join(problems)
                   + f"; the file's generator looks like {found}; build the model with that config "
                   "(load_official(path) infers it)")
        if strict:
            raise ValueError(message)
        _logger.warning(message)
        own = target.state_dict()
        gen = {k: v for k, v in gen.items() if k in own and v.shape == own[k].shape}
    target.load_state_dict(gen, strict=strict)
    _logger.info("loaded LaMa generator from %s (epoch %s)", path, checkpoint.get("epoch", "n/a"))
    return model


def save_official(model: nn.Module, path: str | os.PathLike[str], extra: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s generator in LaMa's checkpoint layout, ``{"state_dict": {"generator.<key>": ...}, "epoch":
    0, "global_step": 0}``: what LaMa's ``load_checkpoint(..., strict=False)`` (``bin/predict.py``) and
    :func:`load_official` read. ``extra``: more ``state_dict`` entries (e.g. ``discriminator.*``). Atomic write."""
    target = model.generator if isinstance(model, LaMa) else model
    if not isinstance(target, FFCResNetGenerator):
        raise TypeError(f"save_official takes a LaMa or an FFCResNetGenerator, got {type(model).__name__}")
    state = {f"generator.{k}": v.detach().cpu() for k, v in target.state_dict().items()}
    state.update(extra or {})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, tmp)
    os.replace(tmp, path)
    return path
