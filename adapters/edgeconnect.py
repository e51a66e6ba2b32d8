"""EdgeConnect: Generative Image Inpainting with Adversarial Edge Learning.

Nazeri, Ng, Joseph, Qureshi, Ebrahimi, ICCV Workshops 2019 (arXiv:1901.00212); official code
knazeri/edge-connect. Two generators of one skeleton (7x7 stem, two stride-2 convolutions, 8 dilated residual
blocks at 1/4 resolution, two transposed convolutions, 7x7 head; instance norm without affine or running
stats everywhere): the edge generator ``G1`` completes a Canny edge map, the inpainting generator ``G2``
paints RGB guided by it. The module trees below reproduce the official ones index for index, so the
released ``EdgeModel_gen.pth`` / ``InpaintingModel_gen.pth`` (and ``*_dis.pth``) load with ``strict=True``:
spectral norm is the legacy ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``, ``weight_u``,
``weight_v``; in eval mode the stored ``u``, ``v`` give ``W = W_orig / (u^T W_orig v)``), and the
discriminator's ``features`` is an alias of ``conv1`` (both appear in its state_dict).

One deliberate difference: activations are not in-place (the official ``ReLU(True)``), so a forward hook
that keeps a norm layer's output is not overwritten by the next ReLU. Outputs are identical.

Toolkit entry points (images in ``[-1, 1]``, mask 1 = hole; conventions in :mod:`.edgeconnect_io`):
:class:`EdgeConnect` (both stages, EC) and :class:`EdgeConnectInpaint` (``G2`` alone with a zero edge
channel, EC#). Both keep the generator under the submodule ``inpaint``, so encoder levels are
``inpaint.encoder.3`` (64 ch, 1/1), ``inpaint.encoder.6`` (128 ch, 1/2) and ``inpaint.encoder.9``
(256 ch, 1/4) in both.

Adapter ``edgeconnect`` (Table 4 of Suin et al.; registered through the ``kdinpaint`` entry points):

=============  ==========================================================================================
``edgeconnect`` EC as released: both stages, nothing attached (the control of EC* / EC#)
``:star``      EC*: cross- and self-distillation (Eq. 2, 3) coupled with completion blocks (Eq. 5) on G2's
               encoder, edge stage kept (§4.2: "CD, SD coupled with CB"); the blocks add about 0.1 M
               parameters (0.5 %), the same recipe as GC* and SF*
``:hash``      EC#: the edge stage removed (:class:`EdgeConnectInpaint`, zero edge channel), completion
               blocks (Eq. 5) and distillation on the same three levels
=============  ==========================================================================================

The teacher of every variant is :class:`EdgeConnectInpaint` fed the ground truth with an empty mask (an
autoencoder of G2's architecture). Stride 4: the models pad any size to a multiple of 4 themselves and crop
back, so the adapter's stride only makes the framework hand them sizes where hole masks and encoder
features line up. :func:`edgeconnect_loss` is EdgeConnect's own G2 objective.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from kdinpaint.adapter import Adapter
from kdinpaint.hookspecs import hookimpl
from kdinpaint.layers import legacy_spectral_norm, legacy_spectral_norm_key
from kdinpaint.weights import load_reported, read_weights, strip_wrapper_prefixes

from .edgeconnect_io import (
    EC_SIZE_MULTIPLE,
    canny,
    check_inputs,
    crop_to,
    edge_generator_input,
    from_unit,
    inpaint_generator_input,
    pad_to_multiple,
    rgb_to_gray,
    to_unit,
)
from .edgeconnect_loss import EC_LOSS_WEIGHTS, EdgeConnectObjective, edgeconnect_loss, edgeconnect_loss_terms

__all__ = [
    "EdgeGenerator",
    "InpaintGenerator",
    "Discriminator",
    "EdgeConnect",
    "EdgeConnectInpaint",
    "OFFICIAL_FILES",
    "identify_state_dict",
    "checkpoint_filter_fn",
    "load_official",
    "save_official",
    "build_edgeconnect",
    "build_edgeconnect_inpaint",
    "build_edgeconnect_discriminator",
    "pack_official",
    "edgeconnect_student",
    "edgeconnect_teacher",
    "EC_LOSS_WEIGHTS",
    "edgeconnect_loss_terms",
    "edgeconnect_loss",
    "EdgeConnectObjective",
    "ENCODER_LEVELS",
    "ADAPTER_SPEC",
    "VARIANT_BUILDERS",
    "register_adapters",
    "register_losses",
]

_logger = logging.getLogger(__name__)

# which -> (network class name, official file name, key of the state_dict inside the file)
OFFICIAL_FILES: dict[str, tuple[str, str, str]] = {
    "edge": ("EdgeGenerator", "EdgeModel_gen.pth", "generator"),
    "inpaint": ("InpaintGenerator", "InpaintingModel_gen.pth", "generator"),
    "edge_dis": ("Discriminator(in_channels=2)", "EdgeModel_dis.pth", "discriminator"),
    "inpaint_dis": ("Discriminator(in_channels=3)", "InpaintingModel_dis.pth", "discriminator"),
}


def _sn(module: nn.Module, use_spectral_norm: bool) -> nn.Module:
    return legacy_spectral_norm(module) if use_spectral_norm else module


def _init_normal(module: nn.Module, gain: float = 0.02) -> None:
    """The official initialisation: conv weights ~ N(0, gain), biases 0 (``weight_orig`` under spectral norm)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(getattr(m, "weight_orig", m.weight), 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResnetBlock(nn.Module):
    """``x + [pad(d), conv3x3(d), IN, ReLU, pad(1), conv3x3, IN](x)``, no activation after the sum.

    Under spectral norm the two convolutions have no bias (as in the official code). ``(B, C, H, W)`` in and out.
    """

    def __init__(self, dim: int, dilation: int = 1, use_spectral_norm: bool = False) -> None:
        super().__init__()
        bias = not use_spectral_norm
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(dilation),
            _sn(nn.Conv2d(dim, dim, 3, padding=0, dilation=dilation, bias=bias), use_spectral_norm),
            nn.InstanceNorm2d(dim, track_running_stats=False),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            _sn(nn.Conv2d(dim, dim, 3, padding=0, bias=bias), use_spectral_norm),
            nn.InstanceNorm2d(dim, track_running_stats=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class _EncoderResDecoder(nn.Module):
    """The skeleton shared by both generators; subclasses choose channels, spectral norm and the output map."""

    def __init__(self, in_chans: int, out_chans: int, residual_blocks: int, use_spectral_norm: bool) -> None:
        super().__init__()
        sn = use_spectral_norm
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3),
            _sn(nn.Conv2d(in_chans, 64, 7, padding=0), sn),
            nn.InstanceNorm2d(64, track_running_stats=False),
            nn.ReLU(),  # encoder.3: level 0, 64 x H x W
            _sn(nn.Conv2d(64, 128, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(128, track_running_stats=False),
            nn.ReLU(),  # encoder.6: level 1, 128 x H/2 x W/2
            _sn(nn.Conv2d(128, 256, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(256, track_running_stats=False),
            nn.ReLU(),  # encoder.9: level 2, 256 x H/4 x W/4
        )
        self.middle = nn.Sequential(*[ResnetBlock(256, 2, use_spectral_norm=sn) for _ in range(residual_blocks)])
        self.decoder = nn.Sequential(
            _sn(nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(128, track_running_stats=False),
            nn.ReLU(),
            _sn(nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), sn),
            nn.InstanceNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.ReflectionPad2d(3),
            nn.Conv2d(64, out_chans, 7, padding=0),
        )
        # timm-style description of the encoder levels (module path relative to this generator)
        self.feature_info = [
            {"module": "encoder.3", "num_chs": 64, "reduction": 1},
            {"module": "encoder.6", "num_chs": 128, "reduction": 2},
            {"module": "encoder.9", "num_chs": 256, "reduction": 4},
        ]
        _init_normal(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation output ``(B, out_chans, H, W)`` of an input ``(B, in_chans, H, W)``, H and W multiples of 4."""
        return self.decoder(self.middle(self.encoder(x)))


class EdgeGenerator(_EncoderResDecoder):
    """G1: ``(B, 3, H, W)`` ``[gray with white holes, edges outside holes, mask]`` -> ``(B, 1, H, W)`` edge
    probability in ``(0, 1)`` (sigmoid). Spectral norm on every conv except the last, as released."""

    def __init__(self, residual_blocks: int = 8, use_spectral_norm: bool = True) -> None:
        super().__init__(3, 1, residual_blocks, use_spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class InpaintGenerator(_EncoderResDecoder):
    """G2: ``(B, 4, H, W)`` ``[RGB in [0, 1] with white holes, edge map]`` -> ``(B, 3, H, W)`` RGB in ``[0, 1]``
    (``(tanh + 1) / 2``). No spectral norm, as released."""

    def __init__(self, residual_blocks: int = 8, use_spectral_norm: bool = False) -> None:
        super().__init__(4, 3, residual_blocks, use_spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.logits(x)) + 1) / 2


class Discriminator(nn.Module):
    """70x70 PatchGAN of both stages: ``(B, in_channels, H, W)`` -> ``(B, 1, H/8 - 2, W/8 - 2)`` scores and the
    five activations (for the feature-matching loss). ``in_channels`` is 2 (gray, edge) for G1 and 3 (RGB) for G2.
    ``features`` is the same module as ``conv1`` (the official alias; both names are in the state_dict)."""

    def __init__(self, in_channels: int, use_sigmoid: bool = True, use_spectral_norm: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.use_sigmoid = use_sigmoid
        sn, bias = use_spectral_norm, not use_spectral_norm

        def block(cin: int, cout: int, stride: int, act: bool = True) -> nn.Sequential:
            layers: list[nn.Module] = [_sn(nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=bias), sn)]
            if act:
                layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers)

        self.conv1 = block(in_channels, 64, 2)
        self.features = self.conv1
        self.conv2 = block(64, 128, 2)
        self.conv3 = block(128, 256, 2)
        self.conv4 = block(256, 512, 1)
        self.conv5 = block(512, 1, 1, act=False)
        _init_normal(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = conv(x)
            feats.append(x)
        out = torch.sigmoid(x) if self.use_sigmoid else x
        return out, feats


# ----------------------------------------------------------------------------------------------------------
# Toolkit-facing models
# ----------------------------------------------------------------------------------------------------------


class EdgeConnect(nn.Module):
    """EC, both stages, called with toolkit ``(image, mask)`` alone.

    ``forward(image, mask)``: ``image`` ``(B, 3, H, W)`` in ``[-1, 1]``, ``mask`` ``(B, 1, H, W)`` (1 = hole), any
    H, W >= 9. Steps: ``[0, 1]`` RGB, gray (rgb2gray), Canny (``sigma``) with the hole excluded, G1 on the
    masked gray / edges / mask, the edge map for G2 = ``G1 * m + canny * (1 - m)`` (``merge_edges=True``, as in
    the official training; ``False`` feeds G1's raw map as the official ``test()`` does), G2, crop.
    ``detach_edges=True`` (default) stops gradients into G1 as in the official stage-3 training (G1 then runs
    without autograd).
    Returns G2's raw output ``(B, 3, H, W)`` in ``[-1, 1]``, **not** composited (the toolkit composites with
    :func:`kdinpaint.masking.composite`). ``return_edges=True`` also returns ``(edges fed to G2, canny)``, both
    ``(B, 1, H, W)`` in ``[0, 1]``.
    """

    def __init__(
        self,
        residual_blocks: int = 8,
        sigma: float = 2.0,
        merge_edges: bool = True,
        detach_edges: bool = True,
    ) -> None:
        super().__init__()
        self.edge = EdgeGenerator(residual_blocks)
        self.inpaint = InpaintGenerator(residual_blocks)
        self.sigma = sigma
        self.merge_edges = merge_edges
        self.detach_edges = detach_edges

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, return_edges: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_inputs(image, mask)
        size = image.shape[-2:]
        mask = mask.to(image.dtype).expand(image.shape[0], 1, *size)
        x01 = to_unit(image)
        gray = rgb_to_gray(x01)  # (B, 1, H, W)
        # Canny in float32 at least: half precision would move pixels across the thresholds
        cdt = torch.promote_types(gray.dtype, torch.float32)
        edges = canny(gray.to(cdt), self.sigma, hole=mask).to(gray.dtype)
        g1_input = pad_to_multiple(edge_generator_input(gray, edges, mask))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_edges):  # no graph for a frozen G1
            pred = crop_to(self.edge(g1_input), size)
        edge_map = pred * mask + edges * (1 - mask) if self.merge_edges else pred
        if self.detach_edges:
            edge_map = edge_map.detach()
        out = crop_to(self.inpaint(pad_to_multiple(inpaint_generator_input(x01, edge_map, mask))), size)
        out = from_unit(out)
        return (out, edge_map, edges) if return_edges else out


class EdgeConnectInpaint(nn.Module):
    """EC#: the inpainting generator alone, its edge channel fed **zeros** (kept, not dropped, so released
    ``InpaintingModel_gen.pth`` weights still load).

    ``forward(image, mask)``: ``(B, 3, H, W)`` in ``[-1, 1]`` and ``(B, 1, H, W)`` (1 = hole) -> G2's raw output
    ``(B, 3, H, W)`` in ``[-1, 1]``, not composited. With an all-zero mask it is the autoencoder teacher.

    ``load_state_dict`` also takes the ``state_dict()`` of a two-stage :class:`EdgeConnect`: removing the edge
    stage is what EC# means, so its ``edge.*`` entries are dropped (logged) and G2's are loaded strictly.
    """

    def __init__(self, residual_blocks: int = 8) -> None:
        super().__init__()
        self.inpaint = InpaintGenerator(residual_blocks)
        self.register_load_state_dict_pre_hook(_drop_edge_stage)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_inputs(image, mask)
        size = image.shape[-2:]
        mask = mask.to(image.dtype).expand(image.shape[0], 1, *size)
        x01 = to_unit(image)
        x = inpaint_generator_input(x01, torch.zeros_like(mask), mask)
        return from_unit(crop_to(self.inpaint(pad_to_multiple(x)), size))


def _drop_edge_stage(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # load_state_dict pre-hook of EdgeConnectInpaint: a two-stage EC state_dict initialises EC# with its G2
    edge = [k for k in state_dict if k.startswith(prefix + "edge.")]
    if edge and any(k.startswith(prefix + "inpaint.") for k in state_dict):
        for key in edge:
            del state_dict[key]
        _logger.info("EdgeConnectInpaint: dropped the %d edge-stage entries of a two-stage state_dict", len(edge))


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------


def _which_of(model: nn.Module) -> str:
    if isinstance(model, EdgeGenerator):
        return "edge"
    if isinstance(model, InpaintGenerator):
        return "inpaint"
    if isinstance(model, Discriminator) and model.in_channels in (2, 3):
        return "edge_dis" if model.in_channels == 2 else "inpaint_dis"
    raise TypeError(
        f"EdgeConnect checkpoints load into EdgeGenerator, InpaintGenerator or Discriminator(in_channels=2|3), "
        f"got {type(model).__name__}; for EdgeConnect / EdgeConnectInpaint load into .edge / .inpaint"
    )


def _describe(which: str) -> str:
    net, fname, _ = OFFICIAL_FILES[which]
    return f"{net} ({fname})"


def identify_state_dict(state_dict: Mapping[str, object]) -> str | None:
    """Which official network a (bare, prefix-free) state_dict belongs to: a key of :data:`OFFICIAL_FILES`
    (``'edge'``, ``'inpaint'``, ``'edge_dis'``, ``'inpaint_dis'``) or ``None`` if it is none of them."""

    def shape(key: str) -> tuple[int, ...] | None:
        v = state_dict.get(key)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    stem_sn, stem = shape("encoder.1.weight_orig"), shape("encoder.1.weight")
    if stem_sn is not None and stem_sn[:2] == (64, 3):
        return "edge"
    if stem is not None and stem[:2] == (64, 4):
        return "inpaint"
    d = shape("conv1.0.weight_orig") or shape("features.0.weight_orig") or shape("conv1.0.weight")
    if d is not None and d[0] == 64 and d[1] in (2, 3) and shape("conv5.0.weight_orig") is not None:
        return "edge_dis" if d[1] == 2 else "inpaint_dis"
    return None


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn an official EdgeConnect checkpoint (or its state_dict) into a state_dict ``model`` loads strictly.

    Unwraps ``{'iteration', 'generator'}`` / ``{'discriminator'}``; strips ``module.`` (DataParallel) and
    ``_orig_mod.`` (torch.compile) prefixes; maps the new-style spectral-norm keys
    (``parametrizations.weight.original`` / ``.0._u`` / ``.0._v``) to the legacy ones; fills the
    discriminator's ``conv1`` / ``features`` alias from whichever is present. Raises ``ValueError`` naming the
    expected file when the weights belong to the other stage or to the other network.

    For the toolkit models: :class:`EdgeConnectInpaint` takes the ``InpaintingModel_gen.pth`` contents;
    :class:`EdgeConnect` takes ``{'edge': <EdgeModel_gen.pth contents>, 'inpaint': <InpaintingModel_gen.pth
    contents>}`` (the file :func:`pack_official` writes); both also take their own ``state_dict()``
    (prefixes stripped), and :class:`EdgeConnectInpaint` the two-stage ones too (keeping G2 only). Keys come
    back prefixed.
    """
    if isinstance(model, (EdgeConnect, EdgeConnectInpaint)):
        return _filter_wrapped(state_dict, model)
    expected = _which_of(model)
    section = OFFICIAL_FILES[expected][2]
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a checkpoint dict or state_dict, got {type(state_dict).__name__}")
    other = "discriminator" if section == "generator" else "generator"
    if isinstance(state_dict.get(section), Mapping):
        state_dict = state_dict[section]  # type: ignore[assignment]
    elif isinstance(state_dict.get(other), Mapping):
        state_dict = state_dict[other]  # type: ignore[assignment]  # the check below names the right file

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = strip_wrapper_prefixes(key)
        key = legacy_spectral_norm_key(key)
        out[key] = value
    if isinstance(model, Discriminator):
        for a, b in (("conv1.", "features."), ("features.", "conv1.")):
            for key in [k for k in out if k.startswith(a)]:
                out.setdefault(b + key[len(a) :], out[key])

    found = identify_state_dict(out)
    if found is not None and found != expected:
        raise ValueError(
            f"these weights are the {_describe(found)}, but the model is the {_describe(expected)}; "
            f"pass the {OFFICIAL_FILES[expected][1]} file (or load these into the {OFFICIAL_FILES[found][0]})"
        )
    if found is None:
        shown = ", ".join(list(out)[:5]) or "no tensors"
        raise ValueError(
            f"these weights are not an EdgeConnect {_describe(expected)}: its keys start with {shown}; "
            f"expected keys such as {next(iter(model.state_dict()))!r}"
        )
    return out


def _filter_wrapped(state_dict: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    parts = ("edge", "inpaint") if isinstance(model, EdgeConnect) else ("inpaint",)
    if all(isinstance(state_dict.get(p), Mapping) for p in parts):  # one official checkpoint per stage
        sub = {p: checkpoint_filter_fn(state_dict[p], getattr(model, p)) for p in parts}  # type: ignore[arg-type]
        return {f"{p}.{k}": v for p, sd in sub.items() for k, v in sd.items()}
    flat = {strip_wrapper_prefixes(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(p + ".") for p in parts for k in flat):  # this model's own state_dict
        if parts == ("inpaint",):  # or a two-stage EC's: EC# keeps its G2
            return {k: v for k, v in flat.items() if not k.startswith("edge.")}
        return flat
    if parts == ("inpaint",):
        return {f"inpaint.{k}": v for k, v in checkpoint_filter_fn(state_dict, model.inpaint).items()}
    raise ValueError(
        "EdgeConnect has two stages: pass {'edge': <EdgeModel_gen.pth contents>, 'inpaint': "
        "<InpaintingModel_gen.pth contents>} (one file: pack_official(<checkpoints folder>, 'ec.safetensors'), "
        "e.g. for a recipe's model.init), or build it with build_edgeconnect(pretrained=<checkpoints folder>)"
    )



def load_official(
    path: str | os.PathLike[str],
    which: str | None = None,
    *,
    model: nn.Module | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an official EdgeConnect file (``EdgeModel_gen.pth``, ``InpaintingModel_gen.pth``, ``*_dis.pth``).

    ``which``: ``'edge'``, ``'inpaint'``, ``'edge_dis'`` or ``'inpaint_dis'``; ``None`` infers it from the
    weights. ``model``: load into this network (a generator, a discriminator or an
    :class:`EdgeConnectInpaint`) instead of building one; for :class:`EdgeConnect` load each stage into
    ``model.edge`` / ``model.inpaint`` (or use :func:`build_edgeconnect`). Uses ``torch.load(weights_only=True)``
    (no pickled code runs). With ``strict`` every missing / unexpected key and shape mismatch is reported by
    name in a ``ValueError``; without it they are logged and the matching tensors loaded. Returns the model.
    """
    if which is not None and which not in OFFICIAL_FILES:
        raise ValueError(f"which must be one of {sorted(OFFICIAL_FILES)} or None, got {which!r}")
    path = Path(path)
    ckpt = read_weights(path, "EdgeConnect checkpoint", map_location)
    owner = model
    if isinstance(model, EdgeConnectInpaint):
        model = model.inpaint
    if model is None:
        if which is None:
            inner = next((ckpt[k] for k in ("generator", "discriminator") if isinstance(ckpt.get(k), Mapping)), ckpt)
            which = identify_state_dict({strip_wrapper_prefixes(k): v for k, v in inner.items()})
            if which is None:
                files = ", ".join(f for _, f, _ in OFFICIAL_FILES.values())
                raise ValueError(f"{path} is not an EdgeConnect checkpoint; expected one of {files}")
        model = _build(which)
    elif which is not None and _which_of(model) != which:
        raise ValueError(f"which={which!r} but the model given is the {_describe(_which_of(model))}")
    try:
        state_dict = checkpoint_filter_fn(ckpt, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    load_reported(model, state_dict, path, _describe(_which_of(model)), strict, _logger)
    _logger.info("loaded %s from %s (iteration %s)", _describe(_which_of(model)), path, ckpt.get("iteration", "n/a"))
    return owner if owner is not None else model


def save_official(model: nn.Module, path: str | os.PathLike[str], iteration: int = 0) -> None:
    """Write ``model`` in the official file layout (``{'iteration', 'generator'}`` or ``{'discriminator'}``),
    readable by the official code and by :func:`load_official`. Written atomically (temporary file + rename)."""
    which = _which_of(model)
    section = OFFICIAL_FILES[which][2]
    payload: dict[str, object] = {section: model.state_dict()}
    if section == "generator":
        payload = {"iteration": int(iteration), **payload}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _build(which: str) -> nn.Module:
    if which == "edge":
        return EdgeGenerator()
    if which == "inpaint":
        return InpaintGenerator()
    return Discriminator(in_channels=2 if which == "edge_dis" else 3)


def _resolve(pretrained: str | os.PathLike[str], which: str) -> Path:
    p = Path(pretrained)
    return p / OFFICIAL_FILES[which][1] if p.is_dir() else p


# ----------------------------------------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------------------------------------


def build_edgeconnect(pretrained: str | os.PathLike[str] | None = None, **kwargs: object) -> EdgeConnect:
    """EC, both stages. ``pretrained``: the official checkpoints folder holding ``EdgeModel_gen.pth`` and
    ``InpaintingModel_gen.pth``. ``kwargs`` go to :class:`EdgeConnect`."""
    model = EdgeConnect(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        if not Path(pretrained).is_dir():
            raise ValueError(
                f"build_edgeconnect(pretrained=...) takes the folder holding EdgeModel_gen.pth and "
                f"InpaintingModel_gen.pth, got {pretrained}"
            )
        load_official(_resolve(pretrained, "edge"), "edge", model=model.edge)
        load_official(_resolve(pretrained, "inpaint"), "inpaint", model=model.inpaint)
    return model


def build_edgeconnect_inpaint(
    pretrained: str | os.PathLike[str] | None = None, **kwargs: object
) -> EdgeConnectInpaint:
    """EC#, the inpainting generator alone. ``pretrained``: ``InpaintingModel_gen.pth`` or its folder."""
    model = EdgeConnectInpaint(**kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_official(_resolve(pretrained, "inpaint"), "inpaint", model=model.inpaint)
    return model


def build_edgeconnect_discriminator(
    stage: str = "inpaint", pretrained: str | os.PathLike[str] | None = None, use_sigmoid: bool = True
) -> Discriminator:
    """The discriminator of ``stage`` (``'edge'``: 2 input channels, ``'inpaint'``: 3). ``pretrained``: the
    ``*_dis.pth`` file or its folder. ``use_sigmoid=False`` for a hinge / LSGAN-logit loss."""
    if stage not in ("edge", "inpaint"):
        raise ValueError(f"stage must be 'edge' or 'inpaint', got {stage!r}")
    model = Discriminator(in_channels=2 if stage == "edge" else 3, use_sigmoid=use_sigmoid)
    if pretrained is not None:
        load_official(_resolve(pretrained, f"{stage}_dis"), f"{stage}_dis", model=model)
    return model


def pack_official(
    checkpoints: str | os.PathLike[str], path: str | os.PathLike[str], *, residual_blocks: int = 8
) -> Path:
    """Write both released generators of an official checkpoints folder into one file, for ``model.init``.

    ``checkpoints``: the folder holding ``EdgeModel_gen.pth`` and ``InpaintingModel_gen.pth`` (both are
    loaded strictly first). ``path``: ``*.safetensors`` gets the flat ``state_dict()`` of :class:`EdgeConnect`
    (``edge.*``, ``inpaint.*``); any other name gets ``{'edge': {'generator': ...}, 'inpaint': {'generator':
    ...}}`` via ``torch.save`` (tensors only, so ``torch.load(weights_only=True)`` reads it). Either is accepted
    by :func:`checkpoint_filter_fn` for :class:`EdgeConnect` and :class:`EdgeConnectInpaint`. Written
    atomically; returns ``path``. ``residual_blocks``: 8 in every release.
    """
    model = build_edgeconnect(pretrained=checkpoints, residual_blocks=residual_blocks)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    else:
        torch.save({p: {"generator": getattr(model, p).state_dict()} for p in ("edge", "inpaint")}, tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Adapter builders (what ``kdinpaint.get_adapter("edgeconnect")`` builds)
# ----------------------------------------------------------------------------------------------------------

_EDGE_STAGE_OPTIONS = ("sigma", "merge_edges", "detach_edges")


def _check_inpaint_only_kwargs(kwargs: dict[str, Any], who: str) -> None:
    """Accept (and ignore) the edge-stage options: recipe kwargs are shared by every variant and the teacher."""
    unknown = [k for k in kwargs if k not in _EDGE_STAGE_OPTIONS]
    if unknown:
        raise TypeError(
            f"{who} got unknown keyword argument(s) {unknown}; it takes residual_blocks, pretrained and the "
            f"edge-stage options {list(_EDGE_STAGE_OPTIONS)} (ignored without an edge stage)"
        )


def edgeconnect_student(
    edge_stage: bool = True,
    residual_blocks: int = 8,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> EdgeConnect | EdgeConnectInpaint:
    """The student of the ``edgeconnect`` adapter: :class:`EdgeConnect` (EC, EC*) or, with
    ``edge_stage=False``, :class:`EdgeConnectInpaint` (EC#; ``variant_builders['hash']``).

    ``pretrained``: the official checkpoints folder (EC# also takes ``InpaintingModel_gen.pth`` itself).
    ``kwargs``: :class:`EdgeConnect` options (``sigma``, ``merge_edges``, ``detach_edges``); ignored by EC#.
    """
    if not isinstance(edge_stage, bool):
        raise TypeError(f"edge_stage must be true or false, got {edge_stage!r}")
    if edge_stage:
        return build_edgeconnect(pretrained, residual_blocks=residual_blocks, **kwargs)
    _check_inpaint_only_kwargs(kwargs, "edgeconnect_student(edge_stage=False)")
    return build_edgeconnect_inpaint(pretrained, residual_blocks=residual_blocks)


def edgeconnect_teacher(
    edge_stage: bool = True,
    residual_blocks: int = 8,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> EdgeConnectInpaint:
    """The teacher (auxiliary network) of every variant: :class:`EdgeConnectInpaint`, G2's architecture fed the
    ground truth with an empty mask and a zero edge channel. Takes the student's keyword arguments so one
    recipe builds both; ``edge_stage`` and the edge-stage options do not apply to it."""
    del edge_stage
    _check_inpaint_only_kwargs(kwargs, "edgeconnect_teacher")
    return build_edgeconnect_inpaint(pretrained, residual_blocks=residual_blocks)


# ----------------------------------------------------------------------------------------------------------
# Spec and registration
# ----------------------------------------------------------------------------------------------------------

ENCODER_LEVELS = ["inpaint.encoder.3", "inpaint.encoder.6", "inpaint.encoder.9"]  # G2: 64 @ 1, 128 @ 1/2, 256 @ 1/4

ADAPTER_SPEC: dict[str, Any] = {
    "name": "edgeconnect",
    "description": "EdgeConnect (two stages): EC of Table 4; star = EC* (G2's encoder), hash = EC# (G2 alone + CB)",
    # EC as released: nothing attached (fine-tuning it with the same recipe is the control for EC* / EC#).
    "encoder_levels": [],
    "completion_sites": [],
    "image_arg": "image",
    "mask_arg": "mask",
    "output": None,  # forward returns G2's prediction; return_edges=True adds the edge maps
    "teacher_input": "empty_mask",  # EdgeConnectInpaint on the ground truth: an autoencoder of G2
    "probe_shape": [1, 3, 64, 64],
    "variants": {
        # EC*: cross- and self-distillation coupled with completion blocks on G2's encoder (§4.2).
        "star": {"encoder_levels": ENCODER_LEVELS, "completion_sites": ENCODER_LEVELS},
        # EC#: the first stage removed (variant_builders), completion blocks and distillation.
        "hash": {"encoder_levels": ENCODER_LEVELS, "completion_sites": ENCODER_LEVELS},
    },
}

VARIANT_BUILDERS: dict[str, dict[str, Any]] = {"hash": {"edge_stage": False}}


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(
        Adapter(
            name="edgeconnect",
            spec=ADAPTER_SPEC,
            build_student=edgeconnect_student,
            build_teacher=edgeconnect_teacher,
            description=ADAPTER_SPEC["description"],
            checkpoint_filter_fn=checkpoint_filter_fn,
            stride=EC_SIZE_MULTIPLE,
            variant_builders=VARIANT_BUILDERS,
        )
    )


@hookimpl
def register_losses(register: Callable[[str, Callable[..., torch.Tensor]], None]) -> None:
    register("edgeconnect", edgeconnect_loss)
    register("edgeconnect-gan", EdgeConnectObjective)
