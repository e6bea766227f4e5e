"""Cosine-distance weights and server-side knowledge distillation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import config_lib, train
from fedreid_jax.errors import ConfigError, DatasetNotPrepared
from fedreid_jax.federated import cdw, kd, rounds, sampling
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.state import ClientStates
from fedreid_jax.models.preprocess import augment, normalize


def test_cosine_distance_weights_by_hand_and_padded_classes_ignored():
  before = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],   # client 0
                     [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # client 1
  after = np.array([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],    # d0 = mean(1, 0) = 0.5
                    [[1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])  # d1 = mean(1, 0) = 0.5 ... see mask
  mask = np.array([[True, True, False], [True, True, False]])
  w = cdw.cosine_distance_weights(jnp.asarray(before), jnp.asarray(after), jnp.asarray(mask))
  np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-6)
  garbage = after.copy()
  garbage[..., 2] = [[5.0, -3.0], [7.0, 2.0]]  # padded class: must not matter
  w2 = cdw.cosine_distance_weights(jnp.asarray(before), jnp.asarray(garbage), jnp.asarray(mask))
  np.testing.assert_allclose(w2, w, atol=1e-6)
  unmasked = cdw.cosine_distance_weights(jnp.asarray(before), jnp.asarray(garbage))
  assert not np.allclose(unmasked, w, atol=1e-3)
  # client 1 unchanged -> all weight on client 0
  w3 = cdw.cosine_distance_weights(jnp.asarray(before), jnp.asarray(np.stack([after[0], before[1]])),
                                   jnp.asarray(mask))
  np.testing.assert_allclose(w3, [1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(cdw.normalized_weights(jnp.zeros(4)), [0.25] * 4)


def test_delta_distance_on_hand_made_trees():
  a = {"backbone": {"k": jnp.array([1.0, 0.0])}, "embedding": {"b": jnp.array([0.0])}}
  b = {"backbone": {"k": jnp.array([0.0, 1.0])}, "embedding": {"b": jnp.array([0.0])}}
  assert float(cdw.parameter_distance(a, b)) == pytest.approx(1.0, abs=1e-6)  # orthogonal
  assert float(cdw.parameter_distance(a, a)) == pytest.approx(0.0, abs=1e-7)
  scaled = jax.tree.map(lambda x: 3.0 * x, a)
  assert float(cdw.parameter_distance(a, scaled)) == pytest.approx(0.0, abs=1e-7)
  c = {"backbone": {"k": jnp.array([1.0, 1.0])}, "embedding": {"b": jnp.array([0.0])}}
  assert float(cdw.parameter_distance(a, c)) == pytest.approx(1 - np.cos(np.pi / 4), abs=1e-6)
  tiny = {"backbone": {"k": jnp.array([1.0, 1e-4])}, "embedding": {"b": jnp.array([0.0])}}
  assert float(cdw.parameter_distance(a, tiny)) == pytest.approx(0.5e-8, rel=1e-3)  # no cancellation


def _experiment(algorithm, **overrides):
  cfg = fakes.tiny_config(**{"fed.algorithm": algorithm, "cdw.batch_size": 8,
                             "kd.batch_size": 8, **overrides})
  return train.Experiment(cfg, fakes.fake_clients(), public=fakes.fake_clients()[0].train)


def test_unchanged_model_has_zero_logit_distance_in_eval_mode_only():
  for mode, zero in (("default", True), ("reference", False)):
    exp = _experiment("fedpav_cdw", **{"cdw.mode": mode})
    sel = exp.stages.broadcast(exp.server, exp.clients, jnp.arange(3))
    batch = exp.inputs.measurement_batch([0, 1, 2], 0, 8)
    measured, after = exp.stages.measure(sel, sel, batch["image"], batch["label"])
    d = np.asarray(measured[cdw.DISTANCE])
    assert d.shape == (3,)
    if zero:
      np.testing.assert_allclose(d, 0.0, atol=1e-6)
    else:  # dropout on and batch statistics: d > 0, and the pass moved the statistics
      assert (d > 1e-3).all()
      assert not np.allclose(jax.tree.leaves(after.batch_stats)[0],
                             jax.tree.leaves(sel.batch_stats)[0])


def test_cdw_round_weights_are_the_normalised_distances():
  exp = _experiment("fedpav_cdw")
  record = exp.train_round(0)
  d = np.array([record[f"client/c{i}/cdw_distance"] for i in range(3)])
  w = np.array([record[f"client/c{i}/weight"] for i in range(3)])
  assert (d > 0).all()
  np.testing.assert_allclose(w, d / d.sum(), rtol=1e-5)


def test_reference_received_stats_equal_sequential_in_place_updates():
  """Client at position p of the round receives the statistics after the
  train-mode passes of the clients before it (computed here one by one)."""
  exp = _experiment("fedpav_cdw", **{"cdw.mode": "reference"})
  batch = exp.inputs.measurement_batch([0, 1, 2], 0, 8)
  order = jnp.asarray(sampling.round_order(0, 0, 3))
  assert sorted(np.asarray(order).tolist()) == [0, 1, 2]
  assert int(order[0]) == sampling.first_client(0, 0, 3)
  got = exp.received_stats(exp.server, batch["image"], order)
  key = jax.random.fold_in(exp.server.rng, exp.server.round)
  keys = jax.random.split(key, 3)
  stats = exp.server.batch_stats
  model = exp.model
  for lane in np.asarray(order):
    for a, b in zip(jax.tree.leaves(params_lib.take_client(got, int(lane))),
                    jax.tree.leaves(stats)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    aug_key, drop_key = jax.random.split(keys[lane])
    x = normalize(augment(aug_key, batch["image"][lane], 2, True))
    _, upd = model.apply({"params": exp.server.params, "batch_stats": stats}, x, train=True,
                         method=type(model).embed, mutable=["batch_stats"],
                         rngs={"dropout": drop_key})
    stats = upd["batch_stats"]


def _teacher_vars(exp, ids):
  shared = params_lib.prefix_predicate(params_lib.FEATURE_EXTRACTOR)
  out = []
  for c in ids:
    one = params_lib.take_client(exp.clients, c)
    out.append({"params": params_lib.split_tree(one.params, shared)[0],
                "batch_stats": params_lib.split_tree(one.batch_stats, shared)[0]})
  return out


def test_kd_teachers_cover_every_client_and_the_loss_is_their_mse():
  """Default mode: the target is the mean of every selected client's
  normalised eval-mode embedding; reference mode: train-mode teachers,
  normalised, against an unnormalised train-mode student."""
  for mode in ("default", "reference"):
    exp = _experiment("fedpav_kd", **{"kd.mode": mode, "kd.every_rounds": 1})
    exp.train_round(0)
    stage = exp.stages.server_stages[0]
    model = exp.model
    teachers = _teacher_vars(exp, range(3))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *teachers)
    images = next(iter(exp.public.stream(0, 0)))["image"]
    key = jax.random.PRNGKey(3)
    params, stats = exp.server.params, exp.server.batch_stats
    _, _, _, loss = stage._step(params, stats, stage._init(params), stacked, images, key)
    aug_key, t_key, s_key = jax.random.split(key, 3)
    x = normalize(augment(aug_key, images, 2, True))
    unit = lambda f: f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    if mode == "default":
      feats = [unit(model.apply(v, x, train=False, method=type(model).embed)) for v in teachers]
      student = unit(model.apply({"params": params, "batch_stats": stats}, x, train=False,
                                 method=type(model).embed))
    else:
      tkeys = jax.random.split(t_key, 3)
      feats = [unit(model.apply(v, x, train=True, method=type(model).embed,
                                mutable=["batch_stats"], rngs={"dropout": k})[0])
               for v, k in zip(teachers, tkeys)]
      student = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                            method=type(model).embed, mutable=["batch_stats"],
                            rngs={"dropout": s_key})[0]
      assert float(jnp.mean(jnp.linalg.norm(student, axis=-1))) > 1.5  # not normalised
    expected = jnp.mean(jnp.square(student - jnp.mean(jnp.stack(feats), 0)))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)


def test_kd_lowers_the_distillation_loss_and_touches_only_the_global_model():
  exp = _experiment("fedpav_kd", **{"kd.every_rounds": 1, "kd.lr": 0.05})
  exp.train_round(0)
  stage = exp.stages.server_stages[0]
  clients_before = jax.tree.map(np.asarray, (exp.clients.params, exp.clients.batch_stats))
  server_before = exp.server
  ctx = rounds.ServerContext(0, exp.clients, jnp.arange(3), exp.public)
  losses = []
  server = server_before
  for _ in range(4):
    server, metrics = stage(server, ctx)
    losses.append(metrics["kd/loss"])
  assert losses[-1] < losses[0], losses
  assert set(server.params) == {"backbone", "embedding"}
  assert not np.allclose(jax.tree.leaves(server.params)[0], jax.tree.leaves(server_before.params)[0])
  for a, b in zip(jax.tree.leaves(clients_before),
                  jax.tree.leaves((exp.clients.params, exp.clients.batch_stats))):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert stage(server, ctx._replace(round_index=1))[1]["kd/steps"] == 5  # every round here
  quiet = kd.Distillation(exp.model, exp.config.kd.copy_and_resolve_references(), exp.config.train)
  quiet.every = 2
  assert quiet(server, ctx) is server  # not a KD round: untouched


def test_reference_kd_keeps_the_partial_public_batch():
  exp = _experiment("fedpav_kd", **{"kd.mode": "reference", "kd.every_rounds": 1})
  stage = exp.stages.server_stages[0]
  sizes = [len(b["label"]) for b in stage.batches(exp.public, 0)]
  assert sizes == [8] * 5  # 40 images: no partial batch
  exp.public.batch_size = 12
  sizes = [len(b["label"]) for b in stage.batches(exp.public, 0)]
  assert sizes == [12, 12, 12, 4]
  rows = np.concatenate([exp.public.plan(0, 0).ravel(), exp.public.leftover_rows(0, 0)])
  assert sorted(rows.tolist()) == list(range(40))


def test_algorithms_are_configurations_of_the_same_parts():
  spec = lambda name: config_lib.describe_algorithm(name, fakes.tiny_config())
  kd_stage = lambda a: any(isinstance(s, kd.Distillation) for s in a.server_stages)
  assert (kd_stage(spec("fedpav_kd_cdw")), cdw.DISTANCE in spec("fedpav_kd_cdw").measurements) \
      == (True, True)
  assert (kd_stage(spec("fedpav_kd")), bool(spec("fedpav_kd").measurements)) == (True, False)
  assert spec("fedpav_kd").needs_public and not spec("fedpav_cdw").needs_public
  assert spec("fedpav_cdw").shared == spec("fedpav").shared
  assert spec("fedpav_cdw").weighting is cdw.cdw_weights
  assert spec("centralised").centralised and spec("centralised").shares
  assert not spec("local").shares and "classifier" in spec("fedavg").shared
  assert spec("fedpav_kd_cdw").label == "FedPav+KD+CDW" and spec("local").label == "Local training"


def test_centralised_trains_one_merged_client_evaluated_on_every_test_set():
  exp = _experiment("centralised")
  assert [c.name for c in exp.clients_data] == ["centralised"]
  merged = exp.clients_data[0].train
  assert len(merged) == 40 + 18 + 16 and exp.clients_data[0].num_train_ids == 4 + 3 + 2
  originals = fakes.fake_clients()
  np.testing.assert_array_equal(merged.read_image(40), originals[1].train.read_image(0))
  assert merged.pids[40] == 4 and merged.pids[-1] == 8
  assert exp.inputs.num_steps(0) == (40 + 18 + 16) // 8
  record = exp.train_round(0)
  assert record["client/centralised/weight"] == 1.0
  assert set(exp.evaluate(client_models=True)) == {"global"}
  assert list(exp.evaluate(client_models=False)["global"]) == ["c0", "c1", "c2"]


def test_bad_input_for_kd_and_cdw():
  cfg = fakes.tiny_config(**{"fed.algorithm": "fedpav_kd"})
  with pytest.raises(DatasetNotPrepared, match="public set.*prepare"):
    train.Experiment(cfg, fakes.fake_clients(), public=None)
  cfg = fakes.tiny_config(**{"fed.algorithm": "fedpav_cdw", "cdw.batch_size": 17})
  with pytest.raises(ConfigError, match="cdw.batch_size=17.*'c2' \\(16 training images\\)"):
    train.Experiment(cfg, fakes.fake_clients())
  cfg = fakes.tiny_config(**{"cdw.form": "angle"})
  from fedreid_jax import config_lib
  with pytest.raises(ConfigError, match="cdw.form='angle'.*logit"):
    config_lib.validate(cfg)


def test_kd_cdw_run_logs_weights_kd_loss_and_evaluations_before_kd(tmp_path):
  import json
  cfg = fakes.tiny_config(**{"fed.algorithm": "fedpav_kd_cdw", "cdw.batch_size": 8,
                             "kd.batch_size": 8, "kd.every_rounds": 2, "eval.every_rounds": 5})
  cfg.fed.rounds = 2
  clients = fakes.fake_clients()
  train.run(cfg, str(tmp_path), clients, clients[0].train)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_recs = {r["round"]: r for r in records if r["kind"] == "train"}
  evals = {r["round"]: r for r in records if r["kind"] == "eval"}
  assert "kd/loss" not in train_recs[1] and train_recs[2]["kd/loss"] > 0
  assert {f"client/c{i}/cdw_distance" for i in range(3)} <= set(train_recs[1])
  assert list(evals) == [2]  # the KD round (also the last)
  assert "eval_before_kd/c0/rank1" in evals[2] and "eval/c0/rank1" in evals[2]
  assert "eval_client/c0/rank1" in evals[2]


def test_real_benchmark_without_public_set_runs_fedpav_and_stops_kd(monkeypatch):
  """An unprepared CUHK02 only matters to KD: the registry returns no public
  set (with a warning) and a KD algorithm stops with the prepare command."""
  from fedreid_jax.data import registry, source
  from fedreid_jax.federated import checks

  def missing(root):
    raise DatasetNotPrepared(f"dataset 'cuhk02' is not prepared under {root}")
  monkeypatch.setattr(source, "load_public", missing)
  monkeypatch.setattr(source, "load_clients", lambda names, root: fakes.fake_clients())
  cfg = fakes.tiny_config(**{"data.name": "fedreid", "data.root": "/nowhere"})
  clients, public = registry.load(cfg.data, 0)
  assert public is None and len(clients) == 3
  checks.check_input(cfg, config_lib.describe_algorithm(cfg.fed.algorithm, cfg), clients,
                     public)  # fedpav: fine
  cfg.fed.algorithm = "fedpav_kd"
  with pytest.raises(DatasetNotPrepared, match="--dataset cuhk02 .*--data_dir /nowhere"):
    checks.check_input(cfg, config_lib.describe_algorithm(cfg.fed.algorithm, cfg), clients,
                       public)
