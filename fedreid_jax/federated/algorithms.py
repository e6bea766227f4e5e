"""An algorithm's optional parts, from its spec and the config: the CDW
measurement and weighting, the reference CDW's received statistics, the KD
server stage. `rounds.make_round_stages` compiles them with the rest."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from fedreid_jax.errors import ConfigError, DatasetNotPrepared
from fedreid_jax.federated import cdw as cdw_lib
from fedreid_jax.federated import kd as kd_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.rounds import AlgorithmSpec
from fedreid_jax.federated.tracing import jit_counted


class AlgorithmParts(NamedTuple):
  measurements: dict  # {name: rounds.Measurement}
  weighting: Callable | None  # rounds.Weighting, None: the spec's named one
  server_stages: tuple  # rounds.ServerStage, in order
  received_stats: Callable | None  # reference CDW: (server, images [S, B, ...], order [S]) -> stats [S, ...]


def make_parts(spec: AlgorithmSpec, config, model) -> AlgorithmParts:
  """The parts `spec` asks for, configured by `config.cdw` / `config.kd`."""
  measurements, weighting, stages, received = {}, None, (), None
  if spec.cdw:
    measurements[cdw_lib.DISTANCE] = cdw_lib.make_measurement(
        model, config.cdw, config.train, spec.shared_prefixes)
    weighting = cdw_lib.cdw_weights
    if config.cdw.form == "logit" and config.cdw.mode == "reference":
      received = jit_counted("received_stats", lambda server, images, order: (
          cdw_lib.received_stats(model, server.params, server.batch_stats, images, order,
                                 config.train, jax.random.fold_in(server.rng, server.round))))
  if spec.kd:
    stages = (kd_lib.Distillation(model, config.kd, config.train),)
  return AlgorithmParts(measurements, weighting, stages, received)


def with_received_stats(selected, stats):
  """The selected clients `[S, ...]` with the shared BatchNorm statistics
  `stats` `[S, ...]` (the reference CDW's per-client received statistics)."""
  return selected._replace(batch_stats=params_lib.merge_trees(selected.batch_stats, stats))


def check_hosts(config, spec) -> None:
  """What a run over several hosts (`jax.process_count() > 1`) cannot do yet."""
  if jax.process_count() == 1:
    return
  why = ("config.fed.strategy must be 'devices' (each host trains the clients its devices "
         "hold)" if config.fed.strategy != "devices" else
         "the reference CDW chains BatchNorm statistics through every client (use "
         "cdw.mode='default')" if spec.cdw and config.cdw.mode == "reference" else
         "centralised trains one client" if spec.centralised else "")
  if why:
    raise ConfigError(f"config.fed.algorithm={config.fed.algorithm!r} with "
                      f"fed.strategy={config.fed.strategy!r} over {jax.process_count()} hosts: "
                      f"{why}; run it on one host (config.hosts.num_processes=1)")


def check_input(config, spec, clients_data, public) -> None:
  """Bad input for the algorithm's parts, before anything is built: a KD run
  without a public set, a CDW batch larger than the smallest client, what
  several hosts cannot run."""
  check_hosts(config, spec)
  if spec.kd and public is None:
    raise DatasetNotPrepared(
        f"config.fed.algorithm={config.fed.algorithm!r} distils on the server's public set, "
        f"but {config.data.name!r} loaded none (for the real benchmark: CUHK02, prepared "
        f"with `python -m fedreid_jax.data prepare --dataset cuhk02 --manual_dir <downloads> "
        f"--data_dir {config.data.root}`); prepare it or pick an algorithm without _kd")
  if spec.cdw:
    smallest = min(clients_data, key=lambda c: len(c.train))
    if config.cdw.batch_size > len(smallest.train):
      raise ConfigError(
          f"config.cdw.batch_size={config.cdw.batch_size} is larger than client "
          f"{smallest.name!r} ({len(smallest.train)} training images); lower it")
