"""Which device a model runs on: the default of this machine, a named one checked to exist, a module's own."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["default_device", "resolve_device", "model_dtype", "model_device"]


DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")
"""The device types :func:`resolve_device` accepts (``meta`` holds no data; others are untested)."""


def default_device() -> torch.device:
    """The first available of ``cuda``, ``mps``, ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: :func:`default_device`; otherwise the named device, refused if absent here or not
    one of :data:`DEVICE_TYPES`."""
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cuda, cuda:N, mps or cpu") from None
    if device.type not in DEVICE_TYPES:  # meta, xla, ...: torch names them, but no image can be inpainted there
        raise ValueError(f"--device {name!r} cannot run a model on images; kdinpaint runs on cuda, cuda:N, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device {default_device()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available here; use --device {default_device()}")
    return device


def model_dtype(model: Any) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer; ``None`` for a plain callable."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t.dtype
    return None


def model_device(model: Any) -> torch.device:
    """Where a module's first parameter (or buffer) is; the CPU for a plain callable or a module without either."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")
