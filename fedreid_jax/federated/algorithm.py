"""An algorithm is one value: `Algorithm`, built by a factory from the config.

    fedpav = fedpav_base(config)                      # FedPav: shared backbone + embedding
    full = with_kd(with_cdw(fedpav, config, model), config, model)  # FedPav+CDW+KD

Every field is a part the round (`rounds.py`) composes, never a copy of the
round: which parameter subtrees travel (`shared`), a term added to each
client's local loss (`client_regularizer`), how the server weighs the
returned clients (`weighting`, reading the round's `measurements`), how it
moves from the weighted mean (`server_optimizer`, an optax transformation of
the pseudo-gradient `server - mean`; None: take the mean), and what runs on
the server after aggregation (`server_stages`). KD and CDW are combinators
over any algorithm that shares parameters. `registry.py` maps names to
factories.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fedreid_jax.federated import cdw as cdw_lib
from fedreid_jax.federated import kd as kd_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.received_stats import ReceivedStats
from fedreid_jax.federated.state import ClientStates

FEATURE_EXTRACTOR = params_lib.FEATURE_EXTRACTOR
BN_AGGREGATIONS = ("mean", "first_client")

# A client measurement: (client state before training, after training, images
# `[B, H, W, 3]` uint8, labels `[B]`) -> scalar, or (scalar, updated after-state)
# when measuring changes the client (the reference CDW's in-place BatchNorm
# update), for one client (mapped over the selected clients).
Measurement = Callable[[ClientStates, ClientStates, jax.Array, jax.Array], Any]
# Aggregation weights: (trained selected clients `[S, ...]`, measurements
# {name: `[S]`}) -> unnormalised weights `[S]`.
Weighting = Callable[[ClientStates, Mapping[str, jax.Array]], jax.Array]
# A client loss term: (the client's full params, the round's shared input
# (`round_input`), the client's own `algorithm_state`) -> scalar.
Regularizer = Callable[[Any, Any, Any], jax.Array]
# The server's mean of the returned clients: (server, shared params `[S, ...]`,
# shared BatchNorm statistics `[S, ...]` or None (not averaged), weights `[S]`)
# -> (params mean, statistics mean or None). Weights may be 0 (a failed or an
# unselected client); they are normalised here.
Aggregator = Callable[[Any, Any, Any, jax.Array], tuple]


def weighted_mean(server, params, stats, weights: jax.Array) -> tuple:
  """`Aggregator`: the plain weighted mean (FedPav)."""
  del server
  return (params_lib.weighted_mean(params, weights),
          None if stats is None else params_lib.weighted_mean(stats, weights))


def data_size_weights(trained: ClientStates, measured) -> jax.Array:
  """`Weighting`: each client's number of training images (FedPav)."""
  del measured
  return trained.num_examples


def uniform_weights(trained: ClientStates, measured) -> jax.Array:
  """`Weighting`: every client alike."""
  del measured
  return jnp.ones_like(trained.num_examples)


