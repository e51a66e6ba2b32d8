"""An exponential moving average of the trained weights (Polyak averaging), for evaluation and export.

With small batches each optimiser step moves the weights along the noise of its batch as much as along what
the batches share; averaging the weights over the last few hundred steps keeps what they share. It is
the usual last step of training generative and inpainting networks (the averaged generator is the one
evaluated and released); the training itself is unchanged.

``decay`` is the weight of the old average per update: ``avg <- decay * avg + (1 - decay) * theta``, a window of
about ``1 / (1 - decay)`` steps. The average starts at the weights given (for ``ReferenceNet(prefill=True)``
that is a network returning its fill, a sound point to average from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["WeightAverage"]


class WeightAverage:
    """Exponential moving average of ``params`` (updated in place by :meth:`update`).

    ``with average.applied():`` swaps the averaged values into the parameters and back on exit, so an export
    or evaluation inside the block sees the averaged network. :meth:`state_dict` / :meth:`load_state_dict` make
    it a checkpointable object (``accelerator.register_for_checkpointing``).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r} (0.999 averages over about 1000 steps)")
        self.params = list(params)
        if not self.params:
            raise ValueError("WeightAverage needs at least one parameter")
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters by ``1 - decay``."""
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged values in the parameters for the block's duration; the trained ones after it."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError(
                "the saved weight average does not fit these parameters (another network or spec); "
                "resume with the recipe that wrote the checkpoint"
            )
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
