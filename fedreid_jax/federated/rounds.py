"""The round as named stages, each a pure function compiled once per run.

    selected = stages.broadcast(server, clients, ids)        # server -> S clients
    trained, metrics = execute(shared, selected, streams, steps)  # strategies.py
    measured, trained = stages.measure(before, trained, batch) # {name: [S]}
    weights = stages.weights(trained, measured)                # [S]
    server = stages.aggregate(server, trained, weights, first) # mean, or a server step
    clients = stages.scatter(clients, trained, ids)            # back into [C, ...]
    server, metrics = stage(server, context) per server stage  # KD

(`placement.py` calls broadcast, measure and scatter for a gathered or a
split client state; `train.Experiment.round_fn` runs them in this order.)

An algorithm (`algorithm.Algorithm`) supplies the parts: what is shared,
the measurements and weighting, the server optimizer, the server stages.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.algorithm import Algorithm, Measurement
from fedreid_jax.federated.topology import ONE_PROCESS
from fedreid_jax.federated.state import ClientStates, ServerState, client_round_keys
from fedreid_jax.federated.tracing import jit_counted

FEATURE_EXTRACTOR = params_lib.FEATURE_EXTRACTOR


class ServerContext(NamedTuple):
  """What a server stage may read besides the server state."""
  round_index: int  # the round just trained (0-based)
  clients: ClientStates  # every client, after this round's scatter `[C, ...]`
  selected: jax.Array  # `[S]` ids trained this round
  public: Any = None  # the server's public set (`input.TrainInput` of one split), or None
  topology: Any = ONE_PROCESS  # `topology.Topology`: the run's hosts


# A server stage: (server state, context) -> server state, or (server state,
# {name: float} logged with the round). Runs after aggregation, in order (KD);
# compile what it computes once. An optional `active(round_index) -> bool`
# says whether it changes the server in that round (the loop evaluates the
# global model before such rounds' stages too).
ServerStage = Callable[[ServerState, ServerContext], ServerState]


def _without_local(tree, alg: Algorithm):
  """`tree` (a server subtree) without the leaves `alg.keep_local` keeps on the clients."""
  if alg.keep_local is None:
    return tree
  return params_lib.split_tree(tree, lambda path: not alg.keep_local(path))[0]


def broadcast(server: ServerState, clients: ClientStates, ids: jax.Array, alg: Algorithm,
              tx: optax.GradientTransformation, in_order: bool = False) -> ClientStates:
  """The selected clients `[S, ...]` ready to train: the global shared subtree
  over their own private parts, a fresh optimizer state, this round's keys
  `fold_in(fold_in(seed, round), id)`, step counters at 0. `in_order`: every
  client is selected (`ids` is `arange(C)`), so no gather (over a client axis
  split across devices, XLA's partitioner all-gathers an arbitrary gather)."""
  sel = clients if in_order else jax.tree.map(lambda x: x[ids], clients)
  params, stats = sel.params, sel.batch_stats
  if alg.shares:
    bcast = lambda x: jnp.broadcast_to(x, (ids.shape[0], *x.shape))
    sent = lambda tree: jax.tree.map(bcast, _without_local(tree, alg))
    params = params_lib.merge_trees(params, sent(server.params))
    stats = params_lib.merge_trees(stats, sent(server.batch_stats))
  opt_state = jax.vmap(tx.init)(params) if alg.reset_optimizer else sel.opt_state
  return sel._replace(params=params, batch_stats=stats, opt_state=opt_state,
                      rng=client_round_keys(server.rng, server.round, ids),
                      step=jnp.zeros_like(sel.step))


def broadcast_rows(server: ServerState, clients: ClientStates, mask: jax.Array,
                   alg: Algorithm, tx: optax.GradientTransformation) -> ClientStates:
  """Every client's row `[C, ...]`, the selected ones (`mask` `[C]` bool) ready
  to train as `broadcast` makes them, the others as they were: the selection
  without a gather (a client axis split over devices stays where it is)."""
  fresh = broadcast(server, clients, jnp.arange(mask.shape[0]), alg, tx, in_order=True)
  keep = lambda new, old: params_lib.where_rows(mask, new, old)
  return fresh._replace(params=keep(fresh.params, clients.params),
                        batch_stats=keep(fresh.batch_stats, clients.batch_stats),
                        opt_state=keep(fresh.opt_state, clients.opt_state))


def aggregate(server: ServerState, trained: ClientStates, weights: jax.Array,
              first_client: jax.Array, alg: Algorithm, num_clients: int = 0) -> ServerState:
  """The algorithm's mean (`alg.aggregator`, by default weighted) of the
  shared subtree over `trained` `[S, ...]`, or, with a
  server optimizer, one step of it along the pseudo-gradient `server - mean`
  (BatchNorm statistics, and leaves the clients keep (`alg.keep_local`),
  always take the mean: the global model's copy, never sent back); the
  server advances to the next round (a non-sharing algorithm only does that)
  and updates its `algorithm_state` (`alg.update_server_state`; `num_clients`:
  every client of the run, SCAFFOLD's N)."""
  before = server
  server = server._replace(round=server.round + 1)
  if alg.update_server_state is not None:
    server = server._replace(algorithm_state=alg.update_server_state(
        before, trained, weights, num_clients))
  if not alg.shares:
    return server
  shared = params_lib.prefix_predicate(alg.shared)
  stacked_stats = params_lib.split_tree(trained.batch_stats, shared)[0]
  mean_stats = alg.bn_aggregation == "mean"
  params, stats = alg.aggregator(before, params_lib.split_tree(trained.params, shared)[0],
                                 stacked_stats if mean_stats else None, weights)
  if not mean_stats:  # reference quirk: statistics of the round's first (random) client
    stats = params_lib.take_client(stacked_stats, first_client)
  opt_state = server.opt_state
  if alg.server_optimizer is not None:
    mean = params
    pseudo_gradient = jax.tree.map(jnp.subtract, server.params, params)
    updates, opt_state = alg.server_optimizer.update(pseudo_gradient, opt_state, server.params)
    params = optax.apply_updates(server.params, updates)
    if alg.keep_local is not None:  # the clients' own leaves: the server keeps their mean
      params = params_lib.merge_trees(params, params_lib.split_tree(mean, alg.keep_local)[0])
  return server._replace(params=params, batch_stats=stats, opt_state=opt_state)


def scatter(clients: ClientStates, trained: ClientStates, ids: jax.Array) -> ClientStates:
  """Writes the trained selected clients back into the full `[C, ...]` state."""
  return jax.tree.map(lambda full, s: full.at[ids].set(s), clients, trained)


def measure(before: ClientStates, after: ClientStates, images: jax.Array, labels: jax.Array,
            measurements: Mapping[str, Measurement]):
  """Every measurement for every selected client: ({name: `[S]`}, after), where
  `after` includes any change a measurement made to the clients it measured.
  Clients are measured one after another (`lax.map`): vmapped forward passes
  with per-client weights become grouped convolutions, slower on CPU and GPU."""
  out = {}
  for name, fn in measurements.items():
    result = jax.lax.map(lambda a, fn=fn: fn(*a), (before, after, images, labels))
    if isinstance(result, tuple):
      result, after = result
    out[name] = result
  return out, after


def measure_one(before: ClientStates, after: ClientStates, images: jax.Array,
                labels: jax.Array, measurements: Mapping[str, Measurement]):
  """`measure` for one client (leaves without the client axis): ({name: scalar},
  after). The `devices` strategy runs it on the device holding the client."""
  out = {}
  for name, fn in measurements.items():
    result = fn(before, after, images, labels)
    if isinstance(result, tuple):
      result, after = result
    out[name] = result
  return out, after


class RoundStages(NamedTuple):
  """The compiled stages of one run (see the module docstring)."""
  broadcast: Callable  # (server, clients, ids [S]) -> selected [S, ...]; split: (.., mask [C]) -> [C, ...]
  measure: Callable | None  # (before, after, images [S, B, ...], labels [S, B]) -> ({name: [S]}, after)
  weights: Callable  # (trained, measured) -> [S]
  aggregate: Callable  # (server, trained, weights, first_client) -> server
  scatter: Callable  # (clients, trained, ids) -> clients
  server_stages: tuple[ServerStage, ...]
  measure_one: Callable | None = None  # (before, after, images [B, ...], labels [B]) of one client
  measure_names: tuple[str, ...] = ()  # the measurements, sorted
  after_training: Callable | None = None  # (trained [S, ...], shared input) -> trained


def make_round_stages(alg: Algorithm, tx: optax.GradientTransformation,
                      every_client_sharding: jax.sharding.Sharding | None = None,
                      num_clients: int = 0) -> RoundStages:
  """Jits each stage of `alg` once for the run. `every_client_sharding`: the
  client axis is split over a mesh this way and a round updates the selected
  rows in place: broadcast takes a `[C]` mask (`broadcast_rows`), training
  and aggregation see every row (unselected ones train no step and weigh 0),
  and scatter is the trained clients themselves: no gather, no collective,
  no device holds them all."""
  measurements = dict(alg.measurements)
  rows = every_client_sharding is not None
  placed = {"out_shardings": every_client_sharding} if rows else {}
  return RoundStages(
      broadcast=(jit_counted("broadcast", lambda s, c, mask: broadcast_rows(s, c, mask, alg, tx),
                             **placed) if rows else
                 jit_counted("broadcast", lambda s, c, ids: broadcast(s, c, ids, alg, tx))),
      measure=(jit_counted("measure", lambda b, a, x, y: measure(b, a, x, y, measurements))
               if measurements else None),
      weights=jit_counted("weights", alg.weighting),
      aggregate=jit_counted("aggregate", lambda s, t, w, f: aggregate(s, t, w, f, alg,
                                                                     num_clients)),
      scatter=(lambda clients, trained, ids: trained) if rows else
      jit_counted("scatter", scatter, donate_argnums=0),
      server_stages=tuple(alg.server_stages),
      measure_one=(jit_counted("measure_one", lambda b, a, x, y: measure_one(b, a, x, y,
                                                                          measurements))
                   if measurements else None),
      measure_names=tuple(sorted(measurements)),
      after_training=(jit_counted("after_training", jax.vmap(alg.after_training,
                                                             in_axes=(0, None)), **placed)
                      if alg.after_training is not None else None))


def global_variables(server: ServerState):
  """The global model as model variables (no classifier)."""
  return {"params": server.params, "batch_stats": server.batch_stats}


def client_variables(clients: ClientStates, index: int | None = None,
                     alg: Algorithm | None = None):
  """Client `index`'s own model (backbone + embedding), for local evaluation:
  its trained copy, or `alg.client_model` of it (Ditto's personal model);
  `index` None: `clients` is one client's state (no client axis)."""
  shared = params_lib.prefix_predicate(FEATURE_EXTRACTOR)
  one = clients if index is None else params_lib.take_client(clients, index)
  if alg is not None and alg.client_model is not None:
    one = one._replace(**alg.client_model(one))
  return {"params": params_lib.split_tree(one.params, shared)[0],
          "batch_stats": params_lib.split_tree(one.batch_stats, shared)[0]}
