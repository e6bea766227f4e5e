"""Images per second delivered by the grain input pipeline (host side only).

    python benchmarks/input_pipeline.py [--images 2048] [--batch 32] [--workers 0,2]

Generates a Market-1501-style fixture (`--images` training JPEGs at Market's
native 128x64, smooth random content so they decode like photos), prepares it
as TFDS array_record in a temporary folder, and times full passes of
`make_loader` at 256x128 (the paper's size) and 64x32 (the CPU configs' size),
for each worker count (augmentation runs on the device, not here). The first
batch (worker start-up) is excluded; each figure is the best of `--repeats`.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fedreid_jax.data import prepare, source
from fedreid_jax.input import grain_loader
from fedreid_jax.data.naming import format_market_name


def photo_like(rng: np.random.Generator, size=(128, 64)) -> Image.Image:
  """Smooth random colours plus mild noise: JPEG size/decoding like a crop photo."""
  small = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((size[1], size[0]), Image.BICUBIC), np.int16)
  img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
  return Image.fromarray(img)


def make_fixture(root: Path, num_images: int, seed: int = 0) -> Path:
  """`Market-1501-v15.09.15/` with `num_images` train images (8 per id)."""
  rng = np.random.default_rng(seed)
  base = root / "Market-1501-v15.09.15"
  for folder in ("bounding_box_train", "query", "bounding_box_test"):
    (base / folder).mkdir(parents=True, exist_ok=True)
  for i in range(num_images):
    pid, k = 2 + i // 8, i % 8
    photo_like(rng).save(base / "bounding_box_train" / format_market_name(pid, k % 6, i, k),
                         quality=90)
  for i in range(8):
    photo_like(rng).save(base / "query" / format_market_name(1, i % 6, i, 0), quality=90)
    photo_like(rng).save(base / "bounding_box_test" / format_market_name(1, (i + 1) % 6, i, 0),
                         quality=90)
  return base


def time_pass(split, size, batch, workers, repeats: int) -> float:
  """Best images/s over `repeats` full passes (first batch excluded)."""
  best = 0.0
  for r in range(repeats):
    it = iter(grain_loader.make_loader(split, image_size=size, batch_size=batch, seed=r,
                                       worker_count=workers))
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
      n += b["image"].shape[0]
    best = max(best, n / (time.perf_counter() - t0))
    it.close()
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=2048)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", default="0,2")
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  logging.basicConfig(level=logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    t0 = time.perf_counter()
    make_fixture(tmp / "raw", args.images)
    prepare.prepare("market1501", tmp / "raw", tmp / "tfds")
    print(f"fixture: {args.images} JPEGs 128x64, prepared in {time.perf_counter() - t0:.1f} s; "
          f"{os.cpu_count()} CPU cores")
    split = source.load_prepared_client("market1501", tmp / "tfds").train
    print(f"{'size':>8s} {'workers':>7s} {'images/s':>9s}")
    for size in ((256, 128), (64, 32)):
      for workers in (int(w) for w in args.workers.split(",")):
        ips = time_pass(split, size, args.batch, workers, args.repeats)
        print(f"{size[0]:>4d}x{size[1]:<3d} {workers:>7d} {ips:>9.0f}")


if __name__ == "__main__":
  main()
