"""Benchmark the training data pipeline: images/s at 256×256 through a DataLoader.

Writes PNGs made from the bundled sample photos (512×512 crops) to a temporary folder, then times
``InpaintingDataset(ImageFolder(..., crop="random"), FreeFormMasks())`` through a
``torch.utils.data.DataLoader`` (decode, random crop, free-form mask, collate).

    python recipes/bench_loader.py --workers 2 --size 256 --batch-size 8 --epochs 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdinpaint.data import FreeFormMasks, ImageFolder, InpaintingDataset, sample_images


def write_pngs(folder: Path, count: int, size: int) -> None:
    images = sample_images(size, count)  # (N, 3, S, S) in [-1, 1]
    arrays = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, arr in enumerate(arrays):
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=512, help="side of the PNGs written to disk")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crop", default="random", choices=["random", "center", "resize"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_pngs(folder, args.images, args.source_size)
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
        f"{args.source_size}x{args.source_size} PNG sources, {count} images in {elapsed:.2f} s)"
    )


if __name__ == "__main__":
    main()
