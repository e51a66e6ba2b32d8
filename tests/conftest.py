"""Test-wide settings: tiny models run fastest on one thread (and two test processes never oversubscribe)."""

import torch

torch.set_num_threads(1)
