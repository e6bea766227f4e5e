"""Bad input for an algorithm, before anything is built: a KD run without a
public set, a CDW batch larger than the smallest client, what several hosts
cannot run."""
from __future__ import annotations

import jax

from fedreid_jax.errors import ConfigError, DatasetNotPrepared


def check_hosts(config, algorithm) -> None:
  """What a run over several hosts (`jax.process_count() > 1`) cannot do yet."""
  if jax.process_count() == 1:
    return
  why = ("config.fed.strategy must be 'devices' (each host trains the clients its devices "
         "hold)" if config.fed.strategy != "devices" else
         "centralised trains one client" if algorithm.centralised else "")
  if why:
    raise ConfigError(f"config.fed.algorithm={config.fed.algorithm!r} with "
                      f"fed.strategy={config.fed.strategy!r} over {jax.process_count()} hosts: "
                      f"{why}; run it on one host (config.hosts.num_processes=1)")


def check_input(config, algorithm, clients_data, public) -> None:
  """Bad input for the algorithm's parts, before anything is built: a KD run
  without a public set, a CDW batch larger than the smallest client, what
  several hosts cannot run."""
  check_hosts(config, algorithm)
  if algorithm.needs_public and public is None:
    raise DatasetNotPrepared(
        f"config.fed.algorithm={config.fed.algorithm!r} distils on the server's public set, "
        f"but {config.data.name!r} loaded none (for the real benchmark: CUHK02, prepared "
        f"with `python -m fedreid_jax.data prepare --dataset cuhk02 --manual_dir <downloads> "
        f"--data_dir {config.data.root}`); prepare it or pick an algorithm without KD")
  if algorithm.measurements:
    smallest = min(clients_data, key=lambda c: len(c.train))
    if algorithm.measurement_batch_size > len(smallest.train):
      raise ConfigError(
          f"config.cdw.batch_size={algorithm.measurement_batch_size} is larger than client "
          f"{smallest.name!r} ({len(smallest.train)} training images); lower it")
