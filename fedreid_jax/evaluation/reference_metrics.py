"""Re-ID retrieval metrics: the plain numpy definition (one loop per query).

This module is the readable specification of the two evaluation protocols;
`retrieval.py` is the fast, vectorised JAX version and is tested against it.

Per query (pid `q`, camera `c`), over the gallery:

- junk (removed from the ranking before anything is counted): entries with the
  same pid AND the same camera as the query, and entries with pid -1;
- correct matches: same pid, different camera (pid != -1);
- everything else, including pid 0 (Market-1501 `0000` distractors), is an
  ordinary negative.

The gallery is ranked by similarity, descending, with a STABLE sort on the
negated similarity (`np.argsort(-sim, kind="stable")`): tied entries keep
their gallery order. (The reference code uses `np.argsort(score)[::-1]`, which
puts ties in reverse gallery order; with real-valued features ties are rare.)

Protocols:

- `"standard"` (torchreid / fast-reid): AP = mean precision at the hits,
  `sum_i i / (r_i + 1) / n_good` (hit `i` 1-based, rank `r_i` 0-based after
  junk removal); mINP = `n_good / (r_last + 1)`; queries without a correct
  match are skipped (not in any denominator).
- `"fedreid"` (the FedReID / Market-1501 reference code): AP is the trapezoid
  form `sum_i (precision_before_i + precision_at_i) / 2 / n_good` with
  `precision_at_i = i / (r_i + 1)` and `precision_before_i = (i - 1) / r_i`
  (1.0 when `r_i == 0`); queries without a correct match count as AP = 0,
  CMC = 0, mINP = 0, and every metric is divided by the number of ALL queries.

CMC rank-k = fraction of counted queries whose first correct match is within
the top k after junk removal.
"""
from __future__ import annotations

from typing import Any

import numpy as np

PROTOCOLS = ("standard", "fedreid")
JUNK_PID = -1
RANKS = (1, 5, 10)


def check_protocol(protocol: str) -> str:
  """Returns `protocol` or raises ValueError listing the valid ones."""
  if protocol not in PROTOCOLS:
    raise ValueError(
        f"Unknown evaluation protocol {protocol!r}; valid protocols: "
        f"{', '.join(repr(p) for p in PROTOCOLS)}.")
  return protocol


def rank_gallery(sim_row: np.ndarray) -> np.ndarray:
  """Gallery indices by descending similarity, ties in gallery order. `[G] -> [G]`."""
  return np.argsort(-np.asarray(sim_row), kind="stable")


def match_and_junk(q_pid: int, q_cam: int, g_pids: np.ndarray,
                   g_cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Boolean masks `(match [G], junk [G])` of one query against the gallery."""
  g_pids = np.asarray(g_pids)
  g_cams = np.asarray(g_cams)
  same_pid = g_pids == q_pid
  same_cam = g_cams == q_cam
  junk = (g_pids == JUNK_PID) | (same_pid & same_cam)
  match = same_pid & ~same_cam & ~junk
  return match, junk


def hit_positions(sim_row: np.ndarray, q_pid: int, q_cam: int,
                  g_pids: np.ndarray, g_cams: np.ndarray) -> np.ndarray:
  """0-based ranks (after junk removal) of the correct matches, ascending. `[n_good]`."""
  match, junk = match_and_junk(q_pid, q_cam, g_pids, g_cams)
  order = rank_gallery(sim_row)
  kept = order[~junk[order]]          # ranking with junk removed
  return np.flatnonzero(match[kept])  # positions of the hits in it


def average_precision_standard(hits: np.ndarray) -> float:
  """Mean precision at each hit: `sum_i i / (r_i + 1) / n_good`. hits: `[n_good]`."""
  if len(hits) == 0:
    return 0.0
  total = 0.0
  for i, r in enumerate(hits, start=1):
    total += i / (r + 1)
  return total / len(hits)


def average_precision_trapezoid(hits: np.ndarray) -> float:
  """Market-1501 trapezoid AP (the reference's `compute_mAP`). hits: `[n_good]`."""
  if len(hits) == 0:
    return 0.0
  n_good = len(hits)
  total = 0.0
  for i, r in enumerate(hits, start=1):
    precision_at = i / (r + 1)
    precision_before = (i - 1) / r if r > 0 else 1.0
    total += (precision_before + precision_at) / 2 / n_good
  return total


def inverse_negative_penalty(hits: np.ndarray) -> float:
  """INP = `n_good / (rank of the last hit, 1-based)`; 0 without hits."""
  if len(hits) == 0:
    return 0.0
  return len(hits) / (hits[-1] + 1)


def query_metrics(sim_row: np.ndarray, q_pid: int, q_cam: int,
                  g_pids: np.ndarray, g_cams: np.ndarray,
                  protocol: str = "standard") -> dict[str, Any]:
  """Metrics of one query. sim_row: `[G]`.

  Returns a dict with `valid` (has a correct match), `cmc` (`{k: 0/1}` for k in
  RANKS), `ap` (in the protocol's form) and `inp`.
  """
  check_protocol(protocol)
  hits = hit_positions(sim_row, q_pid, q_cam, g_pids, g_cams)
  valid = len(hits) > 0
  cmc = {k: float(valid and hits[0] < k) for k in RANKS}
  if protocol == "standard":
    ap = average_precision_standard(hits)
  else:
    ap = average_precision_trapezoid(hits)
  return dict(valid=valid, cmc=cmc, ap=ap, inp=inverse_negative_penalty(hits))


def evaluate_rankings_reference(similarity: np.ndarray,
                                query_pids: np.ndarray,
                                gallery_pids: np.ndarray,
                                query_cams: np.ndarray,
                                gallery_cams: np.ndarray,
                                protocol: str = "standard") -> dict[str, float]:
  """CMC rank-1/5/10, mAP and mINP (fractions) with a Python loop over queries.

  Args:
    similarity: `[Q, G]`, higher = more similar.
    query_pids, query_cams: `[Q]`.
    gallery_pids, gallery_cams: `[G]`.
    protocol: `"standard"` or `"fedreid"` (see the module docstring).

  Returns:
    `{"rank1", "rank5", "rank10", "mAP", "mINP"}` as Python floats. Under
    `"standard"`, if no query has a correct match every metric is 0.0.
  """
  check_protocol(protocol)
  similarity = np.asarray(similarity)
  q_pids, q_cams = np.asarray(query_pids), np.asarray(query_cams)
  g_pids, g_cams = np.asarray(gallery_pids), np.asarray(gallery_cams)
  sums = {f"rank{k}": 0.0 for k in RANKS}
  sums.update(mAP=0.0, mINP=0.0)
  num_valid = 0
  for q in range(similarity.shape[0]):
    m = query_metrics(similarity[q], q_pids[q], q_cams[q], g_pids, g_cams,
                      protocol)
    if not m["valid"]:
      continue  # standard: skipped; fedreid: contributes zeros
    num_valid += 1
    for k in RANKS:
      sums[f"rank{k}"] += m["cmc"][k]
    sums["mAP"] += m["ap"]
    sums["mINP"] += m["inp"]
  denom = num_valid if protocol == "standard" else similarity.shape[0]
  if denom == 0:
    return {key: 0.0 for key in sums}
  return {key: float(value / denom) for key, value in sums.items()}
