"""SCAFFOLD and Ditto (fedreid_jax/federated/scaffold.py, ditto.py), each
against a plain loop written here over two rounds of a tiny experiment:
plain SGD steps of the model's loss, the control-variate corrections and
updates, the personal model's proximal steps; then every strategy agrees,
and a resume with failing and slow clients is bit-for-bit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import fakes
from fedreid_jax import config_lib, train
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import rounds
from fedreid_jax.models.preprocess import normalize

LR = {"backbone": 0.05, "embedding": 0.1, "classifier": 0.1}
DATA = ((3, 8), (2, 8))  # 24 and 16 images: 3 and 2 steps of 8


def plain_config(algorithm, **overrides):
  """Plain SGD (no momentum, no decay), no augmentation, no dropout: the hand
  loops below are the whole computation."""
  return fakes.tiny_config(**{
      "fed.algorithm": algorithm, "train.momentum": 0.0, "train.nesterov": False,
      "train.weight_decay": 0.0, "train.pad": 0, "train.flip": False, "model.dropout": 0.0,
      "train.lr_backbone": LR["backbone"], "train.lr_head": LR["embedding"],
      **overrides})


def flat(tree):
  return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(tree).items()}


def unflat(d):
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in d.items()})


def grad_fn(model):
  """(params, stats, images uint8 [B, H, W, 3], labels [B], classes) ->
  (flat gradients, new stats): the cross-entropy of one batch."""
  def loss(params, stats, images, labels, classes):
    x = normalize(images)  # the training transform without padding, flip or erasing
    (_, logits), upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return local_lib.masked_cross_entropy(logits, labels, classes), upd["batch_stats"]
  g = jax.jit(jax.grad(loss, has_aux=True))
  return lambda p, s, x, y, c: (lambda out: (flat(out[0]), out[1]))(
      g(unflat(p), s, x, y, c))


def assert_close(got, want, rel=2e-3, atol=1e-6):
  """Leafwise max |got - want| <= rel * max |want| + atol (float32 against
  float64 over a few SGD steps; a wrong formula gives O(1) differences; the
  atol covers leaves with no gradient, such as a bias before BatchNorm)."""
  for k in want:
    scale = float(np.max(np.abs(want[k])))
    assert float(np.max(np.abs(np.asarray(got[k], np.float64) - want[k]))) <= rel * scale + atol, k


def shared_keys(d):
  return [k for k in d if k[0] in ("backbone", "embedding")]


def test_scaffold_matches_a_plain_loop_over_two_rounds():
  """Option II over two rounds (the second corrects every step by c - c_i):
  the server model, c, and every c_i against the paper's formulas."""
  cfg = plain_config("scaffold")
  config_lib.validate(cfg)
  exp = train.Experiment(cfg, fakes.fake_clients(DATA))
  grad = grad_fn(exp.model)
  x, stats = flat(exp.server.params), exp.server.batch_stats
  c = {k: np.zeros_like(v) for k, v in x.items()}
  heads = [flat(jax.tree.map(lambda a: a[i], exp.clients.params)) for i in range(2)]
  c_i = [dict(c), dict(c)]
  sizes = np.asarray(exp.clients.num_examples, np.float64)
  for r in range(2):
    trained, new_stats = [], []
    for i in range(2):
      y = {**heads[i], **x}
      s = jax.tree.map(lambda a: a, stats)
      steps = 0
      for batch in exp.inputs.stream(i, r):
        g, s = grad(y, s, batch["image"], batch["label"], int(exp.clients.num_classes[i]))
        for k in y:
          corr = c[k] - c_i[i][k] if k in x else 0.0
          y[k] = y[k] - LR[k[0]] * (g[k] + corr)
        steps += 1
      c_new = {k: c_i[i][k] - c[k] + (x[k] - y[k]) / (steps * LR[k[0]]) for k in x}
      trained.append((y, s, {k: c_new[k] - c_i[i][k] for k in x}))
      c_i[i], heads[i] = c_new, y
      new_stats.append(flat(s))
    exp.train_round(r)
    w = sizes / sizes.sum()
    x = {k: sum(w[i] * trained[i][0][k] for i in range(2)) for k in x}
    stats = unflat({k: sum(w[i] * new_stats[i][k] for i in range(2)) for k in new_stats[0]})
    c = {k: c[k] + sum(t[2][k] for t in trained) / 2 for k in c}
    assert_close(flat(exp.server.params), x)
    assert_close(flat(exp.server.algorithm_state), c)
    for i in range(2):
      assert_close(flat(jax.tree.map(lambda a: a[i], exp.clients.algorithm_state)), c_i[i])
  assert max(float(np.max(np.abs(v))) for v in c.values()) > 0  # the corrections were real


