"""DeepFill v2's networks: the two-stage generator, its teacher and the SN-PatchGAN discriminator.

Yu et al., "Free-Form Image Inpainting with Gated Convolution", ICCV 2019. The two-stage generator (coarse
network; refinement network with a dilated gated-convolution branch and a contextual-attention branch) and
the SN-PatchGAN discriminator, with the module tree of the converted official weights:
nipponjo/deepfillv2-pytorch's ``model/networks_tf.py``, whose ``states_tf_places2.pth`` /
``states_tf_celebahq.pth`` hold the official TensorFlow weights (generator under ``'G'``).
``GatedConvInpaint().load_state_dict(ckpt['G'], strict=True)`` works; use
:func:`~kdinpaint_adapters.gatedconv.weights.load_official` for a checked load with named missing/unexpected keys.

Two numerics, ``GatedConvInpaint(compat=...)``:

``compat="tf"`` (default, and what ``load_official`` / ``build_gatedconv`` use): the official TF
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
batch (see :mod:`kdinpaint_adapters.gatedconv.contextual_attention`); with one mask for the batch they agree.
Images whose sides are not multiples of 8 are padded here (see below), where the port crops them.

Conventions (toolkit <-> network), applied in :meth:`GatedConvInpaint.forward`:

* toolkit: image ``(B, 3, H, W)`` RGB in ``[-1, 1]``, mask ``(B, 1, H, W)`` with 1 = hole
  (:mod:`kdinpaint.masking`);
* network: ``x = cat[image * (1 - M), ones, ones * M]`` (5 channels, holes filled with 0), image in
  ``channel_order``, ``H`` and ``W`` multiples of 8 (the adapter pads bottom/right by reflection, with
  mask 0 in the padding, and crops the output back: :func:`kdinpaint.padding.pad_bottom_right`).

Channel order: ``"bgr"`` is the default of ``compat="tf"``; the evidence that the official weights expect
BGR, and the check that settles it on photographs, are in :mod:`kdinpaint_adapters.gatedconv.channel_order`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdinpaint.masking import check_image_range, check_mask
from kdinpaint.padding import crop_top_left, pad_bottom_right

from .contextual_attention import ContextualAttention, resize_nearest_tf
from .layers import GatedConv2d, GatedUpConv2d, SNConv2d, tf_same_pad

__all__ = [
    "COMPAT_PRESETS",
    "OFFICIAL_COMPAT",
    "GRID",
    "to_network_input",
    "from_network_output",
    "GatedConvInpaint",
    "GatedConvTeacher",
    "SNPatchGANDiscriminator",
]

_CHANNEL_ORDERS = ("rgb", "bgr")
# What each numerics mode implies; ``channel_order`` / ``fuse`` given to GatedConvInpaint override it.
COMPAT_PRESETS: dict[str, dict[str, object]] = {
    "tf": {"channel_order": "bgr", "fuse": True},  # the official graph (cv2 images, fused scores)
    "nipponjo": {"channel_order": "rgb", "fuse": False},  # networks_tf.Generator fed PIL images
}
# The mode the loaders of the converted official files use: the numerics the weights were trained in.
OFFICIAL_COMPAT = "tf"
GRID = 8  # the generator downsamples by 4 and contextual attention by 2 more


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
    return pad_bottom_right(mask, GRID, value=0.0)


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
