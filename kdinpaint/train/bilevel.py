"""Algorithm 1: theta steps on the total loss, then a step on the meta-networks Psi by Reverse-HG.

Per batch: ``T`` ordinary optimiser steps of theta (the student, completion blocks, f_l, PGL) on
``L_tot = L_inp + lambda_d * (R_distil + R_att)``; then one step of Psi (gamma, rho, phi, t) along
``d L_inp(theta_T) / d Psi``, where ``theta_T`` is the result of ``T`` differentiable SGD steps of size
``alpha`` from the theta the batch started with, on the same batch:

    theta_{t+1} = theta_t - alpha * P * grad_theta L_tot(theta_t, Psi)

``P`` is a constant diagonal preconditioner that makes each unrolled step the size of the step the real
optimiser takes. With plain SGD it is 1 (the paper's update). With Adam (or AdamW) it is Adam's own
``1 / (sqrt(v_hat) + eps)``: the optimiser's second-moment estimate at the start of the batch updated with the
first step's gradient, exactly as Adam's own first step of the batch computes it (so no unrolled step is more
than about ``alpha / sqrt(1 - beta2)`` per parameter, Adam's bound), held constant through the unroll. Without it, the
unroll takes SGD steps of size ``alpha`` on raw gradients while theta actually moves by Adam steps of about
``alpha`` per parameter: where a gradient is large (hundreds to thousands for the distillation terms of a
fresh student) the unrolled step is orders of magnitude longer than the real one, ``theta_T`` lands far from
anything the model visits, and the hypergradient is 0 (saturated outputs), huge or NaN — which then steers Psi
at random. ``inner_step="sgd"`` restores the plain update.

Psi reaches ``L_inp`` only through these steps (``L_inp`` itself does not read the meta-networks), so the
hypergradient is the second-order signal of Reverse-HG (Franceschi et al., 2017). It is computed by running
the unrolled steps through :func:`torch.func.functional_call` on the Distiller, hooks active, with
``create_graph=True``, and back-propagating ``L_inp(theta_T)`` to Psi. Modes:

* ``reverse_hg`` — exact: the full unrolled graph, curvature of theta included;
* ``first_order`` — drops the theta-theta curvature: every step's mixed term is taken with the final
  gradient ``grad_theta L_inp(theta_T)`` (one Hessian-free pass per step, cheaper);
* ``frozen`` — Psi is never touched.

``every=k`` (the recipe's ``meta.every``) takes the Psi step on every k-th batch only; the batches between
are theta steps alone, as ``frozen``, so the hypergradient's cost is shared by k batches.

Unrolled passes run on copies of the buffers (BatchNorm statistics move only in the ordinary steps), and
the teacher runs once per batch (:meth:`Distiller.reusing_teacher`). Under ``torch.distributed`` the
hypergradient is averaged over ranks.

A :class:`DivergenceGuard` watches every theta step: a non-finite loss term or gradient, or a total loss far
above its recent median, skips the rest of the batch (no theta or Psi step) with a warning naming the term;
after ``max_bad_steps`` consecutive skipped batches :class:`TrainingDiverged` is raised.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from kdinpaint.attach import Distiller
from kdinpaint.calling import select_output
from kdinpaint.losses._target import differentiate_targets
from kdinpaint.spec import META_MODES

__all__ = ["MetaLearner", "DivergenceGuard", "TrainingDiverged", "META_MODES"]

LOSS_INPUTS = ("prediction", "output")
INNER_STEPS = ("auto", "adam", "sgd")

InpaintLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """Raised by :meth:`MetaLearner.step` after ``max_bad_steps`` consecutive skipped batches.

    Attributes: ``term`` (the loss term that went bad last, e.g. ``"kd/cross/enc2"``, ``"loss_total"``,
    ``"grad_norm"``), ``reason`` (what was wrong with it), ``batch`` (the MetaLearner's batch count, 1-based),
    ``bad_steps`` (the consecutive skipped batches) and ``logs`` (the last batch's logged values).
    """

    def __init__(self, message: str, *, term: str, reason: str, batch: int, bad_steps: int, logs: dict | None = None):
        super().__init__(message)
        self.term, self.reason, self.batch, self.bad_steps = term, reason, batch, bad_steps
        self.logs: dict[str, float | str] = dict(logs or {})


class DivergenceGuard:
    """Decides whether a theta (or Psi) step may be applied, and counts consecutive skipped batches.

    A theta step is bad when a loss term or the gradient norm is non-finite, or when ``|loss_total|`` exceeds
    ``explode_factor`` times the median of ``|loss_total|`` over the last ``window`` applied steps (checked
    once ``warmup`` steps are recorded; a finite spike of a few times the median is ordinary batch-to-batch
    variation, e.g. hole size, so the default factor is large). Only applied steps enter the history: a lasting
    jump stays "exploded" and ends in :class:`TrainingDiverged`. Hypergradient norms have a history of their
    own; there an exploded norm is skipped but recorded, so a lasting change of scale is adopted.

    Its state (histories, counters) is a ``state_dict``, so checkpoints (``accelerator.register_for_checkpointing``)
    resume it exactly.

    Args:
        max_bad_steps: consecutive skipped batches (``MetaLearner.step`` calls) before raising, >= 1.
        explode_factor: the explosion threshold relative to the recent median, > 1; ``None``: only non-finite
            values are caught.
        window: how many recent values the median is taken over.
        warmup: values recorded before explosions are checked.
    """

    def __init__(self, max_bad_steps: int = 5, explode_factor: float | None = 50.0, window: int = 100, warmup: int = 10):
        if int(max_bad_steps) < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        if explode_factor is not None and not explode_factor > 1:
            raise ValueError(f"explode_factor must be > 1 (or None to check only for NaN/inf), got {explode_factor}")
        if window < 1 or warmup < 1 or warmup > window:
            raise ValueError(f"need 1 <= warmup <= window, got warmup={warmup}, window={window}")
        self.max_bad_steps, self.explode_factor, self.warmup = int(max_bad_steps), explode_factor, warmup
        self.history: deque[float] = deque(maxlen=window)  # |loss_total| of applied theta steps
        self.hyper_history: deque[float] = deque(maxlen=window)  # hypergradient norms
        self.bad_streak = 0
        self.skipped_total = 0
        self.batches = 0

    def non_finite(self, values: dict[str, float]) -> tuple[str, str] | None:
        """``(term, reason)`` for the first non-finite value (``values`` ordered most specific first)."""
        for name, v in values.items():
            if not math.isfinite(v):
                return name, f"{name} is {_describe(v)}"
        return None

    def exploded(
        self, name: str, value: float, history: deque, context: dict[str, float] | None = None
    ) -> tuple[str, str] | None:
        """``(name, reason)`` when ``|value|`` is more than ``explode_factor`` times the median of ``history``."""
        if self.explode_factor is None or len(history) < self.warmup:
            return None
        median = statistics.median(history)
        if median <= 0 or abs(value) <= self.explode_factor * median:
            return None
        parts = ", ".join(f"{k} {v:.4g}" for k, v in (context or {}).items() if k in ("loss_inp", "kd/total"))
        reason = f"{name} {value:.4g} is {abs(value) / median:.0f}x its recent median {median:.4g}"
        return name, reason + (f" ({parts})" if parts else "")

    def record(self, loss_total: float) -> None:
        self.history.append(abs(loss_total))

    def check_hypergradient(self, norm: float) -> str | None:
        """A reason to skip the Psi step when the hypergradient norm explodes (it is recorded either way)."""
        bad = self.exploded("hypergrad_norm", norm, self.hyper_history)
        self.hyper_history.append(norm)
        return None if bad is None else bad[1]

    def end_batch(self, bad: tuple[str, str] | None, logs: dict) -> None:
        """Count the batch; warn on a skipped one; raise :class:`TrainingDiverged` after too many in a row."""
        self.batches += 1
        if bad is None:
            self.bad_streak = 0
            return
        self.bad_streak += 1
        self.skipped_total += 1
        term, reason = bad
        if self.bad_streak >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.bad_streak} consecutive batches skipped, the last (batch {self.batches}) "
                f"because {reason}. Lower the learning rates (recipe: optim.lr, meta.lr, meta.inner_lr), check the "
                "data for NaN/inf pixels, or with fp16 mixed precision try bf16 or no",
                term=term, reason=reason, batch=self.batches, bad_steps=self.bad_streak, logs=logs,
            )
        warnings.warn(
            f"batch {self.batches}: {reason}; theta step skipped ({self.bad_streak}/{self.max_bad_steps} "
            "consecutive before TrainingDiverged)",
            RuntimeWarning,
            stacklevel=3,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history), "hyper_history": list(self.hyper_history),
            "bad_streak": self.bad_streak, "skipped_total": self.skipped_total, "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.hyper_history.clear()
        self.hyper_history.extend(state["hyper_history"])
        self.bad_streak, self.skipped_total, self.batches = state["bad_streak"], state["skipped_total"], state["batches"]


def _describe(v: float) -> str:
    return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")



class MetaLearner:
    """Runs Algorithm 1 on a :class:`Distiller`.

    Args:
        kd: the Distiller (unwrapped; under DDP pass ``accelerator.unwrap_model(kd)``).
        theta_optimizer: the optimiser of theta (must not hold the meta-parameters).
        inpaint_loss: ``(pred, target, mask) -> scalar``, the plain inpainting loss ``L_inp`` (e.g.
            reconstruction + style + adversarial terms).
        loss_input: what ``inpaint_loss`` receives first: ``"prediction"`` (the image the spec's ``output``
            selects) or ``"output"`` (the model's whole output, e.g. a named tuple with auxiliary outputs such
            as StructureFlow's flow, for an adapter's own objective).
        fuse_first_step: let the first ordinary theta step double as the unroll's first step (same theta,
            batch and loss): its gradient is taken with ``create_graph=True`` and kept, which saves one forward
            and backward per batch (Reverse-HG and first-order). Only where ``forward_module`` is ``kd`` itself
            and autocast is off; ``backward`` is then not called for that step.
        meta_optimizer: the optimiser of Psi (default: Adam on ``kd.meta_parameters()``, lr ``meta_lr``).
        mode: ``reverse_hg`` | ``first_order`` | ``frozen`` (default: the spec's ``meta.mode``).
        steps: T (default: the spec's ``meta.steps``, 2 as the paper).
        every: the Psi step (and its hypergradient) on every ``every``-th batch only, the first one included;
            the other batches take their T theta steps alone, at the cost of ``frozen``. 1 (default) is
            Algorithm 1; larger values amortise the hypergradient (``python recipes/bench_ops.py meta_step``
            prints the cost per theta step for 1, 2, 4, 8). :attr:`batches` counts the batches seen; a
            resumed run sets it to keep the schedule.
        inner_lr: alpha of the differentiable SGD steps (default: the theta optimiser's first learning rate,
            read at the start of every batch, so that it follows a learning-rate schedule).
        inner_step: ``"auto"`` (``"adam"`` when the theta optimiser is Adam or AdamW, else ``"sgd"``),
            ``"adam"`` (each unrolled step preconditioned by Adam's ``1 / (sqrt(v_hat) + eps)``, constant within
            the batch, so it is the size of the real step) or ``"sgd"`` (raw gradients, the paper's update).
        lambda_d: weight of the distillation terms in ``L_tot`` (the paper: 20).
        meta_lr: learning rate of the default meta optimiser.
        forward_module: what the ordinary steps call (e.g. the DDP-wrapped Distiller, so that gradients are
            synchronised); default ``kd``.
        backward: ``loss -> None`` for the ordinary steps (e.g. ``accelerator.backward``); default ``loss.backward()``.
        autocast: a context-manager factory for the ordinary steps' forward (mixed precision); the
            hypergradient always runs in the parameters' own precision.
        max_hypergrad_norm: clip the hypergradient to this norm before the Psi step (``None``: no clipping).
            The unrolled SGD steps can diverge when ``inner_lr`` is large for the loss's scale; a non-finite
            hypergradient is never applied (the step is skipped and ``logs["meta_skipped"] = 1``).
        scheduler: a learning-rate scheduler of ``theta_optimizer``, stepped after every theta step; a skipped
            batch advances it too (by all its T steps), so the schedule stays aligned with the step count.
        guard: check every theta step (:class:`DivergenceGuard`): a non-finite loss term (``loss_inp``, each
            distillation term, ``loss_total``) or theta gradient, or a ``loss_total`` more than
            ``explode_factor`` times its recent median, skips the rest of the batch (no theta step, no Psi step,
            gradients zeroed) with a ``RuntimeWarning`` naming the term, and ``logs["skipped"] = 1``,
            ``logs["skipped_term"]``; an exploded hypergradient norm skips the Psi step alone. ``False``: every
            step is applied, as given. Under ``torch.distributed`` the decision is taken jointly (one rank's bad
            loss skips the step on all). With a gradient scaler (fp16) non-finite gradients are left to it.
        max_bad_steps: consecutive skipped batches before :class:`TrainingDiverged` is raised.
        explode_factor: see ``guard``; ``None`` catches only non-finite values.

    After :meth:`step`, ``last_output`` holds the last ordinary step's prediction (detached), e.g. for a
    discriminator step, ``last_raw_output`` the model's whole output of that step (tensors detached), and
    ``last_loss_input`` whichever of the two ``inpaint_loss`` receives (``loss_input``).
    """

    def __init__(
        self,
        kd: Distiller,
        theta_optimizer: torch.optim.Optimizer,
        inpaint_loss: InpaintLoss,
        meta_optimizer: torch.optim.Optimizer | None = None,
        *,
        mode: str | None = None,
        steps: int | None = None,
        every: int = 1,
        inner_lr: float | None = None,
        lambda_d: float = 20.0,
        meta_lr: float = 1e-4,
        forward_module: nn.Module | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        autocast: Callable[[], Any] | None = None,
        max_hypergrad_norm: float | None = 1.0,
        loss_input: str = "prediction",
        fuse_first_step: bool = True,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        guard: bool = True,
        max_bad_steps: int = 5,
        explode_factor: float | None = 50.0,
        inner_step: str = "auto",
    ):
        mode = kd.spec.meta.mode if mode is None else mode
        if mode not in META_MODES:
            raise ValueError(f"meta mode {mode!r} is not one of {list(META_MODES)}")
        if loss_input not in LOSS_INPUTS:
            raise ValueError(f"loss_input {loss_input!r} is not one of {list(LOSS_INPUTS)}")
        self.kd, self.mode, self.inpaint_loss, self.lambda_d = kd, mode, inpaint_loss, lambda_d
        self.loss_input = loss_input
        self.fuse_first_step = fuse_first_step
        self.steps = kd.spec.meta.steps if steps is None else int(steps)
        if self.steps < 1:
            raise ValueError(f"steps (T of Algorithm 1) must be >= 1, got {self.steps}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every (a Psi step on every k-th batch) must be an integer >= 1, got {every!r}")
        self.every = every
        self.batches = 0  # step() calls so far: the Psi step falls on batches 0, every, 2 * every, ...
        self.theta_optimizer = theta_optimizer
        self.forward_module = forward_module if forward_module is not None else kd
        self.backward = backward if backward is not None else torch.Tensor.backward
        self.autocast = autocast if autocast is not None else contextlib.nullcontext
        self.last_output: torch.Tensor | None = None
        self.last_raw_output: Any = None
        self.max_hypergrad_norm = max_hypergrad_norm
        psi_ids = {id(p) for p in kd.meta_parameters()}
        held = [p for group in theta_optimizer.param_groups for p in group["params"] if id(p) in psi_ids]
        if held:
            raise ValueError(
                f"the theta optimiser holds {len(held)} meta-parameter(s); build it over "
                "student.parameters() + kd.student_parameters() only (Psi is trained by MetaLearner)"
            )
        theta_ids = {id(p) for group in theta_optimizer.param_groups for p in group["params"]}
        missing = [p for p in kd.student_parameters() if p.requires_grad and id(p) not in theta_ids]
        if missing:
            raise ValueError(
                f"the theta optimiser lacks {len(missing)} of kdinpaint's added parameter(s) (completion blocks, f_l, "
                "PGL): they would never train; build it over student.parameters() + kd.student_parameters()"
            )
        if inner_step not in INNER_STEPS:
            raise ValueError(f"inner_step {inner_step!r} is not one of {list(INNER_STEPS)}")
        adam = isinstance(_base_optimizer(theta_optimizer), (torch.optim.Adam, torch.optim.AdamW))
        if inner_step == "adam" and not adam:
            raise ValueError(
                f"inner_step='adam' preconditions the unroll with Adam's second moments, but the theta optimiser is "
                f"{type(_base_optimizer(theta_optimizer)).__name__}: use inner_step='sgd' (or 'auto')"
            )
        self.inner_step = ("adam" if adam else "sgd") if inner_step == "auto" else inner_step
        self.inner_lr = float(theta_optimizer.param_groups[0]["lr"] if inner_lr is None else inner_lr)
        self._inner_lr_follows = inner_lr is None  # alpha tracks a scheduled learning rate
        self.scheduler = scheduler
        self.guard = DivergenceGuard(max_bad_steps, explode_factor) if guard else None
        # a GradScaler (accelerate's fp16) skips non-finite gradients itself and lowers its scale; skipping its
        # step here would keep the scale too high for ever
        self._scaled = getattr(theta_optimizer, "scaler", None) is not None
        self.meta_optimizer = meta_optimizer
        if self.meta_optimizer is None and mode != "frozen" and psi_ids:
            self.meta_optimizer = torch.optim.Adam(kd.meta_parameters(), lr=meta_lr)
        # names for functional_call, relative to the Distiller
        self._psi_names = [n for n, p in kd.named_parameters() if id(p) in psi_ids]
        theta_ids = {id(p) for group in theta_optimizer.param_groups for p in group["params"]}
        self._theta_names = [n for n, p in kd.named_parameters() if id(p) in theta_ids and p.requires_grad]
        self._updates_psi = mode != "frozen" and bool(self._psi_names)
        self._theta_name_of = {id(p): n for n, p in kd.named_parameters() if n in set(self._theta_names)}

    # ---- one batch ------------------------------------------------------------------------------
    def step(self, inputs: tuple | dict, target: torch.Tensor, kwargs: dict | None = None) -> dict[str, float | str]:
        """Algorithm 1 on one batch: T theta steps, then one Psi step. Returns the logged losses.

        ``inputs``: the student's call, a tuple of positional arguments (e.g. ``(masked_image, mask)``) or
        a dict of keyword arguments; ``kwargs``: keyword arguments beside positional ones.
        ``target``: the ground truth ``(B, 3, H, W)`` in [-1, 1].

        Logs: ``loss_inp``, ``loss_total``, ``kd/<term>`` and ``grad_norm`` of the first theta step, ``lr``
        (the theta learning rate of the first step), ``skipped`` (1 when the guard skipped the batch, with
        ``skipped_term``), ``hypergrad_norm`` and ``meta_skipped`` when Psi is trained on this batch.
        Raises :class:`TrainingDiverged` after ``max_bad_steps`` consecutive skipped batches.
        """
        if isinstance(inputs, dict):
            args, kwargs = (), {**inputs, **(kwargs or {})}
        else:
            args, kwargs = tuple(inputs), dict(kwargs or {})
        kd = self.kd
        params = dict(kd.named_parameters())
        psi_step = self._updates_psi and self.batches % self.every == 0  # meta.every: this batch's Psi step is due
        self.batches += 1
        theta0 = {n: params[n].detach().clone() for n in self._theta_names} if psi_step else {}
        precondition = self.preconditioner() if psi_step else None  # the optimiser's state at theta0
        first: dict[str, torch.Tensor] | None = None
        lr = float(self.theta_optimizer.param_groups[0]["lr"])
        if self._inner_lr_follows:
            self.inner_lr = lr
        logs: dict[str, float | str] = {"lr": lr}
        bad: tuple[str, str] | None = None
        with kd.reusing_teacher():
            mask = kd.call.get(args, kwargs, "mask")
            for t in range(self.steps):
                with self.autocast():
                    fused = t == 0 and psi_step and self._can_fuse(target)
                    if fused:  # the unroll's first step is this very step: same theta, batch and loss
                        theta0 = {n: v.requires_grad_() for n, v in theta0.items()}
                        out, kd_losses = functional_call(kd, theta0, args, {**kwargs, "kd_target": target})
                    else:
                        out, kd_losses = self.forward_module(*args, kd_target=target, **kwargs)
                    pred = select_output(out, kd.spec.output)
                    l_inp = self._loss(out, target, mask)
                    l_tot = l_inp + self.lambda_d * kd_losses["total"]
                self.last_output = pred.detach()
                self.last_raw_output = _detached(out)
                if t == 0:
                    logs.update({"loss_inp": l_inp.item(), "loss_total": l_tot.item()})
                    logs.update({f"kd/{k}": v.item() for k, v in kd_losses.items() if "/" not in k})
                # judged before backward: a NaN forward can break a backward (and one rank skipping it alone
                # would leave DDP waiting), and a bad batch costs no backward
                total, bad = self._judge(l_inp, l_tot, kd_losses) if self.guard is not None else (0.0, None)
                self.theta_optimizer.zero_grad(set_to_none=True)
                if bad is None:
                    if fused:
                        grads = torch.autograd.grad(l_tot, list(theta0.values()), create_graph=True, allow_unused=True)
                        first = {n: g if g is not None else torch.zeros_like(theta0[n]) for n, g in zip(theta0, grads)}
                        for n, g in zip(theta0, grads):
                            params[n].grad = None if g is None else g.detach()
                    else:
                        self.backward(l_tot)
                        for n in self._psi_names:  # Psi is not trained by the theta step
                            params[n].grad = None
                    if self.guard is not None and not self._scaled:  # the gradients are the same on every rank
                        norm = self._grad_norm(params)
                        logs.setdefault("grad_norm", norm)
                        if not math.isfinite(norm):
                            bad = ("grad_norm", f"grad_norm is {_describe(norm)} (the losses are finite)")
                if bad is not None:  # the same theta on the same batch would fail again: drop the whole batch
                    self.theta_optimizer.zero_grad(set_to_none=True)
                    first = None
                    self._advance_schedule(self.steps - t, skipped=True)
                    break
                if self.guard is not None:
                    self.guard.record(total)
                self.theta_optimizer.step()
                self._advance_schedule(1)
            if psi_step and bad is None:
                self._meta_step(theta0, args, kwargs, target, first, params, logs, precondition)
            elif psi_step:
                logs["meta_skipped"] = 1.0
        if self.guard is not None:
            logs["skipped"] = float(bad is not None)
            if bad is not None:
                logs["skipped_term"] = bad[0]
            self.guard.end_batch(bad, logs)
        return logs

    @property
    def last_loss_input(self) -> Any:
        """What ``inpaint_loss`` received in the last ordinary step, detached: the prediction or the whole output."""
        return self.last_raw_output if self.loss_input == "output" else self.last_output

    def _meta_step(
        self,
        theta0: dict,
        args: tuple,
        kwargs: dict,
        target: torch.Tensor,
        first: dict | None,
        params: dict,
        logs: dict,
        precondition: dict | None = None,
    ) -> None:
        """The Psi step of Algorithm 1 along the (clipped) hypergradient; never a non-finite or exploded one."""
        grads = self.hypergradient(theta0, args, kwargs, target, first_step=first, preconditioner=precondition)
        norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())))
        logs["hypergrad_norm"] = norm
        skip = None if math.isfinite(norm) else f"hypergrad_norm is {_describe(norm)}"
        if skip is None and self.guard is not None:
            skip = self.guard.check_hypergradient(norm)
        if skip is not None and self.guard is not None:
            warnings.warn(f"batch {self.guard.batches + 1}: {skip}; Psi step skipped", RuntimeWarning, stacklevel=3)
        logs["meta_skipped"] = float(skip is not None)
        if skip is None:
            scale = 1.0 if self.max_hypergrad_norm is None else min(1.0, self.max_hypergrad_norm / (norm + 1e-12))
            for n, g in grads.items():
                params[n].grad = g * scale
            self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

    def _judge(self, l_inp: torch.Tensor, l_tot: torch.Tensor, kd_losses: dict) -> tuple[float, tuple[str, str] | None]:
        """``(loss_total, (term, reason))`` when the guard rejects this theta step's losses, ``(loss_total, None)``
        when it may go on. The terms are fetched in one transfer and checked most specific first (per-level
        distillation terms before their sums); under ``torch.distributed`` the decision and ``loss_total``
        (the ranks' mean, so that every rank keeps the same history) are taken jointly."""
        names = ["loss_inp", *(f"kd/{k}" for k in kd_losses if "/" in k)]
        names += [f"kd/{k}" for k in kd_losses if "/" not in k and k != "total"] + ["kd/total", "loss_total"]
        tensors = [l_inp, *(kd_losses[n[3:]] for n in names[1:-1]), l_tot]
        values = dict(zip(names, torch.stack([v.detach().float().reshape(()) for v in tensors]).tolist()))
        bad = self.guard.non_finite(values)
        total = values["loss_total"]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.tensor([float(bad is not None), 0.0 if bad else total], device=l_tot.device, dtype=torch.float64)
            dist.all_reduce(flags)
            if flags[0].item() > 0:
                return total, bad or ("other_rank", "a loss term is non-finite on another process")
            total = flags[1].item() / dist.get_world_size()
        return total, bad or self.guard.exploded("loss_total", total, self.guard.history, values)

    def _grad_norm(self, params: dict[str, torch.Tensor]) -> float:
        """The 2-norm of theta's gradient (NaN or inf when any entry is)."""
        grads = [params[n].grad.detach() for n in self._theta_names if params[n].grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).float() for g in grads])))

    def _advance_schedule(self, steps: int, skipped: bool = False) -> None:
        if self.scheduler is None:
            return
        with warnings.catch_warnings():
            if skipped:  # an all-skipped start calls the scheduler before the optimiser ever stepped, on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler", category=UserWarning)
            for _ in range(steps):
                self.scheduler.step()

    def preconditioner(self) -> dict[str, tuple] | None:
        """What ``P`` of the unrolled steps is made of, by theta name, from the theta optimiser's state now:
        ``(v, steps, beta2, eps)``, Adam's second-moment estimate (``None`` before a parameter's first step) and
        step count; ``None`` altogether for ``inner_step="sgd"``. The first unrolled step completes it with its
        own gradient ``g0``, as Adam's update would: ``P = 1 / (sqrt(v_hat) + eps)`` with
        ``v_hat = (beta2 v + (1 - beta2) g0^2) / (1 - beta2^(steps + 1))``, constant through the unroll. (Without
        ``g0`` a parameter whose gradients had been tiny got ``P`` in the millions when one grew.)"""
        if self.inner_step == "sgd":
            return None
        base = _base_optimizer(self.theta_optimizer)
        out: dict[str, tuple] = {}
        for group in base.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                name = self._theta_name_of.get(id(p))
                if name is None:
                    continue
                state = base.state.get(p, {})
                if "exp_avg_sq" in state and float(state["step"]) >= 1:
                    out[name] = (state["exp_avg_sq"].detach().clone(), float(state["step"]), beta2, eps)
                else:
                    out[name] = (None, 0.0, beta2, eps)
        return out

    def _sgd(self, theta: dict, step: dict, correction: dict, precondition: dict | None) -> dict[str, torch.Tensor]:
        """One differentiable (preconditioned) SGD step. ``first_order``: the values follow it but gradients flow
        only through each step's Psi-dependence, accumulated in ``correction`` (added back after the last step).
        ``precondition`` (from :meth:`preconditioner`) is completed in place by the first step."""
        alpha = self.inner_lr
        if precondition is not None:
            for n in theta:
                entry = precondition[n]
                if isinstance(entry, tuple):  # the first step: Adam's v_hat including this gradient
                    v, steps, beta2, eps = entry
                    g0 = step[n].detach()
                    v_new = (1 - beta2) * g0 * g0 if v is None else beta2 * v + (1 - beta2) * g0 * g0
                    precondition[n] = 1 / ((v_new / (1 - beta2 ** (steps + 1))).sqrt() + eps)
            step = {n: precondition[n] * g for n, g in step.items()}
        if self.mode == "reverse_hg":
            return {n: v - alpha * step[n] for n, v in theta.items()}
        for n in theta:
            correction[n] = correction[n] - alpha * (step[n] - step[n].detach())
        return {n: (v - alpha * step[n]).detach().requires_grad_() for n, v in theta.items()}

    def _loss(self, out: Any, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first = out if self.loss_input == "output" else select_output(out, self.kd.spec.output)
        return self.inpaint_loss(first, target, mask)

    def _can_fuse(self, target: torch.Tensor) -> bool:
        """The first ordinary step can double as the unroll's first step when it runs on the Distiller itself
        (not a DDP wrapper, whose gradient hooks need ``backward``) and in the parameters' own precision."""
        return self.fuse_first_step and self.forward_module is self.kd and not torch.is_autocast_enabled(target.device.type)

    def hypergradient(
        self,
        theta0: dict[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        target: torch.Tensor,
        first_step: dict[str, torch.Tensor] | None = None,
        preconditioner: dict[str, tuple] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``d L_inp(theta_T) / d Psi`` after T differentiable SGD steps from ``theta0`` (by name).

        ``first_step``: ``grad_theta L_tot(theta0)`` already computed with ``create_graph=True`` on the
        tensors of ``theta0`` (the fused first ordinary step); the unroll then starts from its second step.
        ``preconditioner``: ``P`` of the steps (:meth:`preconditioner`, taken before the optimiser moved
        theta0); default: the optimiser's state now (``inner_step="adam"``) or none.
        """
        precondition = self.preconditioner() if preconditioner is None else dict(preconditioner)
        kd = self.kd
        params = dict(kd.named_parameters())
        psi = {n: params[n] for n in self._psi_names}
        frozen = {n: p.detach() for n, p in params.items() if n not in psi and n not in theta0}
        buffers = {n: b.clone() for n, b in kd.named_buffers()}  # the unroll must not move BN statistics
        theta = {n: v.detach().requires_grad_() for n, v in theta0.items()}
        correction = {n: torch.zeros_like(v) for n, v in theta0.items()}
        mask = kd.call.get(args, kwargs, "mask")
        if first_step is not None:
            theta = self._sgd(dict(theta0), first_step, correction, precondition)
        with kd.reusing_teacher():
            for _ in range(self.steps - (first_step is not None)):
                out, kd_losses = functional_call(kd, {**frozen, **buffers, **psi, **theta}, args, {**kwargs, "kd_target": target})
                l_tot = self._loss(out, target, mask) + self.lambda_d * kd_losses["total"]
                grads = torch.autograd.grad(l_tot, list(theta.values()), create_graph=True, allow_unused=True)
                step = {n: (g if g is not None else torch.zeros_like(v)) for (n, v), g in zip(theta.items(), grads)}
                theta = self._sgd(theta, step, correction, precondition)
            if self.mode == "first_order":
                theta = {n: v + correction[n] for n, v in theta.items()}
            out = functional_call(kd, {**frozen, **buffers, **psi, **theta}, args, kwargs)
            l_inp = self._loss(out, target, mask)
            kd.drop_captures()  # the final call computed no distillation losses: drop its captures
            with differentiate_targets():  # the steps depend on the self-distillation targets' values too
                hyper = torch.autograd.grad(l_inp, list(psi.values()), allow_unused=True)
        grads = {n: (g if g is not None else torch.zeros_like(psi[n])).detach() for n, g in zip(psi, hyper)}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in grads.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        return grads


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside an accelerate ``AcceleratedOptimizer`` (or the optimiser itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _detached(out: Any) -> Any:
    """``out`` with every tensor detached (tuples, named tuples, lists and dicts kept)."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, dict):
        return type(out)((k, _detached(v)) for k, v in out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_detached(v) for v in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_detached(v) for v in out)
    return out