def test_ditto_personal_models_match_a_plain_loop_over_two_rounds():
  """Each personal model takes a step of CE + (mu / 2) ||v - w_global||^2 on
  every batch, from its own previous round's value; the global model is
  FedPav's; the client's evaluated model is the personal one."""
  mu = 0.5
  cfg = plain_config("ditto", **{"prox.mu": mu})
  exp = train.Experiment(cfg, fakes.fake_clients(DATA))
  grad = grad_fn(exp.model)
  x = flat(exp.server.params)
  v = [flat(jax.tree.map(lambda a: a[i], exp.clients.params)) for i in range(2)]
  v_stats = [jax.tree.map(lambda a: a[i], exp.clients.batch_stats) for i in range(2)]
  for r in range(2):
    for i in range(2):
      for batch in exp.inputs.stream(i, r):
        g, v_stats[i] = grad(v[i], v_stats[i], batch["image"], batch["label"],
                             int(exp.clients.num_classes[i]))
        v[i] = {k: a - LR[k[0]] * (g[k] + (mu * (a - x[k]) if k in x else 0.0))
                for k, a in v[i].items()}
    exp.train_round(r)
    x = flat(exp.server.params)  # FedPav's mean (checked against FedPav below)
    for i in range(2):
      assert_close(flat(jax.tree.map(lambda a: a[i], exp.clients.algorithm_state["params"])),
                   v[i])
  own = rounds.client_variables(exp.clients, 1, alg=exp.algorithm)
  want = flat(jax.tree.map(lambda a: a[1], exp.clients.algorithm_state["params"]))
  for k, leaf in flat(own["params"]).items():
    np.testing.assert_array_equal(leaf, want[k])
  fedpav = train.Experiment(plain_config("fedpav"), fakes.fake_clients(DATA))
  for r in range(2):
    fedpav.train_round(r)
  assert_close(flat(exp.server.params), flat(fedpav.server.params), rel=1e-4)


# `sequential` runs the same compiled chunk as `vmap` under `lax.map` instead
# of `vmap`, whatever the algorithm (test_engine.py checks it against serial).
OTHER_STRATEGIES = ("vmap", "sharded", "devices")


@pytest.mark.parametrize("algorithm,strategies", [
    ("scaffold", OTHER_STRATEGIES), ("ditto", OTHER_STRATEGIES),
    ("fedbn", ("devices",)), ("fedprox", ("devices",)), ("fedadam", ("devices",))])
def test_every_strategy_gives_the_same_numbers(algorithm, strategies):
  """The new algorithms against `serial`: the server (and its optimizer
  state), the algorithm's state, the clients. SCAFFOLD and Ditto, whose
  state lives on the clients, under the lockstep, sharded and devices
  strategies; FedBN (its broadcast differs between gathered and in-place
  rows) under `devices`; FedProx (its term reaches the step through the same shared
  input as SCAFFOLD's correction) and FedAdam (a server step after the
  mean, the same compiled stage for every strategy) under `devices`, the
  layout furthest from `serial`'s. Two rounds of SCAFFOLD (its second is
  corrected) and FedAdam (its second step reads the first's moments)."""
  def run(strategy):
    exp = train.Experiment(fakes.tiny_config(**{
        "fed.algorithm": algorithm, "fed.strategy": strategy, "fed.chunk_steps": 2}),
        fakes.fake_clients())
    for r in range(2 if algorithm in ("scaffold", "fedadam") else 1):
      exp.train_round(r)
    return jax.device_get((exp.server.params, exp.server.opt_state, exp.server.algorithm_state,
                           exp.clients.params, exp.clients.batch_stats,
                           exp.clients.algorithm_state))
  want = run("serial")
  for strategy in strategies:
    got = run(strategy)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      scale = float(np.max(np.abs(a))) + 1e-6
      assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 1e-2 * scale, strategy


def test_resume_with_failing_and_slow_clients_is_bit_for_bit(tmp_path):
  """SCAFFOLD with dropout and stragglers: two rounds straight, against one
  round, a relaunch, and the second: the same records and results."""
  settings = {"fed.algorithm": "scaffold", "fed.dropout": 0.34, "fed.straggler_fraction": 0.5,
              "fed.straggler_steps": 0.5, "fed.rounds": 2, "eval.every_rounds": 2}
  straight = train.run(fakes.tiny_config(**settings), str(tmp_path / "a"), fakes.fake_clients())
  train.run(fakes.tiny_config(**{**settings, "fed.rounds": 1}), str(tmp_path / "b"),
            fakes.fake_clients())
  resumed = train.run(fakes.tiny_config(**settings), str(tmp_path / "b"), fakes.fake_clients())
  assert resumed == straight

  def train_records(run):
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if not k.endswith("seconds")}
            for l in lines if json.loads(l)["kind"] == "train"]
  a, b = train_records("a"), train_records("b")
  assert a == b and sum(r["train/failed"] for r in a) == 2 and a[0]["train/stragglers"] == 1
