"""LPIPS and FID, the perceptual scores of inpainting papers since LaMa, through torchmetrics, from local weights only.

* **LPIPS** (Zhang et al. 2018): torchmetrics' implementation (``torchmetrics.functional.image.lpips``) with its
  bundled linear heads; the backbone (torchvision's AlexNet, VGG16 or SqueezeNet 1.1, ImageNet weights) is read
  from a local file, never downloaded. Per image, on the **composite** (prediction in the hole, original outside)
  against the original, in [-1, 1] as LPIPS expects; lower is better.
* **FID** (Heusel et al. 2017): torchmetrics' ``FrechetInceptionDistance`` with torch-fidelity's port of the
  TensorFlow FID Inception (2048 pool features; images resized to 299 as TensorFlow 1 did, ``antialias=False``,
  the published implementations' setting), composites against originals. FID is a property of two *sets*: tens of
  images give a number dominated by the estimate's bias; the papers use thousands.

Why torchmetrics (kdinpaint first called the ``lpips`` and ``pytorch-fid`` packages): one maintained library for
both; its FID takes any feature network, so the tests run exactly this code with a small random network; its LPIPS
takes a random backbone, into which kdinpaint loads the ImageNet weights itself from a file read with
``weights_only=True`` (no pickled code runs; torchvision's and torch-fidelity's own loaders would unpickle, and
would download a missing file).

Weights: each backbone is one file, looked up in ``directory`` (``--perceptual-weights DIR``), else ``$KDINPAINT_WEIGHTS``,
else torch's hub cache (``torch.hub.get_dir()/checkpoints``, where torchvision and torch-fidelity keep them). A
missing file raises :class:`~kdinpaint.evaluation.metrics.MetricUnavailable` naming the file, the folder to put it
in and where the library would have downloaded it from. U-IDS / P-IDS (MAT, MI-GAN) are not offered: neither
torchmetrics nor torch-fidelity implements them.

``random_backbone=True`` (LPIPS) and ``extractor=`` (FID) run the same code with untrained networks: numbers for
tests, comparable with nothing; every result says which backbone made it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdinpaint.evaluation.metrics import TABLE1_BUCKETS, MetricUnavailable, _label, to_uint8
from kdinpaint.masking import composite, hole_ratio

__all__ = [
    "LPIPS_BACKBONES",
    "INCEPTION_FILES",
    "MetricUnavailable",
    "weights_dir",
    "weights_file",
    "perceptual_unavailable",
    "LPIPS",
    "FID",
    "fid",
    "PerceptualScorer",
    "score_perceptual",
    "perceptual_to_markdown",
    "perceptual_report",
]

ENV = "KDINPAINT_WEIGHTS"
LPIPS_BACKBONES: dict[str, tuple[str, str, str]] = {
    # LPIPS net: (torchvision constructor, file torchvision's hub cache holds, torchvision weights enum)
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth", "AlexNet_Weights"),
    "vgg": ("vgg16", "vgg16-397923af.pth", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth", "SqueezeNet1_1_Weights"),
}
INCEPTION_FILES: tuple[str, ...] = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
"""torch-fidelity's name of the FID Inception weights, then pytorch-fid's name of the same file."""


def weights_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Where backbone weights are read: ``directory``, else ``$KDINPAINT_WEIGHTS``, else ``torch.hub.get_dir()/checkpoints``."""
    if directory is not None:
        return Path(directory)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download_hint(what: str) -> str:
    """Where the library would download the file from (read from the installed library, for the message only)."""
    try:
        if what == "inception":
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            return URL_INCEPTION_V3
        import torchvision

        return getattr(torchvision.models, LPIPS_BACKBONES[what][2]).IMAGENET1K_V1.url
    except (ImportError, AttributeError):
        return "the library's release page"


