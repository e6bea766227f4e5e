"""Benchmarks by name. `load(config.data, seed)` -> (clients, public set)."""
from __future__ import annotations

from typing import Callable

from fedreid_jax.datasets.base import ClientData, ReIDSplit


def _synthetic(data_cfg, seed: int):
  from fedreid_jax.datasets import synthetic
  return synthetic.load_synthetic_benchmark(data_cfg.root, seed=seed,
                                            image_size=tuple(data_cfg.image_size))


def _fedreid(data_cfg, seed: int):
  """The nine real datasets, prepared with `python -m fedreid_jax.data prepare`."""
  from fedreid_jax.data import source
  names = list(data_cfg.clients) or list(source.CLIENT_DATASETS)
  clients = [source.load_prepared_client(n, data_cfg.root, seed=seed) for n in names]
  return clients, source.load_public(data_cfg.root)


_BENCHMARKS: dict[str, Callable] = {"synthetic": _synthetic, "fedreid": _fedreid}


def names() -> tuple[str, ...]:
  return tuple(_BENCHMARKS)


def load(data_cfg, seed: int) -> tuple[list[ClientData], ReIDSplit | None]:
  """Clients (filtered by `data_cfg.clients` when set) and the public set."""
  if data_cfg.name not in _BENCHMARKS:
    raise ValueError(f"unknown dataset {data_cfg.name!r}; choose one of {list(_BENCHMARKS)}")
  clients, public = _BENCHMARKS[data_cfg.name](data_cfg, seed)
  wanted = list(data_cfg.clients)
  if wanted:
    known = [c.name for c in clients]
    missing = [w for w in wanted if w not in known]
    if missing:
      raise ValueError(f"config.data.clients names unknown clients {missing}; "
                       f"{data_cfg.name} has {known}")
    clients = [c for c in clients if c.name in wanted]
  return clients, public
