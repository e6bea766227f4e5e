"""Explicit federated state: every per-client leaf has the client axis first."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fedreid_jax.federated import params as params_lib


class ClientStates(NamedTuple):
  """All clients, stacked. Leaves are `[C, ...]`.

  params: full model (backbone, embedding, padded classifier).
  batch_stats: BatchNorm running statistics.
  opt_state: optax state (re-created each round unless configured otherwise).
  rng: `[C]` typed keys for this round (fold_in(fold_in(seed, round), client)).
  step: `[C]` int32 local steps taken this round.
  num_classes: `[C]` int32 ids of each client (logits past it are masked).
  num_examples: `[C]` float32 training images of each client (FedPav weights).
  algorithm_state: what an algorithm keeps on each client across rounds
    (`Algorithm.init_state`; SCAFFOLD's control variate, Ditto's personal
    model), leaves `[C, ...]`; `()` for most algorithms.
  """
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  step: jax.Array
  num_classes: jax.Array
  num_examples: jax.Array
  algorithm_state: Any = ()


class ServerState(NamedTuple):
  """The global (shared) model: backbone + embedding block, plus bookkeeping.

  opt_state: a server optimizer's state (server stages own it; `()` when none).
  algorithm_state: what an algorithm keeps on the server across rounds
    (`Algorithm.init_state`; SCAFFOLD's control variate); `()` for most.
  """
  params: Any
  batch_stats: Any
  round: jax.Array
  rng: jax.Array
  opt_state: Any = ()
  algorithm_state: Any = ()


def init_states(model, tx: optax.GradientTransformation, shared: params_lib.PathPredicate,
                rng: jax.Array, image_shape: tuple[int, int],
                num_classes: np.ndarray, num_examples: np.ndarray):
  """Initial (ServerState, ClientStates).

  All clients start from the same global model (as the server broadcasts it
  before round one); each classifier gets its own random init.
  """
  num_clients = len(num_classes)
  dummy = jnp.zeros((1, *image_shape, 3), jnp.float32)
  init_rng, head_rng, server_rng = jax.random.split(rng, 3)

  def init_one(key):
    return model.init({"params": key, "dropout": key}, dummy, train=False)

  variables = init_one(init_rng)
  shared_params, _ = params_lib.split_tree(variables["params"], shared)
  shared_stats, _ = params_lib.split_tree(variables["batch_stats"], shared)
  heads = jax.vmap(init_one)(jax.random.split(head_rng, num_clients))

  def broadcast(x):
    return jnp.broadcast_to(x, (num_clients, *x.shape))

  client_params = params_lib.merge_trees(
      heads["params"], jax.tree.map(broadcast, shared_params))
  client_stats = params_lib.merge_trees(
      heads["batch_stats"], jax.tree.map(broadcast, shared_stats))
  clients = ClientStates(
      params=client_params,
      batch_stats=client_stats,
      opt_state=jax.vmap(tx.init)(client_params),
      rng=jax.random.split(jax.random.key(0), num_clients),
      step=jnp.zeros((num_clients,), jnp.int32),
      num_classes=jnp.asarray(num_classes, jnp.int32),
      num_examples=jnp.asarray(num_examples, jnp.float32))
  server = ServerState(params=shared_params, batch_stats=shared_stats,
                       round=jnp.zeros((), jnp.int32), rng=server_rng)
  return server, clients


def single_client(model, tx: optax.GradientTransformation, rng: jax.Array,
                  image_shape: tuple[int, int], num_classes: int, num_examples: int = 1):
  """One client's state, leaves without the client axis (benchmarks, tools)."""
  shared = params_lib.prefix_predicate(params_lib.FEATURE_EXTRACTOR)
  init = jax.jit(lambda key: init_states(model, tx, shared, key, tuple(image_shape),
                                         np.array([num_classes]), np.array([num_examples])))
  return params_lib.take_client(init(rng)[1], 0)


def load_shared(server: ServerState, clients: ClientStates, variables: dict,
                tx: optax.GradientTransformation) -> tuple[ServerState, ClientStates]:
  """The server and every client with the leaves of `variables` (`{"params": ...,
  "batch_stats": ...}` subtrees of the shared model, e.g. a pretrained backbone)
  in place of theirs; the clients' copies broadcast to `[C, ...]` and their
  optimizer states re-created on the new parameters. Shapes must match."""
  new = {name: jax.tree.map(jnp.asarray, tree) for name, tree in variables.items()}
  for name, tree in new.items():
    have = traverse_util.flatten_dict(getattr(server, name))
    for path, leaf in traverse_util.flatten_dict(tree).items():
      if path not in have or have[path].shape != leaf.shape:
        raise ValueError(f"{name}/{'/'.join(path)} {leaf.shape}: no shared variable of that shape")
  num_clients = clients.step.shape[0]
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), new)
  server = server._replace(**{n: params_lib.merge_trees(getattr(server, n), t)
                              for n, t in new.items()})
  clients = clients._replace(**{n: params_lib.merge_trees(getattr(clients, n), t)
                                for n, t in stacked.items()})
  return server, clients._replace(opt_state=jax.vmap(tx.init)(clients.params))


def client_round_keys(seed_key: jax.Array, round_index, client_ids: jax.Array) -> jax.Array:
  """`fold_in(fold_in(key, round), client_id)` for each client: `[S]` keys."""
  round_key = jax.random.fold_in(seed_key, round_index)
  return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(client_ids)


def finite_per_client(clients: ClientStates) -> jax.Array:
  """`[C]` bool: every parameter and BatchNorm statistic of client c is finite."""
  leaves = jax.tree.leaves((clients.params, clients.batch_stats))
  per_leaf = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
  return jnp.all(jnp.stack(per_leaf), axis=0)


def all_finite(tree) -> jax.Array:
  """Scalar bool: every floating leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
