"""DeepFill v2: Free-Form Image Inpainting with Gated Convolution (Yu et al., ICCV 2019).

The two-stage generator (coarse network; refinement network with a dilated gated-convolution branch
and a contextual-attention branch) and the SN-PatchGAN discriminator, with the module tree of the
converted official weights: nipponjo/deepfillv2-pytorch's ``model/networks_tf.py``, whose
``states_tf_places2.pth`` / ``states_tf_celebahq.pth`` hold the official TensorFlow weights (generator
under ``'G'``). ``GatedConvInpaint().load_state_dict(ckpt['G'], strict=True)`` works; use
:func:`load_official` for a checked load with named missing/unexpected keys.

Two numerics, ``GatedConvInpaint(compat=...)``:

``compat="tf"`` (default, and what :func:`load_official` / :func:`build_gatedconv` use): the official TF
graph (JiahuiYu/generative_inpainting v2.0.0), the graph the weights in ``states_tf_*.pth`` were trained
in: TF ``"SAME"`` padding (asymmetric for stride 2); the mask resized to the H/4 features and again to
H/8 inside contextual attention (TF1 nearest, ``align_corners``, float32 rounding); contextual
attention with ``fuse=True``; ``channel_order="bgr"``.

``compat="nipponjo"``: nipponjo/deepfillv2-pytorch's ``networks_tf.Generator`` called as its
``test.py`` / ``infer`` call it, to float rounding: the mask resized once, H -> H/8, inside contextual
attention; its ``linspace`` nearest rounding; ``fuse=False``; ``channel_order="rgb"`` (it feeds the
network PIL's RGB). The coarse stage is the same in both modes; the refined output is not: with
random weights rescaled so that the attention is sharp, the two modes differ by up to 1.7 (images in
[-1, 1], 256x256 and 232x216, free-form masks), and the mask resizing alone, which decides a few
background patches next to the holes, by up to 1.3.

In both modes one deliberate deviation remains: contextual attention uses each sample's own mask for
patch validity, where the official code and the port use the mask of batch element 0 for the whole
batch (see :mod:`kdinpaint_adapters.contextual_attention`); with one mask for the batch they agree.
Images whose sides are not multiples of 8 are padded here (see below), where the port crops them.

Conventions (toolkit <-> network), applied in :meth:`GatedConvInpaint.forward`:

* toolkit: image ``(B, 3, H, W)`` RGB in ``[-1, 1]``, mask ``(B, 1, H, W)`` with 1 = hole
  (:mod:`kdinpaint.masking`);
* network: ``x = cat[image * (1 - M), ones, ones * M]`` (5 channels, holes filled with 0), image in
  ``channel_order``, ``H`` and ``W`` multiples of 8 (the adapter pads bottom/right by reflection, with
  mask 0 in the padding, and crops the output back).

Channel order. Evidence that the official weights expect **BGR**:

* training: neuralgym ``DataFromFNames.read_img`` reads images with ``cv2.imread`` (BGR) and applies
  no conversion; neuralgym's ``images_summary`` defaults to ``color_format='BGR'`` and reverses the
  channels for display, so the authors treated the network's tensors as BGR;
* inference: ``test.py`` and ``batch_test.py`` feed ``cv2.imread`` output and reverse the network
  output (``tf.reverse``) before ``cv2.imwrite(..., result[0][:, :, ::-1])``;
* conversion: the keys and shapes of ``states_tf_*.pth`` map one to one onto the TF variables, and
  nipponjo's repository documents no channel permutation of ``conv1`` / ``xconv1`` / ``pmconv1`` inputs
  or ``conv17`` / ``allconv17`` outputs (no conversion script is published);
* against: nipponjo's ``test.py``, app and trainer feed RGB (PIL) without any flip, and its example
  outputs look plausible. That is weak evidence, since an inpainter that mostly copies colours from
  the context looks plausible in either order.

Hence ``channel_order="bgr"`` is the default of ``compat="tf"``. Where the weights are at hand, the
order is settled empirically by ``kdinpaint check-weights gatedconv states_tf_places2.pth``
(:func:`kdinpaint_adapters.gatedconv_check.check_channel_order`): it inpaints the bundled photos in
both orders and recommends the one with the higher PSNR on the holes; pass that order as
``channel_order`` (it overrides the mode's preset).

Adapter ``gatedconv`` (Table 4 of Suin et al., ICCV 2021), called as ``model(image, mask)``, stride 8:

=========  ==========================================================================================
(default)  GC: DeepFill v2 as released, nothing attached (the control when fine-tuning GC* / GC†).
star       GC*: cross-distillation (Eq. 2), self-distillation (Eq. 3) and completion blocks (Eq. 5)
           on the coarse network's encoder, the last layer of each resolution before the dilated
           block: ``conv1`` (H, cnum/2 ch), ``conv3`` (H/2, cnum), ``conv6`` (H/4, 2 cnum). The paper
           puts GC's supervision in the coarse network and applies "CD, SD coupled with CB while
           keeping the total no. of parameters same"; the released generator has to stay loadable,
           so nothing is removed to pay for the three completion blocks: the deployed GC* has
           40,905 more parameters than GC's 4,052,478 (+1.0 %). The alignment convolutions ``f_l``
           and the meta-networks are training-only.
dagger     GC†: attention transfer (Eq. 9) on ``contextual_attention``, its affinity captured at the
           ``affinity`` submodule, layout ``keys_hw`` (``B x keys x H/8 x W/8``); nothing else (GC†
           scores below GC* in Table 4, so it does not include GC*'s terms).
=========  ==========================================================================================

The teacher is :class:`GatedConvTeacher` (same ``state_dict``; ``model.init`` loads the official weights
into both) with ``teacher_input: same_mask``: it reconstructs the whole ground truth and uses the
student's mask only for contextual attention's patch validity. DeepFill v2's own generator loss is
:func:`gatedconv_loss`, also registered as the loss ``"gatedconv"``; its whole training objective (that
loss and the SN-PatchGAN discriminator) is :class:`GatedConvObjective`, registered as ``"gatedconv-gan"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl
from kdinpaint.inference import crop_top_left, pad_bottom_right
from kdinpaint.layers import get_act_layer
from kdinpaint.weights import key_mismatches, read_weights, strip_wrapper_prefixes
from kdinpaint.masking import check_image_range, check_mask

from .contextual_attention import ContextualAttention, resize_nearest_tf, tf_same_pad
from .gatedconv_loss import GatedConvObjective, gatedconv_loss

__all__ = [
    "GatedConv2d",
    "GatedUpConv2d",
    "GatedConvInpaint",
    "SNConv2d",
    "SNPatchGANDiscriminator",
    "to_network_input",
    "from_network_output",
    "checkpoint_filter_fn",
    "load_official",
    "save_official",
    "build_gatedconv",
    "build_gatedconv_discriminator",
    "GatedConvTeacher",
    "build_gatedconv_teacher",
    "gatedconv_loss",
    "COARSE_LEVELS",
    "COMPAT_PRESETS",
    "OFFICIAL_COMPAT",
    "ADAPTER_SPEC",
    "register_adapters",
    "GatedConvObjective",
    "register_losses",
]

_logger = logging.getLogger(__name__)

_CHANNEL_ORDERS = ("rgb", "bgr")
# What each numerics mode implies; ``channel_order`` / ``fuse`` given to GatedConvInpaint override it.
COMPAT_PRESETS: dict[str, dict[str, object]] = {
    "tf": {"channel_order": "bgr", "fuse": True},  # the official graph (cv2 images, fused scores)
    "nipponjo": {"channel_order": "rgb", "fuse": False},  # networks_tf.Generator fed PIL images
}
# The mode the loaders of the converted official files use: the numerics the weights were trained in.
OFFICIAL_COMPAT = "tf"
GRID = 8  # the generator downsamples by 4 and contextual attention by 2 more


class GatedConv2d(nn.Module):
    """Gated convolution with TF "SAME" padding: ``act(features) * sigmoid(gates)``.

    One convolution produces ``2 * out_channels`` channels, the first half features and the second
    half gates (the split order of the official weights). With ``gated=False`` it is a plain
    convolution to ``out_channels`` followed by ``act_layer`` (the official output layers use
    ``act_layer=None``). Input ``(B, in_channels, H, W)``, output ``(B, out_channels, ceil(H/s), ceil(W/s))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        act_layer: str | type[nn.Module] | None = "elu",
        gated: bool = True,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.gated = gated
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        conv_out = 2 * out_channels if gated else out_channels
        # Stride 1 with an odd kernel: TF "SAME" is symmetric, so the convolution pads by itself (no copy).
        self._self_pad = stride == 1 and kernel_size % 2 == 1
        padding = dilation * (kernel_size - 1) // 2 if self._self_pad else 0
        self.conv = nn.Conv2d(in_channels, conv_out, kernel_size, stride=stride, padding=padding, dilation=dilation)
        self.act = nn.Identity() if act_layer is None else get_act_layer(act_layer)()
        # TF defaults of the official tf.layers.conv2d: Glorot-uniform kernel, zero bias.
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x if self._self_pad else tf_same_pad(x, self.kernel_size, self.stride, self.dilation))
        if not self.gated:
            return self.act(x)
        features, gates = x.split(self.out_channels, dim=1)
        return self.act(features) * torch.sigmoid(gates)


