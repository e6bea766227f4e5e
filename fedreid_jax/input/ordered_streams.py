"""Clients' training streams read by one loader, one client after another.

    ahead = OrderedStreams(inputs, [(0, 2), (0, 5), (1, 2), (1, 5)])  # (round, client)
    for batch in ahead.stream(0, 2): ...   # then ahead.stream(0, 5), ahead.stream(1, 2), ...

The `serial` strategy trains a round's clients one after another, each to its
last batch. Streamed from files, one grain loader can then read all of them,
and the rounds after: one start-up (and one spawn of worker processes) for a
whole run instead of one per client, and reading runs ahead across clients
and rounds. The batches are each client's `plan.client_plan` rows, the same
as a loader per client reads; reading out of the announced order raises.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np

from fedreid_jax.input import grain_loader, plan as plan_lib

Batch = dict  # {"image": uint8 [B, H, W, 3], "label": int32 [B]}


@functools.lru_cache(maxsize=64)
def _client_plan(n: int, batch: int, epochs: int, seed: int, round_index: int,
                 client: int) -> np.ndarray:
  return plan_lib.client_plan(n, batch, epochs, seed, round_index, client)


@dataclasses.dataclass(frozen=True)
class ScheduleReader:
  """Step -> its batch in a schedule of (round, client) parts (picklable).
  `starts` `[P]`: each part's first step; a part's plan `[steps, B]` is
  computed when first read (and cached), so a long schedule stays small."""
  readers: tuple[grain_loader.BatchReader, ...]  # one per client
  batch_size: int
  epochs: int
  seed: int
  rounds: np.ndarray
  clients: np.ndarray
  starts: np.ndarray

  def __call__(self, step) -> dict[str, np.ndarray]:
    step = int(step)
    part = int(np.searchsorted(self.starts, step, side="right")) - 1
    client = int(self.clients[part])
    reader = self.readers[client]
    rows = _client_plan(len(reader.split), self.batch_size, self.epochs, self.seed,
                        int(self.rounds[part]), client)
    return reader(rows[step - int(self.starts[part])])


class OrderedStreams:
  """One loader over the (round, client) streams of `schedule`, in that order.
  `inputs`: the `TrainInput` whose splits, batch order and loader settings
  are read."""

  def __init__(self, inputs, schedule: Sequence[tuple[int, int]]):
    self.inputs = inputs
    self.parts = [(int(r), int(c)) for r, c in schedule if inputs.num_steps(int(c))]
    counts = [inputs.num_steps(c) for _, c in self.parts]
    self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [P + 1]
    self.part, self.position, self._it = 0, 0, None

  @property
  def total(self) -> int:
    return int(self.starts[-1])

  def at_round(self, round_index: int, clients: Sequence[int]) -> bool:
    """Whether the next batches are these clients' of `round_index`, from their first."""
    wanted = [(round_index, c) for c in clients if self.inputs.num_steps(c)]
    return (self.position == self.starts[self.part] and
            self.parts[self.part:self.part + len(wanted)] == wanted)

  def _loader(self):
    if self._it is None:  # opened at the first batch asked for: streams are lazy
      inputs = self.inputs
      reader = ScheduleReader(
          tuple(grain_loader.BatchReader(s, inputs.size) for s in inputs.splits),
          inputs.batch_size, inputs.epochs, inputs.seed,
          np.array([r for r, _ in self.parts], np.int64),
          np.array([c for _, c in self.parts], np.int64), self.starts[:-1])
      self._it = iter(grain_loader.make_steps_loader(
          reader, np.arange(self.total), worker_count=inputs.loader_workers,
          num_threads=inputs.loader_threads, prefetch=max(4, inputs.loader_threads)))
    return self._it

  def close(self) -> None:
    """Stops the loader (threads, worker processes); nothing more is read."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it, self.position = None, self.total

  def where(self) -> str:
    """The (round, client) whose batch is next, in words."""
    if self.position >= self.total:
      return "nothing (all read or stopped)"
    r, c = self.parts[self.part]
    return f"round {r + 1}, {self.inputs.names[c]}"

  def stream(self, round_index: int, client: int) -> Iterator[Batch]:
    """The client's batches of the round; raises unless the loader is at them."""
    key = (round_index, client)
    try:
      for _ in range(self.inputs.num_steps(client)):
        if self.position >= self.total or self.parts[self.part] != key:
          raise RuntimeError(
              f"round {round_index + 1}, {self.inputs.names[client]}: training batches "
              f"asked for while the shared loader is at {self.where()}: streams read by "
              "one loader must be read in order, each to its end")
        batch = next(self._loader())
        self.position += 1
        if self.position == self.starts[self.part + 1]:
          self.part += 1
        if self.position == self.total:
          self.close()  # every batch is out: stop the loader's threads and processes
        yield {"image": batch["image"], "label": batch["label"]}
    finally:
      if (self.position < self.total and self.parts[self.part] == key
          and self.position > self.starts[self.part]):
        self.close()  # a client stopped part-way: nothing after it is read
