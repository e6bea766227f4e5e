"""Seeded, reproducible client sampling."""
from __future__ import annotations

import numpy as np

from fedreid_jax.errors import ConfigError


def num_selected(clients_per_round: float, num_clients: int) -> int:
  """0 -> all; a fraction in (0, 1) -> that share (at least 1); >=1 -> a count."""
  if clients_per_round <= 0:
    return num_clients
  if clients_per_round < 1:
    return max(1, int(round(clients_per_round * num_clients)))
  if int(clients_per_round) > num_clients:
    raise ConfigError(f"config.fed.clients_per_round={clients_per_round} exceeds the "
                     f"{num_clients} clients")
  return int(clients_per_round)


def sample_clients(seed: int, round_index: int, num_clients: int, count: int) -> np.ndarray:
  """Sorted ids of the clients selected in `round_index`: `[count]` int."""
  if count == num_clients:
    return np.arange(num_clients)
  rng = np.random.default_rng([seed, round_index, 0x5A])
  return np.sort(rng.choice(num_clients, size=count, replace=False))


def first_client(seed: int, round_index: int, count: int) -> int:
  """Lane of the round's 'first' client in the reference's random order."""
  return int(np.random.default_rng([seed, round_index, 0xF1]).integers(count))


def round_order(seed: int, round_index: int, count: int) -> np.ndarray:
  """The reference's random client order of a round, as lanes `[count]`; it
  starts with `first_client`."""
  first = first_client(seed, round_index, count)
  rest = np.random.default_rng([seed, round_index, 0x0D]).permutation(
      [i for i in range(count) if i != first])
  return np.concatenate([[first], rest]).astype(np.int32)
