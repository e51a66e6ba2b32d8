"""How a model is called with ``(image, mask)``: finding, replacing and building those arguments.

The spec names the image and mask arguments by parameter name or position; this module binds a real call
(``args``, ``kwargs``) to those names through the signature of the model's ``forward``. With ``input: concat``
the model takes one tensor ``torch.cat([image * (1 - mask), mask], 1)`` (``concat_mask_first``: the mask
channel first) at ``image_arg``: its image channels are the image, its mask channel the mask. Building a
call concatenates what it is given: kdinpaint passes students the masked image, as in the two-argument
convention.
"""

from __future__ import annotations

import inspect
from typing import Any, Union

import torch
from torch import nn

__all__ = ["CallConvention", "convention", "select_output"]

Arg = Union[str, int]


class CallConvention:
    """Locates the image and mask in calls of ``module`` (its ``forward`` signature)."""

    def __init__(self, module: nn.Module, image_arg: Arg = 0, mask_arg: Arg | None = "mask", input: str = "separate"):
        self.module_name = type(module).__name__
        self.image_arg = image_arg
        self.mask_arg = mask_arg
        self.input = input
        if input not in ("separate", "concat", "concat_mask_first"):
            raise ValueError(f"input {input!r} is not one of ['separate', 'concat', 'concat_mask_first']")
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):  # builtins or C extensions without a signature
            params = []
        self._positional = [
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self._keyword_only = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        self._var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
        one_tensor = (
            len(self._positional) == 1 and not self._keyword_only and not self._var_keyword
            and not any(p.kind == p.VAR_POSITIONAL for p in params)
        )
        hint = (
            f"; {self.module_name}.forward takes one tensor: if it is torch.cat([image * (1 - mask), mask], 1), set "
            "the spec's `input: concat` (`concat_mask_first` when the mask channel comes first)"
            if one_tensor and input == "separate" else ""
        )
        if input == "separate" and not isinstance(mask_arg, (str, int)):
            raise ValueError(f"mask_arg must be a parameter name or a position, got {mask_arg!r}{hint}")
        checked = ((image_arg, "image_arg"), (mask_arg, "mask_arg")) if input == "separate" else ((image_arg, "image_arg"),)
        for arg, what in checked:
            if isinstance(arg, str) and params and arg not in self._positional and arg not in self._keyword_only and not self._var_keyword:
                raise ValueError(
                    f"spec {what}={arg!r}: {self.module_name}.forward has no parameter {arg!r}; "
                    f"its parameters are {[p.name for p in params]}{hint}"
                )
        if input == "separate" and one_tensor and isinstance(mask_arg, int) and mask_arg >= 1:
            raise ValueError(f"spec mask_arg={mask_arg!r}: {self.module_name}.forward takes no argument at position {mask_arg}{hint}")

    @property
    def concat(self) -> bool:
        return self.input != "separate"

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
        what = "input tensor" if self.concat else what
        hint = "" if self.concat else (
            "; a model called with one tensor torch.cat([image * (1 - mask), mask], 1) needs the spec's `input: concat`"
            if len(args) + len(kwargs) == 1 else ""
        )
        raise ValueError(
            f"{self.module_name} was called without its {what} ({arg!r}): pass it by position or keyword, "
            f"or set the spec's {'image' if self.concat else what}_arg to where your model takes it{hint}"
        )

    def _slot(self, which: str) -> tuple[Arg, str]:
        return (self.image_arg, "input") if self.concat else (getattr(self, f"{which}_arg"), which)

    def _split(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, mask) channels of a concatenated input."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] < 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{self.module_name} with `input: {self.input}` takes one (B, C + 1, H, W) tensor "
                f"torch.cat([image * (1 - mask), mask], 1), got {got}; check the spec's input and image_arg"
            )
        if self.input == "concat":
            return x[:, :-1], x[:, -1:]
        return x[:, 1:], x[:, :1]

    def _join(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(image.dtype)
        return torch.cat([image, mask] if self.input == "concat" else [mask, image], 1)

    def get(self, args: tuple, kwargs: dict, which: str) -> torch.Tensor:
        """The ``image`` or ``mask`` tensor of a call (with ``input: concat``, channels of the one tensor)."""
        arg, what = self._slot(which)
        kind, key = self._locate(args, kwargs, arg, what)
        value = args[key] if kind == "pos" else kwargs[key]
        if self.concat:
            return self._split(value)[0 if which == "image" else 1]
        return value

    def replace(self, args: tuple, kwargs: dict, which: str, value: Any) -> tuple[tuple, dict]:
        """A copy of the call with the ``image`` or ``mask`` replaced."""
        arg, what = self._slot(which)
        kind, key = self._locate(args, kwargs, arg, what)
        if self.concat:
            image, mask = self._split(args[key] if kind == "pos" else kwargs[key])
            value = self._join(value, mask) if which == "image" else self._join(image, value)
        if kind == "pos":
            args = args[:key] + (value,) + args[key + 1 :]
        else:
            kwargs = {**kwargs, key: value}
        return args, kwargs

    def build(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, dict]:
        """A call ``(args, kwargs)`` passing just the image and the mask (or, with ``input: concat``, the one
        tensor of both)."""
        slots: dict[int, torch.Tensor] = {}
        kwargs: dict[str, torch.Tensor] = {}
        pairs = ((self.image_arg, self._join(image, mask)),) if self.concat else ((self.image_arg, image), (self.mask_arg, mask))
        for arg, value in pairs:
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


def convention(module: nn.Module, spec: Any, *, teacher: bool = False) -> CallConvention:
    """The :class:`CallConvention` of ``module`` as ``spec`` says (its ``teacher_convention`` for a teacher).

    ``spec``: an :class:`~kdinpaint.spec.AdapterSpec` or anything with ``image_arg`` and ``mask_arg``
    (``input`` defaults to ``separate``).
    """
    if teacher and hasattr(spec, "teacher_convention"):
        spec = spec.teacher_convention
    return CallConvention(module, spec.image_arg, spec.mask_arg, getattr(spec, "input", "separate"))


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
