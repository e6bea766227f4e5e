"""k-reciprocal re-ranking and alpha query expansion.

`loop_re_ranking` below is an independent, plain-loop transcription of the
published algorithm (dense V, a Python loop per item, as in the paper's
code); `re_ranking` (vectorised, sparse) and `re_ranking_from_features`
(streamed) must give its numbers.
"""
from __future__ import annotations

import numpy as np
import pytest

from fedreid_jax.evaluation import evaluate_features, evaluate_rankings
from fedreid_jax.evaluation import query_expansion
from fedreid_jax.evaluation import re_ranking  # the package exports the function
from fedreid_jax.evaluation.re_ranking import (evaluate_re_ranking,
                                               re_ranking_from_features)


def loop_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
  """The published algorithm, one item at a time, dense everything."""
  num_query = q_g.shape[0]
  dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32) ** 2
  dist = (dist / dist.max(axis=0)).T  # column max, then transposed (as published)
  n = dist.shape[0]
  rank = np.argsort(dist, axis=1)
  v = np.zeros((n, n), np.float32)

  def reciprocal(i, k):
    out = []
    for j in rank[i, :k + 1]:
      if i in rank[j, :k + 1]:
        out.append(j)
    return out

  half = int(np.around(k1 / 2.0))
  for i in range(n):
    base = reciprocal(i, k1)
    expanded = set(base)
    for c in base:
      cand = reciprocal(c, half)
      if len(set(cand) & set(base)) > 2.0 / 3 * len(cand):
        expanded |= set(cand)
    idx = np.array(sorted(expanded))
    w = np.exp(-dist[i, idx])
    v[i, idx] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
  jaccard = np.zeros((num_query, n), np.float32)
  for i in range(num_query):
    for j in range(n):
      s = 0.0
      for k in range(n):
        if v[i, k] != 0 and v[j, k] != 0:
          s += min(v[i, k], v[j, k])
      jaccard[i, j] = 1 - s / (2 - s)
  final = jaccard * (1 - lambda_value) + dist[:num_query] * lambda_value
  return final[:, num_query:]


