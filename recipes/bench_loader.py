"""Benchmark the training data pipeline: images/s at 256×256 through a DataLoader.

Writes image files made from the bundled sample photos to a temporary folder (by default 256×256 JPEGs,
the format of the Places2 training images the paper uses; ``--format png --source-size 512`` is a heavier
decode), then times
``InpaintingDataset(ImageFolder(..., crop="random"), FreeFormMasks())`` through a
``torch.utils.data.DataLoader`` (decode, random crop, free-form mask, collate).

    python recipes/bench_loader.py --workers 2 --size 256 --batch-size 8 --epochs 3
    python recipes/bench_loader.py --step-flops          # also: what a training step can consume at most
    python recipes/bench_loader.py --step-time           # also: time a real training step (on a GPU if any)

``--step-flops`` counts the floating-point operations of one training step of the reference recipe per
image (Net8 at width 64, the T=2 theta steps of Algorithm 1 on the GMCNN + style + adversarial + distillation
loss, and the discriminator step) with ``torch.utils.flop_counter``, and divides a GPU's peak throughput by
it. The count is low on purpose: the counter sees convolutions and matrix products only (no element-wise
work), and the Reverse-HG hypergradient, which only adds work, is left out (``meta.mode`` frozen; the
unrolled pass at 256×256 needs more memory than a small machine has). So no training step on that GPU can
consume more images per second than the printed bound, at any utilisation; the loader keeps up when its
images/s exceed it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdinpaint.data import FreeFormMasks, ImageFolder, InpaintingDataset, sample_images
from kdinpaint.inference.timing import median_seconds


def write_images(folder: Path, count: int, size: int, fmt: str = "jpg") -> None:
    images = sample_images(size, count)  # (N, 3, S, S) in [-1, 1]
    arrays = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, arr in enumerate(arrays):
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{i:04d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))


GPU_PEAK_TFLOPS = {"H100 SXM, dense TF32 (fp32 training)": 494.7, "H100 SXM, dense BF16 (mixed precision)": 989.4}


def reference_step(size: int, batch: int, mode: str, device: torch.device) -> Callable[[], None]:
    """One training step of the reference recipe (Net8, width 64): an Algorithm 1 block of T=2 theta steps
    (``mode`` for Psi) on GMCNN + style + adversarial + distillation, then a discriminator step."""
    import kdinpaint
    from kdinpaint.train.bilevel import MetaLearner
    from kdinpaint.losses.adversarial import PatchDiscriminator, discriminator_loss, generator_adv_loss
    from kdinpaint.losses.reconstruction import spatially_varying_l1
    from kdinpaint.losses.style import VGGStyleLoss
    from kdinpaint.masking import composite, masked

    adapter = kdinpaint.get_adapter("reference")
    student, teacher = adapter.student(None, width=64), adapter.teacher(None, width=64)
    kd = kdinpaint.attach(student, teacher, adapter.spec.variant(None)).to(device)
    style = VGGStyleLoss("pconv", weights=None, allow_random=True).to(device)  # random weights: cost is the same
    disc = PatchDiscriminator().to(device)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.0, 0.9))

    def inpaint_loss(pred, target, mask):
        return (spatially_varying_l1(pred, target, mask) + 150 * style(pred, target, mask)["style"]
                + 0.1 * generator_adv_loss(disc(composite(pred, target, mask))[0]))

    theta = [*student.parameters(), *kd.student_parameters()]
    learner = MetaLearner(kd, torch.optim.Adam(theta, lr=1e-4), inpaint_loss, mode=mode, steps=2)
    image = (torch.rand(batch, 3, size, size) * 2 - 1).to(device)
    hole = FreeFormMasks().sample(np.random.default_rng(0), (size, size))  # (H, W), 1 = hole
    mask = torch.from_numpy(np.asarray(hole, dtype=np.float32)).expand(batch, 1, size, size).contiguous().to(device)

    def step() -> None:
        learner.step((masked(image, mask), mask), image)
        fake = composite(learner.last_output, image, mask)
        d_loss = discriminator_loss(disc(image)[0], disc(fake)[0])
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()

    return step


def step_flops(size: int, batch: int = 1) -> float:
    """FLOPs per image of one reference-recipe training step without the hypergradient (``meta.mode``
    frozen): a lower bound of the full Algorithm 1 block."""
    from torch.utils.flop_counter import FlopCounterMode

    step = reference_step(size, batch, "frozen", torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch


def step_images_per_second(size: int, batch: int, device: torch.device, repeats: int = 3) -> float:
    """Images/s one reference-recipe training step (Reverse-HG) consumes on ``device``, median of ``repeats``."""
    step = reference_step(size, batch, "reverse_hg", device)
    return batch / median_seconds(step, device, repeats, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=256, help="side of the images written to disk")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"], help="file format of those images")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crop", default="random", choices=["random", "center", "resize"])
    parser.add_argument("--step-flops", action="store_true", help="also bound what a GPU training step consumes")
    parser.add_argument("--step-time", action="store_true", help="also time a reference training step on --device")
    parser.add_argument("--step-batch", type=int, default=6, help="batch of the timed step (the paper's: 6)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder, args.images, args.source_size, args.format)
        dataset = InpaintingDataset(ImageFolder(folder, size=args.size, crop=args.crop), FreeFormMasks())
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            drop_last=True,
        )
        for _ in loader:  # warm-up epoch: worker start-up, page cache
            pass
        count, start = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch in loader:
                count += batch["image"].shape[0]
        elapsed = time.perf_counter() - start
    print(
        f"{count / elapsed:.1f} images/s at {args.size}x{args.size} "
        f"({args.workers} workers, batch {args.batch_size}, crop={args.crop}, "
        f"{args.source_size}x{args.source_size} {args.format.upper()} sources, {count} images in {elapsed:.2f} s)"
    )

    if args.step_flops:
        flops = step_flops(args.size)
        print(f"reference training step (Net8, width 64, T=2 theta steps + D, no hypergradient): at least {flops / 1e12:.2f} TFLOP per image at {args.size}x{args.size}")
        for name, peak in GPU_PEAK_TFLOPS.items():
            bound = peak * 1e12 / flops
            verdict = "keeps up" if count / elapsed > bound else "may be the bottleneck"
            print(f"  {name}: at most {bound:.1f} images/s even at 100 % of peak -> the loader {verdict}")
    if args.step_time:
        device = torch.device(args.device)
        rate = step_images_per_second(args.size, args.step_batch, device)
        verdict = "keeps up" if count / elapsed > rate else "is the bottleneck"
        print(f"reference training step (Net8, width 64, reverse_hg T=2, batch {args.step_batch}) on {device}: "
              f"{rate:.1f} images/s -> the loader {verdict}")


if __name__ == "__main__":
    main()