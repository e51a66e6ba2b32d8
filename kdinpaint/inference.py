"""Running an inpainting model on real images: padding to the stride, batching, compositing, file I/O.

An :class:`Inpainter` wraps what is deployed — a checkpoint rebuilt by :func:`~kdinpaint.export.load_checkpoint`,
an adapter's student with its completion blocks (:func:`deployed_model`), or a weight-free baseline of
:mod:`kdinpaint.evaluation.baselines` — and runs it on images of any size:

1. the known pixels are kept and the holes blanked (:func:`~kdinpaint.masking.masked`), so no model ever
   sees the ground truth under its hole, whatever it does with its input;
2. image and mask are padded once, here, to a multiple of the network's stride (:func:`pad_to_multiple`);
   no model pads for itself;
3. the model runs in batches under ``torch.inference_mode`` in eval mode on the chosen device (its
   train/eval mode is restored afterwards, so training code can evaluate mid-run);
4. the prediction (the spec's ``output``) is cropped back, clamped to [-1, 1] and composited:
   ``pred ⊙ M + image ⊙ (1 - M)``; known pixels are the input's, bit for bit.

Padding (:mod:`kdinpaint.padding`): the border is split evenly and both image and mask are mirrored, so a
mirrored hole stays a hole; the padded area is cropped away before compositing and before any metric.

The floor, the weight-free baselines scored on the same images and masks as a network, is
:mod:`kdinpaint.evaluation.floor`.

Mask files (:func:`load_mask`): luminance, white = hole by default; thresholded at half the range of the
stored values (0/255 and 0/1 label PNGs alike; grey JPEG artefacts go to the nearer side); then resized with
nearest-neighbour sampling to the image size, so a mask of another size is adapted, not refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from kdinpaint import _moved
from kdinpaint._modules import unwrap
from kdinpaint.calling import convention, select_output
from kdinpaint.export import CompletedModel
from kdinpaint.memory import MemoryModel
from kdinpaint.masking import check_image_range, check_mask, check_rgb_image, masked, warn_if_inverted
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS, MetricRow, evaluate, summarize
# the padding helpers moved to kdinpaint.padding; imported here, so the old import paths still work
from kdinpaint.padding import Crop, crop_top_left, pad_bottom_right, pad_to_multiple, unpad  # noqa: F401

__all__ = [
    "Crop",
    "InferenceOutOfMemory",
    "NonFiniteOutput",
    "Inpainter",
    "default_device",
    "resolve_device",
    "pad_to_multiple",
    "unpad",
    "deployed_model",
    "evaluate_model",
    "GeneratedMasks",
    "generated_masks",
    "load_image",
    "load_mask",
    "save_image",
    "mask_to_rgb",
]

log = logging.getLogger(__name__)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class InferenceOutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the batch size to lower."""


class NonFiniteOutput(ValueError):
    """The model returned NaN/inf: its weights are bad (a diverged run, a damaged file), not the image."""


