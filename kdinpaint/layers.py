"""Small layers shared by the built-in networks. Layers take ``act_layer`` as a name or a class."""

from __future__ import annotations

from typing import Type, Union

import torch
from torch import nn

__all__ = ["LayerLike", "get_act_layer", "ConvAct", "legacy_spectral_norm", "legacy_spectral_norm_key"]

LayerLike = Union[str, Type[nn.Module]]
_ACTS: dict[str, Type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def get_act_layer(layer: LayerLike) -> Type[nn.Module]:
    """An activation class from a name (``relu``, ``leaky_relu``, ``elu``, ``gelu``, ``silu``) or a class."""
    if isinstance(layer, str):
        if layer not in _ACTS:
            raise ValueError(f"unknown act_layer {layer!r}; choose one of {sorted(_ACTS)} or pass a class")
        return _ACTS[layer]
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise TypeError(f"act_layer must be a name or an nn.Module class, got {layer!r}")
    return layer


class ConvAct(nn.Sequential):
    """A ``k×k`` convolution (optionally strided or dilated) and an activation.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        act_layer: LayerLike = "elu",
        kernel_size: int = 3,
        dilation: int = 1,
    ):
        pad = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, dilation=dilation),
            get_act_layer(act_layer)(),
        )


def _drop_weight_graph(module: nn.Module, inputs: object, output: object) -> None:
    # Legacy spectral norm caches W = W_orig / sigma as a plain attribute that still carries the autograd
    # graph after a training forward, and copy.deepcopy (e.g. exporting the trained student) refuses such
    # tensors. The forward has used it already and the next one recomputes it, so the cache keeps its value.
    weight = module.__dict__.get("weight")
    if isinstance(weight, torch.Tensor) and weight.grad_fn is not None:
        module.weight = weight.detach()


def legacy_spectral_norm(module: nn.Module) -> nn.Module:
    """``torch.nn.utils.spectral_norm(module)``: the legacy API on purpose, whose ``weight_orig`` /
    ``weight_u`` / ``weight_v`` keys are those of released checkpoints (EdgeConnect, StructureFlow); the
    module stays deep-copyable after a training forward."""
    module = nn.utils.spectral_norm(module)
    module.register_forward_hook(_drop_weight_graph)
    return module


def legacy_spectral_norm_key(key: str) -> str:
    """A state_dict key of ``torch.nn.utils.parametrizations.spectral_norm`` (``parametrizations.weight.original``
    / ``.0._u`` / ``.0._v``) under its legacy name (``weight_orig`` / ``weight_u`` / ``weight_v``)."""
    key = key.replace(".parametrizations.weight.original", ".weight_orig")
    return key.replace(".parametrizations.weight.0._u", ".weight_u").replace(".parametrizations.weight.0._v", ".weight_v")
