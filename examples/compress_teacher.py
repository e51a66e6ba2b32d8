"""Compression: a larger trained inpainting network of another architecture teaches a small one.

The paper's teacher is an autoencoder of the student's own architecture fed the ground truth. Here (the
MI-GAN / EC#-SF# setting) the teacher is the built-in ``reference`` adapter's network (Net4, width 16,
about 0.8 M parameters), trained first as an ordinary inpainter, and the student is ``tiny-unet`` at width 8
(about 25 k parameters). The spec says:

- ``teacher_input: student_input``: the teacher sees what the student sees, the ground truth with its holes
  zeroed and the mask (a trained inpainter, not an autoencoder);
- ``teacher_levels``: the teacher's own modules for the student's ``enc1..enc3``; their widths differ (32 /
  64 / 128 channels against 8 / 16 / 32), so gamma projects; a teacher level at another resolution would be
  resampled to the student's;
- ``output_distillation``: an L1 term between the two predictions in the holes;
- ``distill_scale: feature``: each level's term relative to its target's scale, so ``lambda_d`` weighs a
  relative error whatever the teacher's feature scale.

    python examples/compress_teacher.py                    # about a minute on 2 CPU cores
    python examples/compress_teacher.py --steps 300 --teacher-steps 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

import kdinpaint
from kdinpaint.data import FreeFormMasks, rng_for, sample_images
from kdinpaint.plugins import get_adapter

SPEC = {
    "name": "tiny-from-reference",
    "encoder_levels": ["enc1", "enc2", "enc3"],  # the student's (tiny-unet)
    "teacher_levels": ["enc1", "enc2", "enc3"],  # the teacher's (reference), same resolutions, other widths
    "image_arg": "image",
    "mask_arg": "mask",
    "teacher_input": "student_input",
    "output_distillation": 1.0,
    "distill_scale": "feature",
}


def masks_for(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` free-form masks ``(n, 1, size, size)``, 1 = hole, reproducible from ``seed``."""
    strokes = FreeFormMasks(width=(4, 10))
    return torch.stack([torch.from_numpy(strokes.sample(rng_for(seed, i), (size, size))).float()[None] for i in range(n)])


def hole_l1(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean absolute error in the holes, per hole pixel and channel."""
    with torch.no_grad():
        pred = model(images * (1 - masks), masks)
    return float(((pred - images).abs() * masks).sum() / (masks.sum() * images.shape[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("KDINPAINT_EXAMPLE_STEPS", 60)))
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the same as --steps")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lambda-d", type=float, default=1.0, help="weight of the distillation total")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    images = sample_images(args.size, 16)  # (16, 3, S, S) in [-1, 1]
    train, held_out = images[:12], images[12:]
    held_masks = masks_for(len(held_out), args.size, seed=10_000)
    batches = [train[i : i + args.batch] for i in range(0, len(train), args.batch)]

    # 1. the big network, trained as an ordinary inpainter (in practice: loaded from its checkpoint)
    teacher = get_adapter("reference").student("net4", width=16)
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    for step in range(1, (args.teacher_steps or args.steps) + 1):
        gt = batches[(step - 1) % len(batches)]
        mask = masks_for(len(gt), args.size, seed=step)
        loss = (teacher(gt * (1 - mask), mask) - gt).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    teacher.eval()
    n_teacher = sum(p.numel() for p in teacher.parameters())
    print(f"teacher reference:net4 ({n_teacher} parameters): hole L1 on held-out crops {hole_l1(teacher, held_out, held_masks):.4f}")

    # 2. the small network, distilled from it
    student = get_adapter("tiny-unet").student(width=8)
    kd = kdinpaint.attach(student, teacher, SPEC)
    opt = torch.optim.Adam([*student.parameters(), *kd.student_parameters()], lr=2e-3)
    print(f"{'step':>5} {'L1':>8} {'cross':>8} {'self':>8} {'output':>8}")
    window: list[torch.Tensor] = []
    for step in range(1, args.steps + 1):
        gt = batches[(step - 1) % len(batches)]
        mask = masks_for(len(gt), args.size, seed=step)
        pred = student(gt * (1 - mask), mask)
        l1 = (pred - gt).abs().mean()
        terms = kd.losses(target=gt)  # the teacher runs on the student's input
        loss = l1 + args.lambda_d * terms["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(torch.stack([l1, terms["cross"], terms["self"], terms["output"]]).detach())
        if step % 20 == 0 or step == args.steps:
            mean = torch.stack(window).mean(0)
            print(f"{step:>5} {mean[0]:8.4f} {mean[1]:8.4f} {mean[2]:8.4f} {mean[3]:8.4f}")
            window.clear()

    # 3. deploy: the student with its completion blocks, nothing of the teacher
    deployable = kd.export().eval()
    n_student = sum(p.numel() for p in deployable.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.safetensors"
        kdinpaint.save_exported(deployable, path)
        loaded = kdinpaint.load_exported(path, get_adapter("tiny-unet").student(width=8)).eval()
    same = torch.equal(loaded(held_out * (1 - held_masks), held_masks), deployable(held_out * (1 - held_masks), held_masks))
    kd.detach()
    print(f"student tiny-unet ({n_student} parameters, {n_teacher / n_student:.0f}x fewer): hole L1 on held-out "
          f"crops {hole_l1(loaded, held_out, held_masks):.4f}; reloaded export identical: {same}")


if __name__ == "__main__":
    main()