def clustered(seed, num_ids, num_query, num_gallery, dim=16, spread=0.6):
  """Unit-norm features of `num_ids` gaussian clusters, with pids and cams."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_ids, dim))
  def split(n):
    pids = rng.integers(0, num_ids, n)
    f = centres[pids] + spread * rng.standard_normal((n, dim))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f.astype(np.float32), pids + 1, rng.integers(0, 3, n)
  return split(num_query), split(num_gallery)


def euclidean(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
  return np.sqrt(np.maximum(sq, 0)).astype(np.float32)


CASES = [  # seed, ids, Q, G, k1, k2, lambda
    (0, 3, 20, 60, 20, 6, 0.3),
    (1, 6, 18, 62, 20, 6, 0.3),
    (2, 4, 20, 60, 7, 3, 0.5),
    (3, 5, 15, 45, 5, 1, 0.0),   # k2 = 1: no query expansion; odd k1 (round half to even)
    (4, 6, 20, 60, 30, 12, 1.0),
    (9, 3, 10, 30, 3, 8, 0.3),   # k2 > k1 + 1: longer neighbour lists
    (10, 2, 2, 3, 20, 6, 0.3),   # fewer items than k1 + 1
]


def blocks(q, g):
  return euclidean(q, g), euclidean(q, q), euclidean(g, g)


@pytest.mark.parametrize("case", CASES)
def test_re_ranking_equals_plain_loops(case):
  seed, ids, nq, ng, k1, k2, lam = case
  (q, _, _), (g, _, _) = clustered(seed, ids, nq, ng)
  got = re_ranking(*blocks(q, g), k1=k1, k2=k2, lambda_value=lam)
  want = loop_re_ranking(*blocks(q, g), k1=k1, k2=k2, lambda_value=lam)
  assert got.shape == (nq, ng) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_re_ranking_defaults_and_changes_ranking():
  (q, qp, qc), (g, gp, gc) = clustered(5, 4, 20, 60)
  got = re_ranking(*blocks(q, g))
  np.testing.assert_allclose(got, loop_re_ranking(*blocks(q, g)), atol=1e-6, rtol=0)
  # lambda 1: the normalised squared distance alone, same ranking as the plain one.
  only = re_ranking(*blocks(q, g), lambda_value=1.0)
  plain = euclidean(q, g) ** 2
  np.testing.assert_allclose(only, plain / np.block(
      [[euclidean(q, q) ** 2, plain]]).max(1, keepdims=True), atol=1e-6)
  assert (np.argsort(got, 1) != np.argsort(plain, 1)).any()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [7, 256])
def test_from_features_equals_dense(case, chunk):
  seed, ids, nq, ng, k1, k2, lam = case
  (q, qp, qc), (g, gp, gc) = clustered(seed, ids, nq, ng)
  dense = re_ranking(*blocks(q, g), k1=k1, k2=k2, lambda_value=lam)
  pieces = list(re_ranking_from_features(q, g, k1, k2, lam, chunk=chunk))
  assert [s for s, _ in pieces] == list(range(0, nq, chunk))
  streamed = np.concatenate([rows for _, rows in pieces])
  np.testing.assert_allclose(streamed, dense, atol=2e-6, rtol=0)
  for protocol in ("standard", "fedreid"):
    want = evaluate_rankings(-dense, qp, gp, qc, gc, protocol)
    got = evaluate_re_ranking(q, g, qp, gp, qc, gc, protocol, k1=k1, k2=k2,
                                 lambda_value=lam, chunk=chunk)
    assert got == pytest.approx(want, abs=1e-6)


def test_re_ranking_helps_on_clusters():
  # Noisy clusters: re-ranking should not hurt mAP (it usually helps a lot).
  (q, qp, qc), (g, gp, gc) = clustered(7, 6, 40, 160, spread=1.0)
  plain = evaluate_features(q, g, qp, gp, qc, gc)
  reranked = evaluate_re_ranking(q, g, qp, gp, qc, gc, k1=10, k2=3)
  assert reranked["mAP"] >= plain["mAP"] - 0.02


def test_parameters_refused():
  q = np.eye(3, dtype=np.float32)
  for kwargs in (dict(k1=0), dict(k2=0), dict(lambda_value=1.5), dict(lambda_value=-0.1)):
    with pytest.raises(ValueError):
      re_ranking(q, q, q, **kwargs)
  with pytest.raises(ValueError):
    re_ranking_from_features(q, q, chunk=0)


def test_empty_query():
  g = np.eye(4, dtype=np.float32)
  got = evaluate_re_ranking(np.zeros((0, 4), np.float32), g, [], [1, 2, 3, 4], [],
                               [0, 0, 0, 0])
  assert got["rank1"] == 0.0 and got["mAP"] == 0.0


# ---------------------------------------------------------------------------
# Alpha query expansion.

def test_aqe_hand_computed():
  # Unit vectors at angles 0, 30, 90, 120 degrees. k=2: each item's top-2 by
  # cosine similarity is itself (1) and its nearest other item.
  ang = np.deg2rad([0.0, 30.0, 90.0, 120.0])
  f = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
  q, g = f[:1], f[1:]
  c30 = np.cos(np.deg2rad(30))  # 0.866
  alpha = 3.0
  # item 0 -> itself (w 1) + item 1 (w c30^3); item 1 -> itself + item 0 (30 deg,
  # ties with nothing: item 2 is 60 deg away); item 2 -> itself + item 3 (30 deg);
  # item 3 -> itself + item 2.
  partner = [1, 0, 3, 2]
  want = np.stack([f[i] + c30 ** alpha * f[partner[i]] for i in range(4)])
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  new_q, new_g = query_expansion.aqe(q, g, k=2, alpha=alpha)
  np.testing.assert_allclose(np.concatenate([new_q, new_g]), want, atol=1e-6)
  # k=1: only itself -> unchanged (normalised).
  same_q, same_g = query_expansion.aqe(q, g, k=1, alpha=alpha)
  np.testing.assert_allclose(np.concatenate([same_q, same_g]), f, atol=1e-6)


def test_aqe_equals_dense_definition():
  (q, qp, qc), (g, gp, gc) = clustered(8, 5, 20, 60)
  k, alpha = 5, 3.0
  allf = np.concatenate([q, g]).astype(np.float64)
  norm = allf / np.linalg.norm(allf, axis=1, keepdims=True)
  sims = norm @ norm.T
  want = []
  for row in sims:
    top = np.argsort(-row, kind="stable")[:k]
    want.append((allf[top] * row[top, None] ** alpha).mean(0))
  want = np.stack(want)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  for chunk in (7, 1024):
    new_q, new_g = query_expansion.aqe(q, g, k=k, alpha=alpha, chunk=chunk)
    np.testing.assert_allclose(np.concatenate([new_q, new_g]), want, atol=1e-5)
  twice = query_expansion.aqe(q, g, k=k, alpha=alpha, times=2)
  again = query_expansion.aqe(*query_expansion.aqe(q, g, k=k, alpha=alpha), k=k, alpha=alpha)
  np.testing.assert_allclose(twice[0], again[0], atol=1e-6)


def test_aqe_refuses():
  f = np.eye(3, dtype=np.float32)
  for kwargs in (dict(k=0), dict(alpha=0.0), dict(alpha=-1.0)):
    with pytest.raises(ValueError):
      query_expansion.aqe(f, f, **{"k": 2, "alpha": 3.0, **kwargs})


# ---------------------------------------------------------------------------
# Wiring: config fields and the evaluation's extra metrics.

OPTIONS = dict(re_ranking=True, rr_k1=5, rr_k2=3, rr_lambda=0.3, aqe_k=3, aqe_alpha=3.0)


def linear_embed(size, dim=8):
  """A stand-in model: random projection of the pixels, L2-normalised."""
  import jax
  import jax.numpy as jnp
  proj = np.random.default_rng(0).standard_normal((size[0] * size[1] * 3, dim))

  def embed(variables, images):
    f = images.reshape(images.shape[0], -1).astype(jnp.float32) @ variables["proj"]
    return f / jnp.linalg.norm(f, axis=1, keepdims=True)
  return jax.jit(embed), {"proj": jnp.asarray(proj, jnp.float32)}


@pytest.mark.parametrize("streamed", [False, True])
def test_evaluate_model_extra_metrics(streamed):
  import fakes
  from fedreid_jax.evaluation import features as features_lib
  from fedreid_jax.evaluation import streamed as streamed_lib
  client = fakes.fake_clients()[0]
  size = (32, 16)
  embed_fn, variables = linear_embed(size)
  if streamed:
    test = streamed_lib.StreamedTestSet.from_client(client, size)
    run = lambda options: streamed_lib.evaluate_model(embed_fn, variables, test, "standard", 8,
                                                      threads=1, options=options)
  else:
    test = features_lib.load_test_set(client, size)
    run = lambda options: features_lib.evaluate_model(embed_fn, variables, test, "standard",
                                                      8, options=options)
  plain = run(None)
  assert set(plain) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
  assert run(fakes.tiny_config().eval) == plain  # the defaults: off, same dict
  got = run(OPTIONS)
  assert {k: got[k] for k in plain} == plain  # plain metrics unchanged
  qf = features_lib.extract_features(embed_fn, variables, np.asarray(test.query_images[:]), 8)
  gf = features_lib.extract_features(embed_fn, variables, np.asarray(test.gallery_images[:]), 8)
  ids = (test.query_pids, test.gallery_pids, test.query_cams, test.gallery_cams)
  rr_want = evaluate_re_ranking(np.asarray(qf), np.asarray(gf), *ids, k1=5, k2=3)
  aqe_want = evaluate_features(*query_expansion.aqe(qf, gf, 3, 3.0), *ids)
  assert {k: got[f"{k}_rr"] for k in plain} == pytest.approx(rr_want, abs=1e-6)
  assert {k: got[f"{k}_aqe"] for k in plain} == pytest.approx(aqe_want, abs=1e-6)
  assert len(got) == 15


def test_config_fields_validated():
  import fakes
  from fedreid_jax import config_lib
  from fedreid_jax.errors import ConfigError
  cfg = fakes.tiny_config()
  assert (cfg.eval.re_ranking, cfg.eval.rr_k1, cfg.eval.rr_k2, cfg.eval.rr_lambda,
          cfg.eval.aqe_k, cfg.eval.aqe_alpha) == (False, 20, 6, 0.3, 0, 3.0)
  config_lib.validate(cfg)
  for field, bad, says in [("rr_k1", 0, "rr_k1"), ("rr_k2", 0, "rr_k2"),
                           ("rr_lambda", 1.5, "[0, 1]"), ("rr_lambda", -0.1, "[0, 1]"),
                           ("aqe_k", -1, "aqe_k"), ("aqe_alpha", 0.0, "positive"),
                           ("aqe_alpha", -2.0, "positive")]:
    c = fakes.tiny_config(**{f"eval.{field}": bad})
    with pytest.raises(ConfigError, match=re_escape(says)):
      config_lib.validate(c)
  old = fakes.tiny_config()
  for field in OPTIONS:  # a config saved before these fields existed
    del old.eval[field]
  config_lib.validate(old)


def re_escape(text):
  import re
  return re.escape(text)
