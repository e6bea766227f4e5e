"""Ditto (Li et al., ICML 2021): FedPav's global model, plus a personal model
on each client.

Each client keeps a personal model v (`ClientStates.algorithm_state`:
{"params", "batch_stats", "opt_state"}, `[C, ...]`; its own classifier
included), which starts as the client's initial model. In every local step
the client takes FedPav's step on its copy of the global model w, then a
step of v on the same augmented batch with the loss

    CE(v) + (mu / 2) ||v - w_global||^2     over the shared subtree

(`config.prox.mu`; `w_global`: the model the server sent this round, the
round's shared input). Only w is sent back and averaged, as in FedPav; v
never leaves the client and is what the client's model is evaluated as
(`Algorithm.client_model`). v's optimizer state is kept across rounds (v
trains only on its client); w's is re-created each round as in FedPav.
A round trains two models: about twice FedPav's local compute.
"""
from __future__ import annotations

import dataclasses

import jax

from fedreid_jax.federated import algorithm as alg_lib
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated.state import ClientStates


def make_init_state(tx):
  """`init_state`: every personal model a copy of its client's initial model
  with a fresh optimizer state (`tx`: the clients' optimizer)."""
  def init_state(server, clients: ClientStates):
    personal = {"params": clients.params, "batch_stats": clients.batch_stats,
                "opt_state": jax.vmap(tx.init)(clients.params)}
    return (), personal
  return init_state


def personal_model(one: ClientStates) -> dict:
  """`client_model`: the client's personal params and statistics."""
  return {"params": one.algorithm_state["params"],
          "batch_stats": one.algorithm_state["batch_stats"]}


def ditto(config, mu: float) -> alg_lib.Algorithm:
  """FedPav whose clients also train personal models, proximal weight `mu`."""
  return dataclasses.replace(
      alg_lib.fedpav(config), name="ditto", label="Ditto",
      init_state=make_init_state(local_lib.make_optimizer(config.train)),
      personal_mu=float(mu), client_model=personal_model)
