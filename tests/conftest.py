"""Test-wide settings: tiny models run fastest on one thread (and two test processes never oversubscribe); fixtures
shared by several test folders."""

from collections.abc import Callable

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def random_image() -> Callable[..., torch.Tensor]:
    """``random_image(b, h, w, seed=0)``: ``(b, 3, h, w)`` uniform in [-1, 1], the same for the same arguments."""

    def make(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
        return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    return make
