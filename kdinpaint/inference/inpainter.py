"""The inpainter: an inpainting model run on real images, padded to its stride, batched and composited.

An :class:`Inpainter` wraps what is deployed — a checkpoint rebuilt by :func:`~kdinpaint.export.load_checkpoint`,
an adapter's student with its completion blocks (:func:`deployed_model`), or a weight-free baseline of
:mod:`~kdinpaint.evaluation.baselines` — and runs it on images of any size:

1. the known pixels are kept and the holes blanked (:func:`~kdinpaint.masking.masked`), so no model ever
   sees the ground truth under its hole, whatever it does with its input;
2. image and mask are padded once, here, to a multiple of the network's stride
   (:func:`~kdinpaint.padding.pad_to_multiple`); no model pads for itself;
3. the model runs in batches under ``torch.inference_mode`` in eval mode on the chosen device (its
   train/eval mode is restored afterwards, so training code can evaluate mid-run);
4. the prediction (the spec's ``output``) is cropped back, clamped to [-1, 1] and composited:
   ``pred ⊙ M + image ⊙ (1 - M)``; known pixels are the input's, bit for bit.

Padding (:mod:`kdinpaint.padding`): the border is split evenly and both image and mask are mirrored, so a
mirrored hole stays a hole; the padded area is cropped away before compositing and before any metric.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdinpaint._modules import unwrap
from kdinpaint.attach import attach
from kdinpaint.calling import convention, select_output
from kdinpaint.evaluation.baselines import get_baseline
from kdinpaint.export import CompletedModel, load_checkpoint_adapter
from kdinpaint.inference.device import model_device, model_dtype, resolve_device
from kdinpaint.inference.memory import (InferenceOutOfMemory, MemoryModel, check_fits, count_leaf_calls, probe_memory,
                                        warn_if_slow)
from kdinpaint.masking import check_image_range, check_mask, check_rgb_image, masked, warn_if_inverted
from kdinpaint.padding import pad_to_multiple, unpad
from kdinpaint.plugins import get_adapter

__all__ = ["Inpainter", "NonFiniteOutput", "deployed_model"]

log = logging.getLogger(__name__)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


OUTPUT_LIMIT = 2.0
"""The largest magnitude a prediction may reach in the holes (the convention is [-1, 1]; a network's output a
little beyond it is clamped): above it the model answers on another scale and is refused."""


class NonFiniteOutput(ValueError):
    """The model returned NaN/inf: its weights are bad (a diverged run, a damaged file), not the image."""


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
    ``ValueError``: NaN/inf pixels, values outside [-1, 1], an empty batch, a bad mask, a model whose prediction
    in the holes reaches beyond ±2 (:data:`OUTPUT_LIMIT`: a [0, 255] answer); a model that returns
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
        self.device = resolve_device(device) if device is not None else model_device(model)
        if isinstance(model, nn.Module):
            model = model.to(self.device)
        self.model = model
        self.stride = stride
        self.spec = spec
        self.batch_size = batch_size
        self.inverted_mask_fix = "pass 1 - mask"  # the warning's advice; the command line names its --mask-hole
        # progress within one forward: progress(done, total) after each leaf module's call, the total counted by the
        # memory probe (memory_model().calls_per_forward); the command line shows it as a bar for slow images
        self.progress: Callable[[int, int], None] | None = None
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
        device = resolve_device(device)
        model, which, adapter = load_checkpoint_adapter(path, expected, device=device)
        return cls(model.eval(), stride=adapter.stride, spec=model.spec, device=device, batch_size=batch_size,
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
        """A weight-free baseline of :mod:`~kdinpaint.evaluation.baselines` (``biharmonic``, ``telea``, ``ns``, ``mean``); CPU."""
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
        self._check_scale(pred, mask, start)
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

    def _check_scale(self, pred: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        """Refuse a prediction whose hole values reach beyond ±:data:`OUTPUT_LIMIT`: a model answering on [0, 255]
        (or any other scale) would have every hole clamped to white."""
        if torch.compiler.is_compiling():
            return
        peak = float(pred.detach().masked_fill(~mask.bool(), 0).abs().max())  # the known pixels are never used
        if peak > OUTPUT_LIMIT:
            images = f"image {start}" if len(pred) == 1 else f"images {start}-{start + len(pred) - 1}"
            scale = " (it looks like [0, 255]: return pred / 127.5 - 1)" if peak > 50 else ""
            raise ValueError(
                f"{self.name} returned values up to {peak:g} in magnitude in the holes ({images} of the batch), but "
                f"an inpainting model here answers in [-1, 1] like its input{scale}; clamping would paint every hole "
                "white or black. Map the output to [-1, 1] in the callable (from [0, 1]: pred * 2 - 1)"
            )

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_rgb_image(image, self.name)
        check_image_range(image, tol=0.01)
        check_mask(mask, image)
        warn_if_inverted(mask, stacklevel=2, fix=self.inverted_mask_fix)
        dtype = model_dtype(self.model) or image.dtype
        mask = mask.to(image.dtype).expand(image.shape[0], -1, -1, -1)
        out = torch.empty_like(image)
        module = self.model if isinstance(self.model, nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        watch = contextlib.nullcontext()
        memory = self.memory_model() if self.progress is not None and module is not None else None
        if memory is not None and memory.calls_per_forward > 0:
            total, report = memory.calls_per_forward, self.progress
            watch = count_leaf_calls(module, lambda done: report(done % total or total, total))
        try:
            with torch.inference_mode(), watch:
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
    def memory_model(self) -> MemoryModel | None:
        """How the model's peak memory grows with the pixel count at this batch size, from two probe forwards at
        small sizes (:func:`~kdinpaint.inference.memory.probe_memory`); ``None`` for a plain callable or where
        memory cannot be measured. Measured once, then kept."""
        if getattr(self, "_memory", False) is not False:
            return self._memory
        module = self.model if isinstance(self.model, nn.Module) else None
        self._memory = None if module is None else probe_memory(module, self._call, self.batch_size, self.stride,
                                                                  self.device)
        return self._memory

    def check_memory(self, height: int, width: int, option: str = "--max-side") -> int | None:
        """Refuse, with :class:`~kdinpaint.inference.memory.InferenceOutOfMemory`, images of ``height × width``
        whose forward at this batch size would need more memory than the device has free (on the CPU the kernel
        would kill the process), and warn when the forward is estimated above 30 s, naming the ``option`` side that
        takes about 10 s (:func:`~kdinpaint.inference.memory.warn_if_slow`).

        ``option`` is the command-line option that makes images smaller (``--max-side`` for ``kdinpaint
        inpaint``, ``--size`` for ``evaluate``): the message names it with the largest side that fits.
        Returns the estimated bytes, or ``None`` where no estimate is possible (then nothing is checked).
        """
        need = check_fits(self.memory_model(), self.device, height, width, stride=self.stride,
                          batch_size=self.batch_size, name=self.name, option=option)
        warn_if_slow(self.memory_model(), height, width, stride=self.stride, batch_size=self.batch_size,
                     name=self.name, device=self.device, option=option)
        return need

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
    base, _, variant = name.partition(":")
    adapter = get_adapter(base)
    spec = adapter.spec.variant(variant or None)
    kwargs = dict(builder_kwargs or {})
    student = adapter.student(variant or None, **kwargs)
    teacher = adapter.teacher(variant or None, **kwargs) if spec.needs_teacher else None
    kd = attach(student, teacher, spec, allow_empty=True)  # a network as released taps nothing: exported as it is
    try:
        model = kd.export()
    finally:
        kd.detach()
    return model.eval(), adapter.stride
