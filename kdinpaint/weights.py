"""Reading weight files without running pickled code: ``.safetensors``, or ``.pth`` through
``torch.load(weights_only=True)``. One function, so every loader fails the same clear way."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_weights"]


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
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device=str(map_location))
        else:
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name and the reason
        raise ValueError(f"{path} cannot be read as a tensors-only {what} (weights_only=True): {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a {what} (a mapping of tensors)")
    return data
