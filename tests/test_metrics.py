"""Re-ID retrieval metrics: hand-worked cases, and JAX == numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

from fedreid_jax.evaluation import (PROTOCOLS, evaluate_features, evaluate_rankings,
                                    evaluate_rankings_reference)
from fedreid_jax.evaluation import retrieval

BOTH = [evaluate_rankings, evaluate_rankings_reference]
KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def assert_metrics(got: dict, want: dict, atol: float = 1e-6) -> None:
  assert set(got) == set(KEYS)
  for key, value in want.items():
    assert isinstance(got[key], float), key
    assert got[key] == pytest.approx(value, abs=atol), key


# Query 0: pid 1, cam 0.  Query 1: pid 3, cam 0.
# Gallery (pid, cam), similarity to query 0 descending in gallery order:
#   0: (1, 0) 0.9  same pid + same cam -> junk for q0
#   1: (2, 1) 0.8  negative
#   2: (1, 1) 0.7  match for q0
#   3: (-1, 2) 0.6 junk (pid -1)
#   4: (0, 1) 0.5  negative (pid 0 distractor)
#   5: (1, 2) 0.4  match for q0
#   6: (3, 0) 0.3  same pid + same cam -> junk for q1: q1 has NO correct match
# q0 after junk removal: [g1 N, g2 M, g4 N, g5 M, g6 N] -> hits at ranks r = 1, 3.
#   standard AP  = (1/2 + 2/4) / 2 = 0.5
#   trapezoid AP = [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = (1/4 + 5/12) / 2 = 1/3
#   first hit r=1 -> rank1 0, rank5 1, rank10 1;  INP = 2 / (3+1) = 0.5
# (Without junk removal the hits would be at 2 and 5: different numbers.)
Q_PIDS = np.array([1, 3])
Q_CAMS = np.array([0, 0])
G_PIDS = np.array([1, 2, 1, -1, 0, 1, 3])
G_CAMS = np.array([0, 1, 1, 2, 1, 2, 0])
SIM = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
                [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]], np.float32)


@pytest.mark.parametrize("fn", BOTH)
def test_junk_and_no_match_standard(fn):
  # q1 has no match -> skipped: every metric is q0's alone.
  got = fn(SIM, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, protocol="standard")
  assert_metrics(got, dict(rank1=0.0, rank5=1.0, rank10=1.0, mAP=0.5, mINP=0.5))


@pytest.mark.parametrize("fn", BOTH)
def test_junk_and_no_match_fedreid(fn):
  # q1 counts as zeros, denominator 2: rank5 = 1/2, mAP = (1/3)/2, mINP = 0.5/2.
  got = fn(SIM, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, protocol="fedreid")
  assert_metrics(got, dict(rank1=0.0, rank5=0.5, rank10=0.5, mAP=1 / 6, mINP=0.25))


@pytest.mark.parametrize("fn", BOTH)
def test_trapezoid_vs_standard_first_hit_on_top(fn):
  # Ranking M N M N (no junk): hits at r = 0, 2, n_good = 2.
  #   standard  = (1/1 + 2/3) / 2 = 5/6
  #   trapezoid = [(1.0 + 1/1)/2 + (1/2 + 2/3)/2] / 2 = (1 + 7/12) / 2 = 19/24
  #   INP = 2/3; rank1 = 1.
  sim = np.array([[4.0, 3.0, 2.0, 1.0]])
  g_pids, g_cams = np.array([7, 8, 7, 9]), np.array([1, 1, 2, 1])
  q_pids, q_cams = np.array([7]), np.array([0])
  std = fn(sim, q_pids, g_pids, q_cams, g_cams, protocol="standard")
  fed = fn(sim, q_pids, g_pids, q_cams, g_cams, protocol="fedreid")
  assert_metrics(std, dict(rank1=1.0, rank5=1.0, mAP=5 / 6, mINP=2 / 3))
  assert_metrics(fed, dict(rank1=1.0, rank5=1.0, mAP=19 / 24, mINP=2 / 3))


@pytest.mark.parametrize("fn", BOTH)
def test_ties_keep_gallery_order(fn):
  # Negative (g0) and match (g1) tie at 0.5: the stable sort keeps g0 first,
  # so the hit is at r = 1: rank1 0, standard AP 1/2, trapezoid (0 + 1/2)/2 = 1/4.
  sim = np.array([[0.5, 0.5, 0.1]])
  q_pids, q_cams = np.array([1]), np.array([0])
  g_pids, g_cams = np.array([2, 1, 3]), np.array([1, 1, 1])
  std = fn(sim, q_pids, g_pids, q_cams, g_cams, protocol="standard")
  fed = fn(sim, q_pids, g_pids, q_cams, g_cams, protocol="fedreid")
  assert_metrics(std, dict(rank1=0.0, rank5=1.0, mAP=0.5, mINP=0.5))
  assert_metrics(fed, dict(rank1=0.0, mAP=0.25))
  # Swapping the two tied entries in the gallery puts the match first.
  swapped = fn(sim, q_pids, g_pids[[1, 0, 2]], q_cams, g_cams, protocol="standard")
  assert_metrics(swapped, dict(rank1=1.0, mAP=1.0, mINP=1.0))


@pytest.mark.parametrize("fn", BOTH)
def test_no_valid_query(fn):
  # Only junk for the query (same pid same cam, and pid -1): standard has no
  # valid query -> zeros; fedreid counts it as zero.
  sim = np.array([[0.3, 0.2]])
  for protocol in PROTOCOLS:
    got = fn(sim, np.array([5]), np.array([5, -1]), np.array([2]), np.array([2, 0]),
             protocol=protocol)
    assert_metrics(got, dict.fromkeys(KEYS, 0.0))


@pytest.mark.parametrize("fn", BOTH + [evaluate_features])
def test_unknown_protocol(fn):
  args = (np.ones((1, 2)), np.ones((2, 2))) if fn is evaluate_features else (np.ones((1, 2)),)
  with pytest.raises(ValueError, match="standard.*fedreid"):
    fn(*args, np.array([1]), np.array([1, 2]), np.array([0]), np.array([1, 1]),
       protocol="market")


def random_problem(seed: int, num_query: int = 37, num_gallery: int = 150,
                   ties: bool = False):
  """Random ids with junk (-1), distractors (0) and 8 cameras."""
  rng = np.random.default_rng(seed)
  q_pids = rng.integers(0, 10, num_query)
  g_pids = rng.integers(-1, 10, num_gallery)
  q_cams = rng.integers(0, 8, num_query)
  g_cams = rng.integers(0, 8, num_gallery)
  if ties:
    sim = rng.integers(-4, 5, (num_query, num_gallery)).astype(np.float32)
  else:
    sim = rng.standard_normal((num_query, num_gallery)).astype(np.float32)
  return sim, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_jax_matches_reference(protocol, seed, ties):
  problem = random_problem(seed, ties=ties)
  want = evaluate_rankings_reference(*problem, protocol=protocol)
  assert 0.0 < want["mAP"] < 1.0
  for chunk in (8, 16, 512):  # 37 is not a multiple of 8 or 16
    got = evaluate_rankings(*problem, protocol=protocol, query_chunk=chunk)
    assert_metrics(got, want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_similarity_matches_numpy(protocol):
  import jax.numpy as jnp
  sim, *ids = random_problem(11, ties=True)
  want = evaluate_rankings(sim, *ids, protocol=protocol, query_chunk=10)
  got = evaluate_rankings(jnp.asarray(sim), *ids, protocol=protocol, query_chunk=10)
  assert got == want


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("seed", range(3))
def test_features_match_explicit_similarity(protocol, seed):
  # Small-integer features: every dot product is exact in float32, so the
  # on-device similarity equals the explicit one bit for bit (ties included).
  rng = np.random.default_rng(100 + seed)
  _, q_pids, g_pids, q_cams, g_cams = random_problem(seed, num_query=29)
  q_feats = rng.integers(-2, 3, (29, 6)).astype(np.float32)
  g_feats = rng.integers(-2, 3, (150, 6)).astype(np.float32)
  sim = q_feats @ g_feats.T
  want = evaluate_rankings_reference(sim, q_pids, g_pids, q_cams, g_cams, protocol)
  assert_metrics(evaluate_rankings(sim, q_pids, g_pids, q_cams, g_cams, protocol), want)
  got = evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams,
                          protocol=protocol, query_chunk=8)
  assert_metrics(got, want)


def test_chunk_starts_cover_every_query_once():
  # 10 queries, chunks of 4: the last chunk is shifted back to rows 6..9 and
  # its first 2 rows (6, 7) are dropped.
  assert retrieval._chunk_starts(10, 4) == [(0, 0), (4, 0), (6, 2)]
  for num_query, size in [(10, 4), (8, 4), (5, 5), (13, 1)]:
    rows = [r for start, skip in retrieval._chunk_starts(num_query, size)
            for r in range(start + skip, start + size)]
    assert rows == list(range(num_query))


def test_per_query_statistics_of_hand_case():
  stats = retrieval.ranking_statistics(SIM, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS,
                                       query_chunk=1)
  np.testing.assert_array_equal(stats["n_good"], [2, 0])
  np.testing.assert_array_equal(stats["first"], [1, 7])
  np.testing.assert_array_equal(stats["last"], [3, -1])
  np.testing.assert_allclose(stats["ap_standard"], [0.5, 0.0], atol=1e-7)
  np.testing.assert_allclose(stats["ap_trapezoid"], [1 / 3, 0.0], atol=1e-7)
