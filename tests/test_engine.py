"""The compiled round: masking, strategies, compile-once, state bookkeeping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import train
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import rounds
from fedreid_jax.federated.params import take_client


def experiment(**overrides):
  cfg = fakes.tiny_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    cfg[section][field] = value
  return train.Experiment(cfg, fakes.fake_clients())


@pytest.fixture(scope="module")
def lockstep():
  """One `sequential` experiment shared by the tests that only read it or step it."""
  return experiment()


@pytest.fixture(scope="module")
def serial_after_one_round():
  exp = experiment(**{"fed.strategy": "serial", "fed.chunk_steps": 2})  # scan chunks + single steps
  exp.train_round(0)
  return exp


def leaves_equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_masked_step_changes_nothing(lockstep):
  exp = lockstep
  step = local_lib.make_local_step(exp.model, exp.tx, exp.config.train)
  sel = exp.fns.begin(exp.server, exp.clients, jnp.arange(3))
  state = take_client(sel, 0)
  images = jnp.asarray(exp.sources[0].array[:8])
  labels = jnp.asarray(exp.sources[0].labels[:8])
  skipped, metrics = jax.jit(step)(state, images, labels, jnp.array(False))
  assert leaves_equal(skipped, state)
  assert float(metrics[2]) == 0.0
  stepped, metrics = jax.jit(step)(state, images, labels, jnp.array(True))
  assert not leaves_equal(stepped.params, state.params)
  assert not leaves_equal(stepped.batch_stats, state.batch_stats)
  assert int(stepped.step) == 1 and float(metrics[2]) == 1.0


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_lockstep_strategies_agree_with_serial(strategy, serial_after_one_round):
  seq = serial_after_one_round
  vec = experiment(**{"fed.strategy": strategy})
  vec.train_round(0)
  # Same maths, different batching: float reassociation, amplified over a
  # round of SGD steps with batch-statistics BatchNorm, stays under 1% of
  # each leaf's scale (a wrong client/step mapping gives O(1) differences).
  for tree in ("clients", "server"):
    for a, b in zip(jax.tree.leaves(getattr(seq, tree).params),
                    jax.tree.leaves(getattr(vec, tree).params)):
      scale = float(np.max(np.abs(a))) + 1e-6
      assert float(np.max(np.abs(a - b))) <= 1e-2 * scale


def test_round_compiles_once_across_rounds(lockstep, serial_after_one_round):
  lockstep.train_round(0)
  before = dict(rounds.TRACE_COUNTS)
  assert before["train_chunk"] >= 1 and before["train_lane[2]"] >= 1
  for r in range(1, 4):
    lockstep.train_round(r)
    serial_after_one_round.train_round(r)
  assert dict(rounds.TRACE_COUNTS) == before


def test_unselected_clients_and_classifiers_stay_put():
  exp = experiment(**{"fed.clients_per_round": 2})
  old = jax.tree.map(jnp.copy, exp.clients)  # the round donates its inputs
  old_server = jax.tree.map(jnp.copy, exp.server)
  record = exp.train_round(0)
  chosen = [i for i, c in enumerate(exp.clients_data) if f"client/{c.name}/loss" in record]
  assert len(chosen) == 2
  (skipped,) = set(range(3)) - set(chosen)
  assert leaves_equal(take_client(exp.clients, skipped), take_client(old, skipped))
  for c in chosen:  # trained: classifier moved, and kept by the client
    assert not leaves_equal(exp.clients.params["classifier"], old.params["classifier"])
  assert "classifier" not in exp.server.params
  assert not leaves_equal(exp.server.params, old_server.params)
  assert int(exp.server.round) == 1


def test_local_algorithm_shares_nothing():
  exp = experiment(**{"fed.algorithm": "local"})
  server0 = exp.server
  exp.train_round(0)
  assert leaves_equal(exp.server.params, server0.params)
  a = take_client(exp.clients, 0).params["backbone"]
  b = take_client(exp.clients, 1).params["backbone"]
  assert not leaves_equal(a, b)  # each client trained its own backbone


def test_padding_waste_is_reported(lockstep, serial_after_one_round):
  record = lockstep.train_round(5)
  assert serial_after_one_round.train_round(5)["train/padding_waste"] == 1.0
  # clients have 40, 18, 16 images -> 5, 2, 2 steps of 8; chunks of 4 -> 2 chunks x 3 lanes x 4
  assert record["train/steps"] == 9
  assert record["train/padding_waste"] == pytest.approx(24 / 9)


def test_serial_streams_lazy_data_through_grain():
  exp = experiment(**{"fed.strategy": "serial", "data.in_memory": False, "fed.chunk_steps": 2})
  assert all(src.array is None for src in exp.sources)  # nothing preloaded
  before = jax.tree.map(jnp.copy, exp.clients.params["classifier"])
  record = exp.train_round(0)
  assert record["train/steps"] == 9 and record["train/padding_waste"] == 1.0
  assert np.isfinite(record["train/loss"])
  assert not leaves_equal(exp.clients.params["classifier"], before)
