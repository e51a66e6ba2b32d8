"""Small layers shared by the built-in networks. Layers take ``act_layer`` as a name or a class."""

from __future__ import annotations

from typing import Type, Union

from torch import nn

__all__ = ["LayerLike", "get_act_layer", "ConvAct"]

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
