"""Each client's training batches for a round: one stream per client.

    inputs = TrainInput(splits, image_size=(64, 32), batch_size=32, epochs=1,
                        seed=0, in_memory=True)
    for batch in inputs.stream(client=3, round_index=0):  # `num_steps(3)` batches
      batch["image"]  # uint8 [B, H, W, 3]; batch["label"]: int32 [B]

The batches are the rows of `plan.client_plan(seed, round, client)` in both
modes: `in_memory=True` decodes every image once (`reader.load_images`) and
gathers rows from host memory; `in_memory=False` reads each row through a
grain loader (parallel decode + resize, prefetch). Both read pixels through
`reader.read_resized`, so the mode never changes a result. A stream knows
nothing of lanes or chunks: client execution strategies group its batches.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np

from fedreid_jax.data.base import ReIDSplit
from fedreid_jax.input import plan as plan_lib
from fedreid_jax.input.reader import load_images, read_resized

Batch = dict  # {"image": uint8 [B, H, W, 3], "label": int32 [B]}


class TrainInput:
  """Training batches of several splits (clients, or the server's public set)."""

  def __init__(self, splits: Sequence[ReIDSplit], *, image_size: tuple[int, int],
               batch_size: int, epochs: int, seed: int, in_memory: bool,
               loader_threads: int = 8, loader_workers: int = 0, names: Sequence[str] = ()):
    self.splits = list(splits)
    self.size = tuple(image_size)
    self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
    self.in_memory = in_memory
    self.loader_threads, self.loader_workers = loader_threads, loader_workers
    self.names = list(names) or [f"split {i}" for i in range(len(self.splits))]
    self._arrays: dict[int, np.ndarray] = {}
    self._ahead = None  # OrderedStreams of `schedule`, or of the last `in_order` round
    self._announced = False  # whether `_ahead` is `schedule`'s

  def num_steps(self, client: int) -> int:
    return plan_lib.num_steps(len(self.splits[client]), self.batch_size, self.epochs)

  def plan(self, client: int, round_index: int) -> np.ndarray:
    """`[steps, B]` indices of the client's batches this round."""
    return plan_lib.client_plan(len(self.splits[client]), self.batch_size, self.epochs,
                                self.seed, round_index, client)

  def leftover_rows(self, client: int, round_index: int) -> np.ndarray:
    """`[N % B]` rows of the client's first epoch that `plan` drops."""
    return plan_lib.leftover_rows(len(self.splits[client]), self.batch_size, self.seed,
                                  round_index, client)

  def images(self, client: int) -> np.ndarray:
    """The client's decoded training images `[N, H, W, 3]` (loaded on first use)."""
    if client not in self._arrays:
      self._arrays[client] = load_images(self.splits[client], self.size,
                                         desc=f"decoding {self.names[client]}")
    return self._arrays[client]

  def gather(self, client: int, rows: np.ndarray) -> Batch:
    """Images and labels of index array `rows` (`[B]`), from memory or disk."""
    split = self.splits[client]
    images = (self.images(client)[rows] if self.in_memory
              else read_resized(split, rows, self.size))
    return {"image": images, "label": np.asarray(split.pids[rows], np.int32)}

  def stream(self, client: int, round_index: int) -> Iterator[Batch]:
    """The client's batches of the round, in plan order (lazy: nothing is read
    before the first `next`)."""
    rows = self.plan(client, round_index)
    if self.in_memory:
      for row in rows:
        yield self.gather(client, row)
      return
    from fedreid_jax.input import grain_loader  # grain threads only when streaming
    it = iter(grain_loader.make_loader(
        self.splits[client], image_size=self.size, batch_size=self.batch_size, plan=rows,
        worker_count=self.loader_workers, num_threads=self.loader_threads,
        prefetch=max(4, self.loader_threads)))  # grain wants a buffer >= its threads
    try:
      for batch in it:
        yield {"image": batch["image"], "label": batch["label"]}
    finally:
      if hasattr(it, "close"):
        it.close()

  def streams(self, clients: Sequence[int | None], round_index: int,
              in_order: bool = False) -> list[Iterator[Batch] | None]:
    """`stream(c, round_index)` of each client (None where `clients` holds None).

    `in_order`: the consumer reads the clients one after another, every batch
    of one before the next (the `serial` strategy). Streamed from files, one
    loader then reads them all (`ordered_streams`): the one `schedule`
    announced, when this round is next in it, else one for this round. The
    batches are the same; reading out of that order raises.
    """
    if self.in_memory or not in_order:
      return [None if c is None else self.stream(c, round_index) for c in clients]
    from fedreid_jax.input.ordered_streams import OrderedStreams
    ids = [c for c in clients if c is not None]
    if self._ahead is None or not self._ahead.at_round(round_index, ids):
      if self._announced and self._ahead.position < self._ahead.total:
        logging.warning("round %d: the run's loader is at %s; this round and the later ones "
                        "get a loader each", round_index + 1, self._ahead.where())
      self.close()  # not what was announced: a loader for this round alone
      self._ahead = OrderedStreams(self, [(round_index, c) for c in ids])
    return [None if c is None else self._ahead.stream(round_index, c) for c in clients]

  def schedule(self, parts: Sequence[tuple[int, int]]) -> None:
    """Announces the (round, client) streams that `streams(..., in_order=True)`
    will ask for, in order (e.g. every round of a run): one loader then reads
    ahead through all of them, started (and its worker processes spawned)
    once. No effect in memory."""
    self.close()
    if not self.in_memory:
      from fedreid_jax.input.ordered_streams import OrderedStreams
      self._ahead, self._announced = OrderedStreams(self, parts), True

  def close(self) -> None:
    """Stops the loader of `schedule` or of the last `in_order` round, if any."""
    if self._ahead is not None:
      self._ahead.close()
    self._ahead, self._announced = None, False

  def measurement_batch(self, clients: Sequence[int], round_index: int,
                        batch_size: int | None = None) -> Batch:
    """One batch of each client's own data, stacked: image `[S, B, H, W, 3]`
    (B = `batch_size`, default the training batch size)."""
    batches = [self.measurement_one(c, round_index, batch_size) for c in clients]
    return {k: np.stack([b[k] for b in batches]) for k in ("image", "label")}

  def measurement_one(self, client: int, round_index: int, batch_size: int | None = None) -> Batch:
    """`measurement_batch` of one client: image `[B, H, W, 3]`, label `[B]`."""
    b = batch_size or self.batch_size
    return self.gather(client, plan_lib.measurement_row(
        len(self.splits[client]), b, self.seed, round_index, client))