# ---- devices ------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """The first available of ``cuda``, ``mps``, ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: :func:`default_device`; otherwise the named device, refused if absent here."""
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device {default_device()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available here; use --device {default_device()}")
    return device


# ---- the inpainter ------------------------------------------------------------------------------
def _model_dtype(model: Any) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer; ``None`` for a plain callable."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t.dtype
    return None


def _model_device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


class Inpainter:
    """A model with what it takes to run it on any image: stride, call convention, device, batch size.

    Args:
        model: an ``nn.Module`` called as ``spec`` says, or any callable ``(image, mask) -> prediction``
            (the weight-free baselines).
        stride: H and W the model accepts are multiples of this (:class:`~kdinpaint.adapter.Adapter.stride`).
        spec: an :class:`~kdinpaint.spec.AdapterSpec` (or anything with ``image_arg``, ``mask_arg`` and
            ``output``); ``None``: ``model(image, mask)`` returns the prediction.
        device: where the model runs (moved there); ``None``: where its parameters already are.
        batch_size: images per forward.
        name: how tables and messages call it.

    ``inpainter(image, mask)``: image ``(B, 3, H, W)`` in [-1, 1] on any device and of any float dtype, mask
    ``(B or 1, 1, H, W)`` in {0, 1} with 1 = hole; returns the composite ``(B, 3, H, W)`` in [-1, 1] on the
    image's device in the image's dtype. The model sees its own dtype (a float64 or bfloat16 image is cast for
    a float32 network); the known pixels of the result are the input's, bit for bit. Refused with
    ``ValueError``: NaN/inf pixels, values outside [-1, 1], an empty batch, a bad mask; a model that returns
    NaN/inf raises :class:`NonFiniteOutput`. A mask that is mostly hole (> 60 %) is warned about once per call:
    it is usually inverted (1 = known).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[torch.Tensor, torch.Tensor], Any],
        *,
        stride: int = 1,
        spec: Any = None,
        device: str | torch.device | None = None,
        batch_size: int = 1,
        name: str | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable (image, mask) -> prediction, got {type(model).__name__}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = resolve_device(device) if device is not None else _model_device(model)
        if isinstance(model, nn.Module):
            model = model.to(self.device)
        self.model = model
        self.stride = stride
        self.spec = spec
        self.batch_size = batch_size
        self.name = name or getattr(spec, "name", None) or getattr(model, "__name__", type(model).__name__)
        self._call = None
        if spec is not None and isinstance(model, nn.Module):
            # bind by the student's own signature, not that of a wrapper taking *args, **kwargs
            inner = unwrap(model.model if isinstance(model, CompletedModel) else model)
            self._call = convention(inner, spec)

    # -- constructors
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], expected: str | None = None, *,
                        device: str | torch.device | None = None, batch_size: int = 1) -> "Inpainter":
        """A file written by ``save_exported(..., adapter="name:variant")``; ``expected`` refuses another adapter."""
        from kdinpaint.export import load_checkpoint
        from kdinpaint.plugins import get_adapter

        device = resolve_device(device)
        model, which = load_checkpoint(path, expected, device=device)
        stride = get_adapter(which.partition(":")[0]).stride
        return cls(model.eval(), stride=stride, spec=model.spec, device=device, batch_size=batch_size,
                   name=f"{which.rstrip(':')} ({Path(path).name})")

    @classmethod
    def from_adapter(cls, name: str, *, device: str | torch.device | None = None, batch_size: int = 1,
                     builder_kwargs: dict | None = None) -> "Inpainter":
        """An adapter's deployed student with **random weights** (logged as a warning): for smoke tests."""
        model, stride = deployed_model(name, builder_kwargs)
        log.warning("%s runs with random weights (no checkpoint): its output is noise", name)
        return cls(model, stride=stride, spec=model.spec, device=resolve_device(device), batch_size=batch_size,
                   name=f"{name} (random weights)")

    @classmethod
    def from_baseline(cls, name: str, *, batch_size: int = 1) -> "Inpainter":
        """A weight-free baseline of :mod:`kdinpaint.evaluation.baselines` (``biharmonic``, ``telea``, ``ns``, ``mean``); CPU."""
        from kdinpaint.evaluation.baselines import get_baseline

        return cls(get_baseline(name), batch_size=batch_size, name=name)

    # -- running
    def _forward(self, image: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, start: int = 0) -> torch.Tensor:
        """One batch (images ``start``, ...) on the model's device: the model runs in ``dtype``, the composite
        is in the image's."""
        x, m, crop = pad_to_multiple(masked(image, mask).to(dtype), mask.to(dtype), self.stride)
        if self._call is not None:
            args, kwargs = self._call.build(x, m)
            raw = self.model(*args, **kwargs)
        else:
            raw = self.model(x, m)
        pred = unpad(select_output(raw, getattr(self.spec, "output", None)), crop)
        if pred.shape != image.shape:
            raise ValueError(f"{self.name} returned {tuple(pred.shape)} for an input of {tuple(image.shape)}; "
                             "set the spec's `output` to the image prediction")
        self._check_finite(pred, start)
        # where(), not pred*M + image*(1-M): known pixels stay the input's bit for bit
        return torch.where(mask.bool(), pred.clamp(-1, 1).to(image.dtype), image)

    def _check_finite(self, pred: torch.Tensor, start: int) -> None:
        """Refuse a prediction with NaN/inf anywhere: clamping would turn it into plausible-looking pixels."""
        bad = ~torch.isfinite(pred).all(1)  # (b, H, W): a pixel is bad if any channel is
        if bool(bad.any()):
            half = " (or it overflowed in float16: run it in float32 with model.float())" if pred.dtype == torch.float16 else ""
            images = f"image {start}" if len(pred) == 1 else f"images {start}-{start + len(pred) - 1}"
            raise NonFiniteOutput(
                f"{self.name} returned NaN/inf at {int(bad.sum())} of {bad.numel()} pixels ({images} of the batch): "
                f"the checkpoint is probably from a diverged run or damaged{half}; use an earlier checkpoint of the "
                "run (its log shows the step where the loss became NaN) or retrain"
            )

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_rgb_image(image, self.name)
        check_image_range(image, tol=0.01)
        check_mask(mask, image)
        warn_if_inverted(mask, stacklevel=2)
        dtype = _model_dtype(self.model) or image.dtype
        mask = mask.to(image.dtype).expand(image.shape[0], -1, -1, -1)
        out = torch.empty_like(image)
        module = self.model if isinstance(self.model, nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            with torch.inference_mode():
                for s in range(0, image.shape[0], self.batch_size):
                    x = image[s : s + self.batch_size].to(self.device)
                    m = mask[s : s + self.batch_size].to(self.device)
                    try:
                        out[s : s + self.batch_size] = self._forward(x, m, dtype, s).to(out.device)
                    except _OOM as e:
                        raise self._oom(x, e) from e
                    except RuntimeError as e:  # MPS and the CPU allocator raise plain RuntimeErrors
                        if not any(k in str(e).lower() for k in ("out of memory", "can't allocate memory")):
                            raise
                        raise self._oom(x, e) from e
        finally:
            if module is not None:
                module.train(was_training)
        return out

    # -- memory
    def memory_model(self) -> "MemoryModel | None":
        """How the model's peak memory grows with the pixel count at this batch size, from two probe forwards at
        small sizes (:mod:`kdinpaint.memory`); ``None`` for a plain callable or where memory cannot be measured."""
        from kdinpaint.attention import PixelAttention
        from kdinpaint.memory import fit_linear, peak_bytes, small_attention_blocks
        from kdinpaint.ops import attention

        if getattr(self, "_memory", False) is not False:
            return self._memory
        self._memory = None
        module = self.model if isinstance(self.model, nn.Module) else None
        if module is None:
            return None
        dtype = _model_dtype(module) or torch.float32
        side = -(-64 // self.stride) * self.stride
        points = []
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode(), small_attention_blocks():
                for s in (side, 2 * side):
                    image = torch.zeros(self.batch_size, 3, s, s, device=self.device, dtype=dtype)
                    mask = torch.zeros(self.batch_size, 1, s, s, device=self.device, dtype=dtype)
                    mask[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
                    args, kwargs = self._call.build(image, mask) if self._call is not None else ((image, mask), {})
                    peak = peak_bytes(lambda: module(*args, **kwargs), self.device)
                    if peak is None:
                        return None
                    points.append((s * s, peak))
        finally:
            module.train(was_training)
        has_attention = any(isinstance(m, PixelAttention) for m in module.modules())
        # one forward block of the attention at its full size (the probes ran the smallest): its scores and output
        extra = 2 * attention.FORWARD_BLOCK_ELEMENTS * torch.finfo(dtype).bits // 8 if has_attention else 0
        self._memory = fit_linear(points, extra)
        return self._memory

    def check_memory(self, height: int, width: int, option: str = "--max-side") -> int | None:
        """Refuse, with :class:`InferenceOutOfMemory`, images of ``height × width`` whose forward at this batch
        size would need more memory than the device has free (on the CPU the kernel would kill the process).

        ``option`` is the command-line option that makes images smaller (``--max-side`` for ``kdinpaint
        inpaint``, ``--size`` for ``evaluate``): the message names it with the largest side that fits.
        Returns the estimated bytes, or ``None`` where no estimate is possible (then nothing is checked).
        """
        from kdinpaint.memory import available_bytes, gib, side_that_fits

        model = self.memory_model()
        free = available_bytes(self.device)
        if model is None or free is None:
            return None
        H, W = -(-height // self.stride) * self.stride, -(-width // self.stride) * self.stride
        need = model.bytes(H * W)
        if need <= free:
            return need
        fixes = []
        side = side_that_fits(model, free, H, W, self.stride)
        if side >= self.stride:
            fixes.append(f"use {option} {side} (the longest side that fits)")
        if self.batch_size > 1:
            fixes.append(f"lower --batch-size from {self.batch_size}")
        if self.device.type != "cpu":
            fixes.append("or run on the CPU (--device cpu)")
        raise InferenceOutOfMemory(
            f"{self.name} would need about {gib(need)} for {H}x{W} images at batch size {self.batch_size} on "
            f"{self.device}, but only {gib(free)} is free: {'; '.join(fixes) or 'free memory on this machine'}"
        )

    def _oom(self, x: torch.Tensor, error: Exception) -> InferenceOutOfMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        size = f"{x.shape[-2]}x{x.shape[-1]}"
        if self.batch_size > 1:
            fix = f"lower --batch-size (batch_size=) from {self.batch_size} to {max(1, self.batch_size // 2)}"
        else:
            fix = ("the batch size is already 1: use smaller images (kdinpaint inpaint --max-side, kdinpaint evaluate "
                   "--size) or another device (--device cpu)")
        return InferenceOutOfMemory(f"{self.name} ran out of memory on {self.device} at batch size {self.batch_size} "
                                    f"({size} images): {fix}. ({str(error).splitlines()[0][:200]})")

    def __repr__(self) -> str:
        return f"Inpainter({self.name!r}, stride={self.stride}, device={self.device}, batch_size={self.batch_size})"


def deployed_model(name: str, builder_kwargs: dict | None = None) -> tuple[nn.Module, int]:
    """What an adapter deploys: its student with the spec's completion blocks and PGL attached, exported.

    ``name`` is ``"adapter[:variant]"``; the teacher is built only when the spec needs one to attach.
    Returns the :class:`~kdinpaint.export.CompletedModel` (eval mode, random weights) and the adapter's stride.
    """
    from kdinpaint.attach import attach
    from kdinpaint.plugins import get_adapter

    base, _, variant = name.partition(":")
    adapter = get_adapter(base)
    spec = adapter.spec.variant(variant or None)
    kwargs = dict(builder_kwargs or {})
    student = adapter.student(variant or None, **kwargs)
    teacher = adapter.teacher(variant or None, **kwargs) if spec.needs_teacher else None
    kd = attach(student, teacher, spec)
    try:
        model = kd.export()
    finally:
        kd.detach()
    return model.eval(), adapter.stride


# ---- evaluation ---------------------------------------------------------------------------------
def _item(x: Any, key: str) -> torch.Tensor:
    return x[key] if isinstance(x, dict) else x


def evaluate_model(
    inpainter: Inpainter,
    images: torch.Tensor | Sequence[Any],
    masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    convention: str = "default",
    names: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[MetricRow], dict[str, object]]:
    """Inpaint every image and score it: per-image :class:`~kdinpaint.evaluation.metrics.MetricRow` s and their Table 1 summary.

    Args:
        inpainter: the model to evaluate (wrap a bare network as ``Inpainter(model, stride=, spec=)``).
        images: ``(N, 3, H, W)`` in [-1, 1], or a sequence of ``(3, H, W)`` tensors or of dicts with
            ``"image"`` (and ``"mask"`` when ``masks`` is None: an :class:`~kdinpaint.data.InpaintingDataset`).
        masks: ``(N, 1, H, W)`` in {0, 1}, 1 = hole, or a sequence of ``(1, H, W)`` (mask ``i`` for image ``i``).
        convention: metric convention of :mod:`kdinpaint.evaluation.metrics` (``default``, ``edgeconnect``, ``rn``, ``mmagic``).
        names: one per image (default ``"0"``, ``"1"``, ...).
        on_batch: called with the number of images of each finished batch (progress bars).

    Returns ``(rows, summary)``; ``summary`` is :func:`~kdinpaint.evaluation.metrics.summarize` of the rows (Table 1
    buckets and ``all``), ready for ``to_markdown`` / ``to_csv`` / ``to_json``.
    """
    if not isinstance(inpainter, Inpainter):
        raise TypeError(f"evaluate_model takes an Inpainter, got {type(inpainter).__name__}; "
                        "wrap a network as Inpainter(model, stride=adapter.stride, spec=adapter.spec)")
    n = len(images)
    if n == 0:
        raise ValueError("no images to evaluate")
    if masks is None and not isinstance(images[0], dict):
        raise ValueError("masks=None needs images whose items are dicts with 'image' and 'mask'")
    if masks is not None and len(masks) != n:
        raise ValueError(f"{n} images but {len(masks)} masks; give one mask per image")
    if names is not None and len(names) != n:
        raise ValueError(f"{n} images but {len(names)} names")
    rows: list[MetricRow] = []
    bs = inpainter.batch_size
    for s in range(0, n, bs):
        idx = range(s, min(n, s + bs))
        items = [images[i] for i in idx]
        image = torch.stack([_item(it, "image") for it in items])  # (b, 3, H, W)
        mask = torch.stack([masks[i] for i in idx] if masks is not None else [it["mask"] for it in items])
        pred = inpainter(image, mask)
        batch_names = [names[i] for i in idx] if names is not None else [str(i) for i in idx]
        rows += evaluate(pred, image, mask, convention=convention, names=batch_names)  # type: ignore[arg-type]
        if on_batch is not None:
            on_batch(len(idx))
    return rows, summarize(rows)


class GeneratedMasks(Sequence):
    """``count`` evaluation masks drawn on demand: ``masks[i]`` is ``(1, H, W)`` in {0, 1}, in Table 1 bucket ``i mod 4``.

    Mask ``i`` is drawn by :class:`~kdinpaint.data.FreeFormMasks` (``freeform``) or
    :class:`~kdinpaint.data.RectangleMasks` (``rect``) restricted to the hole-ratio bucket
    ``TABLE1_BUCKETS[i % 4]``, with the generator ``rng_for(seed, i)``: the same on every machine and in any
    order of access, and every column of the table gets images. Nothing is held in memory.
    """

    def __init__(self, kind: Literal["freeform", "rect"], count: int, size: int | tuple[int, int], seed: int = 0) -> None:
        from kdinpaint.data import FreeFormMasks, RectangleMasks

        makers = {"freeform": FreeFormMasks, "rect": RectangleMasks}
        if kind not in makers:
            raise ValueError(f"unknown mask generator {kind!r}; choose one of {sorted(makers)}")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.count, self.seed = count, seed
        self.sources = [makers[kind](ratio=b) for b in TABLE1_BUCKETS]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        from kdinpaint.data import rng_for
        from kdinpaint.data.masks import mask_to_tensor

        if not 0 <= i < self.count:
            raise IndexError(f"mask index {i} out of range for {self.count} masks")
        return mask_to_tensor(self.sources[i % len(self.sources)].sample(rng_for(self.seed, i), self.size))


def generated_masks(kind: Literal["freeform", "rect"], count: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """All of :class:`GeneratedMasks` as one ``(count, 1, H, W)`` tensor."""
    return torch.stack(list(GeneratedMasks(kind, count, size, seed)))


# ---- files --------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as ``(1, 3, H, W)`` float32 in [-1, 1] (grey replicated, alpha dropped, 16-bit scaled)."""
    from kdinpaint.data.images import read_image, to_tensor

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        return to_tensor(read_image(path))[None]
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {str(path)!r} ({type(e).__name__}: {e})") from None


def load_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None,
              hole: Literal["white", "black"] = "white") -> torch.Tensor:
    """A mask file as ``(1, 1, H, W)`` float32 in {0, 1}, 1 = hole, resized to ``size = (H, W)`` (nearest).

    The file's luminance is thresholded at half its range: ``> 0.5`` of full scale for ordinary masks;
    a file whose values are all 0 or 1 (a label PNG) is read as those labels. ``hole="black"`` inverts.
    """
    if hole not in ("white", "black"):
        raise ValueError(f"hole must be 'white' or 'black', got {hole!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask {str(path)!r} does not exist")
    from kdinpaint.data.masks import _read_luminance, _resize_nearest

    try:
        arr, full = _read_luminance(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read mask {str(path)!r} ({type(e).__name__}: {e})") from None
    if full > 1 and arr.max() <= 1:  # a 0/1 label image
        full = 1.0
    white = arr > full / 2
    hole_map = _resize_nearest(white if hole == "white" else ~white, size)
    return torch.from_numpy(hole_map.astype(np.float32))[None, None]


def save_image(path: str | os.PathLike[str], image: torch.Tensor) -> None:
    """Write ``(3, H, W)`` or ``(1, 3, H, W)`` in [-1, 1] as an 8-bit file (format from the suffix), rounded."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"save_image writes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image takes (3, H, W) in [-1, 1], got {tuple(image.shape)}")
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(arr).save(path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot write {str(path)!r} ({e}); use a .png or .jpg file name") from None


def mask_to_rgb(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` mask → ``(B, 3, H, W)`` image in [-1, 1], white = hole (for side-by-side views)."""
    return (mask * 2 - 1).expand(-1, 3, -1, -1)


__getattr__ = _moved.moved_names(__name__)  # the floor, now in kdinpaint.evaluation.floor
