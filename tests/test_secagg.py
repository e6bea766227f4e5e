"""Secure aggregation in the round: FedPav, CDW and KD under it equal the plain
algorithms up to the quantisation error, the server's sum sees only masked
vectors, dropout is recovered, resume is bit-for-bit, bad input is one line."""
import json
import logging
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import config_lib, train
from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import algorithm as alg_lib
from fedreid_jax.federated import cdw, kd, secagg
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import secure_aggregation as sa
from fedreid_jax.models.preprocess import normalize

SECURE = {"secagg.enabled": True}


def _experiment(algorithm="fedpav", **overrides):
  cfg = fakes.tiny_config(**{"fed.algorithm": algorithm, **overrides})
  return train.Experiment(cfg, fakes.fake_clients(), public=fakes.fake_clients()[0].train)


ROUND = {"fed.dropout": 0.34, "kd.every_rounds": 1}  # one of the 3 clients fails


@pytest.fixture(scope="module")
def secure_exp():
  """FedPav+KD+CDW under secure aggregation (one build for the module's tests)."""
  return _experiment("fedpav_kd_cdw", **ROUND, **SECURE)


def _stacked_updates(exp, seed=0, scale=0.05):
  """The shared params and statistics of 3 clients: the global model moved at random."""
  shared = params_lib.prefix_predicate(params_lib.FEATURE_EXTRACTOR)
  rng = np.random.default_rng(seed)
  stacked = lambda tree: jax.tree.map(
      lambda x: x[None] + jnp.asarray(rng.normal(size=(3, *x.shape)) * scale, x.dtype), tree)
  return (stacked(params_lib.split_tree(exp.server.params, shared)[0]),
          stacked(params_lib.split_tree(exp.server.batch_stats, shared)[0]))


def test_secure_mean_equals_the_plain_mean_and_its_sum_sees_only_masked_vectors(
    secure_exp, monkeypatch):
  exp = secure_exp
  alg = exp.algorithm
  assert isinstance(alg.aggregator, secagg.SecureMean) and alg.label == "FedPav+KD+CDW+SecAgg"
  params, stats = _stacked_updates(exp)
  seen, real_sum = [], sa.server_sum

  def spy(masked, delivered, bits):
    seen.append((masked, np.asarray(delivered)))
    return real_sum(masked, delivered, bits)
  real_encode = sa.encode
  encodings = []
  monkeypatch.setattr(sa, "encode", lambda *a: encodings.append(real_encode(*a)) or encodings[-1])
  monkeypatch.setattr(sa, "server_sum", spy)
  protocol = alg.aggregator.protocol
  for weights in ([3.0, 1.0, 2.0], [3.0, 0.0, 2.0]):  # the second: client 1 dropped out
    w = jnp.asarray(weights)
    got = alg.aggregator(exp.server, params, stats, w)
    want = alg_lib.weighted_mean(exp.server, params, stats, w)
    for part, fixed in zip(range(2), (protocol, alg.aggregator.stats_protocol)):
      bound = sa.mean_error_bound(3, fixed) + 1e-6  # + float32 rounding of the sum
      for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=bound, rtol=0)
    masked, delivered = seen[-1]
    assert isinstance(masked, sa.Masked)  # structurally: the sum takes Masked only
    np.testing.assert_array_equal(delivered, np.asarray(weights) > 0)
    plain = np.asarray(encodings[-1])  # the clients' unmasked encodings
    assert all(np.mean(np.asarray(masked.vectors)[k] == plain[k]) < 0.01 for k in range(3))
  with pytest.raises(TypeError, match="Masked"):
    sa.server_sum(encodings[-1], jnp.ones(3, bool), protocol.bits)


def test_secure_cdw_weights_and_kd_teacher_equal_the_plain_ones(secure_exp):
  protocol = sa.Settings()
  distances = jnp.asarray([0.02, 0.0, 0.11, 0.05])
  plain = cdw.normalized_weights(distances)
  mean = secagg.SecureMean(protocol, protocol, seed=0)
  server = types.SimpleNamespace(params={}, batch_stats={}, round=jnp.int32(3))
  # the secure mean of one-hot vectors is the weight it applies to each client
  applied, _ = mean(server, {"x": jnp.eye(4)}, None, distances)
  np.testing.assert_allclose(np.asarray(applied["x"]), np.asarray(plain),
                             atol=sa.mean_error_bound(4, protocol))
  exp = secure_exp
  x = normalize(jnp.asarray(exp.public.gather(0, np.arange(8))["image"]))
  teachers = kd.Distillation(exp.model, exp.config.kd, exp.config.train)._teachers(
      exp.clients, jnp.arange(3))
  each = kd.teacher_embeddings(exp.model, teachers, x, True, False, jax.random.key(0))
  want = kd.teacher_embedding(exp.model, teachers, x, True, False, jax.random.key(0))
  got = secagg.secure_teacher_mean(protocol)(each, jax.random.key(5))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=sa.mean_error_bound(3, protocol))
  assert float(jnp.max(jnp.abs(got - want))) > 0  # quantised, not the plain mean


