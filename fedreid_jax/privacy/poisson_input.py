"""DP-SGD's Poisson batches, padded to one shape (nothing recompiles).

    inputs = PoissonInput(splits, unit="image", images_per_identity=4, image_size=...,
                          batch_size=32, epochs=1, seed=0, in_memory=True)
    batch = next(inputs.stream(client, round_index))
    batch["image"]  # uint8 [U * m, H, W, 3]; batch["label"]: int32 [U * m], -1 = padding

Each step samples every unit independently: an image with rate
q = B / n (`unit="image"`, m = 1), or a person with rate
q = B / (m * n_ids) (`unit="identity"`, m = `images_per_identity`), each
sampled person bringing at most m of its images (drawn at random), in m
consecutive slots. The padded shape holds U = `capacity(B / m)` units, the
expected count plus 4 standard deviations: a step that samples more (about
3e-5 of steps) keeps a random U of them (a truncated Poisson sample; the
count is logged). A client runs round(epochs / q) steps per round.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from fedreid_jax.input.train_input import TrainInput

PAD = -1  # the label of an empty slot
SALT = 0xD95


def capacity(expected_units: float) -> int:
  """Units a padded batch holds: the expected count + 4 std (Poisson), + 1."""
  return int(math.ceil(expected_units + 4 * math.sqrt(expected_units))) + 1


def truncate(rng: np.random.Generator, units: np.ndarray, limit: int) -> np.ndarray:
  """`units` (sorted ids), at most `limit` of them chosen at random."""
  if len(units) <= limit:
    return units
  logging.warning("a Poisson batch drew %d units, above the padded %d: %d dropped",
                  len(units), limit, len(units) - limit)
  return np.sort(rng.choice(units, limit, replace=False))


def num_units(split, unit: str) -> int:
  """A split's protected units: its images, or its identities."""
  return len(split.pids) if unit == "image" else len(np.unique(split.pids))


def sampling_rate(units: int, batch_size: int, per_unit: int) -> float:
  """q = B / (m n_units), at most 1."""
  return min(1.0, batch_size / (per_unit * units))


def steps_per_round(rate: float, epochs: int) -> int:
  """Noisy steps a client runs each round it is selected: round(epochs / q)."""
  return max(1, round(epochs / rate))


class PoissonInput(TrainInput):
  """`TrainInput` whose round plans are padded Poisson batches (in memory)."""

  def __init__(self, splits, *, unit: str, images_per_identity: int, **kw):
    super().__init__(splits, **kw)
    self.unit = unit
    self.per_unit = images_per_identity if unit == "identity" else 1
    self.units = capacity(self.batch_size / self.per_unit)  # U: same for every client

  def rate(self, client: int) -> float:
    """q: each unit's chance of joining a step."""
    return sampling_rate(num_units(self.splits[client], self.unit), self.batch_size,
                         self.per_unit)

  def num_steps(self, client: int) -> int:
    return steps_per_round(self.rate(client), self.epochs)

  def plan(self, client: int, round_index: int) -> np.ndarray:
    """`[steps, U * m]` rows of the client's Poisson batches, `PAD` in empty slots."""
    rng = np.random.default_rng([self.seed, round_index, client, SALT])
    pids = np.asarray(self.splits[client].pids)
    ids = np.unique(pids)
    rows = np.full((self.num_steps(client), self.units * self.per_unit), PAD, np.int64)
    q = self.rate(client)
    for step in range(rows.shape[0]):
      if self.unit == "image":
        drawn = truncate(rng, np.flatnonzero(rng.uniform(size=len(pids)) < q), self.units)
        rows[step, :len(drawn)] = drawn
        continue
      drawn = truncate(rng, ids[rng.uniform(size=len(ids)) < q], self.units)
      for slot, pid in enumerate(drawn):
        own = np.flatnonzero(pids == pid)
        take = rng.choice(own, min(len(own), self.per_unit), replace=False)
        rows[step, slot * self.per_unit:slot * self.per_unit + len(take)] = take
    return rows

  def gather(self, client: int, rows: np.ndarray):
    """Images and labels of `rows`; an empty slot (`PAD`) is image 0 labelled `PAD`."""
    batch = super().gather(client, np.where(rows == PAD, 0, rows))
    batch["label"] = np.where(rows == PAD, PAD, batch["label"]).astype(np.int32)
    return batch
