"""Training objectives: a network's generator losses and its discriminators, for ``recipes/train.py``.

The paper's recipe trains every student with Eq. (11) (R_recon + R_style, Region Normalization's
discriminator): :class:`Eq11Objective`, registered as ``eq11`` (the default of ``losses.objective``). An
adapter can instead train its network with the objective the network was published
with (StructureFlow: L1, sampling correctness, VGG terms and two two-scale LSGAN discriminators) by
registering a :class:`TrainingObjective` subclass through the ``register_losses`` hook::

    @hookimpl
    def register_losses(register):
        register("structureflow", StructureFlowObjective)   # a class: train.py instantiates it

and naming it in a recipe (``losses.objective: structureflow``, ``losses.objective_kwargs: {...}``).

The protocol, as ``recipes/train.py`` uses it:

* the student is called with :attr:`~TrainingObjective.call_kwargs` added (e.g. ``{"return_all": True}``)
  and :attr:`~TrainingObjective.output_key` says where the prediction sits in that output;
* :meth:`~TrainingObjective.generator_loss` receives the model's *whole* output. It is called in the
  ordinary theta steps and inside Algorithm 1's hypergradient (``torch.func.functional_call`` on the
  student), so it must be a pure function of its inputs and of modules that are not theta: it may read the
  discriminators and frozen feature networks, never step an optimiser or change a module's state (use
  :meth:`~TrainingObjective.discriminators_frozen` around discriminator calls: eval mode, so spectral-norm
  power iterations and normalisation statistics stay put);
* :meth:`~TrainingObjective.discriminator_loss` receives the last theta step's output, detached, and
  returns the terms the discriminator optimiser (Adam over :meth:`discriminator_parameters`) minimises;
* discriminators live in :attr:`~TrainingObjective.discriminators` (an ``nn.ModuleDict``): that is what
  checkpoints hold; frozen networks (VGG) live elsewhere in the objective and are rebuilt, not saved;
* :attr:`~TrainingObjective.recipe_keys` names the ``losses`` keys of the recipe that fill constructor
  arguments of the same name (``vgg`` and ``allow_random_vgg`` by default); ``losses.lambda_r`` multiplies
  the generator loss of an objective that does not take ``lambda_r`` itself.

Both losses return ``{term: scalar, ..., "total": scalar}``; :func:`total_of` checks that shape.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Callable, Union

import torch
from torch import nn

from kdinpaint._modules import training_mode
from kdinpaint.evaluation.metrics import ssim
from kdinpaint.losses.adversarial import PatchDiscriminator, discriminator_loss, generator_adv_loss
from kdinpaint.losses.reconstruction import confidence_weight, spatially_varying_l1
from kdinpaint.losses.style import VGGStyleLoss
from kdinpaint.hookspecs import hookimpl
from kdinpaint.masking import composite

__all__ = [
    "TrainingObjective", "Eq11Objective", "BatchMemo", "is_training_objective", "build_objective", "total_of",
    "merge_weights", "register_losses", "SN_WARMUP_ITERATIONS",
]

#: power iterations that settle a discriminator's spectral norms at construction (the default of
#: ``torch.nn.utils.parametrizations.spectral_norm``)
SN_WARMUP_ITERATIONS = 15

OutputKey = Union[int, str, None]


class TrainingObjective(nn.Module):
    """Base class of a network's own objective (generator terms + discriminators).

    Subclasses set :attr:`call_kwargs` / :attr:`output_key` as class attributes, put their discriminators
    into ``self.discriminators[name]`` after ``super().__init__()``, and implement :meth:`generator_loss`
    (and :meth:`discriminator_loss` when they have discriminators). Images are ``(B, 3, H, W)`` in
    [-1, 1], masks ``(B, 1, H, W)`` with 1 = hole (:mod:`kdinpaint.masking`).
    """

    #: extra keyword arguments of the student call (read-only), e.g. ``{"return_all": True}``
    call_kwargs: Mapping[str, Any] = MappingProxyType({})
    #: where the prediction sits in the output of a call with ``call_kwargs`` (tuple index or dict key);
    #: used only when ``call_kwargs`` is not empty; ``None`` keeps the adapter spec's ``output``
    output_key: OutputKey = None
    #: what :meth:`generator_loss` and :meth:`discriminator_loss` receive: ``"output"`` (the model's whole
    #: output) or ``"prediction"`` (the image the adapter spec's ``output`` selects from it)
    loss_input: str = "output"
    #: Adam's betas of the discriminator optimiser; ``None``: the recipe's ``optim.betas``
    discriminator_betas: tuple[float, float] | None = None
    #: ``losses`` keys of the recipe passed to the constructor when it takes them (and the recipe's
    #: ``objective_kwargs`` do not set them)
    recipe_keys: tuple[str, ...] = ("vgg", "allow_random_vgg")

    def __init__(self) -> None:
        super().__init__()
        self.discriminators = nn.ModuleDict()

    def generator_loss(self, output: Any, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator's terms on the model's whole ``output``; ``{..., "total": scalar}``. Pure (see module)."""
        raise NotImplementedError(f"{type(self).__name__} must implement generator_loss(output, target, mask)")

    def discriminator_loss(
        self, output: Any, target: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The discriminators' terms on the detached ``output``; ``None`` when there is no discriminator."""
        return None

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """What the discriminator optimiser trains: the trainable parameters of :attr:`discriminators`."""
        return [p for p in self.discriminators.parameters() if p.requires_grad]

    @torch.no_grad()
    def settle_spectral_norms(self, example: torch.Tensor, iterations: int = SN_WARMUP_ITERATIONS) -> None:
        """Run the discriminators' spectral-norm power iterations ``iterations`` times (train-mode forwards of
        ``example``, output unused). The legacy ``torch.nn.utils.spectral_norm`` starts from random ``u, v``
        and iterates only in training forwards, so until then its sigma is a poor estimate and the
        eval-mode logits that :meth:`generator_loss` reads explode; call this at the end of ``__init__``."""
        with training_mode(self.discriminators, True):
            for _ in range(iterations):
                for d in self.discriminators.values():
                    d(example)

    @contextlib.contextmanager
    def discriminators_frozen(self) -> Iterator[None]:
        """Within this block the discriminators run in eval mode (no power iteration, no running statistics)."""
        with training_mode(self.discriminators, False):
            yield


def is_training_objective(obj: object) -> bool:
    """Whether a registered loss is a :class:`TrainingObjective` class (rather than a loss function)."""
    return isinstance(obj, type) and issubclass(obj, TrainingObjective)


def build_objective(
    cls: type[TrainingObjective],
    kwargs: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    *,
    where: str = "losses.objective_kwargs",
) -> TrainingObjective:
    """``cls(**defaults_it_takes, **kwargs)``: ``defaults`` (e.g. the recipe's ``vgg``) fill only parameters
    the constructor names and ``kwargs`` does not set; an unknown key in ``kwargs`` is a TypeError naming
    ``where`` and the accepted keys."""
    if not is_training_objective(cls):
        raise TypeError(f"{cls!r} is not a TrainingObjective subclass")
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(kwargs or {})
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise TypeError(f"{where}: {cls.__name__} takes no key(s) {unknown}; it takes {accepted}")
    filled = {k: v for k, v in (defaults or {}).items() if k in params and k not in kwargs}
    objective = cls(**filled, **kwargs)
    if not isinstance(getattr(objective, "discriminators", None), nn.ModuleDict):
        raise TypeError(f"{cls.__name__}.__init__ must call super().__init__() (it sets self.discriminators)")
    return objective


def total_of(terms: object, source: str | Callable) -> torch.Tensor:
    """``terms["total"]`` after checking that ``terms`` is a dict of tensors with a scalar ``"total"``.

    ``source`` names the method that returned ``terms``, for the error message.
    """
    name = source if isinstance(source, str) else getattr(source, "__qualname__", repr(source))
    if not isinstance(terms, dict) or not all(isinstance(v, torch.Tensor) for v in terms.values()):
        raise TypeError(f"{name} must return a dict of tensors {{term: scalar, ..., 'total': scalar}}, got {type(terms).__name__}")
    if "total" not in terms:
        raise ValueError(f"{name} returned terms {sorted(terms)} without 'total'; add terms['total'] = the sum to minimise")
    total = terms["total"]
    if total.dim() != 0:
        raise ValueError(f"{name}: terms['total'] must be a scalar, got shape {tuple(total.shape)}")
    return total


def merge_weights(defaults: Mapping[str, float], overrides: Mapping[str, float] | None, network: str) -> dict[str, float]:
    """``defaults`` (a network's official loss weights) updated with ``overrides``; a term the network does
    not have is a ValueError naming ``network`` and its terms."""
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {network} loss term(s) {unknown}; terms: {sorted(defaults)}")
    return {**defaults, **(overrides or {})}


class BatchMemo:
    """Values that depend only on the batch (its target and mask), computed once per batch: Algorithm 1
    calls the inpainting loss up to 2T + 1 times with the same ones (GMCNN's confidence map is 7 blurs with a
    65-tap kernel; the target's VGG features a VGG pass)."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._values: dict[str, Any] = {}

    def get(self, name: str, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` once for the batch ``key`` (its tensors, compared by identity; pass the same key
        for every value of a batch: another key starts a new batch)."""
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            self._key, self._values = key, {}
        if name not in self._values:
            self._values[name] = compute()
        return self._values[name]


class Eq11Objective(TrainingObjective):
    """The paper's L_inp, Eq. (11) without the distillation terms (the Distiller adds those):
    ``lambda_r R_recon + lambda_s R_style + adversarial * L_adv``, registered as ``eq11``; ``ssim > 0`` adds
    ``ssim * (1 - SSIM)`` of the composite (not in the paper; see below).

    ``R_recon`` is GMCNN's spatially-varying L1 (:func:`~kdinpaint.losses.reconstruction.spatially_varying_l1`,
    ``recon_padding``), ``R_style`` the Gram-matrix loss of :class:`~kdinpaint.losses.style.VGGStyleLoss`
    (``style_preset``, ``vgg``; built only when ``lambda_s > 0``), ``L_adv`` the generator side of Region
    Normalization's spectral-norm PatchGAN (:class:`~kdinpaint.losses.adversarial.PatchDiscriminator`, built
    only when ``adversarial > 0``) on the composited prediction; its step minimises
    :func:`~kdinpaint.losses.adversarial.discriminator_loss` (``gan_loss``) of the ground truth against the
    detached composite, with Adam betas (0, 0.9).

    ``ssim``: the weight of ``1 - SSIM(composite, target)``, SSIM as :func:`kdinpaint.metrics.ssim` scores it
    (11×11 Gaussian window, per channel, on [0, 1] images), a term the paper does not have. An L1 loss is
    minimised by the per-pixel median and trades local structure for mean colour; the SSIM term asks for
    the structure too (Zhao et al., "Loss Functions for Image Restoration with Neural Networks", 2017, mix
    it with L1 for the same reason). 0 (the default and the paper) leaves it out.

    ``loss``: a registered loss *function* ``fn(pred, target, mask)`` (an adapter's own generator loss) in
    place of ``R_recon`` and ``R_style``; it gets ``vgg=`` (the style loss's VGG) when it takes one and
    ``lambda_s > 0``. The adversarial term stays. ``recipes/train.py`` builds this for ``losses.objective``
    naming such a function.

    The confidence map and the target's VGG features are computed once per batch (:class:`BatchMemo`). The
    discriminator runs in training mode in the generator loss too (its spectral-norm power iteration moves
    there, as it always has in this recipe).
    """

    loss_input = "prediction"
    discriminator_betas = (0.0, 0.9)
    recipe_keys = (
        "lambda_r", "lambda_s", "style_preset", "vgg", "allow_random_vgg", "adversarial", "gan_loss", "recon_padding", "ssim",
    )

    def __init__(
        self,
        lambda_r: float = 1.0,
        lambda_s: float = 150.0,
        style_preset: str = "pconv",
        vgg: str | None = "vgg16.tv_in1k",
        allow_random_vgg: bool = False,
        adversarial: float = 0.1,
        gan_loss: str = "nsgan",
        recon_padding: str = "reflect",
        ssim: float = 0.0,
        loss: Callable[..., torch.Tensor] | None = None,
    ) -> None:

        super().__init__()
        if loss is not None and (is_training_objective(loss) or not callable(loss)):
            raise TypeError(f"Eq11Objective(loss=...) takes a loss function fn(pred, target, mask), got {loss!r}")
        self.lambda_r, self.lambda_s, self.adversarial = lambda_r, lambda_s, adversarial
        if ssim < 0:
            raise ValueError(f"ssim is the weight of 1 - SSIM and must be >= 0 (0 leaves the term out), got {ssim}")
        self.gan_loss, self.recon_padding, self.loss, self.ssim = gan_loss, recon_padding, loss, float(ssim)
        self._loss_takes_vgg = loss is not None and "vgg" in inspect.signature(loss).parameters
        uses_style = lambda_s > 0 and (loss is None or self._loss_takes_vgg)
        self.style = VGGStyleLoss(style_preset, weights=vgg, allow_random=allow_random_vgg) if uses_style else None
        if adversarial > 0:
            self.discriminators["patch"] = PatchDiscriminator()
        self._memo = BatchMemo()

    def generator_loss(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"recon" (or "loss"), "style", "ssim", "adversarial", "total"}``, each term with its weight, on the prediction."""

        key = (target, mask)
        if self.loss is not None:
            extra = {"vgg": self.style} if self._loss_takes_vgg and self.style is not None else {}
            terms = {"loss": self.lambda_r * self.loss(output, target, mask, **extra)}
        else:
            weight = self._memo.get("confidence", key, lambda: confidence_weight(mask, padding=self.recon_padding))
            terms = {"recon": self.lambda_r * spatially_varying_l1(output, target, mask, weight=weight)}
        total = next(iter(terms.values()))
        if self.style is not None and self.loss is None:
            features = self._memo.get("vgg", key, lambda: self.style.target_features(target, mask))
            terms["style"] = self.lambda_s * self.style(output, target, mask, features)["style"]
            total = total + terms["style"]
        filled = composite(output, target, mask) if self.ssim > 0 or "patch" in self.discriminators else None
        if self.ssim > 0:  # images in [-1, 1] -> [0, 1]; the metric's dtype (float64 on CPU), the loss's back
            score = ssim((filled + 1) / 2, (target + 1) / 2, data_range=1.0)
            terms["ssim"] = self.ssim * (1 - score.mean()).to(output.dtype)
            total = total + terms["ssim"]
        if "patch" in self.discriminators:
            logits = self.discriminators["patch"](filled)[0]
            terms["adversarial"] = self.adversarial * generator_adv_loss(logits, self.gan_loss)
            total = total + terms["adversarial"]
        terms["total"] = total
        return terms

    def discriminator_loss(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``{"total": D loss}``: the ground truth against the detached composite of the prediction."""

        if "patch" not in self.discriminators:
            return None
        disc = self.discriminators["patch"]
        fake = composite(output, target, mask)
        return {"total": discriminator_loss(disc(target)[0], disc(fake.detach())[0], self.gan_loss)}


@hookimpl
def register_losses(register: Callable[[str, Callable[..., object]], None]) -> None:
    """The built-in objective (registered by :mod:`kdinpaint.plugins` as the ``kdinpaint`` distribution's)."""
    register("eq11", Eq11Objective)
