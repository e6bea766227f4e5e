"""Failing and slow clients (`federated/failures.py`): seeded draws, the round's
handling (a failed client's update lost and weighed 0, a straggler's partial
update counted), the same under every strategy, and bad values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import config_lib, train
from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import failures, placement
from fedreid_jax.federated.params import take_client

SETTINGS = {"fed.dropout": 0.34, "fed.straggler_fraction": 0.5, "fed.straggler_steps": 0.5}


def test_draws_are_seeded_counted_and_bounded():
  ids, steps = list(range(9)), [1019, 516, 404, 230, 117, 60, 19, 14, 7]
  plan = failures.round_failures(3, 5, ids, steps, 0.3, 0.5, 0.25)
  again = failures.round_failures(3, 5, ids, steps, 0.3, 0.5, 0.25)
  assert plan == again and plan != failures.round_failures(3, 6, ids, steps, 0.3, 0.5, 0.25)
  assert len(plan.failed) == 3 and len(plan.stragglers) == 3  # round(2.7), round(0.5 * 6)
  assert not plan.failed & plan.stragglers
  full = dict(zip(ids, steps))
  for c in plan.failed:
    assert 1 <= plan.steps[c] <= full[c]
  for c in plan.stragglers:
    assert plan.steps[c] == int(np.ceil(0.25 * full[c]))
  for c in set(ids) - plan.failed - plan.stragglers:
    assert plan.steps[c] == full[c]
  off = failures.round_failures(3, 5, ids, steps)
  assert off.steps == full and not off.failed and not off.stragglers


def test_truncated_stream_drains_the_rest_with_its_last_batch():
  source = iter(range(10))
  short = failures.truncated(source, 3, 7)
  assert list(short) == [0, 1, 2]
  assert next(source) == 7  # the next client's first batch is where a reader expects it


@pytest.mark.parametrize("field, value, message", [
    ("fed.dropout", 1.0, "must be in \\[0, 1\\)"),
    ("fed.dropout", -0.1, "must be in \\[0, 1\\)"),
    ("fed.straggler_fraction", 1.5, "must be in \\[0, 1\\]"),
    ("fed.straggler_steps", 0.0, "must be in \\(0, 1\\]"),
])
def test_bad_values_are_one_line(field, value, message):
  cfg = fakes.tiny_config(**{field: value})
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg)


def test_dropout_failing_every_client_is_refused_before_compiling():
  cfg = fakes.tiny_config(**{"fed.dropout": 0.9})  # round(2.7) = 3 of the 3 clients
  with pytest.raises(ConfigError, match="fails all 3 selected clients of a round; keep it "
                     "below 0.833"):
    train.Experiment(cfg, fakes.fake_clients())


@pytest.fixture(scope="module")
def rounds_by_strategy():
  """One round with a failure and a straggler under `serial` and `vmap`."""
  out = {}
  for strategy in ("serial", "vmap"):
    exp = train.Experiment(fakes.tiny_config(**{"fed.strategy": strategy, **SETTINGS}),
                           fakes.fake_clients())
    before = jax.tree.map(jnp.copy, exp.clients)
    record = exp.train_round(0)
    out[strategy] = (exp, before, record)
  return out


def test_failed_update_is_lost_and_weighs_nothing(rounds_by_strategy):
  exp, before, record = rounds_by_strategy["serial"]
  plan = failures.round_failures(exp.config.seed, 0, [0, 1, 2], [5, 2, 2],
                                 **failures.settings(exp.config.fed))
  (lost,), (slow,) = plan.failed, plan.stragglers
  names = [c.name for c in exp.clients_data]
  assert record["train/failed"] == 1.0 and record[f"client/{names[lost]}/failed"] == 1.0
  assert record[f"client/{names[lost]}/weight"] == 0.0
  assert record[f"client/{names[slow]}/straggler"] == 1.0
  assert record[f"client/{names[slow]}/steps"] == plan.steps[slow] < [5, 2, 2][slow]
  for x, y in zip(jax.tree.leaves(take_client(before, lost).params),
                  jax.tree.leaves(take_client(exp.clients, lost).params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # as before the round
  # the server: the data-size-weighted mean of the clients that delivered (numpy)
  alive = [c for c in range(3) if c != lost]
  clients = jax.device_get(exp.clients)
  w = np.asarray(clients.num_examples, np.float64)[alive]
  w /= w.sum()
  for k in ("backbone", "embedding"):
    for x, y in zip(jax.tree.leaves(clients.params[k]), jax.tree.leaves(exp.server.params[k])):
      np.testing.assert_allclose(np.asarray(y), np.tensordot(w, np.asarray(x)[alive], 1),
                                 rtol=1e-5, atol=1e-6)


def test_every_strategy_sees_the_same_failures(rounds_by_strategy):
  (_, _, a), (_, _, b) = rounds_by_strategy["serial"], rounds_by_strategy["vmap"]
  keys = [k for k in a if k.endswith(("/failed", "/straggler", "/steps", "/weight"))]
  assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_rows_placement_restores_the_failed_rows():
  rows = placement.Rows(None, 4)
  trained = {"w": jnp.arange(8.0).reshape(4, 2)}
  before = {"w": -jnp.ones((4, 2))}
  out = rows.restore(trained, before, frozenset({1, 3}), np.array([0, 1, 3]))
  np.testing.assert_array_equal(out["w"], [[0, 1], [-1, -1], [4, 5], [-1, -1]])
