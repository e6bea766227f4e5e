"""Host side of the input pipeline: round plans, fixed-shape chunks, prefetch.

The host delivers uint8 images already at the model's size; random crop/flip
and normalisation run on the device inside the compiled local step. A round's
data streams chunk by chunk (`[S, K, B, H, W, 3]`), prefetched in a background
thread while the device trains on the previous chunk.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from fedreid_jax.datasets.base import ReIDSplit


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of uint8 `[h, w, 3]` to `[H, W, 3]` (no-op when equal)."""
  if image.shape[:2] == tuple(size):
    return image
  pil = Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC)
  return np.asarray(pil, np.uint8)


def load_all(split: ReIDSplit, size: tuple[int, int]) -> np.ndarray:
  """Every image of a split at `size`: uint8 `[N, H, W, 3]`."""
  out = np.zeros((len(split), *size, 3), np.uint8)
  for i in range(len(split)):
    out[i] = resize(split.read_image(i), size)
  return out


@dataclasses.dataclass(frozen=True)
class ClientPlan:
  """One client's batches this round: `indices [steps, B]` into its train split."""
  client_id: int
  indices: np.ndarray


def client_plan(num_examples: int, batch_size: int, epochs: int, seed: int,
                round_index: int, client_id: int) -> ClientPlan:
  """Shuffled, drop-last batches for `epochs` local epochs, seeded by
  (seed, round, client) so it does not depend on order or device count."""
  rng = np.random.default_rng([seed, round_index, client_id])
  per_epoch = num_examples // batch_size
  batches = [rng.permutation(num_examples)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
             for _ in range(epochs)]
  return ClientPlan(client_id, np.concatenate(batches, 0).astype(np.int64))


def num_chunks(plans: Sequence[ClientPlan], chunk_steps: int) -> int:
  longest = max(len(p.indices) for p in plans)
  return max(1, -(-longest // chunk_steps))


def padding_waste(plans: Sequence[ClientPlan], chunk_steps: int) -> float:
  """Processed step slots / useful steps (1.0 = no padding)."""
  useful = sum(len(p.indices) for p in plans)
  processed = len(plans) * num_chunks(plans, chunk_steps) * chunk_steps
  return processed / max(useful, 1)


class TrainImages:
  """A client's training images, from memory (`[N, H, W, 3]`) or read lazily."""

  def __init__(self, split: ReIDSplit, size: tuple[int, int], in_memory: bool):
    self.split, self.size = split, tuple(size)
    self.array = load_all(split, size) if in_memory else None
    self.labels = np.asarray(split.pids, np.int32)

  def gather(self, indices: np.ndarray) -> np.ndarray:
    if self.array is not None:
      return self.array[indices]
    return np.stack([resize(self.split.read_image(int(i)), self.size) for i in indices])


def build_chunk(sources: Sequence[TrainImages], plans: Sequence[ClientPlan], chunk: int,
                chunk_steps: int, batch_size: int):
  """Chunk `chunk` of a round: images `[S, K, B, H, W, 3]`, labels `[S, K, B]`, mask `[S, K]`."""
  h, w = sources[0].size
  s = len(plans)
  images = np.zeros((s, chunk_steps, batch_size, h, w, 3), np.uint8)
  labels = np.zeros((s, chunk_steps, batch_size), np.int32)
  mask = np.zeros((s, chunk_steps), bool)
  for lane, plan in enumerate(plans):
    src = sources[plan.client_id]
    steps = plan.indices[chunk * chunk_steps:(chunk + 1) * chunk_steps]
    for k, idx in enumerate(steps):
      images[lane, k] = src.gather(idx)
      labels[lane, k] = src.labels[idx]
      mask[lane, k] = True
  return images, labels, mask


def round_chunks(sources, plans, chunk_steps: int, batch_size: int,
                 prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields the round's chunks in order, building up to `prefetch` ahead in a thread."""
  total = num_chunks(plans, chunk_steps)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = [pool.submit(build_chunk, sources, plans, c, chunk_steps, batch_size)
               for c in range(min(prefetch, total))]
    for c in range(total):
      result = pending.pop(0).result()
      nxt = c + len(pending) + 1
      if nxt < total:
        pending.append(pool.submit(build_chunk, sources, plans, nxt, chunk_steps, batch_size))
      yield result
