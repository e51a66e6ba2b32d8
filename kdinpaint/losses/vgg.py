"""VGG feature extractor for the style and perceptual losses, built through ``timm``.

Weights come from one of three places, chosen explicitly:

* a timm name with a pretrained tag, e.g. ``weights="vgg19.tv_in1k"`` (downloads through the
  Hugging Face hub where one is reachable, else uses its cache);
* a local file, ``weights="/path/vgg19.safetensors"`` or a ``.pth`` / ``.pt`` / ``.bin`` read with
  ``torch.load(weights_only=True)`` (never unpickles code). Keys of torchvision's and timm's VGG agree
  for ``features.*``; a ``state_dict`` / ``model`` wrapper and a ``module.`` prefix are accepted;
* random weights, only with ``allow_random=True``: the values of a style loss are then meaningless,
  which is fine for tests of shapes, gradients and normalisation, and nothing else.

With none of them, construction fails with a message that says how to get weights. No pip package
ships VGG weights, so tests always take the third path and say so.

Layer names follow the usual convention: ``relu{block}_{conv}`` after the ``conv``-th convolution of the
``block``-th block (1-based), ``pool{block}`` after its max-pool; ``conv{block}_{conv}`` before the ReLU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from kdinpaint.weights import key_report, read_weights

__all__ = ["VGGFeatures", "vgg_layer_names", "load_vgg_state_dict", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

InputNorm = Literal["imagenet", "none"]


def vgg_layer_names(features: nn.Sequential) -> list[str]:
    """One name per module of a VGG ``features`` stack (``conv1_1``, ``relu1_1``, ..., ``pool5``)."""
    names: list[str] = []
    block, conv = 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.BatchNorm2d):
            names.append(f"bn{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(module, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            names.append(f"other{len(names)}")
    return names


def load_vgg_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read VGG weights from a safetensors file or a ``weights_only`` torch file; keep ``features.*``."""
    try:
        sd = read_weights(path, "VGG weights file")
    except ValueError as exc:  # pickle with code, not a torch file at all, or not a mapping
        raise ValueError(
            f"{exc}. Save a plain state_dict (torch.save(model.state_dict(), path)) or convert it to safetensors"
        ) from exc
    for key in ("state_dict", "model", "params"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("features.") and isinstance(v, torch.Tensor):
            out[k] = v
    if not out:
        raise ValueError(
            f"{str(Path(path))!r} has no 'features.*' tensors; expected torchvision's or timm's VGG key names "
            f"(found e.g. {list(sd)[:5]})"
        )
    return out


class VGGFeatures(nn.Module):
    """Frozen VGG returning a dict of named activations for images in [-1, 1].

    Args:
        arch: a timm VGG architecture (``vgg16``, ``vgg19``, ``*_bn``); ignored when ``weights`` is a
            timm name, which carries its architecture.
        layers: names of the activations to return (see :func:`vgg_layer_names`).
        weights: a timm name with a pretrained tag (``"vgg19.tv_in1k"``), a local weights file, or
            ``None`` (then ``allow_random`` must be true).
        allow_random: permit random initialisation; the features then carry no perceptual meaning.
        input_norm: ``"imagenet"`` maps [-1, 1] to [0, 1] and applies ImageNet mean/std (partial conv,
            MMagic); ``"none"`` feeds [0, 1] unnormalised (EdgeConnect).

    ``forward(x)``: ``x`` ``(B, 3, H, W)`` in [-1, 1]; returns ``{name: (B, C_l, H_l, W_l)}``. The network
    stays in ``eval()`` and its parameters never require gradients; gradients flow to ``x``.
    """

    def __init__(
        self,
        arch: str = "vgg19",
        layers: Sequence[str] = ("relu2_2", "relu3_4", "relu4_4", "relu5_2"),
        *,
        weights: str | os.PathLike[str] | None = None,
        allow_random: bool = False,
        input_norm: InputNorm = "imagenet",
    ) -> None:
        super().__init__()
        if input_norm not in ("imagenet", "none"):
            raise ValueError(f"input_norm must be 'imagenet' or 'none', got {input_norm!r}")
        if not layers:
            raise ValueError("layers must name at least one activation, e.g. ('relu2_2',)")
        features = self._build(arch, weights, allow_random)
        names = vgg_layer_names(features)
        unknown = [n for n in layers if n not in names]
        if unknown:
            valid = [n for n in names if not n.startswith(("other", "bn"))]
            raise ValueError(f"unknown VGG layer(s) {unknown} for {arch}; valid names: {valid}")
        last = max(names.index(n) for n in layers)
        self.features = features[: last + 1]  # drop what no requested layer needs
        self.names = names[: last + 1]
        self.layers = tuple(layers)
        self.input_norm = input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for m in self.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # an in-place ReLU would overwrite a returned conv activation
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _build(arch: str, weights: str | os.PathLike[str] | None, allow_random: bool) -> nn.Sequential:
        if weights is None:
            if not allow_random:
                raise ValueError(
                    "VGGFeatures needs weights: pass weights='vgg19.tv_in1k' (a timm name, downloaded or cached), "
                    "or weights='/path/to/vgg19.safetensors' (a local file; .pth is read with weights_only=True). "
                    "Pass allow_random=True only for tests: the loss is then meaningless"
                )
            _check_arch(arch)
            log.warning(
                "VGGFeatures(%s) uses RANDOM weights (allow_random=True): style/perceptual values are meaningless", arch
            )
            features = _empty_features(arch)
            _init_random(features)
            return features
        text = os.fspath(weights)
        if text.endswith(_FILE_SUFFIXES) or os.sep in text or Path(text).is_file():
            _check_arch(arch)
            features = _empty_features(arch)
            sd = {k.removeprefix("features."): v for k, v in load_vgg_state_dict(text).items()}
            problems = key_report(sd, features, shown=4)
            if problems:
                raise ValueError(
                    f"{text!r} does not match timm's {arch}: {'; '.join(problems)}; "
                    "is it another VGG depth or a batch-norm variant? pass the matching arch="
                )
            features.load_state_dict(sd)
            return features
        base = text.split(".")[0]
        _check_arch(base)
        try:
            return timm.create_model(text, pretrained=True).features
        except Exception as exc:  # no network and no cache, or an unknown tag
            raise RuntimeError(
                f"could not get pretrained weights {text!r} through timm ({type(exc).__name__}: {exc}); "
                "without network access download them elsewhere and pass a local file: weights='/path/vgg.safetensors'"
            ) from exc

    def train(self, mode: bool = True) -> VGGFeatures:
        """Stays in eval mode whatever is asked: the extractor is a fixed function."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGGFeatures expects (B, 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
        x = (x + 1) / 2
        if self.input_norm == "imagenet":
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out: dict[str, torch.Tensor] = {}
        wanted = set(self.layers)
        for name, module in zip(self.names, self.features):
            x = module(x)
            if name in wanted:
                out[name] = x
        return out


def _empty_features(arch: str) -> nn.Sequential:
    """timm's VGG ``features`` stack with uninitialised CPU storage.

    The model is built on the meta device so that its 100M-parameter classifier head, which the losses
    never use, costs neither time nor memory.
    """
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return model.features.to_empty(device="cpu")


def _init_random(features: nn.Sequential) -> None:
    """timm's VGG initialisation: Kaiming-normal (fan-out) convolutions, zero biases, unit batch norms."""
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


def _check_arch(arch: str) -> None:
    if arch not in _ARCHS:
        raise ValueError(f"unknown VGG architecture {arch!r}; choose one of {list(_ARCHS)}")
