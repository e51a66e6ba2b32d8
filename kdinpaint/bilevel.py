"""Algorithm 1: theta steps on the total loss, then a step on the meta-networks Psi by Reverse-HG.

Per batch: ``T`` ordinary optimiser steps of theta (the student, completion blocks, f_l, PGL) on
``L_tot = L_inp + lambda_d * (R_distil + R_att)``; then one step of Psi (gamma, rho, phi, t) along
``d L_inp(theta_T) / d Psi``, where ``theta_T`` is the result of ``T`` differentiable SGD steps of size
``alpha`` from the theta the batch started with, on the same batch:

    theta_{t+1} = theta_t - alpha * grad_theta L_tot(theta_t, Psi)

Psi reaches ``L_inp`` only through these steps (``L_inp`` itself does not read the meta-networks), so the
hypergradient is the second-order signal of Reverse-HG (Franceschi et al., 2017). It is computed by running
the unrolled steps through :func:`torch.func.functional_call` on the Distiller, hooks active, with
``create_graph=True``, and back-propagating ``L_inp(theta_T)`` to Psi. Modes:

* ``reverse_hg`` — exact: the full unrolled graph, curvature of theta included;
* ``first_order`` — drops the theta-theta curvature: every step's mixed term is taken with the final
  gradient ``grad_theta L_inp(theta_T)`` (one Hessian-free pass per step, cheaper);
* ``frozen`` — Psi is never touched.

Unrolled passes run on copies of the buffers (BatchNorm statistics move only in the ordinary steps), and
the teacher runs once per batch (:meth:`Distiller.reusing_teacher`). Under ``torch.distributed`` the
hypergradient is averaged over ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from kdinpaint.attach import Distiller
from kdinpaint.calling import select_output
from kdinpaint.losses._target import differentiate_targets
from kdinpaint.spec import META_MODES

__all__ = ["MetaLearner", "META_MODES"]

LOSS_INPUTS = ("prediction", "output")

InpaintLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
        inner_lr: alpha of the differentiable SGD steps (default: the theta optimiser's first learning rate).
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

    After :meth:`step`, ``last_output`` holds the last ordinary step's prediction (detached), e.g. for a
    discriminator step, and ``last_raw_output`` the model's whole output of that step (tensors detached).
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
        inner_lr: float | None = None,
        lambda_d: float = 20.0,
        meta_lr: float = 1e-4,
        forward_module: nn.Module | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        autocast: Callable[[], Any] | None = None,
        max_hypergrad_norm: float | None = 1.0,
        loss_input: str = "prediction",
        fuse_first_step: bool = True,
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
        self.inner_lr = float(theta_optimizer.param_groups[0]["lr"] if inner_lr is None else inner_lr)
        self.meta_optimizer = meta_optimizer
        if self.meta_optimizer is None and mode != "frozen" and psi_ids:
            self.meta_optimizer = torch.optim.Adam(kd.meta_parameters(), lr=meta_lr)
        # names for functional_call, relative to the Distiller
        self._psi_names = [n for n, p in kd.named_parameters() if id(p) in psi_ids]
        theta_ids = {id(p) for group in theta_optimizer.param_groups for p in group["params"]}
        self._theta_names = [n for n, p in kd.named_parameters() if id(p) in theta_ids and p.requires_grad]
        self._updates_psi = mode != "frozen" and bool(self._psi_names)

    # ---- one batch ------------------------------------------------------------------------------
    def step(self, inputs: tuple | dict, target: torch.Tensor, kwargs: dict | None = None) -> dict[str, float]:
        """Algorithm 1 on one batch: T theta steps, then one Psi step. Returns the logged losses.

        ``inputs``: the student's call, a tuple of positional arguments (e.g. ``(masked_image, mask)``) or
        a dict of keyword arguments; ``kwargs``: keyword arguments beside positional ones.
        ``target``: the ground truth ``(B, 3, H, W)`` in [-1, 1].
        """
        if isinstance(inputs, dict):
            args, kwargs = (), {**inputs, **(kwargs or {})}
        else:
            args, kwargs = tuple(inputs), dict(kwargs or {})
        kd = self.kd
        params = dict(kd.named_parameters())
        theta0 = {n: params[n].detach().clone() for n in self._theta_names} if self._updates_psi else {}
        first: dict[str, torch.Tensor] | None = None
        logs: dict[str, float] = {}
        with kd.reusing_teacher():
            mask = kd._call.get(args, kwargs, "mask")
            for t in range(self.steps):
                with self.autocast():
                    fused = t == 0 and self._updates_psi and self._can_fuse(target)
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
                self.theta_optimizer.zero_grad(set_to_none=True)
                if fused:
                    grads = torch.autograd.grad(l_tot, list(theta0.values()), create_graph=True, allow_unused=True)
                    first = {n: g if g is not None else torch.zeros_like(theta0[n]) for n, g in zip(theta0, grads)}
                    for n, g in zip(theta0, grads):
                        params[n].grad = None if g is None else g.detach()
                else:
                    self.backward(l_tot)
                    for n in self._psi_names:  # Psi is not trained by the theta step
                        params[n].grad = None
                self.theta_optimizer.step()
                if t == 0:
                    logs.update({"loss_inp": l_inp.item(), "loss_total": l_tot.item()})
                    logs.update({f"kd/{k}": v.item() for k, v in kd_losses.items() if "/" not in k})
            if self._updates_psi:
                grads = self.hypergradient(theta0, args, kwargs, target, first_step=first)
                norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
                logs["hypergrad_norm"] = float(norm)
                logs["meta_skipped"] = float(not torch.isfinite(norm))
                if torch.isfinite(norm):
                    scale = 1.0 if self.max_hypergrad_norm is None else min(1.0, self.max_hypergrad_norm / (float(norm) + 1e-12))
                    for n, g in grads.items():
                        params[n].grad = g * scale
                    self.meta_optimizer.step()
                self.meta_optimizer.zero_grad(set_to_none=True)
        return logs

    def _sgd(self, theta: dict, step: dict, correction: dict) -> dict[str, torch.Tensor]:
        """One differentiable SGD step. ``first_order``: the values follow SGD but gradients flow only through
        each step's Psi-dependence, accumulated in ``correction`` (added back after the last step)."""
        alpha = self.inner_lr
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
    ) -> dict[str, torch.Tensor]:
        """``d L_inp(theta_T) / d Psi`` after T differentiable SGD steps from ``theta0`` (by name).

        ``first_step``: ``grad_theta L_tot(theta0)`` already computed with ``create_graph=True`` on the
        tensors of ``theta0`` (the fused first ordinary step); the unroll then starts from its second step.
        """
        kd = self.kd
        params = dict(kd.named_parameters())
        psi = {n: params[n] for n in self._psi_names}
        frozen = {n: p.detach() for n, p in params.items() if n not in psi and n not in theta0}
        buffers = {n: b.clone() for n, b in kd.named_buffers()}  # the unroll must not move BN statistics
        theta = {n: v.detach().requires_grad_() for n, v in theta0.items()}
        correction = {n: torch.zeros_like(v) for n, v in theta0.items()}
        mask = kd._call.get(args, kwargs, "mask")
        if first_step is not None:
            theta = self._sgd(dict(theta0), first_step, correction)
        with kd.reusing_teacher():
            for _ in range(self.steps - (first_step is not None)):
                out, kd_losses = functional_call(kd, {**frozen, **buffers, **psi, **theta}, args, {**kwargs, "kd_target": target})
                l_tot = self._loss(out, target, mask) + self.lambda_d * kd_losses["total"]
                grads = torch.autograd.grad(l_tot, list(theta.values()), create_graph=True, allow_unused=True)
                step = {n: (g if g is not None else torch.zeros_like(v)) for (n, v), g in zip(theta.items(), grads)}
                theta = self._sgd(theta, step, correction)
            if self.mode == "first_order":
                theta = {n: v + correction[n] for n, v in theta.items()}
            out = functional_call(kd, {**frozen, **buffers, **psi, **theta}, args, kwargs)
            l_inp = self._loss(out, target, mask)
            kd._session.reset()  # the final call computed no distillation losses: drop its captures
            with differentiate_targets():  # the steps depend on the self-distillation targets' values too
                hyper = torch.autograd.grad(l_inp, list(psi.values()), allow_unused=True)
        grads = {n: (g if g is not None else torch.zeros_like(psi[n])).detach() for n, g in zip(psi, hyper)}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in grads.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        return grads


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
