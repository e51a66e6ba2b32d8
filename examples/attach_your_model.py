"""Distil your own inpainting network: three added lines in an ordinary training loop.

``MyUNet`` below stands for your model: kdinpaint never edits it. A hand-written spec names the last module
of each encoder level; ``kdinpaint.attach`` hooks the paper's completion blocks (Eq. 5) and cross/self
distillation (Eq. 2, 3) into it; ``kd.losses(target=...)`` returns the distillation terms of the last
forward; ``kd.detach()`` leaves the model exactly as before. The teacher (the paper's auxiliary network)
has the student's architecture, sees the ground truth, and is pre-trained first as an L1 autoencoder.

Data: crops of the photos bundled with scikit-image / scikit-learn (``kdinpaint.data.sample_images``)
and DeepFill v2 free-form masks. Runs in seconds on a CPU:

    python examples/attach_your_model.py                 # 40 steps
    python examples/attach_your_model.py --steps 200     # or KDINPAINT_EXAMPLE_STEPS=200
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import kdinpaint
from kdinpaint.data import FreeFormMasks, rng_for, sample_images


class MyUNet(nn.Module):
    """Your network: a small U-Net called as ``model(image, mask)`` (image in [-1, 1], mask 1 = hole)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ELU())

        self.inp = conv(4, w)
        self.down = nn.ModuleList([conv(w, w, 2), conv(w, 2 * w, 2), conv(2 * w, 4 * w, 2)])  # 1/2, 1/4, 1/8
        self.up = nn.ModuleList([conv(4 * w + 2 * w, 2 * w), conv(2 * w + w, w), conv(w + w, w)])
        self.out = nn.Conv2d(w, 3, 3, 1, 1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.inp(torch.cat([image * (1 - mask), mask], 1))  # (B, w, H, W)
        skips = [x]
        for down in self.down:
            skips.append(down(skips[-1]))  # (B, C_l, H / 2^l, W / 2^l)
        y = skips.pop()
        for up in self.up:
            skip = skips.pop()
            y = up(torch.cat([F.interpolate(y, size=skip.shape[-2:]), skip], 1))
        return torch.tanh(self.out(y))


# The hand-written spec: the last module of each encoder level, shallow to deep (the paper's breakpoints).
# kdinpaint.suggest_spec(MyUNet(), (image, mask)) proposes the same three paths.
SPEC = {
    "name": "my-unet",
    "encoder_levels": ["down.0", "down.1", "down.2"],
    "mask_arg": "mask",
}


def masks_for(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` free-form masks ``(n, 1, size, size)``, 1 = hole, reproducible from ``seed``."""
    strokes = FreeFormMasks(width=(4, 10))
    holes = [strokes.sample(rng_for(seed, i), (size, size)) for i in range(n)]
    return torch.stack([torch.from_numpy(h).float()[None] for h in holes])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("KDINPAINT_EXAMPLE_STEPS", 40)))
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the same as --steps")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    images = sample_images(args.size, 12)  # (12, 3, S, S) in [-1, 1]
    student = MyUNet()
    teacher = kdinpaint.build_teacher(student)  # same architecture, fresh weights
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    history = kdinpaint.pretrain(teacher, batches, spec=SPEC, steps=args.teacher_steps or args.steps, lr=2e-3)
    print(f"teacher pre-training (L1 autoencoder): {history[0]:.4f} -> {history[-1]:.4f}")

    kd = kdinpaint.attach(student, teacher, SPEC)  # added line 1: hooks in, teacher frozen
    optimiser = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=2e-3)  # added line 2
    # kd.meta_parameters() (gamma, rho, phi) are trained by the bilevel update of Algorithm 1 in
    # recipes/train.py; this example keeps them at their initial values.
    lambda_d = 20.0  # the paper's weight of the distillation terms (Eq. 4)

    print(f"{'step':>5} {'L1':>8} {'cross':>8} {'self':>8} {'total':>8}")
    window: list[torch.Tensor] = []
    for step in range(1, args.steps + 1):
        k = (step - 1) % len(batches)
        gt = batches[k]
        mask = masks_for(len(gt), args.size, seed=step)
        pred = student(gt, mask)  # the model's own call; completion blocks act inside it
        l1 = (pred - gt).abs().mean()
        kd_losses = kd.losses(target=gt)  # added line 3: distillation terms of this forward
        loss = l1 + lambda_d * kd_losses["total"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        window.append(torch.stack([l1, kd_losses["cross"], kd_losses["self"], loss]).detach())
        if step % 10 == 0 or step == args.steps:
            mean = torch.stack(window).mean(0)  # averaged over the last steps
            print(f"{step:>5} {mean[0]:8.4f} {mean[1]:8.4f} {mean[2]:8.4f} {mean[3]:8.4f}")
            window.clear()

    model = kd.detach()  # the plain model again: no hooks, same state_dict keys
    print(f"done; detached {type(model).__name__} with {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
