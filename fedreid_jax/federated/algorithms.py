"""An algorithm's optional parts, from its spec and the config: the CDW
measurement and weighting, the reference CDW's received statistics, the KD
server stage. `rounds.make_round_stages` compiles them with the rest."""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedreid_jax import hosts
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
  received_stats: "ReceivedStats | None"  # the reference CDW's received statistics


def make_parts(spec: AlgorithmSpec, config, model) -> AlgorithmParts:
  """The parts `spec` asks for, configured by `config.cdw` / `config.kd`."""
  measurements, weighting, stages, received = {}, None, (), None
  if spec.cdw:
    measurements[cdw_lib.DISTANCE] = cdw_lib.make_measurement(
        model, config.cdw, config.train, spec.shared_prefixes)
    weighting = cdw_lib.cdw_weights
    if config.cdw.form == "logit" and config.cdw.mode == "reference":
      received = ReceivedStats(model, config.train)
  if spec.kd:
    stages = (kd_lib.Distillation(model, config.kd, config.train),)
  return AlgorithmParts(measurements, weighting, stages, received)


class ReceivedStats:
  """The reference CDW's received statistics (`cdw.received_stats`): for a
  stacked batch of the selected clients, or client by client on the host that
  holds each (a split state, several hosts). Both draw client i's pass from
  `split(fold_in(server.rng, server.round), S)[i]`, i its position in the round."""

  def __init__(self, model, train_cfg):
    key = lambda server: jax.random.fold_in(server.rng, server.round)
    self._stacked = jit_counted("received_stats", lambda server, images, order: (
        cdw_lib.received_stats(model, server.params, server.batch_stats, images, order,
                               train_cfg, key(server))))
    self._one = jit_counted("received_stats/one", lambda server, images, position, num: (
        cdw_lib.stat_contribution(model, server.params, server.batch_stats, images,
                                  jax.random.split(key(server), num)[position], train_cfg)),
                            static_argnums=3)
    self._chain = jit_counted("received_stats/chain", lambda server, contributions, order: (
        cdw_lib.chain_stats(server.batch_stats, contributions, order)))
    self._rows = jit_counted("received_stats/rows", _merge_rows)

  def __call__(self, server, images: jax.Array, order: jax.Array):
    """images `[S, B, H, W, 3]` of the S selected clients, order `[S]` -> stats `[S, ...]`."""
    return self._stacked(server, images, order)

  def into_rows(self, server, selected, images: dict[int, jax.Array], ids: np.ndarray,
                order: np.ndarray, mask: np.ndarray):
    """`selected` (every client's row `[C, ...]`, maybe split over hosts) with
    the selected clients' received statistics. `images`: {client: its CDW batch}
    of this host's selected clients; `ids` `[S]` the selected clients, `order`
    `[S]` positions in `ids`, `mask` `[C]`. Each pass runs on this host (all
    processes call this together; the contributions are summed over hosts)."""
    local = hosts.local_copy(server)
    position = {int(c): i for i, c in enumerate(ids)}
    like = jax.eval_shape(lambda s: s.batch_stats, local)
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(like)]
    table = np.zeros((len(ids), sum(sizes)))  # a row per selected client, flattened
    for client, batch in images.items():
      out = self._one(local, batch, position[client], len(ids))
      table[position[client]] = np.concatenate(
          [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(out)])
    table = hosts.sum_over_hosts(table)
    parts = np.split(table, np.cumsum(sizes)[:-1], axis=1)
    contributions = jax.tree.unflatten(jax.tree.structure(like), [
        p.reshape(len(ids), *x.shape).astype(x.dtype) for p, x in zip(parts, jax.tree.leaves(like))])
    stats = jax.tree.map(np.asarray, self._chain(local, contributions, jnp.asarray(order)))
    row_position = np.array([position.get(c, 0) for c in range(mask.shape[0])], np.int32)
    return self._rows(selected, stats, row_position, mask)


def _merge_rows(selected, stats, row_position: jax.Array, mask: jax.Array):
  """Rows of `selected` `[C, ...]` where `mask` get `stats[row_position]`
  (`stats` `[S, ...]`, the shared BatchNorm statistics); the others keep theirs."""
  old = traverse_util.flatten_dict(flax.core.unfreeze(selected.batch_stats))
  new = traverse_util.flatten_dict(flax.core.unfreeze(stats))
  return with_received_stats(selected, traverse_util.unflatten_dict(params_lib.where_rows(
      mask, {path: x[row_position] for path, x in new.items()},
      {path: old[path] for path in new})))


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
