"""The round: broadcast, masked steps, strategies, compile-once, sharing rules."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import train
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import rounds, state as state_lib
from fedreid_jax.federated.params import take_client
from fedreid_jax.federated.tracing import TRACE_COUNTS


def experiment(**overrides):
  return train.Experiment(fakes.tiny_config(**overrides), fakes.fake_clients())


def copy(tree):
  return jax.tree.map(jnp.copy, tree)  # rounds donate their inputs


def leaves_equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_close(a, b, rel=1e-2):
  """Leafwise max |a - b| <= rel * max |a|: float reassociation over a round of
  SGD with batch-statistics BatchNorm stays far below 1%; a wrong client or
  step mapping gives O(1) differences."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(np.max(np.abs(x))) + 1e-6
    assert float(np.max(np.abs(x - y))) <= rel * scale


@pytest.fixture(scope="module")
def serial_round():
  """`serial` with K=2: clients of 5, 2, 2 steps run scanned chunks and single steps."""
  exp = experiment(**{"fed.strategy": "serial", "fed.chunk_steps": 2})
  before = (copy(exp.server), copy(exp.clients))
  record = exp.train_round(0)
  return exp, before, record


@pytest.fixture(scope="module")
def lockstep_rounds():
  """`vmap` and `sequential` after the same first round as `serial_round`."""
  out = {}
  for strategy in ("vmap", "sequential"):
    exp = experiment(**{"fed.strategy": strategy, "fed.chunk_steps": 4})  # masked steps
    out[strategy] = (exp, exp.train_round(0))
  return out


def test_broadcast_hands_out_global_model_fresh_optimizer_and_own_keys(serial_round):
  exp, (server, clients), _ = serial_round
  ids = jnp.array([2, 0])
  sel = exp.stages.broadcast(server, clients, ids)
  for lane, cid in enumerate([2, 0]):
    one = take_client(sel, lane)
    for part in ("backbone", "embedding"):
      assert leaves_equal(one.params[part], server.params[part])
    assert leaves_equal(one.params["classifier"], take_client(clients, cid).params["classifier"])
    assert leaves_equal(one.opt_state, exp.tx.init(one.params))
    want = jax.random.fold_in(jax.random.fold_in(server.rng, server.round), cid)
    assert bool(jnp.all(jax.random.key_data(one.rng) == jax.random.key_data(want)))
    assert int(one.step) == 0
  assert not bool(jnp.all(jax.random.key_data(sel.rng[0]) == jax.random.key_data(sel.rng[1])))


def test_masked_step_changes_nothing(serial_round):
  exp, (server, clients), _ = serial_round
  step = jax.jit(local_lib.make_local_step(exp.model, exp.tx, exp.config.train))
  state = take_client(exp.stages.broadcast(server, clients, jnp.arange(3)), 0)
  batch = exp.inputs.gather(0, np.arange(8))
  images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  skipped, metrics = step(state, images, labels, jnp.array(False))
  assert leaves_equal(skipped, state)
  assert float(metrics["steps"]) == 0.0 and float(metrics["loss"]) == 0.0
  stepped, metrics = step(state, images, labels, jnp.array(True))
  assert not leaves_equal(stepped.params, state.params)
  assert not leaves_equal(stepped.batch_stats, state.batch_stats)
  assert int(stepped.step) == 1 and float(metrics["steps"]) == 1.0


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_lockstep_strategies_agree_with_serial_per_client(strategy, serial_round, lockstep_rounds):
  serial, _, serial_record = serial_round
  other, record = lockstep_rounds[strategy]
  for c in range(3):
    assert_close(take_client(serial.clients, c).params, take_client(other.clients, c).params)
    name = serial.clients_data[c].name
    assert record[f"client/{name}/steps"] == serial_record[f"client/{name}/steps"]
    assert record[f"client/{name}/loss"] == pytest.approx(serial_record[f"client/{name}/loss"],
                                                          rel=1e-2)
  assert_close(serial.server.params, other.server.params)