def weights_file(what: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """The local file of backbone ``what`` (``alex``, ``vgg``, ``squeeze`` or ``inception``), or
    :class:`MetricUnavailable` naming the missing file and where to put it."""
    if what != "inception" and what not in LPIPS_BACKBONES:
        raise ValueError(f"unknown backbone {what!r}; choose one of {[*LPIPS_BACKBONES, 'inception']}")
    folder = weights_dir(directory)
    names = INCEPTION_FILES if what == "inception" else (LPIPS_BACKBONES[what][1],)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    metric = "FID" if what == "inception" else f"LPIPS-{what}"
    raise MetricUnavailable(
        f"{metric} needs the weights file {names[0]} in {folder} (nothing is downloaded here): copy it there from a "
        f"machine that has it ({_download_hint(what)}), or give its folder with --perceptual-weights DIR / ${ENV}"
    )


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file read without unpickling code (``weights_only=True``); a file that needs more is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling or format error: name the file and the reason
        raise ValueError(f"cannot read {str(path)!r} as plain weights ({type(e).__name__}: {e}); kdinpaint loads "
                         "backbone weights with weights_only=True: use the original state_dict file") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a state_dict (a mapping of names to tensors)")
    return dict(state)


def perceptual_unavailable(lpips_net: str = "alex", directory: str | os.PathLike[str] | None = None,
                           fid: bool = True) -> str | None:
    """Why LPIPS (and FID) cannot run here (a missing package or weights file), or None when they can."""
    try:
        import torchmetrics  # noqa: F401
        if fid:
            import torch_fidelity  # noqa: F401
    except ImportError as e:
        return f"LPIPS and FID need the perceptual extra ({e.name} is missing): pip install 'kdinpaint[perceptual]'"
    try:
        weights_file(lpips_net, directory)
        if fid:
            weights_file("inception", directory)
    except MetricUnavailable as e:
        return str(e)
    return None


def _torchmetrics_lpips() -> Any:
    try:
        from torchmetrics.functional.image.lpips import _LPIPS
    except ImportError as e:
        raise MetricUnavailable("LPIPS needs torchmetrics: pip install 'kdinpaint[perceptual]'") from e
    return _LPIPS


class LPIPS(nn.Module):
    """LPIPS distance per image, ``(B,)``, between two batches ``(B, 3, H, W)`` in [-1, 1].

    Args:
        net: ``alex`` (the LPIPS paper's default), ``vgg`` (LaMa's) or ``squeeze``.
        weights: a weights folder (see :func:`weights_dir`) or the backbone's file itself.
        random_backbone: leave the backbone untrained (seeded with ``seed``): the same computation for tests.

    ``backbone`` says which: ``"ImageNet (<file>)"`` or ``"random (seed N)"``.
    """

    def __init__(self, net: str = "alex", *, weights: str | os.PathLike[str] | None = None,
                 random_backbone: bool = False, seed: int = 0) -> None:
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
        impl = _torchmetrics_lpips()
        self.net = net
        path = None
        if not random_backbone:
            path = Path(weights) if weights is not None and Path(weights).is_file() else weights_file(net, weights)
            state = _state_dict(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # pnet_rand: torchvision builds the backbone without weights (its own loader would download them)
            self.model = impl(pretrained=True, net=net, pnet_rand=True)
        if path is not None:
            self._load_backbone(state, path)
        self.model.eval().requires_grad_(False)
        self.backbone = f"ImageNet ({path.name})" if path is not None else f"random (seed {seed})"

    def _load_backbone(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """Copy torchvision's ``features.<i>.<name>`` tensors into the LPIPS slices (``slice<k>.<i>.<name>``)."""
        target = self.model.net.state_dict()
        loaded = {}
        for key in target:
            _, index, name = key.split(".", 2)  # slice<k>, layer index in torchvision's features, parameter
            source = f"features.{index}.{name}"
            if source not in state or state[source].shape != target[key].shape:
                raise ValueError(f"{str(path)!r} is not torchvision's {LPIPS_BACKBONES[self.net][0]} state_dict: "
                                 f"{source} of shape {tuple(target[key].shape)} is missing or has another shape")
            loaded[key] = state[source]
        self.model.net.load_state_dict(loaded)

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"LPIPS takes two (B, 3, H, W) batches of one shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        device = next(self.model.parameters()).device
        return self.model(pred.float().to(device), target.float().to(device)).flatten().cpu()


class FID:
    """Fréchet distance between the features of two image sets, accumulated batch by batch.

    ``update(real, fake)`` takes batches ``(B, 3, H, W)`` in [-1, 1] (either may be None); :meth:`compute` needs
    at least two images of each set. The images enter the feature network as ``uint8`` (rounded, as a saved PNG).

    Args:
        weights: a weights folder (see :func:`weights_dir`) or the Inception file itself.
        extractor: any ``nn.Module`` mapping a ``uint8`` batch ``(B, 3, H, W)`` to features ``(B, d)`` instead of the
            Inception (tests: a small random network).
    """

    def __init__(self, *, weights: str | os.PathLike[str] | None = None, extractor: nn.Module | None = None,
                 device: torch.device | str = "cpu") -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as e:
            raise MetricUnavailable("FID needs torchmetrics and torch-fidelity: pip install 'kdinpaint[perceptual]'") from e
        if extractor is None:
            path = Path(weights) if weights is not None and Path(weights).is_file() else weights_file("inception", weights)
            _state_dict(path)  # refuse a file that would unpickle code before torch-fidelity reads it
            self.metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path),
                                                   antialias=False)
            self.backbone = f"Inception ({path.name})"
        else:
            self.metric = FrechetInceptionDistance(feature=extractor.eval(), normalize=False)
            self.backbone = f"custom ({type(extractor).__name__})"
        self.metric = self.metric.to(device)
        self.device = torch.device(device)
        self.counts = {"real": 0, "fake": 0}

    @torch.no_grad()
    def update(self, real: torch.Tensor | None = None, fake: torch.Tensor | None = None) -> None:
        for key, images in (("real", real), ("fake", fake)):
            if images is None:
                continue
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"FID takes (B, 3, H, W) batches, got {tuple(images.shape)}")
            self.metric.update(to_uint8(images.detach().cpu()).to(torch.uint8).to(self.device), real=key == "real")
            self.counts[key] += images.shape[0]

    def compute(self) -> float:
        if min(self.counts.values()) < 2:
            raise ValueError(f"FID needs at least 2 images in each set, got {self.counts}")
        return float(self.metric.compute())


