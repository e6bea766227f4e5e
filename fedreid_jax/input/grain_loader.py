"""A grain input pipeline over a `ReIDSplit`: read, decode, resize, batch.

    loader = make_loader(client.train, image_size=(256, 128), batch_size=32, seed=0)
    for batch in loader:  # {"image": uint8 [B, H, W, 3], "label": [B], "camid": [B]}
      ...

- The batches are the rows of a batch plan (`plan.batch_plan`, or one you
  pass, e.g. `plan.client_plan`), in order: grain's threads and worker
  processes read ahead and return whole batches in plan order, so the output
  never depends on `worker_count` or threads.
- Images are read with `reader.read_resized` (for prepared datasets: one
  array_record call per batch, JPEG draft decoding, bicubic resize), exactly
  as the in-memory cache and evaluation read them.
- No augmentation or normalisation here: the engine does both on the device
  (`fedreid_jax.models.preprocess`), so there is one implementation of each.
- Worker processes (`worker_count > 0`) need a picklable split: prepared
  datasets and in-memory arrays are; absl flags are marked parsed here
  because grain's workers read them. Close the iterator (`it.close()`) when
  done early, so the workers stop at once. On the 2-core development machine
  threads alone (`worker_count=0`) deliver more than worker processes (see
  `benchmarks/input_pipeline.py`); processes pay off with more cores.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterable, Iterator

import grain
import numpy as np

from fedreid_jax.data.base import ReIDSplit
from fedreid_jax.input.plan import batch_plan
from fedreid_jax.input.reader import read_resized


@dataclasses.dataclass(frozen=True)
class BatchReader:
  """Plan row -> `{image [B, H, W, 3] uint8, label [B], camid [B]}` (picklable)."""
  split: ReIDSplit
  size: tuple[int, int]
  draft: bool = True

  def __call__(self, row: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": read_resized(self.split, row, self.size, self.draft),
            "label": np.asarray(self.split.pids[row], np.int32),
            "camid": np.asarray(self.split.camids[row], np.int32)}


def _mark_absl_flags_parsed() -> None:
  from absl import flags  # grain's worker processes read absl flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(split: ReIDSplit, *, image_size: tuple[int, int], batch_size: int,
                seed: int = 0, shuffle: bool = True, num_epochs: int = 1,
                plan: np.ndarray | None = None, worker_count: int = 0,
                num_threads: int = 4, prefetch: int = 4,
                jpeg_draft: bool = True) -> grain.IterDataset:
  """A grain dataset of fixed-shape batches over `split`, in plan order.

  Args:
    image_size: `(H, W)` of the emitted images.
    seed / shuffle / num_epochs: the plan `batch_plan(len(split), batch_size,
      num_epochs, (seed,), shuffle)`, used when `plan` is None.
    plan: `[steps, B]` indices to read instead (e.g. `plan.client_plan`).
    worker_count: grain worker processes (0: threads of this process only).
    num_threads / prefetch: reading threads and batches read ahead (per process).
    jpeg_draft: let libjpeg decode large JPEGs at a reduced scale before the
      bicubic resize (`images.decode_resized`; prepared datasets only).
  Returns:
    An iterable `grain.IterDataset` of `len(plan)` batches.
  Raises:
    ValueError: the split holds fewer images than one batch.
  """
  if len(split) < batch_size:
    raise ValueError(f"split of {len(split)} images is smaller than batch_size={batch_size}")
  if plan is None:
    plan = batch_plan(len(split), batch_size, num_epochs, (seed,), shuffle)
  return make_steps_loader(BatchReader(split, tuple(image_size), jpeg_draft),
                           np.asarray(plan, np.int64), worker_count=worker_count,
                           num_threads=num_threads, prefetch=prefetch)


def make_steps_loader(read_step, steps: np.ndarray, *, worker_count: int = 0,
                      num_threads: int = 4, prefetch: int = 4) -> grain.IterDataset:
  """`read_step(s)` (picklable; a batch) for each `s` of `steps` (e.g. plan rows,
  or step numbers), in that order, read ahead by `num_threads` threads in each
  of `worker_count` worker processes (0: this process only)."""
  ds = grain.MapDataset.source(steps).map(read_step)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  if worker_count:
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=prefetch))
  return it


def prefetch_to_device(batches: Iterable[dict], size: int = 2, sharding=None) -> Iterator[dict]:
  """Moves batches to the device `size` ahead in a background thread."""
  import jax  # only needed here
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def producer():
    try:
      for b in batches:
        q.put(jax.device_put(b, sharding) if sharding is not None else jax.device_put(b))
    except BaseException as e:  # surfaced in the consumer
      q.put(e)
    q.put(done)

  threading.Thread(target=producer, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
