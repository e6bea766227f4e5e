"""SCAFFOLD (Karimireddy et al., ICML 2020) with the paper's option II, as
FedPav with control variates over the shared subtree.

State: the server's control variate c (`ServerState.algorithm_state`) and
each client's c_i (`ClientStates.algorithm_state`, `[C, ...]`), all zero at
the start, shaped like the shared params.

- Every local step's gradient is corrected by c - c_i. The correction enters
  as the loss term <w - stop_gradient(w), c - c_i>, whose value is 0 and
  whose gradient is exactly c - c_i (`correction`); the round's shared input
  carries the global model x and c to every client.
- After its K local steps, client i (option II):
      c_i+ = c_i - c + (x - y_i) / (K eta)
  with eta the step size of each parameter: the client optimizer's rate of
  its group (`train.lr_backbone`, `train.lr_head`) divided by
  (1 - `train.momentum`), the steady-state step of heavy-ball or Nesterov
  SGD (with momentum 0 it is the paper's formula exactly).
- The server: x <- FedPav's weighted mean of the returned y_i (global step
  size 1), and c <- c + (1 / N) sum_{i in S} (c_i+ - c_i) over the clients
  that returned an update (N: every client of the run). It computes
  c_i+ - c_i = -c + (x - y_i) / (K_i eta) from the returned y_i and K_i,
  without holding the clients' c_i.
A client that trained no step (not selected, or restored after failing)
keeps its c_i and adds nothing to c.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from fedreid_jax.federated import algorithm as alg_lib
from fedreid_jax.federated.state import ClientStates


def step_sizes(shared_params, train_cfg):
  """Per-leaf eta of the shared params: `lr_backbone` for the backbone,
  `lr_head` for the rest, over (1 - momentum). A tree of floats."""
  scale = 1.0 / (1.0 - float(train_cfg.momentum or 0.0))
  return {k: jax.tree.map(lambda _, k=k: float(
      train_cfg.lr_backbone if k == "backbone" else train_cfg.lr_head) * scale, v)
          for k, v in shared_params.items()}


def init_state(server, clients: ClientStates):
  """(c, c_i `[C, ...]`): zeros shaped like the shared params."""
  c = jax.tree.map(jnp.zeros_like, server.params)
  c_i = jax.tree.map(jnp.zeros_like, {k: clients.params[k] for k in server.params})
  return c, c_i


def shared_input(server) -> dict:
  """The round's input to every local step: the global model x and c."""
  return {"global": server.params, "control": server.algorithm_state}


def correction(params, shared: dict, own) -> jax.Array:
  """<w - stop_gradient(w), c - c_i> over the shared subtree: value 0, gradient
  c - c_i (`Regularizer`; `own`: the client's c_i)."""
  control = shared["control"]
  terms = jax.tree.map(lambda w, c, ci: jnp.vdot(w - lax.stop_gradient(w), c - ci),
                       {k: params[k] for k in control}, control, own)
  return sum(jax.tree.leaves(terms))


def make_after_training(train_cfg):
  """`after_training` for one client: c_i+ = c_i - c + (x - y_i) / (K eta)
  (unchanged when K = 0)."""
  def after_training(one: ClientStates, shared: dict) -> ClientStates:
    steps = one.step.astype(jnp.float32)
    control, x = shared["control"], shared["global"]
    y = {k: one.params[k] for k in control}
    new = jax.tree.map(lambda ci, c, xx, yy, eta: ci - c + (xx - yy) / (jnp.maximum(steps, 1.0) * eta),
                       one.algorithm_state, control, x, y, step_sizes(x, train_cfg))
    keep = jax.tree.map(lambda n, o: jnp.where(steps > 0, n, o), new, one.algorithm_state)
    return one._replace(algorithm_state=keep)
  return after_training


def make_update_server_state(train_cfg):
  """`update_server_state`: c + (1 / N) sum over returned clients of
  (-c + (x - y_i) / (K_i eta)); trained `[S, ...]`, weights `[S]`."""
  def update(before, trained: ClientStates, weights: jax.Array, num_clients: int):
    control, x = before.algorithm_state, before.params
    steps = trained.step.astype(jnp.float32)
    returned = ((weights > 0) & (steps > 0)).astype(jnp.float32)  # [S]
    per_client = returned / jnp.maximum(steps, 1.0)  # [S]: 1 / K_i, 0 when nothing returned

    def leaf(c, xx, yy, eta):  # yy: [S, ...]
      moved = jnp.tensordot(per_client, xx[None] - yy, axes=1) / eta  # sum_i (x - y_i)/(K_i eta)
      return c + (moved - jnp.sum(returned) * c) / num_clients
    y = {k: trained.params[k] for k in control}
    return jax.tree.map(leaf, control, x, y, step_sizes(x, train_cfg))
  return update


def scaffold(config, model=None) -> alg_lib.Algorithm:
  """FedPav with SCAFFOLD's control variates (option II)."""
  del model
  return dataclasses.replace(
      alg_lib.fedpav(config), name="scaffold", label="SCAFFOLD",
      init_state=init_state, shared_input=shared_input, client_regularizer=correction,
      after_training=make_after_training(config.train),
      update_server_state=make_update_server_state(config.train))