def fid(real: torch.Tensor, fake: torch.Tensor, *, weights: str | os.PathLike[str] | None = None,
        extractor: nn.Module | None = None, batch_size: int = 16) -> float:
    """FID between two sets ``(N, 3, H, W)`` in [-1, 1] (see :class:`FID`)."""
    metric = FID(weights=weights, extractor=extractor)
    for i in range(0, max(len(real), len(fake)), batch_size):
        metric.update(real[i : i + batch_size] if i < len(real) else None,
                      fake[i : i + batch_size] if i < len(fake) else None)
    return metric.compute()


class PerceptualScorer:
    """LPIPS per image and FID of one method's composites against the originals, batch by batch.

    ``add(pred, image, mask)`` scores a batch (``pred`` the raw prediction; the composite is scored); :meth:`result`
    returns ``{"lpips": {"net", "backbone", "buckets": {label: {"count", "mean"}}}, "fid": value or None,
    "fid_backbone", "count", "lpips_rows": [...]}`` with the Table 1 buckets of the hole ratio plus ``all``.
    ``lpips`` / ``fid`` None leave that metric out.
    """

    def __init__(self, lpips: LPIPS | None, fid: FID | None,
                 buckets: Sequence[tuple[float, float]] = TABLE1_BUCKETS) -> None:
        if lpips is None and fid is None:
            raise ValueError("PerceptualScorer needs an LPIPS, a FID or both")
        self.lpips, self.fid, self.buckets = lpips, fid, tuple(buckets)
        self.rows: list[tuple[float, float]] = []  # (hole ratio, LPIPS) per image
        self.count = 0

    def add(self, pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> None:
        out = composite(pred.float().cpu(), image.float().cpu(), mask.float().cpu()).clamp(-1, 1)
        image = image.float().cpu()
        ratios = hole_ratio(mask.float().cpu()).tolist()
        if self.lpips is not None:
            self.rows += list(zip(ratios, self.lpips(out, image).tolist()))
        if self.fid is not None:
            self.fid.update(real=image, fake=out)
        self.count += image.shape[0]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "lpips": None, "fid": None, "fid_backbone": None}
        if self.lpips is not None:
            groups = {_label(lo, hi): [v for r, v in self.rows if lo <= r < hi] for lo, hi in self.buckets}
            groups["all"] = [v for _, v in self.rows]
            out["lpips"] = {"net": self.lpips.net, "backbone": self.lpips.backbone,
                            "buckets": {k: {"count": len(v), "mean": float(np.mean(v)) if v else math.nan}
                                        for k, v in groups.items()}}
            out["lpips_rows"] = [v for _, v in self.rows]
        if self.fid is not None:
            out["fid"] = self.fid.compute() if self.count >= 2 else math.nan
            out["fid_backbone"] = self.fid.backbone
        return out


