"""The round as named stages, each a pure function compiled once per run.

    selected = stages.broadcast(server, clients, ids)        # server -> S clients
    trained, metrics = execute(selected, streams, steps)       # execution.py
    measured, trained = stages.measure(before, trained, batch) # {name: [S]}
    weights = stages.weights(trained, measured)                # [S]
    server = stages.aggregate(server, trained, weights, first) # shared subtree mean
    clients = stages.scatter(clients, trained, ids)            # back into [C, ...]
    server, metrics = stage(server, context) per server stage  # KD

An algorithm is a configuration of these parts (`AlgorithmSpec`), never a
copy: FedPav shares backbone + embedding with data-size weights; `_cdw`
weights by the CDW distance measurement (cdw.py); `_kd` adds the KD server
stage (kd.py); `fedavg` also shares the classifier; `local` shares nothing;
`centralised` is FedPav over one client holding every training set.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.state import ClientStates, ServerState, client_round_keys
from fedreid_jax.federated.tracing import jit_counted

ALGORITHMS = ("fedpav", "fedpav_kd", "fedpav_cdw", "fedpav_kd_cdw", "local", "fedavg",
              "centralised")
FEATURE_EXTRACTOR = params_lib.FEATURE_EXTRACTOR
BN_AGGREGATIONS = ("mean", "first_client")

# A client measurement: (client state before training, after training, images
# `[B, H, W, 3]` uint8, labels `[B]`) -> scalar, or (scalar, updated after-state)
# when measuring changes the client (the reference CDW's in-place BatchNorm
# update), for one client (vmapped over S).
Measurement = Callable[[ClientStates, ClientStates, jax.Array, jax.Array], jax.Array]
# Aggregation weights: (trained selected clients `[S, ...]`, measurements
# {name: `[S]`}) -> unnormalised weights `[S]`.
Weighting = Callable[[ClientStates, Mapping[str, jax.Array]], jax.Array]


def data_size_weights(trained: ClientStates, measured) -> jax.Array:
  del measured
  return trained.num_examples


def uniform_weights(trained: ClientStates, measured) -> jax.Array:
  del measured
  return jnp.ones_like(trained.num_examples)


WEIGHTINGS: dict[str, Weighting] = {"data_size": data_size_weights, "uniform": uniform_weights}


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
  """What an algorithm is made of."""
  shared_prefixes: tuple[str, ...]  # parameter subtrees sent to/from the server
  weighting: str = "data_size"  # a key of WEIGHTINGS
  bn_aggregation: str = "mean"  # "mean" or the reference's "first_client" quirk
  reset_optimizer: bool = True  # optimizer state re-created each round
  kd: bool = False  # server-side knowledge distillation (kd.py)
  cdw: bool = False  # cosine-distance weights (cdw.py) instead of `weighting`
  centralised: bool = False  # every training set merged into one client

  @property
  def shares(self) -> bool:
    return bool(self.shared_prefixes)


def algorithm_spec(fed_cfg) -> AlgorithmSpec:
  """Named algorithm -> its parts: `fedpav[_kd][_cdw]`, `local`, `fedavg`
  (FedPav that also shares the classifier), `centralised`."""
  name = fed_cfg.algorithm
  prefixes = {"local": (), "fedavg": FEATURE_EXTRACTOR + ("classifier",)}.get(
      name, FEATURE_EXTRACTOR)
  parts = name.split("_")
  return AlgorithmSpec(prefixes, fed_cfg.weighting, fed_cfg.bn_aggregation,
                       fed_cfg.reset_optimizer, kd="kd" in parts, cdw="cdw" in parts,
                       centralised=name == "centralised")


class ServerContext(NamedTuple):
  """What a server stage may read besides the server state."""
  round_index: int  # the round just trained (0-based)
  clients: ClientStates  # every client, after this round's scatter `[C, ...]`
  selected: jax.Array  # `[S]` ids trained this round
  public: Any = None  # the server's public set (`input.TrainInput` of one split), or None


# A server stage: (server state, context) -> server state, or (server state,
# {name: float} logged with the round). Runs after aggregation, in order (KD);
# compile what it computes once. An optional `active(round_index) -> bool`
# says whether it changes the server in that round (the loop evaluates the
# global model before such rounds' stages too).
ServerStage = Callable[[ServerState, ServerContext], ServerState]


def broadcast(server: ServerState, clients: ClientStates, ids: jax.Array, spec: AlgorithmSpec,
              tx: optax.GradientTransformation, in_order: bool = False) -> ClientStates:
  """The selected clients `[S, ...]` ready to train: the global shared subtree
  over their own private parts, a fresh optimizer state, this round's keys
  `fold_in(fold_in(seed, round), id)`, step counters at 0. `in_order`: every
  client is selected (`ids` is `arange(C)`), so no gather (over a client axis
  split across devices, XLA's partitioner all-gathers an arbitrary gather)."""
  sel = clients if in_order else jax.tree.map(lambda x: x[ids], clients)
  params, stats = sel.params, sel.batch_stats
  if spec.shares:
    bcast = lambda x: jnp.broadcast_to(x, (ids.shape[0], *x.shape))
    params = params_lib.merge_trees(params, jax.tree.map(bcast, server.params))
    stats = params_lib.merge_trees(stats, jax.tree.map(bcast, server.batch_stats))
  opt_state = jax.vmap(tx.init)(params) if spec.reset_optimizer else sel.opt_state
  return sel._replace(params=params, batch_stats=stats, opt_state=opt_state,
                      rng=client_round_keys(server.rng, server.round, ids),
                      step=jnp.zeros_like(sel.step))


def broadcast_rows(server: ServerState, clients: ClientStates, mask: jax.Array,
                   spec: AlgorithmSpec, tx: optax.GradientTransformation) -> ClientStates:
  """Every client's row `[C, ...]`, the selected ones (`mask` `[C]` bool) ready
  to train as `broadcast` makes them, the others as they were: the selection
  without a gather (a client axis split over devices stays where it is)."""
  fresh = broadcast(server, clients, jnp.arange(mask.shape[0]), spec, tx, in_order=True)
  keep = lambda new, old: params_lib.where_rows(mask, new, old)
  return fresh._replace(params=keep(fresh.params, clients.params),
                        batch_stats=keep(fresh.batch_stats, clients.batch_stats),
                        opt_state=keep(fresh.opt_state, clients.opt_state))


def aggregate(server: ServerState, trained: ClientStates, weights: jax.Array,
              first_client: jax.Array, spec: AlgorithmSpec) -> ServerState:
  """Weighted mean of the shared subtree over `trained` `[S, ...]`; the server
  advances to the next round (a non-sharing algorithm only does that)."""
  server = server._replace(round=server.round + 1)
  if not spec.shares:
    return server
  shared = params_lib.prefix_predicate(spec.shared_prefixes)
  params = params_lib.weighted_mean(params_lib.split_tree(trained.params, shared)[0], weights)
  stats = params_lib.split_tree(trained.batch_stats, shared)[0]
  if spec.bn_aggregation == "mean":
    stats = params_lib.weighted_mean(stats, weights)
  else:  # reference quirk: statistics of the round's first (random) client
    stats = params_lib.take_client(stats, first_client)
  return server._replace(params=params, batch_stats=stats)


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


def make_round_stages(spec: AlgorithmSpec, tx: optax.GradientTransformation,
                      measurements: Mapping[str, Measurement] | None = None,
                      weighting: Weighting | None = None,
                      server_stages: Sequence[ServerStage] = (),
                      every_client_sharding: jax.sharding.Sharding | None = None
                      ) -> RoundStages:
  """Jits each stage once for the run. `weighting` overrides `spec.weighting`.
  `every_client_sharding`: the client axis is split over a mesh this way and
  a round updates the selected rows in place: broadcast takes a `[C]` mask
  (`broadcast_rows`), training and aggregation see every row (unselected
  ones train no step and weigh 0), and scatter is the trained clients
  themselves: no gather, no collective, no device holds them all."""
  weighting = weighting or WEIGHTINGS[spec.weighting]
  measurements = dict(measurements or {})
  rows = every_client_sharding is not None
  placed = {"out_shardings": every_client_sharding} if rows else {}
  return RoundStages(
      broadcast=(jit_counted("broadcast", lambda s, c, mask: broadcast_rows(s, c, mask, spec, tx),
                             **placed) if rows else
                 jit_counted("broadcast", lambda s, c, ids: broadcast(s, c, ids, spec, tx))),
      measure=(jit_counted("measure", lambda b, a, x, y: measure(b, a, x, y, measurements))
               if measurements else None),
      weights=jit_counted("weights", weighting),
      aggregate=jit_counted("aggregate", lambda s, t, w, f: aggregate(s, t, w, f, spec)),
      scatter=(lambda clients, trained, ids: trained) if rows else
      jit_counted("scatter", scatter, donate_argnums=0),
      server_stages=tuple(server_stages),
      measure_one=(jit_counted("measure_one", lambda b, a, x, y: measure_one(b, a, x, y,
                                                                          measurements))
                   if measurements else None))


def global_variables(server: ServerState):
  """The global model as model variables (no classifier)."""
  return {"params": server.params, "batch_stats": server.batch_stats}


def client_variables(clients: ClientStates, index: int | None = None):
  """Client `index`'s own model (backbone + embedding), for local evaluation;
  `index` None: `clients` is one client's state (no client axis)."""
  shared = params_lib.prefix_predicate(FEATURE_EXTRACTOR)
  one = clients if index is None else params_lib.take_client(clients, index)
  return {"params": params_lib.split_tree(one.params, shared)[0],
          "batch_stats": params_lib.split_tree(one.batch_stats, shared)[0]}
