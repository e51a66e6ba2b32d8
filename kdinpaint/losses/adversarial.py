"""The adversarial part of the paper's recipe: Region Normalization's discriminator and nsgan loss.

The paper "use[s] same discriminators as [42]" (Region Normalization, Yu et al., AAAI 2020). RN's
discriminator (``geekyutao/RN`` ``networks.py`` ``D_Net``) is EdgeConnect's (``knazeri/edge-connect``
``src/networks.py`` ``Discriminator``): a five-layer PatchGAN,

* 4×4 convolutions, padding 1, channels 3→64→128→256→512→1, strides 2, 2, 2, 1, 1;
* LeakyReLU(0.2) after the first four; spectral norm on every convolution (no bias with it);
* a sigmoid on the output; a 256×256 image gives a 30×30 map (70×70 receptive field).

Training defaults, also RN's and EdgeConnect's (``models.py`` / ``main.py``; ``config.yml.example``):
non-saturating BCE ("nsgan"), generator adversarial weight 0.1 (:data:`ADV_WEIGHT`), discriminator
learning rate 0.1× the generator's (:data:`D_LR_RATIO`), Adam betas (0, 0.9) (:data:`ADAM_BETAS`); the
fake sample is the raw generator output, not the composite. The discriminator loss is
``½ (BCE(D(real), 1) + BCE(D(fake), 0))``.

Here the discriminator returns logits and the losses use ``binary_cross_entropy_with_logits``, which
is ``BCE(sigmoid(logit), y)`` computed stably; ``D.probabilities(x)`` gives the sigmoid map.
``lsgan`` and ``hinge`` are offered as in EdgeConnect's ``AdversarialLoss``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "ADV_WEIGHT",
    "D_LR_RATIO",
    "ADAM_BETAS",
    "PatchDiscriminator",
    "discriminator_loss",
    "generator_adv_loss",
    "discriminator_optimizer",
]

ADV_WEIGHT = 0.1
"""Generator adversarial weight (RN ``--gan_weight 0.1``, EdgeConnect ``INPAINT_ADV_LOSS_WEIGHT: 0.1``)."""
D_LR_RATIO = 0.1
"""Discriminator lr / generator lr (RN ``d_lr = 0.1 * lr``, EdgeConnect ``D2G_LR: 0.1``)."""
ADAM_BETAS = (0.0, 0.9)
"""Adam betas for both networks (RN and EdgeConnect ``BETA1: 0.0``, ``BETA2: 0.9``)."""

GanLoss = Literal["nsgan", "lsgan", "hinge"]
_LOSSES = ("nsgan", "lsgan", "hinge")


class PatchDiscriminator(nn.Module):
    """RN / EdgeConnect five-layer spectral-norm PatchGAN.

    ``forward(x)``: ``x`` ``(B, in_channels, H, W)`` (images in [-1, 1]); returns ``(logits, features)``
    with ``logits`` ``(B, 1, H/8 - 2, W/8 - 2)`` for ``H, W`` divisible by 8 (30×30 at 256) and
    ``features`` the five layer outputs (for a feature-matching loss). ``H, W`` must be at least 32.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        *,
        use_spectral_norm: bool = True,
        act_layer: str | type[nn.Module] = "leaky_relu",
    ) -> None:
        super().__init__()
        if isinstance(act_layer, str):
            if act_layer != "leaky_relu":
                raise ValueError(f"act_layer must be 'leaky_relu' or an nn.Module class, got {act_layer!r}")
            make_act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        else:
            make_act = act_layer
        c = base_channels
        widths = [in_channels, c, 2 * c, 4 * c, 8 * c, 1]
        strides = [2, 2, 2, 1, 1]
        self.layers = nn.ModuleList()
        for i, stride in enumerate(strides):
            conv = nn.Conv2d(widths[i], widths[i + 1], 4, stride=stride, padding=1, bias=not use_spectral_norm)
            if use_spectral_norm:
                conv = spectral_norm(conv)
            self.layers.append(nn.Sequential(conv, make_act()) if i < 4 else nn.Sequential(conv))
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"discriminator expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"discriminator needs H, W >= 32 (three stride-2 4x4 layers), got {tuple(x.shape[-2:])}")
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return x, feats

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid map RN's ``use_sigmoid=True`` returns, ``(B, 1, h, w)`` in (0, 1)."""
        return torch.sigmoid(self(x)[0])


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: GanLoss = "nsgan") -> torch.Tensor:
    """Discriminator loss, ``½ (L(D(real), real) + L(D(fake), fake))``.

    ``nsgan``: ``L = BCE(sigmoid(logit), y)`` with ``y = 1`` for real, 0 for fake, averaged over the map;
    ``lsgan``: ``L = mean (sigmoid(logit) - y)²`` (EdgeConnect applies MSE after its sigmoid);
    ``hinge``: ``L = mean relu(1 - logit)`` for real, ``mean relu(1 + logit)`` for fake.
    ``*_logits``: ``(B, 1, h, w)`` raw outputs of :class:`PatchDiscriminator`; pass ``fake`` detached.
    """
    _check_loss(loss)
    return 0.5 * (_adv(real_logits, True, loss, disc=True) + _adv(fake_logits, False, loss, disc=True))


def generator_adv_loss(fake_logits: torch.Tensor, loss: GanLoss = "nsgan") -> torch.Tensor:
    """Generator adversarial loss (unweighted; RN multiplies it by :data:`ADV_WEIGHT`).

    ``nsgan``: ``BCE(sigmoid(D(fake)), 1)`` (non-saturating); ``lsgan``: ``mean (sigmoid(D(fake)) - 1)²``;
    ``hinge``: ``-mean D(fake)``. ``fake_logits``: ``(B, 1, h, w)`` of the raw generator output.
    """
    _check_loss(loss)
    return _adv(fake_logits, True, loss, disc=False)


def discriminator_optimizer(
    discriminator: nn.Module,
    generator_lr: float,
    *,
    lr_ratio: float = D_LR_RATIO,
    betas: tuple[float, float] = ADAM_BETAS,
) -> torch.optim.Adam:
    """Adam for the discriminator at ``lr_ratio × generator_lr`` with RN's betas."""
    if generator_lr <= 0:
        raise ValueError(f"generator_lr must be positive, got {generator_lr}")
    return torch.optim.Adam(discriminator.parameters(), lr=generator_lr * lr_ratio, betas=betas)


def _check_loss(loss: str) -> None:
    if loss not in _LOSSES:
        raise ValueError(f"unknown adversarial loss {loss!r}; choose one of {list(_LOSSES)}")


def _adv(logits: torch.Tensor, real: bool, loss: str, *, disc: bool) -> torch.Tensor:
    if loss == "nsgan":
        target = torch.full_like(logits, 1.0 if real else 0.0)
        return F.binary_cross_entropy_with_logits(logits, target)
    if loss == "lsgan":
        return ((torch.sigmoid(logits) - (1.0 if real else 0.0)) ** 2).mean()
    if disc:
        return F.relu(1 - logits).mean() if real else F.relu(1 + logits).mean()
    return -logits.mean()
