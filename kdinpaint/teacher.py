"""The auxiliary network (teacher): built from the student's own architecture, pre-trained as an L1 autoencoder.

The paper's AN is the same backbone as the inpainting network, fed the ground truth, and pre-trained with a
plain L1 loss (§4, "Loss"). :func:`build_teacher` makes a fresh copy of the student's architecture;
:func:`pretrain` runs that pre-training: the teacher sees the ground truth (with an empty mask, or the
call the spec's ``teacher_input`` says) and regresses it.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Iterable, Iterator

import torch
from torch import nn

from kdinpaint import _modules
from kdinpaint.attach import is_attached
from kdinpaint.calling import CallConvention, convention, select_output
from kdinpaint.masking import check_image_range
from kdinpaint.plugins import resolve_spec
from kdinpaint.spec import AdapterSpec, SpecLike

__all__ = ["build_teacher", "pretrain", "autoencoder_call"]

log = logging.getLogger(__name__)


# how a teacher is called, remembered from build_teacher(spec=) for pretrain() (weak: a dropped teacher is forgotten)
_SPECS: "weakref.WeakKeyDictionary[nn.Module, AdapterSpec]" = weakref.WeakKeyDictionary()


def build_teacher(student: nn.Module, spec: SpecLike | None = None) -> nn.Module:
    """A copy of the student's architecture with fresh weights (every ``reset_parameters`` called).

    Build it before :func:`kdinpaint.attach` (a hooked model is refused: its hooks would be copied). ``spec`` (as
    for :func:`kdinpaint.attach`) is remembered for the teacher, so that :func:`pretrain` calls it the same way
    without being told again: ``{"input": "concat"}`` for a network called with one tensor.
    """
    root = _modules.unwrap(student)
    if is_attached(root):
        raise RuntimeError("build the teacher before kdinpaint.attach(), or call kd.detach() first")
    resolved = resolve_spec(spec) if spec is not None else None  # a bad spec fails here, not at pretrain
    teacher = copy.deepcopy(root)
    for module in teacher.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    if resolved is not None:
        _SPECS[teacher] = resolved
    return teacher


def _batches(data: Iterable, steps: int) -> Iterator[torch.Tensor]:
    done, passes = 0, 0
    while done < steps:
        any_batch = False
        passes += 1
        for batch in data:
            any_batch = True
            if isinstance(batch, dict):
                batch = batch["image"]
            elif isinstance(batch, (tuple, list)):
                batch = batch[0]
            yield batch
            done += 1
            if done >= steps:
                return
        if not any_batch and passes > 1:
            raise ValueError(
                f"pretrain() ran out of data after {done} of {steps} steps: {type(data).__name__} yielded its "
                "batches once and was empty when iterated again (an iterator or generator is used up by one pass); "
                f"pass something that can be iterated again (a list, a DataLoader) or steps={done}"
            )
        if not any_batch:
            raise ValueError("pretrain() got no data: the iterable of images is empty")


def autoencoder_call(call: CallConvention, teacher_input: str, image: torch.Tensor) -> tuple[tuple, dict]:
    """The teacher's call on the ground truth alone, as in its pre-training: ``teacher(image)`` for
    ``teacher_input="image_only"``, otherwise the student's convention with an empty mask."""
    if teacher_input == "image_only":
        return (image,), {}
    return call.build(image, torch.zeros_like(image[:, :1]))


def pretrain(
    teacher: nn.Module,
    data: Iterable,
    *,
    spec: SpecLike | None = None,
    steps: int = 1000,
    lr: float = 1e-4,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device | None = None,
    log_every: int = 0,
) -> list[float]:
    """Pre-train the teacher as an L1 autoencoder of the ground truth; returns the loss per step.

    Args:
        teacher: the auxiliary network (e.g. from :func:`build_teacher`).
        data: an iterable (re-iterated as needed) of image batches ``(B, 3, H, W)`` in [-1, 1], of dicts with
            an ``"image"`` key, or of tuples whose first item is the image.
        spec: how to call the network (``input``, ``image_arg``, ``mask_arg``, ``output``, ``teacher_input``,
            or ``teacher_call`` for a teacher of another convention); default: the spec given to
            :func:`build_teacher`, else ``teacher(image, mask=zeros)``.
        steps, lr: optimisation steps and Adam learning rate (the paper: Adam, 1e-4).
        optimizer: an optimiser of your own over the teacher's parameters (``lr`` is then ignored).
        device: where to train (default: where the teacher's parameters are).
        log_every: log the loss every this many steps (0: never).
    """
    spec = resolve_spec(spec) if spec is not None else _SPECS.get(_modules.unwrap(teacher), AdapterSpec())
    if device is None:
        p = next(iter(teacher.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    try:
        call = convention(_modules.unwrap(teacher), spec, teacher=True)
    except ValueError as e:
        raise ValueError(f"pretrain() cannot call the teacher: {e}; give the spec as spec= here or to "
                         "kdinpaint.build_teacher(student, spec=...)") from None
    opt = optimizer or torch.optim.Adam(teacher.parameters(), lr=lr)
    teacher.train()
    history: list[float] = []
    for step, image in enumerate(_batches(data, steps), 1):
        image = image.to(device)
        check_image_range(image, name=f"pretrain batch {step}")  # a NaN batch would leave a NaN teacher
        args, kwargs = autoencoder_call(call, spec.teacher_input, image)
        pred = select_output(teacher(*args, **kwargs), spec.teacher_convention.output)
        loss = (pred - image).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if log_every and step % log_every == 0:
            log.info("teacher pretrain step %d: L1 %.4f", step, history[-1])
    teacher.eval()
    return history
