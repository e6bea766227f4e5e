"""Federated scenarios built from `ClientData`: by dataset, by camera, by identity.

- Federated-by-dataset (the paper's default) is just a list of clients, one
  per dataset (`fedreid_jax.data.source.load_clients`).
- `by_camera`: one client per camera of one dataset (the paper: Market-1501,
  6 clients). Client k trains on the training images taken by camera k, with
  its ids relabelled 0..C_k-1 (an id seen by several cameras is in several
  clients, as in the reference's `split_camera_data.py`).
- `merged`: every client's training set in one (the centralised baseline),
  ids offset so that they stay distinct across datasets.
- `by_identity`: a dataset's training ids split into N clients (the paper:
  CUHK03-NP, 2 clients), seeded. Unlike the reference script (which drops the
  `n % N` leftover ids), every id goes to exactly one client; part sizes
  differ by at most one id.

Test sets (our choice): every client of a split dataset carries the parent
dataset's full query and gallery (the same `ReIDSplit` objects, no copy),
because the paper evaluates the global model on the dataset's standard test
set. `info["test_set"]` names that parent, so an evaluator can evaluate each
distinct test set once (`distinct_test_sets`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from fedreid_jax.data.base import JUNK_PID, ClientData, ReIDSplit, relabel
from fedreid_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Take:
  """`read_image` of a subset: local index -> parent's `read_image(indices[i])`.

  A plain class (not a lambda) so splits stay picklable for worker processes.
  """
  read_image: Callable[[int], np.ndarray]
  indices: np.ndarray

  def __call__(self, i: int) -> np.ndarray:
    return self.read_image(int(self.indices[i]))


def take(split: ReIDSplit, indices: Sequence[int], pids: np.ndarray | None = None) -> ReIDSplit:
  """The sub-split `split[indices]`; `pids` replaces its ids (e.g. relabelled)."""
  idx = np.asarray(indices, np.int64).reshape(-1)
  names = tuple(split.names[i] for i in idx) if len(split.names) else ()
  new_pids = split.pids[idx] if pids is None else np.asarray(pids, np.int32)
  return ReIDSplit(read_image=Take(split.read_image, idx),
                   pids=np.asarray(new_pids, np.int32).reshape(-1),
                   camids=np.asarray(split.camids[idx], np.int32).reshape(-1),
                   names=names)


def relabelled(split: ReIDSplit, indices: Sequence[int]) -> ReIDSplit:
  """`split[indices]` with junk dropped and ids relabelled 0..C-1."""
  idx = np.asarray(indices, np.int64).reshape(-1)
  idx = idx[split.pids[idx] != JUNK_PID]
  return take(split, idx, relabel(split.pids[idx]) if len(idx) else np.zeros(0, np.int32))


def _child(client: ClientData, name: str, train: ReIDSplit, **info) -> ClientData:
  merged = {k: v for k, v in client.info.items() if not k.startswith("num_")}
  merged.update(info, parent=client.name,
                test_set=client.info.get("test_set", client.name),
                num_train_ids=int(np.unique(train.pids).size),
                num_train_images=len(train))
  return ClientData(name=name, train=train, query=client.query,
                    gallery=client.gallery, info=merged)


def by_camera(client: ClientData) -> list[ClientData]:
  """One client per camera present in `client`'s training split.

  Client names are `<name>_c<k>` with the 1-based camera number of the file
  names (`market1501_c1` ... `market1501_c6`), in camera order.
  """
  cams = np.unique(client.train.camids)
  out = []
  for cam in cams:
    idx = np.flatnonzero(client.train.camids == cam)
    out.append(_child(client, f"{client.name}_c{int(cam) + 1}",
                      relabelled(client.train, idx), camera=int(cam)))
  return out


def by_identity(client: ClientData, num_clients: int, seed: int = 0) -> list[ClientData]:
  """`client`'s training ids shuffled (seeded) and split into `num_clients` parts.

  Client names are `<name>_part<k>` (1-based). Raises ConfigError when there
  are fewer training ids than clients.
  """
  if num_clients < 1:
    raise ConfigError(f"config.data.scenario_clients={num_clients} must be at least 1")
  ids = np.unique(client.train.pids[client.train.pids != JUNK_PID])
  if len(ids) < num_clients:
    raise ConfigError(f"{client.name} has {len(ids)} training ids, fewer than "
                     f"num_clients={num_clients}")
  shuffled = np.random.default_rng([seed, len(ids)]).permutation(ids)
  out = []
  for k, part in enumerate(np.array_split(shuffled, num_clients)):
    idx = np.flatnonzero(np.isin(client.train.pids, part))
    out.append(_child(client, f"{client.name}_part{k + 1}", relabelled(client.train, idx),
                      identity_part=k, identity_seed=seed))
  return out


@dataclasses.dataclass(frozen=True)
class Concat:
  """`read_image` of concatenated splits: global index -> (split, local index)."""
  readers: tuple[Callable[[int], np.ndarray], ...]
  starts: np.ndarray  # [K] first global index of each split

  def __call__(self, i: int) -> np.ndarray:
    k = int(np.searchsorted(self.starts, i, side="right")) - 1
    return self.readers[k](int(i - self.starts[k]))


def merged(clients: Sequence[ClientData], name: str = "centralised") -> ClientData:
  """One client training on every client's training split (ids of client k
  offset by the id counts of clients 0..k-1); its test splits are the first
  client's (the centralised baseline is evaluated on every client's own)."""
  sizes = np.array([len(c.train) for c in clients])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  offsets = np.cumsum([0] + [c.num_train_ids for c in clients])[:-1]
  train = ReIDSplit(
      read_image=Concat(tuple(c.train.read_image for c in clients), starts),
      pids=np.concatenate([c.train.pids + o for c, o in zip(clients, offsets)]).astype(np.int32),
      camids=np.concatenate([c.train.camids for c in clients]).astype(np.int32),
      names=tuple(n for c in clients for n in (c.train.names or [""] * len(c.train))))
  return ClientData(name, train, clients[0].query, clients[0].gallery,
                    info={"merged": [c.name for c in clients]})


def distinct_test_sets(clients: Sequence[ClientData]) -> list[ClientData]:
  """The first client of each distinct test set (evaluate these only once)."""
  seen, out = set(), []
  for c in clients:
    key = c.info.get("test_set", c.name)
    if key not in seen:
      seen.add(key)
      out.append(c)
  return out
