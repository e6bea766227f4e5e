"""Model-size images from a `ReIDSplit`: the one read-and-resize path.

Prepared datasets offer a batched `read_resized` (one array_record call, JPEG
draft decoding); any other split is read image by image and resized with
`images.resize_bicubic`. Training (in memory or streamed) and evaluation all
read through `read_resized`, so an index always yields the same pixels.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from fedreid_jax.data.base import ReIDSplit
from fedreid_jax.data.images import resize_bicubic
from fedreid_jax.data.scenarios import Take


def read_resized(split: ReIDSplit, indices, size: tuple[int, int],
                 draft: bool = True) -> np.ndarray:
  """uint8 `[n, H, W, 3]`: `split`'s images `indices` at `size` (bicubic)."""
  read, idx = split.read_image, np.asarray(indices, np.int64)
  while isinstance(read, Take):  # subsets of a prepared split: read the parent in one call
    read, idx = read.read_image, read.indices[idx]
  if hasattr(read, "read_resized"):
    images = read.read_resized(idx, tuple(size), draft)
  else:
    images = [resize_bicubic(read(int(i)), tuple(size)) for i in idx]
  if not images:
    return np.zeros((0, *size, 3), np.uint8)
  return np.stack(images)


def load_images(split: ReIDSplit, size: tuple[int, int], desc: str = "",
                block: int = 256, threads: int = 8) -> np.ndarray:
  """Every image of `split` at `size`: uint8 `[N, H, W, 3]` (progress bar when long).
  Blocks of `block` images are read by `threads` threads (PIL's decode and
  resize release the GIL); each block's pixels do not depend on them."""
  out = np.zeros((len(split), *size, 3), np.uint8)
  starts = range(0, len(split), block)

  def read_block(start: int) -> None:
    stop = min(start + block, len(split))
    out[start:stop] = read_resized(split, np.arange(start, stop), size)

  pool = ThreadPoolExecutor(max(1, threads))
  try:
    for _ in tqdm(pool.map(read_block, starts), total=len(starts), desc=desc or "decoding",
                  unit="block", leave=False, disable=True if len(starts) < 8 else None):
      pass
  finally:  # a bad image or a stop signal: the blocks not started are dropped
    pool.shutdown(wait=True, cancel_futures=True)
  return out
