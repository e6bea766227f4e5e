"""Unseen domains (`config.eval.unseen`): clients whose data never trains.

`config.data.clients` chooses which clients are loaded (empty: all of the
dataset's); `config.eval.unseen` names some of those as unseen. They are
taken out before anything is built (`split`): never selected, their
training data never read, not counted in `fed.clients_per_round` nor in the
aggregation weights. The global model is evaluated on their test sets at
every evaluation (`"unseen"` in the run's results, `eval_unseen/<client>/...`
in `metrics.jsonl`). An algorithm without a global model (`local`) has
nothing to evaluate there: its unseen clients only stay out of training
(`evaluated` logs it).

Bad input is one `ConfigError` line: from `check_config` before any data is
loaded when the config names the clients (the `by_dataset` scenario), else
from `split` right after loading.
"""
from __future__ import annotations

import logging
from typing import Sequence

from fedreid_jax.data import registry
from fedreid_jax.data.base import ClientData
from fedreid_jax.errors import ConfigError


def names(config) -> tuple[str, ...]:
  """`config.eval.unseen` as a tuple; `()` for configs saved before the field."""
  value = config.eval.get("unseen", ())
  return (value,) if isinstance(value, str) else tuple(value)


def check_form(unseen: Sequence[str]) -> None:
  """Raises ConfigError (one line) unless `unseen` holds distinct strings."""
  bad = [u for u in unseen if not isinstance(u, str)]
  if bad:
    raise ConfigError(f"config.eval.unseen={tuple(unseen)!r} must hold client names "
                      f"(strings), not {bad}; e.g. ('syn_viper',)")
  twice = sorted({u for u in unseen if list(unseen).count(u) > 1})
  if twice:
    raise ConfigError(f"config.eval.unseen names {twice} more than once; list each once")


def check(unseen: Sequence[str], loaded: Sequence[str], dataset_clients=None,
          chosen: Sequence[str] = ()) -> None:
  """Raises ConfigError (one line) unless `unseen` names distinct clients among
  `loaded` (the run's client names) and leaves at least one to train.

  Args:
    unseen: `config.eval.unseen`.
    loaded: the names of the clients the run loads.
    dataset_clients: every client name of the dataset when known (`by_dataset`),
      to tell a name the dataset lacks from one `config.data.clients` leaves out.
    chosen: `config.data.clients` (empty: the dataset's every client).
  """
  check_form(unseen)
  missing = [u for u in unseen if u not in loaded]
  known = list(dataset_clients) if dataset_clients is not None else list(loaded)
  unknown = [u for u in missing if u not in known]
  if unknown:
    raise ConfigError(f"config.eval.unseen names {unknown}, not client(s) of this run; "
                      f"its clients are {known}")
  if missing:
    raise ConfigError(f"config.eval.unseen names {missing}, which config.data.clients="
                      f"{tuple(chosen)!r} does not load; an unseen client must be loaded: "
                      "add it to config.data.clients (it still never trains), or leave "
                      "data.clients empty for every client")
  if loaded and set(loaded) <= set(unseen):
    raise ConfigError(f"config.eval.unseen holds every client this run loads "
                      f"({list(loaded)}), so none would train; leave at least one out of it")


def check_config(config) -> None:
  """`check` before any data is loaded, when the config alone names the
  clients (`by_dataset`); also refuses a `fed.clients_per_round` count above
  the clients left to train. Other scenarios are checked by `split`."""
  unseen = names(config)
  if not unseen:
    return
  dataset_clients = registry.client_names(config.data)
  if dataset_clients is None:
    return check_form(unseen)  # the names are known after loading (`split`)
  chosen = tuple(config.data.clients)
  loaded = [c for c in dataset_clients if not chosen or c in chosen]
  check(unseen, loaded, dataset_clients, chosen)
  left, wanted = len(loaded) - len(unseen), config.fed.clients_per_round
  if isinstance(wanted, (int, float)) and wanted >= 1 and int(wanted) > left:
    raise ConfigError(f"config.fed.clients_per_round={wanted} exceeds the {left} clients "
                      f"that train ({len(loaded)} loaded, {len(unseen)} in config.eval.unseen); "
                      "lower it")


def split(config, clients: Sequence[ClientData]
          ) -> tuple[list[ClientData], list[ClientData]]:
  """`(training clients, unseen clients)` of the loaded `clients`, each in
  their loaded order; raises ConfigError (`check`) on a bad `eval.unseen`."""
  unseen = names(config)
  if not unseen:
    return list(clients), []
  check(unseen, [c.name for c in clients], chosen=tuple(config.data.clients))
  return ([c for c in clients if c.name not in unseen],
          [c for c in clients if c.name in unseen])


def evaluated(unseen: Sequence[ClientData], algorithm) -> list[ClientData]:
  """The unseen clients to evaluate the global model on: all of them when the
  algorithm has one (`algorithm.shares`), else none, with a log line."""
  if unseen and not algorithm.shares:
    logging.info("config.eval.unseen: %s has no global model; %s do not train and are "
                 "not evaluated", algorithm.name, ", ".join(c.name for c in unseen))
    return []
  return list(unseen)