def test_padding_waste_and_steps(serial_round, lockstep_rounds):
  _, _, serial_record = serial_round
  _, record = lockstep_rounds["sequential"]
  # clients have 40, 18, 16 images -> 5, 2, 2 steps of 8; chunks of 4 -> 2 chunks x 3 lanes x 4
  assert record["train/steps"] == serial_record["train/steps"] == 9
  assert record["train/padding_waste"] == pytest.approx(24 / 9)
  assert serial_record["train/padding_waste"] == 1.0
  weights = [serial_record[f"client/c{i}/weight"] for i in range(3)]
  np.testing.assert_allclose(weights, np.array([40, 18, 16]) / 74, rtol=1e-6)


def weighted_mean_of_shared(exp, ids):
  """numpy: the data-size-weighted mean of clients `ids`' shared subtrees
  (params and BatchNorm statistics), in float64."""
  clients = jax.device_get(exp.clients)
  w = np.asarray(clients.num_examples, np.float64)[ids]
  w = w / w.sum()
  mean = lambda tree: jax.tree.map(lambda x: np.tensordot(w, np.asarray(x, np.float64)[ids], 1),
                                   {k: tree[k] for k in ("backbone", "embedding")})
  return mean(clients.params), mean(clients.batch_stats)


def assert_server_is_weighted_mean(exp, ids, rtol=1e-5):
  params, stats = weighted_mean_of_shared(exp, ids)
  for want, got in ((params, exp.server.params), (stats, exp.server.batch_stats)):
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(y, np.float64), x, rtol=rtol, atol=1e-6)


def test_server_is_the_weighted_mean_of_the_trained_clients(serial_round, lockstep_rounds):
  """The round-level invariant (fedpav): after a whole round, the server's shared
  parameters and statistics equal the data-size-weighted mean of the trained
  clients' shared subtrees, for `serial`, `vmap` and `sequential` (`sharded`
  and `devices`: tests/test_algorithm_registry.py)."""
  exps = [serial_round[0]] + [e for e, _ in lockstep_rounds.values()]
  for exp in exps:
    assert_server_is_weighted_mean(exp, [0, 1, 2])


def test_every_strategy_compiles_once_across_rounds(serial_round, lockstep_rounds):
  exps = [serial_round[0]] + [e for e, _ in lockstep_rounds.values()]
  for exp in exps:
    exp.train_round(1)
  before = dict(TRACE_COUNTS)
  for name in ("serial/step", "serial/chunk", "vmap/chunk", "sequential/chunk", "broadcast",
               "weights", "aggregate", "scatter"):
    assert before.get(name, 0) >= 1, name
  for r in range(2, 4):
    for exp in exps:
      exp.train_round(r)
  assert dict(TRACE_COUNTS) == before


def test_unselected_clients_stay_put_and_classifiers_stay_private():
  exp = experiment(**{"fed.clients_per_round": 2})
  old, old_server = copy(exp.clients), copy(exp.server)
  chosen = list(exp.selected(0))
  record = exp.train_round(0)
  assert len(chosen) == 2 and all(f"client/c{c}/loss" in record for c in chosen)
  (skipped,) = set(range(3)) - set(chosen)
  assert leaves_equal(take_client(exp.clients, skipped), take_client(old, skipped))
  for c in chosen:  # trained: classifier moved, and kept by the client
    assert not leaves_equal(take_client(exp.clients, c).params["classifier"],
                            take_client(old, c).params["classifier"])
  assert "classifier" not in exp.server.params
  assert not leaves_equal(exp.server.params, old_server.params)
  assert int(exp.server.round) == 1


def test_local_algorithm_keeps_each_clients_own_model_over_rounds():
  exp = experiment(**{"fed.algorithm": "local"})
  server0 = copy(exp.server)
  exp.train_round(0)
  after_one = copy(exp.clients)
  # Round 2 must start each client from its own round-1 model, not the server's.
  sel = exp.stages.broadcast(exp.server, exp.clients, jnp.arange(3))
  assert leaves_equal(sel.params, after_one.params)
  assert leaves_equal(sel.batch_stats, after_one.batch_stats)
  exp.train_round(1)
  assert leaves_equal(exp.server.params, server0.params)
  assert int(exp.server.round) == 2
  backbones = [take_client(exp.clients, c).params["backbone"] for c in range(3)]
  assert not leaves_equal(backbones[0], backbones[1])
  assert not leaves_equal(take_client(exp.clients, 0).params, take_client(after_one, 0).params)


