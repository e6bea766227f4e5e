"""The compiled pieces of a federated round, built once per run.

A round is `begin` (gather the selected clients, hand them the global model,
fresh optimizer state and round keys), `train_chunk` called once per chunk of
K local steps, and `finish` (scatter back, aggregate the shared subtree).
An algorithm is a configuration of these parts (see `AlgorithmSpec`), not a
copy: FedPav shares backbone + embedding with data-size weights; local
training shares nothing.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.state import ClientStates, ServerState, client_round_keys

# How many times each compiled function was traced (tests assert "once").
TRACE_COUNTS: collections.Counter = collections.Counter()

ALGORITHMS = ("fedpav", "local", "fedavg")
FEATURE_EXTRACTOR = ("backbone", "embedding")  # the re-ID model without a classifier
BN_AGGREGATIONS = ("mean", "first_client")
WEIGHTINGS = ("data_size", "uniform")


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
  """What an algorithm is made of."""
  shared_prefixes: tuple[str, ...]  # parameter subtrees sent to/from the server
  weighting: str = "data_size"  # aggregation weights
  bn_aggregation: str = "mean"  # "mean" or the reference's "first_client" quirk
  reset_optimizer: bool = True  # optimizer state re-created each round

  @property
  def shares(self) -> bool:
    return bool(self.shared_prefixes)


def algorithm_spec(fed_cfg) -> AlgorithmSpec:
  """Named algorithm -> its parts. `fedavg` also shares the classifier."""
  prefixes = {"fedpav": FEATURE_EXTRACTOR, "local": (),
              "fedavg": FEATURE_EXTRACTOR + ("classifier",)}[fed_cfg.algorithm]
  return AlgorithmSpec(prefixes, fed_cfg.weighting, fed_cfg.bn_aggregation,
                       fed_cfg.reset_optimizer)


class RoundFns(NamedTuple):
  begin: Callable
  train_chunk: Callable  # all lanes: (sel [S], images [S, K, ...], labels, mask)
  train_lane: Callable  # `serial`: (sel [S], lane, images [k, ...], labels), no padding
  finish: Callable


def aggregation_weights(weighting: str, selected: ClientStates) -> jax.Array:
  """`[S]` unnormalised weights of the selected clients."""
  if weighting == "data_size":
    return selected.num_examples
  if weighting == "uniform":
    return jnp.ones_like(selected.num_examples)
  raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def aggregate(server: ServerState, selected: ClientStates, spec: AlgorithmSpec,
              first_client: jax.Array) -> ServerState:
  """FedPav: weighted mean of the shared subtree over selected clients `[S, ...]`."""
  shared = params_lib.prefix_predicate(spec.shared_prefixes)
  weights = aggregation_weights(spec.weighting, selected)
  params = params_lib.weighted_mean(params_lib.split_tree(selected.params, shared)[0], weights)
  stats = params_lib.split_tree(selected.batch_stats, shared)[0]
  if spec.bn_aggregation == "mean":
    stats = params_lib.weighted_mean(stats, weights)
  else:  # reference quirk: statistics of the round's first (random) client
    stats = params_lib.take_client(stats, first_client)
  return server._replace(params=params, batch_stats=stats)


def make_round_fns(model, tx: optax.GradientTransformation, train_cfg, spec: AlgorithmSpec,
                   strategy: str, mesh=None) -> RoundFns:
  """Jitted begin / train_chunk / finish for one run."""
  local_step = local_lib.make_local_step(model, tx, train_cfg)
  client_chunk = local_lib.make_client_chunk(local_step)
  run_clients = (None if strategy == "serial"
                 else local_lib.make_strategy(strategy, client_chunk, mesh))

  def begin(server: ServerState, clients: ClientStates, selected_ids: jax.Array):
    TRACE_COUNTS["begin"] += 1
    sel = jax.tree.map(lambda x: x[selected_ids], clients)
    params, stats = sel.params, sel.batch_stats
    if spec.shares:
      num = selected_ids.shape[0]
      bcast = lambda x: jnp.broadcast_to(x, (num, *x.shape))
      params = params_lib.merge_trees(params, jax.tree.map(bcast, server.params))
      stats = params_lib.merge_trees(stats, jax.tree.map(bcast, server.batch_stats))
    opt_state = jax.vmap(tx.init)(params) if spec.reset_optimizer else sel.opt_state
    return sel._replace(params=params, batch_stats=stats, opt_state=opt_state,
                        rng=client_round_keys(server.rng, server.round, selected_ids),
                        step=jnp.zeros_like(sel.step))

  def train_chunk(sel: ClientStates, images, labels, mask):
    TRACE_COUNTS["train_chunk"] += 1
    return run_clients(sel, images, labels, mask)

  def train_lane(sel: ClientStates, lane, images, labels):
    TRACE_COUNTS[f"train_lane[{images.shape[0]}]"] += 1
    state = params_lib.take_client(sel, lane)
    if images.shape[0] == 1:  # no scan: XLA CPU runs convs in a loop body ~2.5x slower
      state, metrics = local_step(state, images[0], labels[0], jnp.array(True))
    else:
      state, metrics = client_chunk(state, images, labels, jnp.ones(images.shape[0], bool))
    sel = jax.tree.map(lambda full, one: full.at[lane].set(one), sel, state)
    return sel, metrics

  def finish(server: ServerState, clients: ClientStates, sel: ClientStates,
             selected_ids: jax.Array, first_client: jax.Array):
    TRACE_COUNTS["finish"] += 1
    clients = jax.tree.map(lambda full, s: full.at[selected_ids].set(s), clients, sel)
    if spec.shares:
      server = aggregate(server, sel, spec, first_client)
    return server._replace(round=server.round + 1), clients

  return RoundFns(begin=jax.jit(begin),
                  train_chunk=jax.jit(train_chunk, donate_argnums=0),
                  train_lane=jax.jit(train_lane, donate_argnums=0),
                  finish=jax.jit(finish, donate_argnums=1))


def global_variables(server: ServerState):
  """The global model as model variables (no classifier)."""
  return {"params": server.params, "batch_stats": server.batch_stats}


def client_variables(clients: ClientStates, index: int):
  """Client `index`'s own model (backbone + embedding), for local evaluation."""
  shared = params_lib.prefix_predicate(FEATURE_EXTRACTOR)
  one = params_lib.take_client(clients, index)
  return {"params": params_lib.split_tree(one.params, shared)[0],
          "batch_stats": params_lib.split_tree(one.batch_stats, shared)[0]}
