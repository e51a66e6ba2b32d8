"""A network's own training objective: its generator losses and its discriminators, for ``recipes/train.py``.

The paper's recipe trains every student with Eq. (11) (R_recon + R_style, Region Normalization's
discriminator). An adapter can instead train its network with the objective the network was published
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
  checkpoints hold; frozen networks (VGG) live elsewhere in the objective and are rebuilt, not saved.

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

__all__ = [
    "TrainingObjective", "is_training_objective", "build_objective", "total_of", "merge_weights", "SN_WARMUP_ITERATIONS",
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