def test_fedavg_shares_the_classifier_too():
  exp = experiment(**{"fed.algorithm": "fedavg"})
  exp.train_round(0)
  assert set(exp.server.params) == {"backbone", "embedding", "classifier"}
  sel = exp.stages.broadcast(exp.server, exp.clients, jnp.arange(3))
  heads = [take_client(sel, c).params["classifier"] for c in range(3)]
  assert leaves_equal(heads[0], heads[1]) and leaves_equal(heads[0], exp.server.params["classifier"])


def test_measurement_and_server_stage_hooks():
  """A constant client measurement reaches the record and can weight the
  aggregation; a server stage that doubles the model runs after aggregation."""
  def const(before, after, images, labels):
    del after, images, labels
    return jnp.float32(0.5) + 0.0 * before.num_examples

  seen = []

  def double(server, ctx):
    seen.append((ctx.round_index, tuple(np.asarray(ctx.selected)), ctx.public))
    return server._replace(params=jax.tree.map(lambda x: 2 * x, server.params))

  cfg = fakes.tiny_config()
  plain = train.Experiment(cfg, fakes.fake_clients())
  hooked = train.Experiment(cfg, fakes.fake_clients(), public=fakes.fake_clients()[0].train,
                            measurements={"const": const}, server_stages=[double])
  plain.train_round(0)
  record = hooked.train_round(0)
  assert [record[f"client/c{i}/const"] for i in range(3)] == [0.5, 0.5, 0.5]
  assert seen[0][:2] == (0, (0, 1, 2)) and seen[0][2].num_steps(0) == 5
  assert_close(jax.tree.map(lambda x: 2 * x, plain.server.params), hooked.server.params,
               rel=1e-5)
  weighted = dataclasses.replace(plain.algorithm, measurements={"const": const},
                                 weighting=lambda trained, m: m["const"] * 0 + jnp.arange(3.0))
  stages = rounds.make_round_stages(weighted, plain.tx)
  assert np.allclose(stages.weights(plain.clients, {"const": jnp.ones(3)}), [0, 1, 2])


def test_in_memory_and_streamed_batches_and_round_are_identical():
  cfgs = [fakes.tiny_config(**{"data.in_memory": in_memory}) for in_memory in (True, False)]
  exps = [train.Experiment(c, fakes.fake_clients()) for c in cfgs]
  for client, round_index in ((0, 0), (2, 3)):
    a, b = (list(e.inputs.stream(client, round_index)) for e in exps)
    assert len(a) == len(b) == exps[0].inputs.num_steps(client)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
  records = [e.train_round(0) for e in exps]
  assert records[0] == records[1]
  assert leaves_equal(exps[0].server.params, exps[1].server.params)


def test_init_gives_every_client_the_same_start_and_own_classifier():
  exp = experiment()
  for c in (1, 2):
    assert leaves_equal(take_client(exp.clients, c).params["backbone"], exp.server.params["backbone"])
  assert not leaves_equal(take_client(exp.clients, 0).params["classifier"],
                          take_client(exp.clients, 1).params["classifier"])
  np.testing.assert_array_equal(exp.clients.num_examples, [40, 18, 16])
  assert isinstance(exp.server, state_lib.ServerState) and exp.server.opt_state == ()


def test_non_finite_training_names_the_round_and_client():
  from fedreid_jax.errors import TrainingDiverged
  exp = experiment()
  record = exp.train_round(0)
  exp.check_finite(0, record)  # healthy: no error
  exp.clients = exp.clients._replace(params=jax.tree.map(
      lambda x: x.at[1].set(jnp.nan) if x.ndim and x.shape[0] == 3 else x, exp.clients.params))
  with pytest.raises(TrainingDiverged, match=r"round 1: .* client\(s\) c1;"):
    exp.check_finite(0, record)
