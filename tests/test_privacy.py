"""Differential privacy: the accountant against dp-accounting called directly,
client-level DP-FedAvg against a plain numpy implementation, the `dp` config
checks (one line each), and a run whose privacy record continues exactly
across a resume (docs/privacy.md)."""
import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import fakes
from fedreid_jax import config_lib, run_config, train
from fedreid_jax.errors import CheckpointMismatch, ConfigError
from fedreid_jax.federated import sampling
from fedreid_jax.federated.failures import RoundFailures
from fedreid_jax.federated.state import ServerState
from fedreid_jax.evaluation.suite_runs import Run
from fedreid_jax.privacy import accountant, client_dp
from fedreid_jax.privacy import report as privacy_report
from fedreid_jax.privacy.run import RunPrivacy

# --- the accountant -----------------------------------------------------------


def direct_epsilon(q, sigma, count, delta, kind):
  """dp-accounting on its own: `count` Poisson-subsampled Gaussian steps."""
  acc = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
         if kind == "pld" else rdp_privacy_accountant.RdpAccountant())
  for _ in range(count):  # composed one by one, as a run does round after round
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_accountant_matches_dp_accounting(kind):
  for q, sigma, count in ((0.25, 1.2, 7), (1.0, 3.0, 4)):
    ours = accountant.epsilon(q, sigma, count, 1e-5, kind)
    assert ours == pytest.approx(direct_epsilon(q, sigma, count, 1e-5, kind), rel=1e-6)
  assert accountant.epsilon(0.3, 0.0, 5, 1e-5, kind) == np.inf
  assert accountant.epsilon(0.3, 1.0, 0, 1e-5, kind) == 0.0


def test_calibration_reaches_the_target():
  sigma = accountant.calibrate(0.2, 20, 4.0, 1e-5, "rdp")
  assert accountant.epsilon(0.2, sigma, 20, 1e-5, "rdp") <= 4.0
  assert accountant.epsilon(0.2, sigma - 0.05, 20, 1e-5, "rdp") > 4.0


# --- client-level DP: the mechanism against numpy ------------------------------


def server_and_clients(num_clients=5, size=(6, 7), seed=0):
  """A server and stacked client updates over a tiny feature-extractor tree."""
  rng = np.random.default_rng(seed)
  tree = lambda *lead: {"backbone": {"w": rng.normal(size=(*lead, *size)).astype(np.float32)},
                        "embedding": {"b": rng.normal(size=(*lead, size[0])).astype(np.float32)}}
  server_params = tree()
  stats = lambda *lead: {"backbone": {"bn": {"mean": rng.normal(size=(*lead, 3)).astype(np.float32),
                                             "var": rng.uniform(1, 2, (*lead, 3)).astype(np.float32)}},
                         "embedding": {"bn": {"mean": np.zeros((*lead, 3), np.float32),
                                              "var": np.ones((*lead, 3), np.float32)}}}
  server = ServerState(params=server_params, batch_stats=stats(), round=jnp.int32(3),
                       rng=jax.random.key(1))
  return server, tree(num_clients), stats(num_clients)


def numpy_dp_mean(server, params, stats, sampled, clip, expected):
  """DP-FedAvg without noise, in numpy: each sampled client's (params, stats)
  update clipped jointly to `clip`, summed, over `expected`."""
  ref = [np.asarray(x) for x in jax.tree.leaves((server.params, server.batch_stats))]
  rows = [np.asarray(x) for x in jax.tree.leaves((params, stats))]
  deltas = [r - f[None] for r, f in zip(rows, ref)]
  norms = np.sqrt(sum((d.reshape(len(sampled), -1) ** 2).sum(1) for d in deltas))
  scale = np.minimum(1.0, clip / norms) * sampled
  return [f + np.tensordot(scale, d, 1) / expected for f, d in zip(ref, deltas)], norms


def aggregate(server, params, stats, weights, clip, sigma, expected):
  server = server._replace(algorithm_state=client_dp.make_init_state(clip, sigma, sigma)(
      server, None)[0])
  return jax.jit(client_dp.make_aggregator(expected))(server, params, stats, jnp.asarray(weights))


def test_client_updates_clipped_per_client():
  server, params, stats = server_and_clients()
  sampled = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
  got = aggregate(server, params, stats, sampled * [3, 9, 1, 2, 5], 0.8, 0.0, 2.5)
  want, norms = numpy_dp_mean(server, params, stats, sampled, 0.8, 2.5)
  assert (norms > 0.8).all()  # every update is clipped: the bound is what counts
  for g, w in zip(jax.tree.leaves(got), want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  delta = {"u": jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * [[0.1], [1], [5], [9]])}
  clipped, _ = client_dp.clip_rows(delta, jnp.float32(2.0))
  np.testing.assert_array_less(np.linalg.norm(np.asarray(clipped["u"]), axis=1), 2.0 + 1e-5)


def test_no_noise_large_clip_is_the_plain_mean():
  server, params, stats = server_and_clients()
  got_params, got_stats = aggregate(server, params, stats, np.ones(5), 1e6, 0.0, 5.0)
  for g, p in zip(jax.tree.leaves((got_params, got_stats)), jax.tree.leaves((params, stats))):
    np.testing.assert_allclose(g, np.asarray(p).mean(0), rtol=1e-5, atol=1e-5)