def score_perceptual(
    inpainter: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    *,
    lpips: LPIPS | None,
    fid: FID | None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``inpainter(image, mask)`` over ``images`` / ``masks`` (as :func:`kdinpaint.inference.evaluate_model`
    takes them) and score the composites: :meth:`PerceptualScorer.result`. ``fid`` accumulates: give each method
    a fresh :class:`FID` (its Inception is built once per instance)."""
    scorer = PerceptualScorer(lpips, fid)
    n = len(images)
    if n == 0 or len(masks) != n:
        raise ValueError(f"score_perceptual needs one mask per image, got {n} images and {len(masks)} masks")
    for s in range(0, n, batch_size):
        idx = range(s, min(n, s + batch_size))
        image = torch.stack([images[i] for i in idx])  # (b, 3, H, W)
        mask = torch.stack([masks[i] for i in idx])  # (b, 1, H, W)
        with torch.no_grad():
            pred = inpainter(image, mask)
        scorer.add(pred, image, mask)
        if on_batch is not None:
            on_batch(len(idx))
    return scorer.result()


def perceptual_to_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """``{method: score_perceptual result}`` as a table: LPIPS per hole-ratio bucket and overall, FID over the set,
    with a line naming the backbones (and saying so when one is random)."""
    first = next(iter(results.values()))
    labels = list(first["lpips"]["buckets"]) if first.get("lpips") else ["all"]
    lines = ["| Metric | Method | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    notes = []
    for method, r in results.items():
        if r.get("lpips"):
            cells = ["-" if b["count"] == 0 or math.isnan(b["mean"]) else f"{b['mean']:.4f}"
                     for b in (r["lpips"]["buckets"][k] for k in labels)]
            lines.append(f"| LPIPS-{r['lpips']['net']} ↓ | {method} | " + " | ".join(cells) + " |")
            notes.append(r["lpips"]["backbone"])
    for method, r in results.items():
        if r.get("fid") is not None:
            value = "-" if math.isnan(r["fid"]) else f"{r['fid']:.2f}"
            lines.append(f"| FID ↓ | {method} | " + " | ".join([""] * (len(labels) - 1) + [value]) + " |")
            notes.append(r["fid_backbone"])
    text = "\n".join(lines) + "\n"
    backbones = sorted(set(notes))
    text += f"\nBackbones: {', '.join(backbones)}; {first['count']} images"
    if any(b.startswith(("random", "custom")) for b in backbones):
        text += ". UNTRAINED BACKBONE: these numbers test the code path and compare with nothing"
    if first.get("fid") is not None and first["count"] < 1000:
        text += f". FID on {first['count']} images is dominated by its estimation bias (papers use thousands)"
    return text + ".\n"


def perceptual_report(
    methods: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    images: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    *,
    mode: str = "auto",
    lpips_net: str = "alex",
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
) -> tuple[dict[str, Any] | None, str]:
    """LPIPS and FID of each of ``methods`` (``{name: inpainter}``) on the same images and masks, for a report:
    ``({name: score_perceptual result}, table)``.

    ``mode``: ``"auto"`` scores when the packages and weights are here and otherwise returns ``(None, a line naming
    what is missing and where to put it)``; ``"on"`` raises ``ValueError`` with that line instead; ``"off"`` returns
    ``(None, "")``.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return None, ""
    why = perceptual_unavailable(lpips_net, weights)
    if why is not None:
        if mode == "on":
            raise ValueError(why)
        return None, f"LPIPS and FID not computed: {why}\n"
    lp = LPIPS(lpips_net, weights=weights)
    results = {name: score_perceptual(method, images, masks, lpips=lp, fid=FID(weights=weights), batch_size=batch_size)
               for name, method in methods.items()}
    return results, perceptual_to_markdown(results)