def test_a_secure_round_with_dropout_kd_and_cdw_equals_the_plain_round(secure_exp):
  plain, secure = _experiment("fedpav_kd_cdw", **ROUND), secure_exp
  a, b = plain.train_round(0), secure.train_round(0)
  assert a["train/failed"] == b["train/failed"] == 1.0
  weights = [k for k in a if k.endswith("/weight")]
  assert weights and all(a[k] == b[k] for k in weights)  # the clients' side is the same
  for x, y in zip(jax.tree.leaves(plain.server.params), jax.tree.leaves(secure.server.params)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-4, rtol=0)
  assert a["kd/loss"] == pytest.approx(b["kd/loss"], rel=1e-3)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "train/round_seconds"}
            for line in f]


def test_resume_in_the_middle_of_a_secure_run_is_bit_for_bit(tmp_path, caplog):
  cfg = fakes.tiny_config(**{"fed.algorithm": "fedpav", "fed.dropout": 0.34, "fed.rounds": 2,
                             "eval.every_rounds": 2, "eval.client_models": False, **SECURE})
  cfg.checkpoint_every = 1
  clients = fakes.fake_clients()
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.run(cfg, str(straight), clients, clients[0].train)
  shutil.copytree(straight, resumed)  # the same run, stopped after round 1's checkpoint
  shutil.rmtree(resumed / "checkpoints" / "2")
  for leftover in [*(resumed / "checksums").glob("2.*"), resumed / "results.json"]:
    leftover.unlink()
  shutil.rmtree(resumed / "export")
  caplog.set_level(logging.INFO)
  train.run(cfg, str(resumed), clients, clients[0].train)  # resumes after round 1
  assert _records(resumed) == _records(straight)
  for name in ("results.json", *(f"export/{f}" for f in os.listdir(straight / "export"))):
    assert (resumed / name).read_bytes() == (straight / name).read_bytes()
  assert "after round 1" in caplog.text  # it did resume


@pytest.mark.parametrize("overrides, message", [
    ({"secagg.bits": 24}, r"^config\.secagg\.bits=24 is too few for 9 clients with clip=8 "),
    ({"secagg.clip": 0}, r"^config\.secagg\.clip=0(\.0)? must be a positive number"),
    ({"secagg.frac_bits": 24}, r"^config\.secagg\.frac_bits=24 with clip=8 encodes values"),
    ({"secagg.stats_frac_bits": 13},
     r"^config\.secagg\.stats_frac_bits=13 with stats_clip=4096 encodes values"),
    ({"fed.algorithm": "fedpav_cdw", "cdw.mode": "reference"},
     r"^config\.secagg\.enabled with algorithm 'fedpav_cdw' is refused: cdw\.mode='reference'"),
    ({"fed.bn_aggregation": "first_client"}, r"is refused: fed\.bn_aggregation='first_client'"),
    ({"dp.mode": "client"}, r"^config\.secagg\.enabled with config\.dp\.mode='client' is refused"),
])
def test_bad_input_is_one_line_before_anything_is_built(overrides, message):
  cfg = fakes.tiny_config(**SECURE)
  for key, value in overrides.items():
    section, field = key.split(".")
    if section not in cfg:
      pytest.skip(f"no config.{section} section in this tree")
    cfg[section][field] = value
  with pytest.raises(ConfigError, match=message) as error:
    config_lib.validate(cfg)
  assert "\n" not in str(error.value)


def test_what_runs_under_it_and_older_configs():
  for name in ("fedbn_kd_cdw", "fedadam", "local", "centralised"):
    config_lib.validate(fakes.tiny_config(**{"fed.algorithm": name, **SECURE}))
  old = fakes.tiny_config()
  del old["secagg"]  # a config saved before the section: off
  assert not secagg.enabled(old)
  config_lib.validate(old)
  scaffold_like = alg_lib.Algorithm("x", "X", alg_lib.FEATURE_EXTRACTOR,
                                    update_server_state=lambda *a: None)
  assert "update_server_state" in secagg.refusal(scaffold_like)
