"""Which channel order do DeepFill v2 weights expect? The evidence, and a check on photographs.

Evidence that the official weights expect **BGR** (hence ``channel_order="bgr"`` is the default of
``compat="tf"``, :data:`~kdinpaint_adapters.gatedconv.model.COMPAT_PRESETS`):

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

Where the weights are at hand, the question is empirical: inpaint photographs under masks once in each
order and compare the reconstruction of the holes with the ground truth. The order the weights were
trained in restores the colours of the holes; the other one hands the network swapped red and blue, and
what it paints into a hole (which the known pixels do not decide) comes out in the wrong colours.

:func:`check_channel_order` does this and returns a :class:`ChannelOrderCheck` recommending the order with
the higher PSNR on the holes; pass that order as ``channel_order`` (it overrides the mode's preset). The
command line is ``kdinpaint check-weights gatedconv FILE`` (bundled photos and seeded free-form masks by
default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch

from kdinpaint.evaluation.metrics import PSNR_CEILING
from kdinpaint.masking import check_mask, check_rgb_image
from kdinpaint.weights import read_weights

from .model import OFFICIAL_COMPAT, GatedConvInpaint
from .weights import checkpoint_filter_fn, load_checked

__all__ = ["ChannelOrderCheck", "check_channel_order", "hole_psnr", "load_for_check", "ORDERS"]

ORDERS = ("bgr", "rgb")


def hole_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR over the hole pixels only, ``(B,)`` in dB, images in ``[-1, 1]`` scaled to ``[0, 255]``.

    ``pred`` is clamped to ``[-1, 1]``; ``mask`` ``(B, 1, H, W)`` with 1 = hole (every image needs a hole).
    The mean squared error runs over the three channels of the hole pixels; where they are equal the score is
    :data:`~kdinpaint.evaluation.metrics.PSNR_CEILING` (100 dB), not +inf, so means over images stay finite.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    hole = (mask > 0.5).to(pred.dtype).expand_as(pred)
    count = hole.flatten(1).sum(1)
    if (count == 0).any():
        raise ValueError("every mask needs a hole: the PSNR on the holes of an image without one is undefined")
    err = ((pred.clamp(-1, 1) - target) * 127.5) ** 2 * hole
    mse = err.flatten(1).sum(1) / count
    return 10 * torch.log10(255.0**2 / mse.clamp_min(255.0**2 * 10 ** (-PSNR_CEILING / 10)))


@dataclass
class ChannelOrderCheck:
    """Hole PSNR of each image in each channel order, and the verdict.

    ``psnr[order][i]``: image ``i`` inpainted with ``channel_order=order``. ``recommendation`` is the order
    with the higher mean hole PSNR when it leads by at least ``min_margin_db`` and is better on more than
    half of the images; otherwise ``None`` (inconclusive).
    """

    names: list[str]
    psnr: dict[str, list[float]]
    compat: str
    min_margin_db: float = 0.1
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def mean(self, order: str) -> float:
        values = [v for v in self.psnr[order] if math.isfinite(v)]
        return sum(values) / len(values) if values else float("inf")

    def wins(self, order: str) -> int:
        other = ORDERS[1 - ORDERS.index(order)]
        return sum(a > b for a, b in zip(self.psnr[order], self.psnr[other]))

    @property
    def margin_db(self) -> float:
        """Mean hole PSNR of the better order minus that of the other (>= 0)."""
        return abs(self.mean("rgb") - self.mean("bgr"))

    @property
    def recommendation(self) -> str | None:
        best = max(ORDERS, key=self.mean)
        if self.margin_db >= self.min_margin_db and 2 * self.wins(best) > len(self.names):
            return best
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "compat": self.compat,
            "images": self.names,
            "psnr_hole": {o: self.psnr[o] for o in ORDERS},
            "mean_psnr_hole": {o: self.mean(o) for o in ORDERS},
            "wins": {o: self.wins(o) for o in ORDERS},
            "margin_db": self.margin_db,
            "min_margin_db": self.min_margin_db,
            "recommendation": self.recommendation,
        }

    def to_markdown(self) -> str:
        lines = ["| image | PSNR holes, bgr (dB) | PSNR holes, rgb (dB) |", "|---|---|---|"]
        lines += [f"| {n} | {b:.2f} | {r:.2f} |" for n, b, r in zip(self.names, self.psnr["bgr"], self.psnr["rgb"])]
        lines.append(f"| **mean** | **{self.mean('bgr'):.2f}** | **{self.mean('rgb'):.2f}** |")
        lines.append("")
        lines.append(f"better on: bgr {self.wins('bgr')} image(s), rgb {self.wins('rgb')} of {len(self.names)}; "
                     f"margin {self.margin_db:.2f} dB (compat={self.compat!r})")
        best = self.recommendation
        if best is None:
            lines.append(f"inconclusive: neither order leads by {self.min_margin_db:g} dB on more than half of the "
                         "images; try more images (--count) or your own photos (--images)")
        else:
            lines.append(f"recommendation: channel_order={best!r}, e.g. GatedConvInpaint(channel_order={best!r}) or "
                         f"model.kwargs: {{channel_order: {best}}} in a recipe")
        return "\n".join(lines + self.notes) + "\n"


def load_for_check(path: str | PathLike, compat: str = OFFICIAL_COMPAT) -> GatedConvInpaint:
    """A :class:`GatedConvInpaint` of the file's width (read from ``conv1``) with the file's weights, eval mode."""
    checkpoint = read_weights(path, "DeepFill v2 checkpoint (states_tf_places2.pth / states_tf_celebahq.pth)")
    try:
        state = checkpoint_filter_fn(checkpoint)
        conv1 = state.get("conv1.conv.weight")
        if conv1 is None or conv1.dim() != 4:
            raise ValueError("no generator weight conv1.conv.weight: not a DeepFill v2 generator")
        model = GatedConvInpaint(int(conv1.shape[0]), compat=compat)  # conv1 has 2 * (cnum / 2) outputs
        load_checked(model, state, "generator")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return model.eval()


def check_channel_order(
    model: GatedConvInpaint | str | PathLike,
    images: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    *,
    names: Sequence[str] | None = None,
    compat: str = OFFICIAL_COMPAT,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    min_margin_db: float = 0.1,
) -> ChannelOrderCheck:
    """Inpaint ``images`` under ``masks`` in both channel orders and score the holes (:func:`hole_psnr`).

    Args:
        model: a :class:`GatedConvInpaint` (its ``channel_order`` is restored afterwards) or a weights file
            (:func:`load_for_check`, built with ``compat``).
        images: ``(N, 3, H, W)`` RGB in ``[-1, 1]``, or a sequence of ``(3, H, W)`` of one size.
        masks: ``(N, 1, H, W)`` or a sequence of ``(1, H, W)``, 1 = hole; every mask needs a hole.
        names: one label per image (default ``image0``, ...).
        compat: numerics of a model built from a file (default :data:`OFFICIAL_COMPAT`).
        batch_size: images per forward.
        device: where the network runs.
        min_margin_db: the lead in mean hole PSNR below which the verdict is inconclusive.
    """
    source = ""
    if not isinstance(model, GatedConvInpaint):
        source = str(model)
        model = load_for_check(model, compat)
    images = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    masks = masks if isinstance(masks, torch.Tensor) else torch.stack(list(masks))
    check_rgb_image(images, "DeepFill v2", name="images")
    check_mask(masks, images, name="masks")
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"one mask per image: got {masks.shape[0]} masks for {images.shape[0]} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = images.shape[0]
    names = [f"image{i}" for i in range(n)] if names is None else list(names)
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} images")
    was_training, order_before = model.training, model.channel_order
    model.eval().to(device)
    psnr: dict[str, list[float]] = {}
    try:
        for order in ORDERS:
            model.channel_order = order
            scores = []
            with torch.inference_mode():
                for i in range(0, n, batch_size):
                    image = images[i : i + batch_size].to(device, torch.float32)
                    mask = masks[i : i + batch_size].to(device, torch.float32)
                    pred = model(image, mask)
                    scores += hole_psnr(pred.float(), image, mask).tolist()
            psnr[order] = scores
    finally:
        model.channel_order = order_before
        model.train(was_training)
    return ChannelOrderCheck(names, psnr, getattr(model, "compat", compat), min_margin_db, source)