def test_noise_has_std_sigma_times_clip():
  """All updates zero: the mean moves by N(0, (sigma C)^2) / expected; over
  the 60 000 coordinates the sample std is within 2% of sigma C (its own
  std is ~0.3%) and the mean within 5 standard errors of 0."""
  server = ServerState(params={"backbone": {"w": jnp.zeros((200, 300))}, "embedding": {}},
                       batch_stats=None, round=jnp.int32(0), rng=jax.random.key(4))
  params = jax.tree.map(lambda x: jnp.broadcast_to(x, (3, *x.shape)), server.params)
  out, _ = aggregate(server, params, None, np.ones(3), 0.7, 1.3, 2.0)
  noise = np.asarray(out["backbone"]["w"]).ravel() * 2.0
  assert noise.std() == pytest.approx(1.3 * 0.7, rel=0.02)
  assert abs(noise.mean()) < 5 * 1.3 * 0.7 / np.sqrt(noise.size)


def test_poisson_sample_and_plan():
  counts = np.zeros(50)
  for r in range(400):
    counts[client_dp.poisson_sample(0, r, 50, 0.2)] += 1
  assert counts.sum() / (400 * 50) == pytest.approx(0.2, abs=0.01)
  np.testing.assert_array_equal(client_dp.poisson_sample(0, 7, 50, 0.2),
                                client_dp.poisson_sample(0, 7, 50, 0.2))
  plan = client_dp.sampled_plan(RoundFailures({0: 5, 1: 4, 2: 6}, frozenset(), frozenset({1})),
                                [2])
  assert plan.steps == {0: 0, 1: 0, 2: 6} and plan.failed == {0, 1} and not plan.stragglers


def test_adaptive_clip_moves_towards_the_quantile():
  server, params, stats = server_and_clients()
  server = server._replace(algorithm_state=client_dp.make_init_state(100.0, 1.0, 1.0)(
      server, None)[0])
  update = client_dp.make_clip_update(0.5, 0.2, 0.0, 5.0)
  trained = ServerState(params=params, batch_stats=stats, round=None, rng=None)
  after = update(server, trained, jnp.ones(5), 5)
  assert float(after["clip"]) == pytest.approx(100.0 * np.exp(-0.2 * 0.5))  # all unclipped


# --- the config checks: one line each, before training --------------------------


@pytest.mark.parametrize("overrides, words", [
    ({"dp.mode": "sgd", "dp.noise_multiplier": -1.0}, "noise_multiplier=-1.0"),
    ({"dp.mode": "sgd", "dp.clip_norm": 0.0}, "clip_norm=0.0"),
    ({"dp.mode": "client", "data.scenario": "by_identity", "data.scenario_clients": 50,
      "dp.delta": 0.05}, "below 1/n = 1/50"),
    ({"dp.mode": "client", "data.scenario": "by_identity", "data.scenario_clients": 50,
      "dp.delta": 1e-4, "dp.target_epsilon": 1e-5, "dp.accountant": "rdp"}, "cannot be reached"),
    ({"dp.mode": "client", "data.scenario": "by_identity", "data.scenario_clients": 4,
      "dp.delta": 1e-3, "dp.client_rate": 0.2}, "needs at least 1"),
    ({"dp.mode": "client", "fed.clients_per_round": 3}, "Poisson-sampled"),
    ({"dp.mode": "laplace"}, "dp.mode='laplace'"),
])
def test_bad_dp_settings_one_line(overrides, words):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(fakes.tiny_config(**overrides))
  assert words in str(e.value) and "\n" not in str(e.value)


def test_client_dp_refuses_kd_and_local():
  for name in ("fedpav_kd", "local"):
    cfg = fakes.tiny_config(**{"dp.mode": "client", "dp.client_rate": 1.0, "dp.delta": 1e-3,
                               "fed.algorithm": name})
    with pytest.raises(ConfigError, match="cannot protect") as e:
      train.Experiment(cfg, fakes.fake_clients())
    assert "\n" not in str(e.value)


def test_older_config_without_dp_section_validates():
  cfg = fakes.tiny_config()
  del cfg["dp"]
  config_lib.validate(cfg)


# --- a run: the record, and its epsilon across a resume ------------------------


