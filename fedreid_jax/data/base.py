"""The data interface every dataset (synthetic or real) hands to the engine.

A dataset yields records `(image, pid, camid)`; the engine sees, per client, a
`ClientData` with three `ReIDSplit`s. Images are read lazily by index, so a
split may be an in-memory array (synthetic), a folder of files, or a
`tfds.data_source` (real data).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

JUNK_PID = -1


@dataclasses.dataclass(frozen=True)
class ReIDSplit:
  """One split of one dataset.

  Attributes:
    read_image: index -> uint8 image `[H, W, 3]` (any size; the pipeline resizes).
    pids: `[N]` int32 person ids (train: relabelled 0..C-1; test: original ids,
      -1 = junk).
    camids: `[N]` int32 camera ids, 0-based.
    names: `[N]` file names (for error messages and debugging).
  """
  read_image: Callable[[int], np.ndarray]
  pids: np.ndarray
  camids: np.ndarray
  names: Sequence[str] = ()

  def __len__(self) -> int:
    return int(self.pids.shape[0])

  def read_batch(self, indices: Sequence[int]) -> list[np.ndarray]:
    return [self.read_image(int(i)) for i in indices]


@dataclasses.dataclass(frozen=True)
class ClientData:
  """What one federated client holds: its training split and its test splits."""
  name: str
  train: ReIDSplit
  query: ReIDSplit
  gallery: ReIDSplit
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_train_ids(self) -> int:
    return int(self.train.pids.max()) + 1 if len(self.train) else 0


def relabel(pids: np.ndarray) -> np.ndarray:
  """Maps arbitrary training ids to 0..C-1 in sorted order. `[N] -> [N]`."""
  _, labels = np.unique(pids, return_inverse=True)
  return labels.astype(np.int32)


def split_from_arrays(images: np.ndarray, pids, camids, names=()) -> ReIDSplit:
  """A split backed by an in-memory uint8 array `[N, H, W, 3]`."""
  return ReIDSplit(read_image=images.__getitem__,
                   pids=np.asarray(pids, np.int32),
                   camids=np.asarray(camids, np.int32),
                   names=tuple(names))
