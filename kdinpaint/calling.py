"""How a model is called with ``(image, mask)``: finding, replacing and building those arguments.

The spec names the image and mask arguments by parameter name or position; this module binds a real call
(``args``, ``kwargs``) to those names through the signature of the model's ``forward``.
"""

from __future__ import annotations

import inspect
from typing import Any, Union

import torch
from torch import nn

__all__ = ["CallConvention", "select_output"]

Arg = Union[str, int]


class CallConvention:
    """Locates the image and mask in calls of ``module`` (its ``forward`` signature)."""

    def __init__(self, module: nn.Module, image_arg: Arg = 0, mask_arg: Arg = "mask"):
        self.module_name = type(module).__name__
        self.image_arg = image_arg
        self.mask_arg = mask_arg
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):  # builtins or C extensions without a signature
            params = []
        self._positional = [
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self._keyword_only = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        self._var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
        for arg, what in ((image_arg, "image_arg"), (mask_arg, "mask_arg")):
            if isinstance(arg, str) and params and arg not in self._positional and arg not in self._keyword_only and not self._var_keyword:
                raise ValueError(
                    f"spec {what}={arg!r}: {self.module_name}.forward has no parameter {arg!r}; "
                    f"its parameters are {[p.name for p in params]}"
                )

    def _locate(self, args: tuple, kwargs: dict, arg: Arg, what: str) -> tuple[str, Any]:
        if isinstance(arg, int):
            if arg < len(args):
                return "pos", arg
            if arg < len(self._positional) and self._positional[arg] in kwargs:
                return "kw", self._positional[arg]
        else:
            if arg in kwargs:
                return "kw", arg
            if arg in self._positional and self._positional.index(arg) < len(args):
                return "pos", self._positional.index(arg)
        raise ValueError(
            f"{self.module_name} was called without its {what} ({arg!r}): pass it by position or keyword, "
            f"or set the spec's {what}_arg to where your model takes it"
        )

    def get(self, args: tuple, kwargs: dict, which: str) -> torch.Tensor:
        """The ``image`` or ``mask`` tensor of a call."""
        kind, key = self._locate(args, kwargs, getattr(self, f"{which}_arg"), which)
        return args[key] if kind == "pos" else kwargs[key]

    def replace(self, args: tuple, kwargs: dict, which: str, value: Any) -> tuple[tuple, dict]:
        """A copy of the call with the ``image`` or ``mask`` replaced."""
        kind, key = self._locate(args, kwargs, getattr(self, f"{which}_arg"), which)
        if kind == "pos":
            args = args[:key] + (value,) + args[key + 1 :]
        else:
            kwargs = {**kwargs, key: value}
        return args, kwargs

    def build(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, dict]:
        """A call ``(args, kwargs)`` passing just the image and the mask."""
        slots: dict[int, torch.Tensor] = {}
        kwargs: dict[str, torch.Tensor] = {}
        for arg, value in ((self.image_arg, image), (self.mask_arg, mask)):
            if isinstance(arg, int):
                slots[arg] = value
            elif arg in self._positional:
                slots[self._positional.index(arg)] = value
            else:
                kwargs[arg] = value
        if slots and sorted(slots) != list(range(len(slots))):
            # positions with gaps: pass by name where we can
            for pos, value in list(slots.items()):
                if pos < len(self._positional):
                    kwargs[self._positional[pos]] = slots.pop(pos)
            if slots:
                raise ValueError(
                    f"cannot build a call of {self.module_name} from image_arg={self.image_arg!r}, "
                    f"mask_arg={self.mask_arg!r}: pass example_inputs to attach()"
                )
        return tuple(slots[i] for i in sorted(slots)), kwargs


def select_output(output: Any, key: Arg | None) -> torch.Tensor:
    """The prediction inside a model's output (``key``: tuple index, dict key, or ``None`` for the output)."""
    if key is None:
        value = output
    else:
        try:
            value = output[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"the spec's output={key!r} does not select anything from the model's output of type "
                f"{type(output).__name__}"
            ) from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the model returned {type(value).__name__}, not a tensor; set the spec's `output` to the index or "
            "key of the prediction"
        )
    return value
