"""Reading weight files without running pickled code: ``.safetensors``, or ``.pth`` through
``torch.load(weights_only=True)``. One function, so every loader fails the same clear way."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

# a state_dict key without DDP's ``module.`` / torch.compile's ``_orig_mod.`` prefixes, in any order
from kdinpaint._modules import normalise_path as strip_wrapper_prefixes

__all__ = ["read_weights", "load_weights", "key_mismatches", "key_report", "load_reported", "strip_wrapper_prefixes",
           "check_values", "check_file_values"]


def read_weights(path: str | os.PathLike[str], what: str = "checkpoint", map_location: str | torch.device = "cpu") -> Mapping[str, Any]:
    """The mapping stored in ``path`` (a state_dict or a dict of them).

    ``what`` names the expected content in the errors (e.g. ``"EdgeConnect checkpoint"``): a missing file
    raises ``FileNotFoundError``, a file that is not tensors-only or not a mapping raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        if path.suffix == ".safetensors":
            data: Any = load_file(str(path), device=str(map_location))
        else:
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name and the reason
        raise ValueError(f"{path} cannot be read as a tensors-only {what} (weights_only=True): {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a {what} (a mapping of tensors)")
    return data


def key_mismatches(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, wrong_shape)`` key names of ``state_dict`` against ``model``'s state."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    return missing, unexpected, wrong_shape


def key_report(state_dict: Mapping[str, torch.Tensor], model: nn.Module, shown: int = 10) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against ``model``, by name."""
    own = model.state_dict()
    missing, unexpected, wrong_shape = key_mismatches(state_dict, model)
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape]
    problems = []
    for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if names:
            more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
            problems.append(f"{label} ({len(names)}): " + ", ".join(names[:shown]) + more)
    return problems


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def check_values(tensors: Iterable[tuple[str, torch.Tensor]], model: nn.Module, where: object) -> None:
    """``ValueError`` naming ``where`` and the key for a stored tensor that ``load_state_dict`` would silently turn
    into garbage: of another kind than the model's (integer, e.g. quantised, or bool weights into float ones: copied
    as numbers) or, for a parameter, holding NaN/inf (every output NaN). Float widths (float16 into float32) are
    cast, as torch does. Keys the model lacks are left to :func:`key_report`."""
    own = model.state_dict()
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    for key, value in tensors:
        mine = own.get(key)
        if mine is None:
            continue
        if _kind(value.dtype) != _kind(mine.dtype):
            raise ValueError(
                f"{where}: tensor {key!r} is {str(value.dtype).replace('torch.', '')} ({_kind(value.dtype)}) but the "
                f"network's is {str(mine.dtype).replace('torch.', '')}: loading would copy its numbers as weights. It is "
                "a quantised file or another program's; pass the float weights of this network"
            )
        if key in params and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{where}: parameter {key!r} holds {bad} NaN/inf value(s): every output would be NaN. The weights were "
                "saved from a run that diverged or the file is damaged; use an earlier checkpoint"
            )


def check_file_values(path: str | os.PathLike[str], model: nn.Module) -> None:
    """:func:`check_values` for the tensors of the safetensors file ``path``, read one at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        check_values(((k, f.get_tensor(k)) for k in f.keys()), model, path)


def load_reported(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], where: object, what: str, strict: bool, logger: logging.Logger
) -> None:
    """Load ``state_dict``; with ``strict`` any :func:`key_report` problem is a ``ValueError`` naming ``what``,
    without it the problems are logged and the tensors that fit are loaded."""
    problems = key_report(state_dict, model)
    if problems and strict:
        raise ValueError(f"{where} does not match the {what}: " + "; ".join(problems))
    for p in problems:
        logger.warning("%s: %s", where, p)
    check_values(state_dict.items(), model, where)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}, strict=strict)


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    what: str,
    filter_fn: Callable[[Mapping[str, Any], nn.Module], Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Load the weight file ``path`` into ``model`` strictly, every failure a ``ValueError`` naming the file.

    ``what`` says what the file should hold (``"reference student (model.init)"``); ``filter_fn`` (an
    adapter's ``checkpoint_filter_fn``) remaps official keys first. Unreadable files are refused by
    :func:`read_weights`, a file of another network by its :func:`key_report` (missing, unexpected and
    mis-shaped keys by name), a filter that cannot make sense of the file by its error.
    """
    state = read_weights(path, what)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as e:
            raise ValueError(f"{path} is not a {what}: its keys cannot be remapped ({type(e).__name__}: {e})") from None
    problems = key_report(state, model)
    if problems:
        raise ValueError(f"{path} is not a {what}: " + "; ".join(problems) + "; pass a file written for this network")
    check_values(state.items(), model, path)
    model.load_state_dict(state)