WEIGHTINGS: dict[str, Weighting] = {"data_size": data_size_weights, "uniform": uniform_weights}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One federated algorithm, as the round composes it.

  name, label: its registered name and its column in tables and reports.
  shared: parameter subtrees exchanged with the server (`()`: nothing).
  client_regularizer: None, or `(params, shared_input, own) -> scalar` added
    to each local step's loss (`shared_input`: the round's input common to
    every client, `round_input`; `own`: the client's `algorithm_state`).
  shared_input: None (the server's shared params when there is a
    regularizer, else nothing) or `(server) -> pytree` handed to every local
    step of the round (SCAFFOLD: the global model and control variate).
  aggregator: how the server averages the returned clients (`Aggregator`;
    secure aggregation and client-level DP replace it).
  init_state: None, or `(server, clients) -> (server algorithm_state,
    clients algorithm_state [C, ...])`, run once when the run starts.
  after_training: None, or `(one trained client, shared_input) -> client`,
    mapped over the clients after local training (a client that trained no
    step must come back unchanged).
  update_server_state: None, or `(server before the round, trained clients
    [S, ...], weights [S], num_clients) -> server algorithm_state`.
  personal_mu: None, or Ditto's proximal weight: each client also trains a
    personal model (its `algorithm_state`) on the same batches, with
    (mu / 2) ||v - w_global||^2 over the shared subtree.
  client_model: None (the client's trained copy) or `(one client) ->
    {"params", "batch_stats"}`: the model evaluated as the client's.
  weighting: aggregation weights from the trained clients and `measurements`.
  measurements: {name: `Measurement`} taken of every selected client after
    training, on `measurement_batch_size` of its own images.
  server_optimizer: None (the server takes the weighted mean) or an optax
    transformation of the pseudo-gradient `server - mean`; its state lives
    in `ServerState.opt_state` and is checkpointed with it.
  server_stages: `rounds.ServerStage`s run after aggregation, in order (KD).
  keep_local: None, or a predicate over leaf paths (`("backbone", "bn1",
    "scale")`, the same in params and batch_stats) of leaves inside `shared`
    that each client keeps as its own (FedBN's BatchNorm): broadcast leaves
    the client's values, and the server's copy is the round's weighted mean
    of the clients' values, never sent back and never moved by
    `server_optimizer` (the global model needs them for evaluation).
  centralised: every training set merged into one client.
  bn_aggregation: "mean", or the reference's "first_client" quirk.
  reset_optimizer: the clients' optimizer state re-created each round.
  received_stats: the reference CDW's in-flight BatchNorm statistics, or None.
  needs_public: a server stage reads the server's public set (KD).
  """
  name: str
  label: str
  shared: tuple[str, ...]
  client_regularizer: Regularizer | None = None
  shared_input: Callable[[Any], Any] | None = None
  aggregator: Aggregator = weighted_mean
  init_state: Callable[[Any, ClientStates], tuple] | None = None
  after_training: Callable[[ClientStates, Any], ClientStates] | None = None
  update_server_state: Callable[..., Any] | None = None
  personal_mu: float | None = None
  client_model: Callable[[ClientStates], dict] | None = None
  weighting: Weighting = data_size_weights
  measurements: Mapping[str, Measurement] = dataclasses.field(default_factory=dict)
  server_optimizer: optax.GradientTransformation | None = None
  server_stages: tuple = ()
  centralised: bool = False
  bn_aggregation: str = "mean"
  reset_optimizer: bool = True
  received_stats: ReceivedStats | None = None
  needs_public: bool = False
  measurement_batch_size: int = 0
  keep_local: params_lib.PathPredicate | None = None  # leaves inside `shared` each client keeps

  @property
  def shares(self) -> bool:
    return bool(self.shared)


def round_input(algorithm: Algorithm, server) -> Any:
  """The round's input common to every client's local steps: the algorithm's
  `shared_input(server)`, else the server's shared params when a client
  regularizer or a personal model needs them, else `()`."""
  if algorithm.shared_input is not None:
    return algorithm.shared_input(server)
  if algorithm.client_regularizer is not None or algorithm.personal_mu is not None:
    return server.params
  return ()


def base(config, name: str, label: str, shared: tuple[str, ...] = FEATURE_EXTRACTOR,
         **fields) -> Algorithm:
  """An algorithm with the config's common settings (`config.fed.weighting`,
  `bn_aggregation`, `reset_optimizer`)."""
  return Algorithm(name=name, label=label, shared=shared,
                   weighting=WEIGHTINGS[config.fed.weighting],
                   bn_aggregation=config.fed.bn_aggregation,
                   reset_optimizer=config.fed.reset_optimizer, **fields)


def fedpav(config, model=None) -> Algorithm:
  """FedPav: backbone + embedding block averaged, classifiers stay on the clients."""
  del model
  return base(config, "fedpav", "FedPav")


def fedavg(config, model=None) -> Algorithm:
  """FedPav that also averages the (padded) classifier."""
  del model
  return base(config, "fedavg", "FedAvg", FEATURE_EXTRACTOR + ("classifier",))


def local(config, model=None) -> Algorithm:
  """Each client trains alone: nothing is shared."""
  del model
  return base(config, "local", "Local training", ())


def centralised(config, model=None) -> Algorithm:
  """One client holding every training set, trained like FedPav."""
  del model
  return base(config, "centralised", "Centralised", centralised=True)


def with_cdw(algorithm: Algorithm, config, model) -> Algorithm:
  """`algorithm` weighted by the cosine distance of each client's update
  (`config.cdw`: form, mode, batch size) instead of its own weighting."""
  reference = config.cdw.form == "logit" and config.cdw.mode == "reference"
  measurement = cdw_lib.make_measurement(model, config.cdw, config.train, algorithm.shared)
  return dataclasses.replace(
      algorithm, name=f"{algorithm.name}_cdw", label=f"{algorithm.label}+CDW",
      measurements={**algorithm.measurements, cdw_lib.DISTANCE: measurement},
      weighting=cdw_lib.cdw_weights, measurement_batch_size=config.cdw.batch_size,
      received_stats=ReceivedStats(model, config.train) if reference else None)


def with_kd(algorithm: Algorithm, config, model) -> Algorithm:
  """`algorithm` with server-side knowledge distillation on the public set
  every `config.kd.every_rounds` rounds, after aggregation."""
  return dataclasses.replace(
      algorithm, name=f"{algorithm.name}_kd", label=f"{algorithm.label}+KD",
      server_stages=(*algorithm.server_stages, kd_lib.Distillation(model, config.kd, config.train)),
      needs_public=True)


def with_server_optimizer(algorithm: Algorithm, optimizer: optax.GradientTransformation,
                          name: str, label: str) -> Algorithm:
  """`algorithm` whose server steps from its current model along the
  pseudo-gradient `server - mean` with `optimizer` (`optax.sgd(1.0)` lands
  on the mean)."""
  return dataclasses.replace(algorithm, name=name, label=label, server_optimizer=optimizer)
