"""Prepared datasets as `ClientData`, read lazily through `tfds.data_source`.

Ids, cameras and file names come from the metadata stored at build time, so
loading touches no image; `read_image(i)` reads and decodes one record (PIL)
when asked. Readers are picklable (they reopen the array_record files in
each process), so splits can feed grain worker processes.

    client = load_prepared_client("market1501", "data/tfds")
    client.train.read_image(0)  # uint8 [H, W, 3] at original size
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from fedreid_jax.data import builders, layouts, prepare, specs, splits
from fedreid_jax.data.images import decode_image, decode_resized
from fedreid_jax.data.base import JUNK_PID, ClientData, ReIDSplit
from fedreid_jax.data.scenarios import relabelled
from fedreid_jax.errors import DatasetNotPrepared

TRAIN_SPLITS = ("train_all", "train")
CLIENT_DATASETS = specs.CLIENTS  # the nine clients, the paper's table order
PUBLIC_DATASET = specs.PUBLIC


NotPreparedError = DatasetNotPrepared  # the name tests and users know


class RecordReader:
  """Lazy, picklable reader of one built split: `reader(i)` -> uint8 `[H, W, 3]`."""

  def __init__(self, name: str, data_dir: str, split: str):
    self.name, self.data_dir, self.split = name, str(data_dir), split
    self._source, self._lock = None, threading.Lock()

  def _open(self):
    with self._lock:  # reading threads start together: one of them opens it
      if self._source is None:
        builder = builders.get_builder(self.name, self.data_dir)
        self._source = builder.as_data_source(
            self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):
    return {"name": self.name, "data_dir": self.data_dir, "split": self.split}

  def __setstate__(self, state):
    self.__dict__.update(state, _source=None, _lock=threading.Lock())

  def __len__(self) -> int:
    return len(self._open())

  def record(self, i: int) -> dict:
    """The raw record `{image: bytes, pid, camid, filename}`."""
    return self._open()[int(i)]

  def __call__(self, i: int) -> np.ndarray:
    return decode_image(self.record(i)["image"])

  def read_resized(self, indices, size: tuple[int, int], draft: bool = True
                   ) -> list[np.ndarray]:
    """Several images at `size`, read in one array_record call (faster)."""
    records = self._open().__getitems__([int(i) for i in indices])
    return [decode_resized(r["image"], size, draft) for r in records]


def _empty_split() -> ReIDSplit:
  def read(i):
    raise IndexError(f"index {i} out of range for an empty split")
  return ReIDSplit(read, np.zeros(0, np.int32), np.zeros(0, np.int32), ())


def _check_prepared(name: str, data_dir: str | Path) -> str:
  canonical = specs.resolve_name(name)
  if not builders.is_built(canonical, data_dir):
    raise NotPreparedError(
        f"dataset {canonical!r} is not prepared in {str(data_dir)!r} (no "
        f"{str(builders.build_path(canonical, data_dir))!r}); run:\n  "
        + prepare.prepare_command(canonical, data_dir))
  return canonical


def _split(builder, name: str, data_dir: str, split: str, first_digit_camera: bool) -> ReIDSplit:
  labels = builders.labels_of(builder, split)
  if split not in builder.info.splits:
    return _empty_split()
  n = builder.info.splits[split].num_examples
  if n != len(labels["pid"]):
    raise ValueError(f"{name}/{split}: {n} records but {len(labels['pid'])} stored "
                     "labels; rebuild it with prepare --overwrite")
  camids = labels["camid"]
  if first_digit_camera:
    camids = layouts.first_digit_camids(camids)
  return ReIDSplit(read_image=RecordReader(name, data_dir, split), pids=labels["pid"],
                   camids=camids, names=tuple(labels["filename"].tolist()))


def _reference_train(split: ReIDSplit, idx: np.ndarray, stored: dict, small: bool,
                     seed: int) -> np.ndarray:
  """Indices of the reference's `train` split: the one stored at build time
  for its seed, else drawn now (same rule, `splits.reference_train_split`)."""
  if stored.get("seed") == seed:
    val = set(stored["val_filenames"])
    return np.array([i for i in idx if split.names[i] not in val], np.int64)
  keep, _ = splits.reference_train_split(split.pids[idx], small=small, seed=seed)
  return idx[keep]


def load_prepared_client(name: str, data_dir: str | Path = prepare.DEFAULT_DATA_DIR, *,
                         train_split: str = "train_all", seed: int = 0,
                         first_digit_camera: bool = False) -> ClientData:
  """One prepared dataset as a federated client.

  Args:
    name: dataset name (any accepted spelling, see `specs.resolve_name`).
    data_dir: the `--data_dir` given to prepare.
    train_split: `train_all` (default, the full training split) or `train`
      (the reference's smaller split, `splits.reference_train_split`, seeded).
    seed: seed of the `train` split.
    first_digit_camera: the reference quirk (camera numbers cut to their first
      digit; changes MSMT17 only).
  Returns:
    `ClientData`: train ids relabelled 0..C-1 (junk never included), query and
    gallery with original ids (junk -1 and distractors kept), cameras 0-based.
  Raises:
    NotPreparedError: the message holds the prepare command to run.
  """
  if train_split not in TRAIN_SPLITS:
    raise ValueError(f"train_split={train_split!r}; choose one of {list(TRAIN_SPLITS)}")
  canonical = _check_prepared(name, data_dir)
  spec = specs.SPECS[canonical]
  builder = builders.get_builder(canonical, data_dir)
  data_dir = str(data_dir)
  parts = {s: _split(builder, canonical, data_dir, s, first_digit_camera)
           for s in layouts.SPLITS}
  train_all = parts["train_all"]
  idx = np.flatnonzero(train_all.pids != JUNK_PID)
  meta = builder.info.metadata
  if train_split == "train":
    idx = _reference_train(train_all, idx, meta.get("reference_train_split", {}),
                           spec.small, seed)
  train = relabelled(train_all, idx)
  info = dict(builders.built_counts(builder), dataset=canonical, title=spec.title,
              data_dir=data_dir, layout=meta.get("layout", ""),
              source=meta.get("source", ""), split_policy=meta.get("split", {}),
              train_split=train_split, seed=seed, first_digit_camera=first_digit_camera,
              num_train_ids=int(np.unique(train.pids).size), num_train_images=len(train))
  return ClientData(name=canonical, train=train, query=parts["query"],
                    gallery=parts["gallery"], info=info)


def load_clients(names: Sequence[str], data_dir: str | Path = prepare.DEFAULT_DATA_DIR,
                 **kwargs) -> list[ClientData]:
  """Federated-by-dataset: one client per name (all must be prepared).

  Raises:
    NotPreparedError: for the first missing dataset, listing every missing one
      with the command that prepares it.
  """
  missing = [n for n in names if not builders.is_built(specs.resolve_name(n), data_dir)]
  if missing:
    cmds = "\n  ".join(prepare.prepare_command(n, data_dir) for n in missing)
    raise NotPreparedError(f"dataset(s) {', '.join(missing)} not prepared in "
                           f"{str(data_dir)!r}; run:\n  {cmds}")
  return [load_prepared_client(n, data_dir, **kwargs) for n in names]


def load_public(data_dir: str | Path = prepare.DEFAULT_DATA_DIR,
                name: str = specs.PUBLIC) -> ReIDSplit:
  """The server's public set (CUHK02's `train_all`, ids relabelled 0..C-1)."""
  canonical = _check_prepared(name, data_dir)
  builder = builders.get_builder(canonical, data_dir)
  split = _split(builder, canonical, str(data_dir), "train_all", False)
  return relabelled(split, np.arange(len(split)))