class GatedUpConv2d(nn.Module):
    """x2 nearest upsampling then a 3x3 gated convolution (official ``gen_deconv``).

    TF's ``align_corners`` nearest x2 upsampling picks source row ``floor(i / 2)``, exactly PyTorch's
    ``nearest`` mode. Keys: ``<name>.conv.conv.weight``.
    """

    def __init__(self, in_channels: int, out_channels: int, act_layer: str | type[nn.Module] | None = "elu") -> None:
        super().__init__()
        self.conv = GatedConv2d(in_channels, out_channels, 3, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _flip_channels(x: torch.Tensor, channel_order: str) -> torch.Tensor:
    return x.flip(1) if channel_order == "bgr" else x


def to_network_input(
    image: torch.Tensor, mask: torch.Tensor, channel_order: str = "bgr"
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Toolkit ``(image, mask)`` -> the generator's 5-channel input.

    Args:
        image: ``(B, 3, H, W)`` RGB in ``[-1, 1]``.
        mask: ``(B or 1, 1, H, W)``, 1 = hole (checked with :func:`kdinpaint.masking.check_mask`).
        channel_order: ``"rgb"`` or ``"bgr"``, the order the network expects.

    Returns:
        ``x`` ``(B, 5, H8, W8)`` = ``[image * (1 - M), ones, M]`` in ``channel_order``; the padded mask
        ``(B, 1, H8, W8)``; and ``(H, W)`` to crop back. ``H8``/``W8`` are the next multiples of 8; the
        image is reflect-padded at the bottom/right (replicate when too small to reflect), the mask
        with 0 (the padding is known context).
    """
    if channel_order not in _CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {channel_order!r}")
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"image must be (B, 3, H, W) RGB in [-1, 1], got {shape}; "
            "repeat a grayscale channel three times or drop an alpha channel first"
        )
    check_image_range(image)
    mask = _pad_mask(mask, image)
    H, W = image.shape[-2:]
    image = _flip_channels(pad_bottom_right(image, GRID), channel_order)
    ones = torch.ones_like(mask)
    x = torch.cat([image * (1 - mask), ones, ones * mask], dim=1)  # (B, 5, H8, W8)
    return x, mask, (int(H), int(W))


def _pad_mask(mask: torch.Tensor, image: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Check ``mask`` against ``image``, broadcast it over the batch, zero-pad it to multiples of 8."""
    check_mask(mask, image, name=name)
    mask = mask.to(image.dtype).expand(image.shape[0], -1, -1, -1)
    H, W = image.shape[-2:]
    return F.pad(mask, (0, -W % GRID, 0, -H % GRID))


def from_network_output(y: torch.Tensor, size: tuple[int, int], channel_order: str = "bgr") -> torch.Tensor:
    """Network output ``(B, 3, H8, W8)`` in ``channel_order`` -> toolkit RGB ``(B, 3, H, W)``, cropped."""
    if channel_order not in _CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {channel_order!r}")
    return _flip_channels(crop_top_left(y, size), channel_order)


class GatedConvInpaint(nn.Module):
    """The DeepFill v2 two-stage generator; ``state_dict`` keys equal the converted official ones.

    Args:
        cnum: base width (official 48; must be divisible by 4). The converted weights need 48.
        compat: ``"tf"`` (default: the official graph, the one the converted weights were trained in)
            or ``"nipponjo"`` (nipponjo/deepfillv2-pytorch's ``networks_tf.Generator``); see the module
            docstring. It presets ``channel_order`` and ``fuse`` and decides how the mask reaches
            contextual attention (resized twice, H -> H/4 -> H/8, or once, H -> H/8).
        channel_order: image channel order the weights expect, ``"bgr"`` or ``"rgb"``; default the
            mode's (``"bgr"`` for ``"tf"``, see the module docstring for the evidence; ``"rgb"`` for
            ``"nipponjo"``). Toolkit images are always RGB.
        fuse: contextual attention's fusion step; default the mode's (``True`` for ``"tf"``, ``False``
            for ``"nipponjo"``). Setting it alone does not give nipponjo's port (the mask resizing differs).
        act_layer: activation of the gated convolutions (official ``"elu"``).

    Module paths for hooks: coarse encoder ``conv1`` (H, cnum/2 ch), ``conv2_downsample`` / ``conv3``
    (H/2, cnum ch), ``conv4_downsample`` ... ``conv12`` (H/4, 2*cnum ch); refinement branches ``xconv*``
    and ``pmconv*``; contextual attention ``contextual_attention`` with its affinity at
    ``contextual_attention.affinity`` (``(B, L, H/8, W/8)``, ``L = H/8 * W/8``).
    """

    def __init__(
        self,
        cnum: int = 48,
        *,
        compat: str = "tf",
        channel_order: str | None = None,
        fuse: bool | None = None,
        act_layer: str | type[nn.Module] = "elu",
    ) -> None:
        super().__init__()
        if cnum < 4 or cnum % 4:
            raise ValueError(f"cnum must be a positive multiple of 4, got {cnum}")
        if compat not in COMPAT_PRESETS:
            raise ValueError(
                f"compat must be one of {tuple(COMPAT_PRESETS)} (the official TF graph, or nipponjo/deepfillv2-pytorch's "
                f"networks_tf.Generator), got {compat!r}"
            )
        preset = COMPAT_PRESETS[compat]
        channel_order = preset["channel_order"] if channel_order is None else channel_order
        fuse = preset["fuse"] if fuse is None else fuse
        if channel_order not in _CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {channel_order!r}")
        self.cnum = cnum
        self.compat = compat
        self.channel_order = channel_order
        c, a = cnum, act_layer

        def g(cin: int, cout: int, k: int = 3, s: int = 1, d: int = 1, act=a) -> GatedConv2d:
            return GatedConv2d(cin, cout, k, stride=s, dilation=d, act_layer=act)

        # Stage 1 (coarse). Registration order = the official key order.
        self.conv1 = g(5, c // 2, 5)
        self.conv2_downsample = g(c // 2, c, s=2)
        self.conv3 = g(c, c)
        self.conv4_downsample = g(c, 2 * c, s=2)
        self.conv5 = g(2 * c, 2 * c)
        self.conv6 = g(2 * c, 2 * c)
        self.conv7_atrous = g(2 * c, 2 * c, d=2)
        self.conv8_atrous = g(2 * c, 2 * c, d=4)
        self.conv9_atrous = g(2 * c, 2 * c, d=8)
        self.conv10_atrous = g(2 * c, 2 * c, d=16)
        self.conv11 = g(2 * c, 2 * c)
        self.conv12 = g(2 * c, 2 * c)
        self.conv13_upsample = GatedUpConv2d(2 * c, c, act_layer=a)
        self.conv14 = g(c, c)
        self.conv15_upsample = GatedUpConv2d(c, c // 2, act_layer=a)
        self.conv16 = g(c // 2, c // 4)
        self.conv17 = GatedConv2d(c // 4, 3, 3, act_layer=None, gated=False)
        # Stage 2, dilated ("hallucination") branch.
        self.xconv1 = g(3, c // 2, 5)
        self.xconv2_downsample = g(c // 2, c // 2, s=2)
        self.xconv3 = g(c // 2, c)
        self.xconv4_downsample = g(c, c, s=2)
        self.xconv5 = g(c, 2 * c)
        self.xconv6 = g(2 * c, 2 * c)
        self.xconv7_atrous = g(2 * c, 2 * c, d=2)
        self.xconv8_atrous = g(2 * c, 2 * c, d=4)
        self.xconv9_atrous = g(2 * c, 2 * c, d=8)
        self.xconv10_atrous = g(2 * c, 2 * c, d=16)
        # Stage 2, attention branch.
        self.pmconv1 = g(3, c // 2, 5)
        self.pmconv2_downsample = g(c // 2, c // 2, s=2)
        self.pmconv3 = g(c // 2, c)
        self.pmconv4_downsample = g(c, 2 * c, s=2)
        self.pmconv5 = g(2 * c, 2 * c)
        self.pmconv6 = g(2 * c, 2 * c, act="relu")
        self.contextual_attention = ContextualAttention(
            ksize=3, rate=2, fuse_k=3, softmax_scale=10.0, fuse=bool(fuse), compat=compat
        )
        self.pmconv9 = g(2 * c, 2 * c)
        self.pmconv10 = g(2 * c, 2 * c)
        # Stage 2, merged decoder.
        self.allconv11 = g(4 * c, 2 * c)
        self.allconv12 = g(2 * c, 2 * c)
        self.allconv13_upsample = GatedUpConv2d(2 * c, c, act_layer=a)
        self.allconv14 = g(c, c)
        self.allconv15_upsample = GatedUpConv2d(c, c // 2, act_layer=a)
        self.allconv16 = g(c // 2, c // 4)
        self.allconv17 = GatedConv2d(c // 4, 3, 3, act_layer=None, gated=False)

    def forward_network(
        self, x: torch.Tensor, mask: torch.Tensor, validity_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official two-stage graph in the network's own conventions.

        Args:
            x: ``(B, 5, H, W)`` = ``[image * (1 - M), ones, M]``, image in ``channel_order`` and ``[-1, 1]``,
                ``H`` and ``W`` multiples of 8.
            mask: ``(B or 1, 1, H, W)``, 1 = hole; pastes the coarse result into the holes.
            validity_mask: mask deciding which background patches contextual attention may use
                (default ``mask``). A teacher fed the ground truth with an empty ``mask`` can pass the
                student's mask here so that both attend over the same valid patches.

        Returns:
            ``(x_stage1, x_stage2)``, each ``(B, 3, H, W)`` in ``[-1, 1]`` (tanh), channel_order.
        """
        if x.dim() != 4 or x.shape[1] != 5 or x.shape[-2] % GRID or x.shape[-1] % GRID:
            raise ValueError(
                f"x must be (B, 5, H, W) with H and W multiples of {GRID}, got {tuple(x.shape)}; "
                "use forward(image, mask), which builds the input and pads"
            )
        xin = x
        x = self.conv2_downsample(self.conv1(x))
        x = self.conv4_downsample(self.conv3(x))
        x = self.conv6(self.conv5(x))
        x = self.conv10_atrous(self.conv9_atrous(self.conv8_atrous(self.conv7_atrous(x))))
        x = self.conv12(self.conv11(x))
        x = self.conv14(self.conv13_upsample(x))
        x = self.conv16(self.conv15_upsample(x))
        x_stage1 = torch.tanh(self.conv17(x))

        xnow = x_stage1 * mask + xin[:, :3] * (1 - mask)  # paste the coarse result into the holes
        x = self.xconv2_downsample(self.xconv1(xnow))
        x = self.xconv4_downsample(self.xconv3(x))
        x = self.xconv6(self.xconv5(x))
        x_hallu = self.xconv10_atrous(self.xconv9_atrous(self.xconv8_atrous(self.xconv7_atrous(x))))

        x = self.pmconv2_downsample(self.pmconv1(xnow))
        x = self.pmconv4_downsample(self.pmconv3(x))
        x = self.pmconv6(self.pmconv5(x))
        vmask = mask if validity_mask is None else validity_mask
        if self.compat == "tf":
            # The official graph resizes the mask to the H/4 features here (TF nearest, align_corners);
            # contextual attention resizes it again to H/8.
            vmask = resize_nearest_tf(vmask, x.shape[-2:])
        # nipponjo's port hands contextual attention the full-resolution mask (resized once, H -> H/8).
        x = self.contextual_attention(x, x, vmask)
        pm = self.pmconv10(self.pmconv9(x))

        x = torch.cat([x_hallu, pm], dim=1)  # (B, 4*cnum, H/4, W/4)
        x = self.allconv12(self.allconv11(x))
        x = self.allconv14(self.allconv13_upsample(x))
        x = self.allconv16(self.allconv15_upsample(x))
        x_stage2 = torch.tanh(self.allconv17(x))
        return x_stage1, x_stage2

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        *,
        return_coarse: bool = False,
        validity_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Inpaint in toolkit conventions.

        Args:
            image: ``(B, 3, H, W)`` RGB in ``[-1, 1]``; pixels under the mask are ignored.
            mask: ``(B or 1, 1, H, W)``, 1 = hole.
            return_coarse: also return the coarse (stage 1) prediction.
            validity_mask: see :meth:`forward_network` (toolkit convention, same size as ``mask``).

        Returns:
            The refined prediction ``(B, 3, H, W)`` RGB in ``[-1, 1]`` over the whole image (not
            composited: ``kdinpaint.masking.composite(pred, image, mask)`` keeps the known pixels), or
            ``(refined, coarse)`` with ``return_coarse=True``.
        """
        x, mask_p, size = to_network_input(image, mask, self.channel_order)
        vmask = None if validity_mask is None else _pad_mask(validity_mask, image, "validity_mask")
        coarse, refined = self.forward_network(x, mask_p, vmask)
        refined = from_network_output(refined, size, self.channel_order)
        if not return_coarse:
            return refined
        return refined, from_network_output(coarse, size, self.channel_order)


class SNConv2d(nn.Conv2d):
    """Convolution with spectral normalisation; keys ``weight``, ``bias`` and the buffer ``weight_u`` (O, 1).

    ``sigma`` comes from one power iteration started at ``weight_u`` (neuralgym ``kernel_spectral_norm``);
    ``weight_u`` is updated in training mode only and the power iteration is not differentiated
    (``torch.nn.utils.spectral_norm`` semantics; TF also back-propagates through it). The stored
    ``weight`` is never modified: the normalised weight is computed for each call.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, eps: float = 1e-12
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.eps = eps
        self.register_buffer("weight_u", F.normalize(torch.randn(self.out_channels, 1), dim=0, eps=eps))

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight.view(self.out_channels, -1)  # (O, I*k*k)
        with torch.no_grad():
            v = F.normalize(w.t() @ self.weight_u, dim=0, eps=self.eps)  # (I*k*k, 1)
            u = F.normalize(w @ v, dim=0, eps=self.eps)  # (O, 1)
            if self.training:
                self.weight_u.copy_(u)
        sigma = (u.t() @ w @ v).squeeze()
        return self.weight / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class _DisConv(nn.Module):
    """5x5 stride-2 SN convolution, TF "SAME" padding, LeakyReLU(0.2). Keys ``conv_sn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv_sn = SNConv2d(in_channels, out_channels, kernel_size, stride=stride)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_sn(tf_same_pad(x, self.kernel_size, self.stride)))


class SNPatchGANDiscriminator(nn.Module):
    """SN-PatchGAN: six 5x5 stride-2 SN convolutions (cnum, 2, 4, 4, 4, 4 x cnum), flattened output.

    Args:
        in_channels: 4 = image and mask (official ``gan_with_mask``), or 3 for the image only.
        cnum: base width (official 64).
        channel_order: the order the weights expect (as for the generator); toolkit images are RGB.
    """

    def __init__(self, in_channels: int = 4, cnum: int = 64, *, channel_order: str = "bgr") -> None:
        super().__init__()
        if in_channels not in (3, 4):
            raise ValueError(f"in_channels must be 4 (image + mask) or 3 (image), got {in_channels}")
        if channel_order not in _CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {channel_order!r}")
        self.in_channels, self.channel_order = in_channels, channel_order
        widths = [in_channels, cnum, 2 * cnum, 4 * cnum, 4 * cnum, 4 * cnum, 4 * cnum]
        for i in range(6):
            self.add_module(f"conv{i + 1}", _DisConv(widths[i], widths[i + 1]))

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(B, N)`` for toolkit images ``(B, 3, H, W)`` RGB in ``[-1, 1]`` and mask ``(B or 1, 1, H, W)``.

        ``N = 4*cnum * ceil(H/64) * ceil(W/64)``; real images should score high (hinge loss).
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        x = _flip_channels(image, self.channel_order)
        if self.in_channels == 4:
            if mask is None:
                raise ValueError("this discriminator was built with in_channels=4: pass the mask as well")
            check_mask(mask, image)
            x = torch.cat([x, mask.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        for i in range(6):
            x = getattr(self, f"conv{i + 1}")(x)
        return x.flatten(1)


# --------------------------------------------------------------------------------------------------
# Official weights


def _tf_to_torch_name(name: str) -> str | None:
    """``inpaint_net/<layer>/kernel`` -> ``<layer>.conv.weight``; up-convs gain ``.conv.conv``."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != "inpaint_net" or parts[-1] not in ("kernel", "bias"):
        return None
    param = "weight" if parts[-1] == "kernel" else "bias"
    if len(parts) == 3:
        return f"{parts[1]}.conv.{param}"
    if len(parts) == 4 and parts[2] == f"{parts[1]}_conv":
        return f"{parts[1]}.conv.conv.{param}"
    return None


def checkpoint_filter_fn(checkpoint: Mapping, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Turn an official checkpoint into a :class:`GatedConvInpaint` ``state_dict``.

    Accepts nipponjo's converted file (``{'G': ..., 'D': ...}``), a bare generator state_dict (with
    ``module.`` / ``_orig_mod.`` prefixes stripped), or TF variables already read into tensors
    (``inpaint_net/conv1/kernel`` in HWIO layout, permuted to OIHW). ``model`` is unused (timm's
    signature). Raises ``ValueError`` for anything else, e.g. nipponjo's ``states_pt_*.pth``, whose
    ``stage1.*`` layout belongs to a port with different numerics.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint["G"] if "G" in checkpoint else checkpoint
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(map(str, checkpoint))[:8]
        raise ValueError(
            f"not a DeepFill v2 generator checkpoint: expected the converted official weights with the "
            f"generator under 'G' (states_tf_places2.pth / states_tf_celebahq.pth), found keys {top}"
        )
    tf_names = any(str(k).startswith("inpaint_net/") for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = strip_wrapper_prefixes(key)
        if tf_names:
            name = _tf_to_torch_name(key)
            if name is None:
                continue  # discriminator, optimizer slots, global step: not generator weights
            key, value = name, (value.permute(3, 2, 0, 1) if value.dim() == 4 else value)
        out[key] = value
    if any(k.startswith(("stage1.", "stage2.")) for k in out):
        raise ValueError(
            "this checkpoint has nipponjo's networks.py layout (states_pt_*.pth: stage1.* / stage2.*, PyTorch "
            "padding, fine-tuned for it); this adapter reproduces the official graph and loads "
            "states_tf_places2.pth / states_tf_celebahq.pth"
        )
    return out


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing, unexpected, wrong_shape = key_mismatches(state, module)
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong_shape]
    if missing or unexpected or wrong:

        def few(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        raise ValueError(
            f"{what} weights do not match {type(module).__name__}: missing keys [{few(missing)}]; "
            f"unexpected keys [{few(unexpected)}]; shape mismatches [{few(wrong)}]"
            + ("; the converted official weights need cnum=48" if wrong else "")
        )
    module.load_state_dict(state, strict=True)


def load_official(
    path: str | PathLike,
    *,
    model: GatedConvInpaint | None = None,
    discriminator: SNPatchGANDiscriminator | None = None,
    map_location: str | torch.device = "cpu",
) -> GatedConvInpaint:
    """Load ``states_tf_places2.pth`` / ``states_tf_celebahq.pth`` (generator under ``'G'``) strictly.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs). ``model`` defaults
    to a new ``GatedConvInpaint(compat=OFFICIAL_COMPAT)`` (``"tf"``: the numerics the weights were
    trained in; pass ``model=GatedConvInpaint(compat="nipponjo")`` to reproduce nipponjo's port instead);
    a ``discriminator`` is filled from ``'D'`` (the file must have one).
    Raises ``ValueError`` naming the problem (unreadable file, no generator, missing/unexpected keys,
    shape mismatches). Returns the generator.
    """
    checkpoint = read_weights(
        path, "DeepFill v2 checkpoint (the converted official states_tf_places2.pth / states_tf_celebahq.pth)", map_location
    )
    model = GatedConvInpaint(compat=OFFICIAL_COMPAT) if model is None else model
    try:
        _load_checked(model, checkpoint_filter_fn(checkpoint), "generator")
        if discriminator is not None:
            if not isinstance(checkpoint, Mapping) or "D" not in checkpoint:
                raise ValueError("no discriminator weights under 'D'; load the generator alone")
            _load_checked(discriminator, checkpoint["D"], "discriminator")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    _logger.info("loaded DeepFill v2 weights from %s", path)
    return model


def save_official(
    model: GatedConvInpaint, path: str | PathLike, *, discriminator: SNPatchGANDiscriminator | None = None
) -> None:
    """Write ``{'G': generator, 'D': discriminator}`` in the layout of the converted official files,
    readable by :func:`load_official` and by nipponjo's ``networks_tf``. Atomic (temporary file + rename)."""
    payload: dict[str, object] = {"G": model.state_dict()}
    if discriminator is not None:
        payload["D"] = discriminator.state_dict()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Constructors


def build_gatedconv(pretrained: str | PathLike | None = None, **kwargs: object) -> GatedConvInpaint:
    """GC, the DeepFill v2 generator. ``pretrained``: a converted official file (``states_tf_*.pth``);
    ``kwargs`` go to :class:`GatedConvInpaint` (e.g. ``compat``, ``channel_order``); ``compat`` defaults
    to :data:`OFFICIAL_COMPAT` (``"tf"``, the numerics the official weights were trained in)."""
    kwargs.setdefault("compat", OFFICIAL_COMPAT)
    model = GatedConvInpaint(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_official(pretrained, model=model)
    return model


def build_gatedconv_discriminator(
    pretrained: str | PathLike | None = None, **kwargs: object
) -> SNPatchGANDiscriminator:
    """The SN-PatchGAN discriminator; ``pretrained``: a file with ``'D'`` (as written by a trainer)."""
    model = SNPatchGANDiscriminator(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        path = Path(pretrained)
        state = read_weights(path, "DeepFill v2 discriminator checkpoint")
        if "D" not in state:
            raise ValueError(f"{path} has no discriminator weights under 'D'")
        _load_checked(model, state["D"], "discriminator")
    return model


# --------------------------------------------------------------------------------------------------
# Distillation: teacher, loss, spec and registration


class GatedConvTeacher(GatedConvInpaint):
    """The auxiliary network (AN) of the ``gatedconv`` adapter: the DeepFill v2 generator as an autoencoder.

    Same module tree and ``state_dict`` as :class:`GatedConvInpaint` (the converted official weights load
    into it, and the spec's module paths name the same layers in teacher and student). Called as
    ``teacher(image, mask)`` under the spec's ``teacher_input: same_mask``, i.e. with the ground truth and
    the student's mask:

    * ``image`` (the ground truth) enters the coarse network whole: input ``[image, ones, 0]``, no hole;
    * the refinement network refines the coarse reconstruction everywhere (its paste mask is all ones,
      where the student pastes only into the holes), so one L1 loss on the output trains both stages,
      including the coarse encoder that GC* distils from;
    * ``mask`` serves only as contextual attention's patch-validity mask: teacher and student attend over
      the same background patches, so their affinities (``B x keys x H/8 x W/8``) compare key by key (GC†).

    With an all-zero ``mask`` (teacher pre-training) every background patch is usable.
    """

    def forward(  # type: ignore[override]
        self, image: torch.Tensor, mask: torch.Tensor, *, return_coarse: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``image`` ``(B, 3, H, W)`` RGB in ``[-1, 1]``; ``mask`` ``(B or 1, 1, H, W)``, 1 = hole,
        decides only which patches contextual attention may use. Returns ``(B, 3, H, W)`` in ``[-1, 1]``, or
        ``(refined, coarse)`` with ``return_coarse=True``."""
        validity = _pad_mask(mask, image)  # (B, 1, H8, W8): checked here, so errors name `mask`
        x, _, size = to_network_input(image, torch.zeros_like(image[:, :1]), self.channel_order)
        coarse, refined = self.forward_network(x, torch.ones_like(validity), validity)
        refined = from_network_output(refined, size, self.channel_order)
        if not return_coarse:
            return refined
        return refined, from_network_output(coarse, size, self.channel_order)


def build_gatedconv_teacher(pretrained: str | PathLike | None = None, **kwargs: object) -> GatedConvTeacher:
    """The AN for GC* / GC†: :class:`GatedConvTeacher` with the student's keyword arguments (``compat``
    defaults to :data:`OFFICIAL_COMPAT`, as the student's)."""
    kwargs.setdefault("compat", OFFICIAL_COMPAT)
    model = GatedConvTeacher(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_official(pretrained, model=model)
    return model


COARSE_LEVELS = ["conv1", "conv3", "conv6"]  # coarse encoder: H (cnum/2 ch), H/2 (cnum), H/4 (2 cnum)

ADAPTER_SPEC = {
    "name": "gatedconv",
    "description": "DeepFill v2 (gated convolution): GC of Table 4; star = GC* (coarse encoder), dagger = GC† (attention transfer)",
    # GC as released: nothing attached (fine-tuning it with the same recipe is the control for GC* / GC†).
    "encoder_levels": [],
    "completion_sites": [],
    "attention_sites": [],
    "image_arg": "image",
    "mask_arg": "mask",
    "output": None,  # forward returns the refined prediction; return_coarse=True adds the coarse one
    "teacher_input": "same_mask",  # with GatedConvTeacher: ground truth whole, the mask for patch validity
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        # GC*: cross- and self-distillation with completion blocks on the coarse network's encoder.
        "star": {"encoder_levels": COARSE_LEVELS, "completion_sites": COARSE_LEVELS},
        # GC†: attention transfer (Eq. 9) on contextual attention, nothing else.
        "dagger": {
            "attention_sites": [
                {"module": "contextual_attention", "affinity": "affinity", "layout": "keys_hw", "transfer": True, "fusion": False}
            ]
        },
    },
}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="gatedconv",
            spec=ADAPTER_SPEC,
            build_student=build_gatedconv,
            build_teacher=build_gatedconv_teacher,
            description=ADAPTER_SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=GRID,
        )
    )


@hookimpl
def register_losses(register: Callable[[str, Callable[..., torch.Tensor]], None]) -> None:
    register("gatedconv", gatedconv_loss)
    register("gatedconv-gan", GatedConvObjective)
