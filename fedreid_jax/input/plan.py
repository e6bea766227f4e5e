"""The batch order: which images form which batch, as a function of seeds only.

Every consumer (in-memory training, the streamed grain loader, the public
set) takes its batches from `batch_plan`, so whether images sit in memory or
stream from disk never changes a result.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MEASUREMENT_STREAM = 1  # seed word of the extra per-client measurement batch


def epoch_orders(num_examples: int, epochs: int, seed_words: Sequence[int],
                 shuffle: bool = True) -> list[np.ndarray]:
  """Per epoch the order of the N examples: a fresh permutation drawn from
  `default_rng(seed_words)` (or the identity). `epochs` x `[N]`."""
  rng = np.random.default_rng(list(seed_words))
  return [rng.permutation(num_examples) if shuffle else np.arange(num_examples)
          for _ in range(epochs)]


def batch_plan(num_examples: int, batch_size: int, epochs: int, seed_words: Sequence[int],
               shuffle: bool = True) -> np.ndarray:
  """`[epochs * (N // B), B]` int64 indices: `epoch_orders` cut into batches,
  last partial batch dropped."""
  per_epoch = num_examples // batch_size
  rows = [order[:per_epoch * batch_size].reshape(per_epoch, batch_size)
          for order in epoch_orders(num_examples, epochs, seed_words, shuffle)]
  if not rows:
    return np.zeros((0, batch_size), np.int64)
  return np.concatenate(rows, 0).astype(np.int64)


def client_plan(num_examples: int, batch_size: int, epochs: int, seed: int,
                round_index: int, client_id: int) -> np.ndarray:
  """A client's local-training batches of one round: `[steps, B]`, seeded by
  (seed, round, client), so independent of order, strategy and device count."""
  return batch_plan(num_examples, batch_size, epochs, (seed, round_index, client_id))


def measurement_row(num_examples: int, batch_size: int, seed: int, round_index: int,
                    client_id: int) -> np.ndarray:
  """One batch `[B]` of a client's own data for the round's client measurements
  (the first batch of a freshly shuffled pass, as the reference's CDW takes)."""
  return batch_plan(num_examples, batch_size, 1,
                    (seed, round_index, client_id, MEASUREMENT_STREAM))[0]


def leftover_rows(num_examples: int, batch_size: int, seed: int, round_index: int,
                  client_id: int) -> np.ndarray:
  """The rows `client_plan` drops (one epoch): the last partial batch `[N % B]`
  of the same permutation (the reference's KD keeps it)."""
  order = epoch_orders(num_examples, 1, (seed, round_index, client_id))[0]
  return order[num_examples // batch_size * batch_size:].astype(np.int64)


def num_steps(num_examples: int, batch_size: int, epochs: int) -> int:
  """Local steps of a client per round (drop last)."""
  return num_examples // batch_size * epochs