def test_client_dp_round_and_resumed_accounting():
  """A round's record and weights follow the Poisson sample; a relaunch with
  another dp.noise_multiplier restores the run's own noise (the server's
  checkpointed algorithm_state) and its epsilon continues exactly."""
  dp = {"dp.mode": "client", "dp.client_rate": 0.7, "dp.delta": 1e-3, "dp.clip_norm": 0.5}
  exp = train.Experiment(fakes.tiny_config(**dp), fakes.fake_clients())
  record = exp.train_round(0)
  sampled = client_dp.poisson_sample(0, 0, 3, 0.7)
  assert [i for i in range(3) if record[f"client/c{i}/weight"] > 0] == list(sampled)
  assert record["privacy/epsilon"] == pytest.approx(direct_epsilon(0.7, 1.0, 1, 1e-3, "pld"),
                                                    rel=1e-6)
  other = fakes.tiny_config(**dp, **{"dp.noise_multiplier": 5.0})
  resumed = RunPrivacy(other, fakes.fake_clients(), config_lib.describe_algorithm("fedpav", other))
  for r in (1, 2):  # the server state as the checkpoint restores it
    entry = resumed.record(r, exp.server)
    assert entry["privacy/noise_multiplier"] == 1.0 and entry["privacy/rounds"] == r + 1
    assert entry["privacy/epsilon"] == pytest.approx(
        direct_epsilon(0.7, 1.0, r + 1, 1e-3, "pld"), rel=1e-6)


def test_report_privacy_section(tmp_path):
  client = [{"round": r, "kind": "train", "privacy/epsilon": 0.5 * r, "privacy/rounds": r}
            for r in (1, 2, 3)]
  sgd = [{"round": r, "kind": "train", "privacy/epsilon": 2.0 * r, "privacy/a/epsilon": 2.0 * r,
          "privacy/a/steps": 10 * r, "privacy/b/epsilon": r, "privacy/b/steps": 5 * r}
         for r in (1, 2)]
  runs = [Run(str(tmp_path), "dpfedavg", {"dp": {"delta": 1e-3}}, client),
          Run(str(tmp_path), "dpsgd", {"dp": {"delta": 1e-5}}, sgd),
          Run(str(tmp_path), "plain", {}, [{"round": 1, "kind": "train"}])]
  text = privacy_report.privacy_section(runs, str(tmp_path))
  assert "| dpfedavg (seed 0) | every client (client-level) | 1.5 | 0.001 | 3 rounds |" in text
  assert "| dpsgd (seed 0) | a | 4 | 1e-05 | 20 steps |" in text
  assert "| dpsgd (seed 0) | b | 2 | 1e-05 | 10 steps |" in text
  assert "plain" not in text and (tmp_path / "privacy_epsilon.png").exists()
  assert privacy_report.privacy_section(runs[2:], str(tmp_path)) == ""


def test_relaunch_with_another_dp_mechanism_refused(tmp_path):
  saved = json.loads(fakes.tiny_config(**{"dp.mode": "sgd"}).to_json())
  for field, value in (("noise_multiplier", 2.0), ("unit", "identity"), ("mode", "off")):
    now = json.loads(fakes.tiny_config(**{"dp.mode": "sgd", f"dp.{field}": value}).to_json())
    with pytest.raises(CheckpointMismatch, match=f"dp.{field}"):
      run_config.check_meaning(saved, now, str(tmp_path))
  older = json.loads(fakes.tiny_config().to_json())
  del older["dp"]  # a run saved before the section resumes (its fields count as unchanged)
  run_config.check_meaning(older, json.loads(fakes.tiny_config().to_json()), str(tmp_path))


def test_sgd_record_is_dp_accounting_of_the_steps_so_far():
  """Per client: q = B / n, round(1 / q) noisy steps a round it is selected,
  epsilon from dp-accounting on all of them; the same numbers for any round
  asked again (a resumed run asks for its round)."""
  cfg = fakes.tiny_config(**{"dp.mode": "sgd", "dp.delta": 1e-3, "fed.clients_per_round": 2})
  clients = fakes.fake_clients()
  privacy = RunPrivacy(cfg, clients, config_lib.describe_algorithm("fedpav", cfg))
  selected = {c: 0 for c in range(3)}
  for r in range(3):
    for c in sampling.sample_clients(0, r, 3, 2):
      selected[int(c)] += 1
    entry = privacy.record(r, None)
    for c, client in enumerate(clients):
      q = 8 / len(client.train)
      steps = round(1 / q) * selected[c]
      assert entry[f"privacy/{client.name}/sampling_rate"] == pytest.approx(q)
      assert entry[f"privacy/{client.name}/steps"] == steps
      assert entry[f"privacy/{client.name}/epsilon"] == pytest.approx(
          direct_epsilon(q, 1.0, steps, 1e-3, "pld") if steps else 0.0, rel=1e-6)
  again = RunPrivacy(cfg, clients, config_lib.describe_algorithm("fedpav", cfg))
  assert again.record(1, None) == privacy.record(1, None)


@pytest.mark.parametrize("overrides, words", [
    ({"dp.delta": 0.1}, "below 1/n = 1/16"),  # the smallest client: 16 images
    ({"dp.delta": 0.6, "dp.unit": "identity"}, "below 1/n = 1/2"),  # 2 people
    ({"dp.target_epsilon": 1e-4, "dp.accountant": "rdp"}, "cannot be reached"),
])
def test_sgd_mode_refusals_with_the_data(overrides, words):
  cfg = fakes.tiny_config(**{"dp.mode": "sgd", **overrides})
  with pytest.raises(ConfigError) as e:
    RunPrivacy(cfg, fakes.fake_clients(), config_lib.describe_algorithm("fedpav", cfg))
  assert words in str(e.value) and "\n" not in str(e.value)
