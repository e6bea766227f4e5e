"""Algorithms as registered values: the registry's bad input, a plugin from a
config file through the CLI, a client regularizer and a server optimizer
against hand computations, and the round-level mean invariant for the
`sharded` and `devices` strategies."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fakes
from fedreid_jax import config_lib, federated, train
from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import rounds
from fedreid_jax.federated import state as state_lib
from fedreid_jax.federated.state import ClientStates, ServerState
from fedreid_jax.models.reid import build_model
from test_engine import assert_server_is_weighted_mean

ROOT = fakes.ROOT
BUILT_IN = ("local", "fedpav", "fedpav_kd", "fedpav_cdw", "fedpav_kd_cdw", "fedavg", "centralised")


def test_built_in_names_labels_and_order():
  assert federated.registered()[:len(BUILT_IN)] == BUILT_IN
  cfg = fakes.tiny_config()
  labels = [config_lib.describe_algorithm(n, cfg).label for n in BUILT_IN]
  assert labels == ["Local training", "FedPav", "FedPav+KD", "FedPav+CDW", "FedPav+KD+CDW",
                    "FedAvg", "Centralised"]


@pytest.mark.parametrize("field", ["fed.algorithm", "baselines"])
def test_unknown_name_is_one_line_naming_the_registered(field):
  cfg = fakes.tiny_config()
  if field == "baselines":
    cfg.baselines = ("no_such_algorithm",)
  else:
    cfg.fed.algorithm = "no_such_algorithm"
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  message = str(e.value)
  assert "\n" not in message and f"config.{field}='no_such_algorithm'" in message
  assert all(name in message for name in BUILT_IN)


def test_factory_returning_something_else_is_refused_before_anything_is_built():
  federated.register_algorithm("returns_a_dict_test", lambda config, model: {"shared": ()})
  cfg = fakes.tiny_config(**{"fed.algorithm": "returns_a_dict_test"})
  with pytest.raises(ConfigError, match="returned dict, not a fedreid_jax.federated.Algorithm"
                     ".*registered: local, fedpav"):
    config_lib.validate(cfg)


def test_a_name_registered_twice_with_different_factories_is_refused():
  first = lambda config, model: federated.build_algorithm("fedpav", config, model)
  federated.register_algorithm("twice_test", first)
  federated.register_algorithm("twice_test", first)  # the same factory again: fine
  with pytest.raises(ConfigError, match="'twice_test' is already registered.*registered: local"):
    federated.register_algorithm("twice_test", lambda config, model: None)
  with pytest.raises(ConfigError, match="already registered"):
    federated.register_algorithm("fedpav", first)


def test_a_config_file_loaded_twice_registers_its_algorithm_once():
  path = os.path.join(ROOT, "tests", "configs", "plugin_algorithm.py")
  for _ in range(2):
    cfg = config_lib.load_config_file(path)
  assert cfg.fed.algorithm == "proximal_plugin" and "proximal_plugin" in federated.registered()
  config_lib.validate(cfg)
  assert config_lib.describe_algorithm("proximal_plugin", cfg).label == "Proximal plugin"


def test_client_regularizer_adds_its_gradient_to_the_step():
  """One plain-SGD step with (mu/2)||w - g||^2 on the shared subtree moves the
  shared weights by an extra -lr * mu * (w - g) (by hand) against the same
  step with g = w (a zero term), the classifier not at all."""
  cfg = fakes.tiny_config(**{"model.dropout": 0.0})
  model = build_model(cfg.model, 4)
  lr, mu = 0.1, 0.5
  tx = optax.sgd(lr)
  shared_keys = ("backbone", "embedding")

  def regularizer(params, global_params, client_state):
    own = jax.tree.leaves({k: params[k] for k in shared_keys})
    return mu / 2 * sum(jnp.sum((a - b) ** 2) for a, b in zip(own, jax.tree.leaves(global_params)))
  proximal = jax.jit(local_lib.make_local_step(model, tx, cfg.train, regularizer))
  state = state_lib.single_client(model, tx, jax.random.key(0), cfg.data.image_size, 4)
  shifted = {k: jax.tree.map(lambda x: x + 0.01, state.params[k]) for k in shared_keys}
  rng = np.random.default_rng(0)  # g = w + 0.01
  images = rng.integers(0, 256, (cfg.train.batch_size, *cfg.data.image_size, 3), np.uint8)
  args = (images, rng.integers(0, 4, cfg.train.batch_size).astype(np.int32), jnp.array(True))
  own = {k: state.params[k] for k in shared_keys}
  a, _ = proximal(state, *args, own)
  b, _ = proximal(state, *args, shifted)
  diff = jax.tree.map(jnp.subtract, b.params, a.params)
  for k in shared_keys:  # -lr * mu * (w - g) = lr * mu * 0.01
    for leaf in jax.tree.leaves(diff[k]):
      np.testing.assert_allclose(leaf, lr * mu * 0.01, rtol=0, atol=2e-6)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(diff["classifier"]))


def test_server_sgd_of_rate_one_lands_on_the_mean_and_momentum_keeps_state():
  """With `optax.sgd(1.0)` on the pseudo-gradient `server - mean` the server
  lands on the weighted mean; with momentum its state is carried in
  `ServerState.opt_state` (by hand: v1 = d1, v2 = 0.5 v1 + d2, x2 = x1 - v2)."""
  server = ServerState(params={"backbone": {"w": jnp.array([1.0, 2.0])}},
                       batch_stats={"backbone": {"m": jnp.zeros(1)}}, round=jnp.int32(0),
                       rng=jax.random.key(0))
  trained = ClientStates(params={"backbone": {"w": jnp.array([[3.0, 2.0], [5.0, 6.0]])}},
                         batch_stats={"backbone": {"m": jnp.array([[1.0], [3.0]])}},
                         opt_state=(), rng=jnp.zeros(2), step=jnp.zeros(2, jnp.int32),
                         num_classes=jnp.array([3, 5]), num_examples=jnp.array([1.0, 3.0]))
  weights = trained.num_examples
  plain = federated.Algorithm("p", "P", ("backbone",))
  sgd1 = dataclasses.replace(plain, server_optimizer=optax.sgd(1.0))
  mean = rounds.aggregate(server, trained, weights, jnp.int32(0), plain)
  landed = rounds.aggregate(server._replace(opt_state=optax.sgd(1.0).init(server.params)),
                            trained, weights, jnp.int32(0), sgd1)
  np.testing.assert_allclose(mean.params["backbone"]["w"], [4.5, 5.0])  # 0.25*[3,2]+0.75*[5,6]
  np.testing.assert_allclose(landed.params["backbone"]["w"], [4.5, 5.0], rtol=1e-6)
  heavy = dataclasses.replace(plain, server_optimizer=optax.sgd(1.0, momentum=0.5))
  s = server._replace(opt_state=heavy.server_optimizer.init(server.params))
  x = np.array([1.0, 2.0])
  v = np.zeros(2)
  for _ in range(2):
    s = rounds.aggregate(s, trained, weights, jnp.int32(0), heavy)
    v = 0.5 * v + (x - np.array([4.5, 5.0]))
    x = x - v
    np.testing.assert_allclose(s.params["backbone"]["w"], x, rtol=1e-6)
  np.testing.assert_allclose(s.batch_stats["backbone"]["m"], [2.5])  # statistics: the mean


@pytest.mark.parametrize("strategy", ["sharded", "devices"])
def test_round_invariant_for_sharded_and_devices(strategy):
  """A whole round of `strategy`: the server equals the data-size-weighted mean
  of the trained clients (numpy); the server-optimizer path with sgd(1.0),
  applied to the same round's trained clients, lands on it within float
  tolerance (its state carried in `ServerState.opt_state`)."""
  exp = train.Experiment(fakes.tiny_config(**{"fed.strategy": strategy}), fakes.fake_clients())
  before = jax.tree.map(jnp.copy, exp.server)
  exp.train_round(0)
  assert_server_is_weighted_mean(exp, [0, 1, 2])
  sgd1 = federated.with_server_optimizer(exp.algorithm, optax.sgd(1.0), "sgd1", "sgd(1)")
  stepped = rounds.aggregate(before._replace(opt_state=optax.sgd(1.0).init(before.params)),
                             exp.clients, exp.clients.num_examples, jnp.int32(0), sgd1)
  for x, y in zip(jax.tree.leaves(exp.server.params), jax.tree.leaves(stepped.params)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
  assert exp.server.opt_state == () and int(stepped.round) == int(exp.server.round)


@pytest.mark.slow
def test_plugin_algorithm_from_its_own_config_file_runs_from_the_cli(tmp_path):
  workdir = tmp_path / "run"
  out = fakes.cli("--config", "tests/configs/plugin_algorithm.py", "--workdir", str(workdir),
                  f"--config.data.root={tmp_path / 'data'}", timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records if r["kind"] == "train"] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in records if r["kind"] == "train")
  assert "Proximal plugin R-1" in (workdir / "results.md").read_text()
  assert json.loads((workdir / "config.json").read_text())["fed"]["algorithm"] == \
      "proximal_plugin"
