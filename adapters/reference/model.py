"""The paper's own network (Fig. 2), :class:`ReferenceNet`, and its auxiliary network (teacher).

Suin, Purohit & Rajagopalan, "Distillation-guided Image Inpainting", ICCV 2021. The layer-wise description is
in the paper's supplementary material, which is not public; this backbone follows the main text: a
three-level encoder-decoder whose encoder levels end in completion blocks (added by :func:`kdinpaint.attach`)
and whose decoder levels end in pixel attention fused with adaptive convolution by PGL (the fusion is added
by ``attach`` around the attention modules). At the default width (64) it has about 13 M parameters with
everything attached, the size of Table 2.

Network (``image``, ``mask`` -> image in [-1, 1]; H, W divisible by 8)::

    stem   5×5 conv on (masked image, mask)                  w      H
    enc1   3×3 s2, 3×3                                       2w     H/2   <- completion block, x_1
    enc2   3×3 s2, 3×3                                       4w     H/4   <- completion block, x_2
    enc3   3×3 s2, 3×3 dilated 2                             8w     H/8   <- completion block, x_3
    dec3   3×3, 3×3                      -> att3 (+ PGL)     8w     H/8
    dec2   up, concat enc2, 3×3, 3×3     -> att2 (+ PGL)     4w     H/4
    dec1   up, concat enc1, 3×3, 3×3     -> att1 (+ PGL)     2w     H/2
    head   up, concat stem, 3×3, 3×3 -> tanh                 3      H

The decoder attention refines the holes only (``PixelAttention(refine_holes=True)``, called with the mask:
``d + M ⊙ g ⊙ (a - d)``, gate ``g`` starting at zero). With ``prefill=True`` (the demo recipe; not in the
paper) the holes of the input start from :func:`kdinpaint.ops.fill.harmonic_fill` instead of zeros, the stem also
sees how far the plain harmonic (membrane) fill lies from it (the guide: where the smooth and the slope-continuing
interpolants disagree), and the output is a correction of that fill. Both are explained in recipes/decisions.md.

The auxiliary network (teacher) is the same backbone, fed the ground truth with an empty mask; it gets no
completion blocks or PGL (attach adds those to the student only) and never the prefill.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

from kdinpaint.pixel_attention import PixelAttention
from kdinpaint.evaluation.baselines import biharmonic
from kdinpaint.blocks import AdaptiveConv, GlobalLocalFusion
from kdinpaint.layers import ConvAct, LayerLike
from kdinpaint.masking import masked
from kdinpaint.ops.fill import PREFILL_BIHARMONIC, PREFILL_SWEEPS, biharmonic_fill, harmonic_fill, is_tracing

_FILL_CACHE: collections.deque = collections.deque(maxlen=4)
"""The last fills of :meth:`ReferenceNet._fills`, shared by every network (a student, its teacher and its twin
call the network on a batch's tensors in turns)."""

__all__ = ["ReferenceNet", "Compensation", "reference_net", "reference_teacher", "border_ramp", "exact_biharmonic_fill"]

_PREFILL_LIMIT = 0.999  # atanh(0.999) = 3.8: a saturated fill stays a finite pre-activation


class Compensation(nn.Module):
    """Residual 1×1 bottleneck ``x + W2 act(W1 x)``: extra parameters for the parameter-matched baseline."""

    def __init__(self, channels: int, hidden: int, act_layer: LayerLike = "elu"):
        super().__init__()
        self.body = nn.Sequential(ConvAct(channels, hidden, act_layer=act_layer, kernel_size=1), nn.Conv2d(hidden, channels, 1))
        nn.init.zeros_(self.body[1].weight)
        nn.init.zeros_(self.body[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _matching_hidden(channels: int, extra: int) -> int:
    """Hidden width of a :class:`Compensation` with about ``extra`` parameters (``r (2C + 1) + C``)."""
    return max(1, round((extra - channels) / (2 * channels + 1)))


class ReferenceNet(nn.Module):
    """The paper's backbone, called as ``model(image, mask)``.

    Args:
        width: channels of the stem; the levels have 2, 4, 8 times as many.
        attention: pixel attention at the end of each decoder level (Net6-Net8); else identities.
        compensate: add residual 1×1 bottlenecks matching the parameters Net8 adds (the Baseline).
        act_layer: activation, a name or a class.
        completion_kernel_size: kernel size of the completion blocks / PGL that ``compensate`` matches.
        prefill: start the holes from a weight-free smooth fill (:func:`kdinpaint.ops.fill.harmonic_fill`)
            instead of zeros, and predict the output as a correction of that fill,
            ``tanh(atanh(fill) + head(...))``, with the head's last convolution starting at zero (a fresh
            network returns the fill). The stem then takes 7 channels: the fill, the guide ``harmonic - fill``
            (the plain harmonic fill, no biharmonic steps, minus the fill) and the mask. Not in the paper: see
            recipes/decisions.md.
            ``True`` (or ``"pyramid"``) starts from the coarse-to-fine fill; ``"biharmonic"`` from the exact
            biharmonic interpolant, :func:`kdinpaint.evaluation.baselines.biharmonic` (scikit-image, on the CPU; the
            weight-free floor itself, so a fresh network scores exactly the floor; cheaper than 200 steps of the
            pyramid fill's refinement at 64×64, but seconds per image at 256×256 with large holes).
        prefill_ramp: with ``prefill``, the correction fades in over this many pixels from the hole's border,
            ``atanh(fill) + r ⊙ head(...)`` with ``r = 1/R, 2/R, ..., 1`` at chessboard distance ``1, 2, ..., R``
            from the nearest known pixel (0 on known pixels); 0 applies the head everywhere. The fill meets
            the known pixels continuously; a correction that does not vanish there leaves a seam at the
            hole's border (recipes/decisions.md).
        prefill_iterations: Jacobi sweeps per pyramid level of the fill (and of the guide's harmonic fill).
        prefill_biharmonic: conjugate-gradient steps refining the pyramid fill towards the biharmonic interpolant.

    Shapes: image ``(B, 3, H, W)`` in [-1, 1], mask ``(B, 1, H, W)`` with 1 = hole, ``H, W`` divisible by 8;
    returns the prediction ``(B, 3, H, W)`` in [-1, 1] (not composited with the input).
    """

    stride = 8

    def __init__(
        self,
        width: int = 64,
        attention: bool = True,
        compensate: bool = False,
        act_layer: LayerLike = "elu",
        completion_kernel_size: int = 3,
        prefill: bool | str = False,
        prefill_iterations: int = PREFILL_SWEEPS,
        prefill_biharmonic: int = PREFILL_BIHARMONIC,
        prefill_ramp: int = 0,
    ):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int (the stem's channels), got {width!r}")
        w = width
        modes = {False: None, True: "pyramid", "pyramid": "pyramid", "biharmonic": "biharmonic"}
        if not isinstance(prefill, (bool, str)) or prefill not in modes:
            raise ValueError(f"prefill must be false, true, 'pyramid' or 'biharmonic', got {prefill!r}")
        self.prefill_mode: str | None = modes[prefill]
        self.prefill_iterations, self.prefill_biharmonic = int(prefill_iterations), int(prefill_biharmonic)
        if isinstance(prefill_ramp, bool) or not isinstance(prefill_ramp, int) or prefill_ramp < 0:
            raise ValueError(f"prefill_ramp is a width in pixels, an int >= 0 (0: no ramp), got {prefill_ramp!r}")
        self.prefill_ramp = prefill_ramp
        enc = [2 * w, 4 * w, 8 * w]
        self.stem = ConvAct(7 if self.prefill else 4, w, act_layer=act_layer, kernel_size=5)
        self.enc1 = nn.Sequential(ConvAct(w, enc[0], 2, act_layer), ConvAct(enc[0], enc[0], act_layer=act_layer))
        self.enc2 = nn.Sequential(ConvAct(enc[0], enc[1], 2, act_layer), ConvAct(enc[1], enc[1], act_layer=act_layer))
        self.enc3 = nn.Sequential(ConvAct(enc[1], enc[2], 2, act_layer), ConvAct(enc[2], enc[2], act_layer=act_layer, dilation=2))
        self.dec3 = nn.Sequential(ConvAct(enc[2], enc[2], act_layer=act_layer), ConvAct(enc[2], enc[2], act_layer=act_layer))
        self.dec2 = nn.Sequential(ConvAct(enc[2] + enc[1], enc[1], act_layer=act_layer), ConvAct(enc[1], enc[1], act_layer=act_layer))
        self.dec1 = nn.Sequential(ConvAct(enc[1] + enc[0], enc[0], act_layer=act_layer), ConvAct(enc[0], enc[0], act_layer=act_layer))
        self.head = nn.Sequential(ConvAct(enc[0] + w, w, act_layer=act_layer), nn.Conv2d(w, 3, 3, 1, 1))
        if self.prefill:  # the output starts as the fill; training learns the correction
            nn.init.zeros_(self.head[1].weight)
            nn.init.zeros_(self.head[1].bias)
        dec = [enc[2], enc[1], enc[0]]  # att3, att2, att1
        # attention refines the holes through a zero-initialised gate (recipes/decisions.md)
        make_att = (lambda c: PixelAttention(c, refine_holes=True)) if attention else (lambda c: nn.Identity())
        self.att3, self.att2, self.att1 = (make_att(c) for c in dec)
        self.compensate = compensate
        if compensate:  # what completion blocks, attention and PGL add to Net8, level by level
            k = completion_kernel_size
            cb = [sum(p.numel() for p in AdaptiveConv(c, k).parameters()) for c in enc]
            att = [
                sum(p.numel() for p in (*PixelAttention(c, refine_holes=True).parameters(), *GlobalLocalFusion(c, k).parameters()))
                for c in dec
            ]
            self.comp_enc = nn.ModuleList(Compensation(c, _matching_hidden(c, n), act_layer) for c, n in zip(enc, cb))
            self.comp_dec = nn.ModuleList(Compensation(c, _matching_hidden(c, n), act_layer) for c, n in zip(dec, att))

    @property
    def prefill(self) -> bool:
        """Whether the holes start from a weight-free fill (``prefill_mode`` is ``"pyramid"`` or ``"biharmonic"``)."""
        return self.prefill_mode is not None

    def _fills(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill of ``image`` and the guide ``harmonic - prefill`` (both clamped to [-1, 1] first: the
        biharmonic part may overshoot slightly). Algorithm 1 calls the network four times per batch on the
        same tensors, and the control twin (``train.control``) four times more, so the last fills are kept and
        reused, by any network with the same fill settings, while the same (unmodified) image and mask come back;
        the fills take no gradient."""
        if torch.compiler.is_compiling() or image.is_inference() or mask.is_inference():  # no version counter
            return self._compute_fills(image, mask)
        settings = (self.prefill_mode, self.prefill_iterations, self.prefill_biharmonic)
        # the cache holds the tensors themselves: identity, not an address that a new tensor could reuse
        for entry in _FILL_CACHE:
            if entry[0] is image and entry[1] is mask and entry[2] == (image._version, mask._version) and entry[3] == settings:
                return entry[4]
        fills = self._compute_fills(image, mask)
        _FILL_CACHE.append((image, mask, (image._version, mask._version), settings, fills))
        return fills

    def _compute_fills(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefill_mode == "biharmonic":  # traced (torch.export, ONNX): the same system solved in torch
            start = (biharmonic_fill(image, mask) if is_tracing() else exact_biharmonic_fill(image, mask)).clamp(-1, 1)
        else:
            start = harmonic_fill(image, mask, self.prefill_iterations, self.prefill_biharmonic).clamp(-1, 1)
        smooth = harmonic_fill(image, mask, self.prefill_iterations).clamp(-1, 1)
        return start, smooth - start

    @staticmethod
    def _attend(att: nn.Module, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A decoder attention (Net6-Net8) gets the mask, to refine the holes only; the identity does not. Not a
        test of PixelAttention: the exported model wraps it (with its PGL fusion), and the wrapper must get the mask too."""
        return att(d) if isinstance(att, nn.Identity) else att(d, mask)

    def _comp(self, which: str, i: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, which)[i](x) if self.compensate else x

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] % 8 or image.shape[-2] % 8:
            raise ValueError(f"ReferenceNet needs H and W divisible by 8, got {tuple(image.shape[-2:])}; pad the input")
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        if self.prefill:  # (B, 3, H, W) each
            start, guide = self._fills(image, mask)
            x0 = self.stem(torch.cat([start, guide, mask], 1))  # (B, w, H, W)
        else:
            start = masked(image, mask)
            x0 = self.stem(torch.cat([start, mask], 1))  # (B, w, H, W)
        x1 = self._comp("comp_enc", 0, self.enc1(x0))  # (B, 2w, H/2, W/2)
        x2 = self._comp("comp_enc", 1, self.enc2(x1))  # (B, 4w, H/4, W/4)
        x3 = self._comp("comp_enc", 2, self.enc3(x2))  # (B, 8w, H/8, W/8)
        y = self._comp("comp_dec", 0, self._attend(self.att3, self.dec3(x3), mask))  # (B, 8w, H/8, W/8)
        y = self._comp("comp_dec", 1, self._attend(self.att2, self.dec2(torch.cat([up(y), x2], 1)), mask))  # (B, 4w, H/4, W/4)
        y = self._comp("comp_dec", 2, self._attend(self.att1, self.dec1(torch.cat([up(y), x1], 1)), mask))  # (B, 2w, H/2, W/2)
        out = self.head(torch.cat([up(y), x0], 1))  # (B, 3, H, W)
        if self.prefill:  # a correction of the fill, in tanh's pre-activation (finite: the fill is clamped)
            if self.prefill_ramp:
                out = out * border_ramp(mask, self.prefill_ramp).to(out.dtype)
            out = out + torch.atanh(start.clamp(-_PREFILL_LIMIT, _PREFILL_LIMIT))
        return torch.tanh(out)


def reference_net(
    width: int = 64,
    attention: bool = True,
    compensate: bool = False,
    act_layer: LayerLike = "elu",
    prefill: bool | str = False,
    prefill_iterations: int = PREFILL_SWEEPS,
    prefill_biharmonic: int = PREFILL_BIHARMONIC,
    prefill_ramp: int = 0,
) -> ReferenceNet:
    """Build the student of the ``reference`` adapter."""
    return ReferenceNet(
        width=width, attention=attention, compensate=compensate, act_layer=act_layer, prefill=prefill,
        prefill_iterations=prefill_iterations, prefill_biharmonic=prefill_biharmonic, prefill_ramp=prefill_ramp,
    )


def reference_teacher(**kwargs) -> ReferenceNet:
    """The auxiliary network: the student's backbone with fresh weights, always without ``prefill``.

    Its input has no hole, so a fill would change nothing, and a correction of its own input would let the
    autoencoder return the ground truth without learning any feature (``head = 0``). The distilled feature
    shapes are the same either way; only the stem's input channels differ (4 here, 7 with the fill's guide).
    """
    return reference_net(**{**kwargs, "prefill": False})


def border_ramp(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, 1, H, W)``: ``k / width`` on hole pixels at chessboard distance ``k`` from the nearest known pixel
    (``k <= width``; 1 beyond), 0 on known pixels: the mean of the hole eroded ``0 .. width - 1`` times by a
    3×3 square. An image without a known pixel has no border and gets 1 everywhere."""
    hole = (mask > 0.5).to(torch.float32)
    ramp = torch.zeros_like(hole)
    for _ in range(width):
        ramp = ramp + hole
        hole = -F.max_pool2d(-hole, 3, 1, 1)  # erosion; the image's edge is not a border (max_pool pads with -inf)
    return ramp / width


def exact_biharmonic_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``prefill="biharmonic"``: :func:`kdinpaint.evaluation.baselines.biharmonic` of every sample that has a known pixel
    (known pixels unchanged, in [-1, 1]); a sample that is all hole gets zeros, as the pyramid fill gives it."""
    mask = mask.expand(image.shape[0], -1, -1, -1) if mask.shape[0] != image.shape[0] else mask
    out = torch.zeros_like(image)
    ok = (mask.flatten(1).min(1).values < 1).nonzero().flatten()
    if len(ok):
        out[ok] = biharmonic(image[ok], mask[ok])  # NumPy inside: no gradient, clamped to [-1, 1]
    return out
