"""Benchmarks by name. `load(config.data, seed)` -> (clients, public set)."""
from __future__ import annotations

import logging
from typing import Callable

from fedreid_jax.errors import ConfigError, DatasetNotPrepared
from fedreid_jax.data.base import ClientData, ReIDSplit


def _synthetic(data_cfg, seed: int):
  from fedreid_jax.data import synthetic
  return synthetic.load_synthetic_benchmark(data_cfg.root, seed=seed,
                                            image_size=tuple(data_cfg.image_size))


def _fedreid(data_cfg, seed: int):
  """The nine real datasets, prepared with `python -m fedreid_jax.data prepare`.
  The public set (CUHK02) only KD needs: None, with a warning, when it is not
  prepared (a KD algorithm then stops before training)."""
  from fedreid_jax.data import source
  names = list(data_cfg.clients) or list(source.CLIENT_DATASETS)
  clients = source.load_clients(names, data_cfg.root)
  try:
    public = source.load_public(data_cfg.root)
  except DatasetNotPrepared as e:
    logging.warning("no public set (only the _kd algorithms need it): %s", e)
    public = None
  return clients, public


_BENCHMARKS: dict[str, Callable] = {"synthetic": _synthetic, "fedreid": _fedreid}
SCENARIOS = ("by_dataset", "by_camera", "by_identity")


def names() -> tuple[str, ...]:
  return tuple(_BENCHMARKS)


def expected_clients(data_cfg) -> int | None:
  """How many clients `load` will give, known from the config alone (None for
  `by_camera`, whose count is the dataset's cameras)."""
  if data_cfg.scenario == "by_identity":
    return int(data_cfg.scenario_clients)
  if data_cfg.scenario != "by_dataset":
    return None
  if data_cfg.clients:
    return len(data_cfg.clients)
  return len(client_names(data_cfg))


def client_names(data_cfg) -> tuple[str, ...] | None:
  """Every client name of the dataset `data_cfg.name` as `by_dataset` loads
  them (before `data_cfg.clients` filters); None for the other scenarios,
  whose names come from splitting the data."""
  if data_cfg.scenario != "by_dataset" or data_cfg.name not in _BENCHMARKS:
    return None
  if data_cfg.name == "synthetic":
    from fedreid_jax.data import synthetic
    return tuple(synthetic.DOMAIN_NAMES)
  from fedreid_jax.data import source
  return tuple(source.CLIENT_DATASETS)


def load(data_cfg, seed: int) -> tuple[list[ClientData], ReIDSplit | None]:
  """Clients (filtered by `data_cfg.clients` when set) and the public set."""
  if data_cfg.name not in _BENCHMARKS:
    raise ConfigError(f"unknown dataset {data_cfg.name!r}; choose one of {list(_BENCHMARKS)}")
  clients, public = _BENCHMARKS[data_cfg.name](data_cfg, seed)
  wanted = list(data_cfg.clients)
  if wanted:
    known = [c.name for c in clients]
    missing = [w for w in wanted if w not in known]
    if missing:
      raise ConfigError(f"config.data.clients names unknown clients {missing}; "
                       f"{data_cfg.name} has {known}")
    clients = [c for c in clients if c.name in wanted]
  return apply_scenario(clients, data_cfg, seed), public


def apply_scenario(clients: list[ClientData], data_cfg, seed: int) -> list[ClientData]:
  """by_dataset: as is; by_camera / by_identity: split the one dataset named
  in `data_cfg.clients` into per-camera or `data_cfg.scenario_clients` clients."""
  if data_cfg.scenario == "by_dataset":
    return clients
  from fedreid_jax.data import scenarios
  if len(clients) != 1:
    raise ConfigError(f"config.data.scenario={data_cfg.scenario!r} splits one dataset; set "
                     f"config.data.clients to one of {[c.name for c in clients]}")
  if data_cfg.scenario == "by_camera":
    return scenarios.by_camera(clients[0])
  return scenarios.by_identity(clients[0], data_cfg.scenario_clients, seed)
