"""Evaluation that streams: test images read batch by batch, features on the device.

    tests = [StreamedTestSet.from_client(c, (256, 128)) for c in clients]
    cache = {}  # one per model: clients sharing a test set are embedded once
    metrics = evaluate_model(embed_fn, variables, tests[0], "standard", 256, cache=cache)

The in-memory path (`features.load_test_set`) decodes every query and
gallery image of every client into host memory first (MSMT17 alone is 93,820
images, 9.2 GB at 256x128; the nine datasets ~14.5 GB). Here a split is read
through the same `input.reader.read_resized`, `threads` batches ahead, each
batch embedded as soon as it is read by the same `features.embed_batches`;
only the `[N, E]` features accumulate, on the device. Same batches, same
compiled function: the features equal the in-memory ones bit for bit.

Clients that share a test set (the by-camera and by-identity scenarios:
`ClientData.info["test_set"]`) carry the same `key`; `evaluate_model` with a
`cache` computes each key's metrics once per model.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Iterator

import jax
import numpy as np

from fedreid_jax import hosts
from fedreid_jax.data.base import ClientData, ReIDSplit
from fedreid_jax.evaluation.features import embed_batches, extra_metrics
from fedreid_jax.input.reader import read_resized


@dataclasses.dataclass(frozen=True)
class SplitImages:
  """A split's images at `size`, read on indexing only: `images[idx]` ->
  uint8 `[*idx.shape, H, W, 3]` (retrieval examples read a few this way)."""
  split: ReIDSplit
  size: tuple[int, int]

  def __len__(self) -> int:
    return len(self.split)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.split), *self.size, 3)

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.arange(len(self.split))[idx] if isinstance(idx, slice) else np.asarray(idx)
    flat = read_resized(self.split, idx.reshape(-1), self.size)
    return flat.reshape(*idx.shape, *self.size, 3)


@dataclasses.dataclass(frozen=True)
class StreamedTestSet:
  """A client's query and gallery, not decoded; `key` names the test set."""
  name: str
  key: str
  query: ReIDSplit
  gallery: ReIDSplit
  size: tuple[int, int]

  @classmethod
  def from_client(cls, client: ClientData, size: tuple[int, int]) -> "StreamedTestSet":
    return cls(client.name, client.info.get("test_set", client.name), client.query,
               client.gallery, tuple(size))

  query_pids = property(lambda self: self.query.pids)
  gallery_pids = property(lambda self: self.gallery.pids)
  query_cams = property(lambda self: self.query.camids)
  gallery_cams = property(lambda self: self.gallery.camids)
  query_images = property(lambda self: SplitImages(self.query, self.size))
  gallery_images = property(lambda self: SplitImages(self.gallery, self.size))


def read_batches(split: ReIDSplit, size: tuple[int, int], batch_size: int,
                 threads: int = 4) -> Iterator[np.ndarray]:
  """The split's images in order, uint8 `[<=B, H, W, 3]` batches, read by
  `threads` threads at most `threads` batches ahead of the consumer."""
  starts = range(0, len(split), batch_size)
  threads = max(1, threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending: collections.deque = collections.deque()
    for start in starts:
      rows = np.arange(start, min(start + batch_size, len(split)))
      pending.append(pool.submit(read_resized, split, rows, size))
      if len(pending) > threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def split_features(embed_fn, variables, split: ReIDSplit, size: tuple[int, int],
                   batch_size: int, threads: int = 4) -> jax.Array:
  """Features `[N, E]` of every image of `split`, read and embedded batch by batch."""
  return embed_batches(embed_fn, variables, read_batches(split, size, batch_size, threads),
                       batch_size, (*size, 3))


def evaluate_model(embed_fn, variables, test: StreamedTestSet, protocol: str, batch_size: int,
                   examples_path: str | None = None, cache: dict | None = None,
                   threads: int = 4, options=None) -> dict:
  """rank1/5/10, mAP, mINP of one model on `test`, streamed; with `cache` (one
  dict per model), a test set already scored under the same `key` is not
  embedded again. `examples_path`: also save retrieval examples there.
  `options` (`config.eval`): also re-ranked / AQE metrics
  (`features.extra_metrics`; re-ranking holds no `Q x G` matrix either)."""
  from fedreid_jax.evaluation.retrieval import evaluate_features
  variables = hosts.local_copy(variables)  # one device, not every device of a mesh
  hit = cache.get(test.key) if cache is not None else None
  feats = hit[1] if hit else None
  if hit is None or (examples_path and feats is None):
    feats = tuple(split_features(embed_fn, variables, s, test.size, batch_size, threads)
                  for s in (test.query, test.gallery))
  metrics = hit[0] if hit else {**evaluate_features(
      *feats, test.query_pids, test.gallery_pids, test.query_cams, test.gallery_cams,
      protocol=protocol), **extra_metrics(*feats, test, protocol, options)}
  if cache is not None:  # features are kept only while examples need them
    cache[test.key] = (metrics, feats if examples_path else None)
  if examples_path:
    from fedreid_jax.evaluation import retrieval_examples as examples_lib
    examples_lib.save_examples(examples_path, examples_lib.retrieval_examples(*feats, test))
  return dict(metrics)
