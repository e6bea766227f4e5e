"""Host side of the input pipeline: round plans, fixed-shape chunks, prefetch.

The host delivers uint8 images already at the model's size; random crop/flip
and normalisation run on the device inside the compiled local step. A round's
data streams chunk by chunk (`[S, K, B, H, W, 3]`), prefetched in a background
thread while the device trains on the previous chunk.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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


def lane_pieces(num_steps: int, chunk_steps: int) -> list[tuple[int, int]]:
  """`serial`: (start, length) pieces of one client's steps: full chunks of K,
  then single steps (two compiled shapes, no padded step)."""
  full = num_steps // chunk_steps * chunk_steps
  return ([(s, chunk_steps) for s in range(0, full, chunk_steps)]
          + [(s, 1) for s in range(full, num_steps)])


def padding_waste(plans: Sequence[ClientPlan], chunk_steps: int, serial: bool = False) -> float:
  """Processed step slots / useful steps (1.0 = no padding)."""
  useful = sum(len(p.indices) for p in plans)
  if serial:
    return 1.0
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


def build_piece(source: TrainImages, plan: ClientPlan, start: int, length: int):
  """`serial`: images `[k, B, H, W, 3]`, labels `[k, B]` for steps start..start+k."""
  idx = plan.indices[start:start + length]
  return np.stack([source.gather(i) for i in idx]), source.labels[idx]


def prefetched(tasks: Sequence, ahead: int = 2) -> Iterator:
  """Runs the thunks in order in a background thread, `ahead` in advance."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = [pool.submit(t) for t in tasks[:ahead]]
    for i in range(len(tasks)):
      result = pending.pop(0).result()
      if i + ahead < len(tasks):
        pending.append(pool.submit(tasks[i + ahead]))
      yield result


def round_chunks(sources, plans, chunk_steps: int, batch_size: int) -> Iterator:
  """Lockstep strategies: the round's chunks (images, labels, mask), prefetched."""
  tasks = [functools.partial(build_chunk, sources, plans, c, chunk_steps, batch_size)
           for c in range(num_chunks(plans, chunk_steps))]
  return prefetched(tasks)


def grain_serial_pieces(sources, plans, chunk_steps: int, batch_size: int, epochs: int,
                        seed: int, round_index: int, threads: int, workers: int) -> Iterator:
  """`serial` on data read lazily (real datasets): each client's batches come
  from a grain loader (parallel decode + bicubic resize, prefetch) seeded by
  (seed, round, client), grouped into pieces of K then single steps."""
  from fedreid_jax.data import grain_loader
  for lane, plan in enumerate(plans):
    src = sources[plan.client_id]
    client_seed = int(np.random.SeedSequence([seed, round_index, plan.client_id]).generate_state(1)[0])
    batches = iter(grain_loader.make_loader(
        src.split, image_size=src.size, batch_size=batch_size, seed=client_seed,
        num_epochs=epochs, worker_count=workers, num_threads=threads))
    for _, length in lane_pieces(len(plan.indices), chunk_steps):
      piece = [next(batches) for _ in range(length)]
      yield (lane, np.stack([b["image"] for b in piece]), np.stack([b["label"] for b in piece]))


def serial_pieces(sources, plans, chunk_steps: int) -> Iterator:
  """`serial`: (lane, images `[k, B, ...]`, labels `[k, B]`) client after client, prefetched."""
  tasks = [functools.partial(lambda lane, *a: (lane, *build_piece(*a)), lane,
                             sources[plan.client_id], plan, start, length)
           for lane, plan in enumerate(plans)
           for start, length in lane_pieces(len(plan.indices), chunk_steps)]
  return prefetched(tasks)
