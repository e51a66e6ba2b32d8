"""How large the distillation terms are next to the reconstruction loss, with and without ``distill_scale``.

A user's own network: a U-Net on a timm ``resnet18`` encoder (random weights, 4 input channels: the masked
image and the mask), levels ``encoder.layer*`` (layer1..layer4, 1/4 to 1/32), its teacher from
``kdinpaint.build_teacher`` pre-trained as an L1 autoencoder for ``--teacher-steps``. The student then trains
``--steps`` steps with ``L1 + lambda_d * total`` (Adam, ``lambda_d`` 20 as in the paper and the README), once
with ``distill_scale: plain`` (Eq. 2/3 as written) and once with ``feature`` (each level's term divided by the
mean square of its target), from the same initial weights and batches. Printed per mode: L1, the
distillation total and ``lambda_d * total / L1`` at the last step. The crops are the bundled photos
(``kdinpaint.data.sample_images``), masks DeepFill v2 free-form strokes. Nothing is downloaded.

    python recipes/bench_distill_scale.py                       # 128x128, batch 4, 10 + 10 steps, a minute on 2 cores
    python recipes/bench_distill_scale.py --network tiny-unet   # the built-in tiny-unet adapter instead
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import kdinpaint
from kdinpaint.data import FreeFormMasks, rng_for, sample_images


class ResNetUNet(nn.Module):
    """A U-Net with a timm resnet18 encoder (features at 1/2 … 1/32), called as ``model(image, mask)``."""

    def __init__(self) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:  # pragma: no cover - timm is a dependency of kdinpaint
            raise ImportError("the resnet18 U-Net needs timm: pip install timm") from e
        self.encoder = timm.create_model("resnet18", pretrained=False, features_only=True, in_chans=4)
        chans = self.encoder.feature_info.channels()  # [64, 64, 128, 256, 512]
        self.up = nn.ModuleList()
        c = chans[-1]
        for skip in reversed(chans[:-1]):
            self.up.append(nn.Sequential(nn.Conv2d(c + skip, skip, 3, 1, 1), nn.BatchNorm2d(skip), nn.ReLU()))
            c = skip
        self.head = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(torch.cat([image * (1 - mask), mask], 1))
        y = feats[-1]
        for up, skip in zip(self.up, reversed(feats[:-1])):
            y = up(torch.cat([F.interpolate(y, size=skip.shape[-2:]), skip], 1))
        return torch.tanh(self.head(F.interpolate(y, scale_factor=2.0)))


def build(network: str) -> tuple[nn.Module, dict]:
    if network == "resnet18-unet":
        return ResNetUNet(), {"encoder_levels": ["encoder.layer*"]}
    from kdinpaint.plugins import get_adapter

    return get_adapter(network).student(), {"encoder_levels": list(get_adapter(network).spec.encoder_levels)}


def masks_for(n: int, size: int, seed: int) -> torch.Tensor:
    strokes = FreeFormMasks()
    return torch.stack([torch.from_numpy(strokes.sample(rng_for(seed, i), (size, size))).float()[None] for i in range(n)])


def run(student: nn.Module, teacher: nn.Module, spec: dict, batches: list, size: int, steps: int, lambda_d: float) -> dict:
    kd = kdinpaint.attach(student, teacher, spec)
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=1e-4)
    student.train()
    for step in range(1, steps + 1):
        gt = batches[(step - 1) % len(batches)]
        mask = masks_for(len(gt), size, step)
        l1 = (student(gt * (1 - mask), mask) - gt).abs().mean()
        total = kd.losses(target=gt)["total"]
        opt.zero_grad(set_to_none=True)
        (l1 + lambda_d * total).backward()
        opt.step()
    kd.detach()
    return {"l1": l1.item(), "total": total.item(), "ratio": lambda_d * total.item() / l1.item()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="resnet18-unet", help="resnet18-unet, or a registered adapter name")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--teacher-steps", type=int, default=10)
    parser.add_argument("--lambda-d", type=float, default=20.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    student, spec = build(args.network)
    teacher = kdinpaint.build_teacher(student)
    images = sample_images(args.size, 4 * args.batch)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    kdinpaint.pretrain(teacher, batches, steps=args.teacher_steps, spec={**spec, "mask_arg": "mask"}, lr=1e-3)
    n = sum(p.numel() for p in student.parameters())
    print(f"{args.network} ({n / 1e6:.1f} M parameters), levels {spec['encoder_levels']}, {args.size}x{args.size}, "
          f"batch {args.batch}, lambda_d {args.lambda_d:g}, step {args.steps}:")
    print(f"{'distill_scale':>14} {'L1':>8} {'total':>10} {'lambda_d*total/L1':>18}")
    for scale in ("plain", "feature"):
        torch.manual_seed(1)
        row = run(copy.deepcopy(student), teacher, {**spec, "distill_scale": scale}, batches, args.size, args.steps, args.lambda_d)
        print(f"{scale:>14} {row['l1']:8.4f} {row['total']:10.4f} {row['ratio']:18.1f}")


if __name__ == "__main__":
    main()
