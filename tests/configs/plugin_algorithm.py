"""A user's own algorithm, registered from a config file (tests/test_algorithm_registry.py).

  python -m fedreid_jax.main --config tests/configs/plugin_algorithm.py --workdir runs/plugin

`proximal_plugin`: FedPav whose clients add (mu / 2) ||w - w_global||^2 over
the shared subtree to their loss (FedProx's term), with a server momentum
step on the pseudo-gradient; three small synthetic clients, 2 rounds.
"""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import optax

from fedreid_jax import federated

MU = 0.1


def _synthetic_config():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "synthetic.py")
  spec = importlib.util.spec_from_file_location("synthetic_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def proximal(config, model):
  base = federated.build_algorithm("fedpav", config, model)

  def regularizer(params, global_params, client_state):
    del client_state  # the client's algorithm_state: none here
    own = {k: params[k] for k in global_params}
    return MU / 2 * sum(jnp.sum((a - b) ** 2) for a, b in
                        zip(jax.tree.leaves(own), jax.tree.leaves(global_params)))
  return dataclasses.replace(base, label="Proximal plugin", client_regularizer=regularizer,
                             server_optimizer=optax.sgd(1.0, momentum=0.5))


federated.register_algorithm("proximal_plugin", proximal)


def get_config():
  c = _synthetic_config()
  c.data.clients = ("syn_viper", "syn_3dpes", "syn_ilids")
  c.data.image_size = (32, 16)
  c.model.width = 4
  c.model.embed_dim = 16
  c.train.batch_size = 8
  c.train.pad = 2
  c.fed.algorithm = "proximal_plugin"
  c.fed.rounds = 2
  c.eval.every_rounds = 1
  c.eval.batch_size = 16
  c.baselines = ()
  return c
