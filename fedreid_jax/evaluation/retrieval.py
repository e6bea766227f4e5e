"""Re-ID retrieval metrics, vectorised in JAX and chunked over queries.

Same protocols as `reference_metrics.py` (read its docstring for the
definitions); this version is for real galleries (MSMT17: 11,659 queries x
82,161 gallery images, 3.8 GB of f32 similarities), so it never loops over
queries in Python and never needs the full `[Q, G]` matrix at once:

1. take `query_chunk` query rows of the similarity (or compute them on the
   device from features: `evaluate_features`);
2. per row, sort the gallery by descending similarity (a stable sort on
   `-sim`, so ties keep gallery order, exactly like the numpy reference),
   carrying a per-entry status (negative / match / junk) along with the key;
3. drop junk by cumulative sums: the rank of an entry after junk removal is
   `cumsum(not junk) - 1`, the index of a hit is `cumsum(match)`;
4. CMC (first hit rank), AP in both forms and INP (last hit rank) per query
   from those sums, on the device in float32;
5. average on the host in float64 under the chosen protocol.

Every chunk has the same static shape: the last one is shifted back to end at
the last query and the rows it shares with the previous chunk are dropped, so
nothing is padded, copied, or compiled twice.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.evaluation.reference_metrics import JUNK_PID, RANKS, check_protocol

NEGATIVE, MATCH, JUNK = 0, 1, 2  # an entry's status (`status`)


def status(q_pids: jax.Array, q_cams: jax.Array, g_pids: jax.Array,
           g_cams: jax.Array) -> jax.Array:
  """Per (query, gallery) entry: 0 negative, 1 correct match, 2 junk. `[B, G]` int8."""
  same_pid = q_pids[:, None] == g_pids[None, :]
  same_cam = q_cams[:, None] == g_cams[None, :]
  junk = (g_pids[None, :] == JUNK_PID) | (same_pid & same_cam)
  match = same_pid & ~junk
  return jnp.where(junk, JUNK, jnp.where(match, MATCH, NEGATIVE)).astype(jnp.int8)


def _sorted_status(sim: jax.Array, status: jax.Array) -> jax.Array:
  """`status` of each row in descending-similarity order (stable). `[B, G] -> [B, G]`.

  Sorting `(-sim, status)` with one key is the same permutation as
  `jnp.argsort(-sim, stable=True)` followed by a gather, without the gather.
  """
  _, status_sorted = jax.lax.sort((-sim, status), dimension=1, is_stable=True,
                                  num_keys=1)
  return status_sorted


def _stats_from_sorted(status_sorted: jax.Array) -> dict[str, jax.Array]:
  """Per-query statistics from the ranked status. `[B, G] -> {name: [B]}`.

  Returns `n_good` (number of correct matches), `first` / `last` (0-based
  rank after junk removal of the first / last hit; G / -1 without hits),
  `ap_standard` and `ap_trapezoid` (0 without hits).
  """
  num_gallery = status_sorted.shape[1]
  match = status_sorted == MATCH
  valid = status_sorted != JUNK
  pos = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1   # rank after junk removal
  hit = jnp.cumsum(match, axis=1, dtype=jnp.int32)       # 1-based hit index at hits
  n_good = hit[:, -1]
  first = jnp.min(jnp.where(match, pos, num_gallery), axis=1)
  last = jnp.max(jnp.where(match, pos, -1), axis=1)
  pos_f = pos.astype(jnp.float32)
  hit_f = hit.astype(jnp.float32)
  precision_at = hit_f / (pos_f + 1.0)
  precision_before = jnp.where(pos > 0, (hit_f - 1.0) / jnp.maximum(pos_f, 1.0), 1.0)
  denom = jnp.maximum(n_good, 1).astype(jnp.float32)
  ap_standard = jnp.sum(jnp.where(match, precision_at, 0.0), axis=1) / denom
  trapezoid = 0.5 * (precision_before + precision_at)
  ap_trapezoid = jnp.sum(jnp.where(match, trapezoid, 0.0), axis=1) / denom
  return dict(n_good=n_good, first=first, last=last, ap_standard=ap_standard,
              ap_trapezoid=ap_trapezoid)


@jax.jit
def chunk_stats(sim: jax.Array, q_pids: jax.Array, q_cams: jax.Array,
                g_pids: jax.Array, g_cams: jax.Array) -> dict[str, jax.Array]:
  """Statistics of a chunk of similarity rows `[B, G]` -> `{name: [B]}`."""
  entry_status = status(q_pids, q_cams, g_pids, g_cams)
  return _stats_from_sorted(_sorted_status(sim.astype(jnp.float32), entry_status))


@functools.partial(jax.jit, static_argnames="size")
def _chunk_stats_sliced(sim_all: jax.Array, start: jax.Array, size: int,
                        q_pids: jax.Array, q_cams: jax.Array, g_pids: jax.Array,
                        g_cams: jax.Array) -> dict[str, jax.Array]:
  """Like `chunk_stats` on rows `[start, start + size)` of a device `[Q, G]`."""
  sim = jax.lax.dynamic_slice_in_dim(sim_all, start, size, axis=0)
  return chunk_stats(sim, q_pids, q_cams, g_pids, g_cams)


@functools.partial(jax.jit, static_argnames="size")
def _chunk_stats_features(q_feats: jax.Array, start: jax.Array, size: int,
                          g_feats: jax.Array, q_pids: jax.Array,
                          q_cams: jax.Array, g_pids: jax.Array,
                          g_cams: jax.Array) -> dict[str, jax.Array]:
  """Statistics of query rows `[start, start + size)`; similarity = `q @ g.T`.

  Full f32 precision (no TF32 on GPU): rankings are sensitive to ties.
  """
  q = jax.lax.dynamic_slice_in_dim(q_feats, start, size, axis=0)
  sim = jnp.dot(q.astype(jnp.float32), g_feats.astype(jnp.float32).T,
                precision=jax.lax.Precision.HIGHEST)
  return chunk_stats(sim, q_pids, q_cams, g_pids, g_cams)


def _chunk_starts(num_query: int, size: int) -> list[tuple[int, int]]:
  """`(start, skip)` per chunk: rows `[start + skip, start + size)` are new.

  The last chunk is shifted back to end at `num_query`; its first `skip` rows
  were already scored by the previous chunk and are dropped.
  """
  out = []
  for s in range(0, num_query, size):
    start = min(s, num_query - size)
    out.append((start, s - start))
  return out


def _run_chunks(num_query: int, query_chunk: int, score_chunk) -> dict[str, np.ndarray]:
  """Calls `score_chunk(start, size)` per chunk; concatenates to `{name: [Q]}`."""
  if query_chunk < 1:
    raise ValueError(f"query_chunk must be positive, got {query_chunk}.")
  size = min(query_chunk, num_query)
  pending = [(score_chunk(start, size), skip)
             for start, skip in _chunk_starts(num_query, size)]  # async dispatch
  pieces = [(jax.device_get(stats), skip) for stats, skip in pending]
  return {name: np.concatenate([stats[name][skip:] for stats, skip in pieces])
          for name in pieces[0][0]}


def summarize(stats: dict[str, np.ndarray], protocol: str = "standard") -> dict[str, float]:
  """Averages per-query statistics `{name: [Q]}` under `protocol` (float64 on host).

  Returns `{"rank1", "rank5", "rank10", "mAP", "mINP"}`; under `"standard"`
  with no valid query, all 0.0.
  """
  check_protocol(protocol)
  n_good = np.asarray(stats["n_good"], np.int64)
  valid = n_good > 0
  num_query = n_good.shape[0]
  first = np.asarray(stats["first"], np.int64)
  last = np.asarray(stats["last"], np.int64)
  inp = np.where(valid, n_good / np.maximum(last + 1, 1), 0.0)
  ap_key = "ap_standard" if protocol == "standard" else "ap_trapezoid"
  ap = np.where(valid, np.asarray(stats[ap_key], np.float64), 0.0)
  per_query = {f"rank{k}": (valid & (first < k)).astype(np.float64) for k in RANKS}
  per_query.update(mAP=ap, mINP=inp)
  denom = int(valid.sum()) if protocol == "standard" else num_query
  if denom == 0:
    return {name: 0.0 for name in per_query}
  return {name: float(v.sum() / denom) for name, v in per_query.items()}


def _ids(q_pids: Any, g_pids: Any, q_cams: Any, g_cams: Any):
  """Validates and converts the id arrays: `[Q], [G], [Q], [G]` int32."""
  q_pids, q_cams = np.asarray(q_pids, np.int32), np.asarray(q_cams, np.int32)
  g_pids, g_cams = np.asarray(g_pids, np.int32), np.asarray(g_cams, np.int32)
  if q_pids.shape != q_cams.shape or g_pids.shape != g_cams.shape:
    raise ValueError("pids and cams must have the same shape: "
                     f"query {q_pids.shape} vs {q_cams.shape}, "
                     f"gallery {g_pids.shape} vs {g_cams.shape}.")
  return q_pids, g_pids, q_cams, g_cams


def ranking_statistics(similarity: Any, query_pids: Any, gallery_pids: Any,
                       query_cams: Any, gallery_cams: Any, *,
                       query_chunk: int = 512) -> dict[str, np.ndarray]:
  """Per-query statistics (see `_stats_from_sorted`) of a `[Q, G]` similarity.

  `similarity` may be a numpy array (each chunk is sent to the device on its
  own) or a device array (sliced on the device).
  """
  q_pids, g_pids, q_cams, g_cams = _ids(query_pids, gallery_pids, query_cams,
                                        gallery_cams)
  num_query, num_gallery = similarity.shape
  if (num_query, num_gallery) != (q_pids.shape[0], g_pids.shape[0]):
    raise ValueError(f"similarity {similarity.shape} does not match "
                     f"{q_pids.shape[0]} queries x {g_pids.shape[0]} gallery.")
  g_pids_d, g_cams_d = jnp.asarray(g_pids), jnp.asarray(g_cams)
  on_device = isinstance(similarity, jax.Array)

  def score_chunk(start: int, size: int):
    rows = slice(start, start + size)
    if on_device:
      return _chunk_stats_sliced(similarity, start, size, q_pids[rows],
                                 q_cams[rows], g_pids_d, g_cams_d)
    return chunk_stats(np.asarray(similarity[rows], np.float32), q_pids[rows],
                       q_cams[rows], g_pids_d, g_cams_d)

  return _run_chunks(num_query, query_chunk, score_chunk)


def evaluate_rankings(similarity: Any, query_pids: Any, gallery_pids: Any,
                      query_cams: Any, gallery_cams: Any,
                      protocol: str = "standard", *,
                      query_chunk: int = 512) -> dict[str, float]:
  """CMC rank-1/5/10, mAP and mINP (fractions in [0, 1]) of a similarity matrix.

  Args:
    similarity: `[Q, G]`, higher = more similar (numpy or device array).
    query_pids, query_cams: `[Q]` ints; gallery_pids, gallery_cams: `[G]` ints.
      Gallery pid -1 is junk, pid 0 an ordinary (distractor) id.
    protocol: `"standard"` (torchreid / fast-reid) or `"fedreid"` (the
      reference's trapezoid AP, no-match queries counted as 0); see
      `reference_metrics`.
    query_chunk: query rows scored per compiled call (memory ~ 20 B x chunk x G).

  Returns:
    `{"rank1", "rank5", "rank10", "mAP", "mINP"}` as Python floats.
  """
  check_protocol(protocol)
  if similarity.shape[0] == 0:
    return summarize(dict(n_good=np.zeros(0), first=np.zeros(0), last=np.zeros(0),
                          ap_standard=np.zeros(0), ap_trapezoid=np.zeros(0)),
                     protocol)
  stats = ranking_statistics(similarity, query_pids, gallery_pids, query_cams,
                             gallery_cams, query_chunk=query_chunk)
  return summarize(stats, protocol)


def evaluate_features(query_feats: Any, gallery_feats: Any, q_pids: Any,
                      g_pids: Any, q_cams: Any, g_cams: Any,
                      protocol: str = "standard",
                      query_chunk: int = 512) -> dict[str, float]:
  """Like `evaluate_rankings` with similarity = `query_feats @ gallery_feats.T`.

  The similarity is computed chunk by chunk on the device; the full `[Q, G]`
  matrix never exists. Features are used as given (L2-normalise them first
  for cosine similarity).

  Args:
    query_feats: `[Q, D]`; gallery_feats: `[G, D]`.
    q_pids, q_cams: `[Q]`; g_pids, g_cams: `[G]`.
    protocol, query_chunk: as in `evaluate_rankings`.
  """
  check_protocol(protocol)
  q_pids, g_pids, q_cams, g_cams = _ids(q_pids, g_pids, q_cams, g_cams)
  num_query = query_feats.shape[0]
  if (num_query, gallery_feats.shape[0]) != (q_pids.shape[0], g_pids.shape[0]):
    raise ValueError(f"features {query_feats.shape} / {gallery_feats.shape} do not "
                     f"match {q_pids.shape[0]} queries / {g_pids.shape[0]} gallery.")
  if num_query == 0:
    return evaluate_rankings(np.zeros((0, g_pids.shape[0]), np.float32), q_pids,
                             g_pids, q_cams, g_cams, protocol)
  q_feats_d, g_feats_d = jnp.asarray(query_feats), jnp.asarray(gallery_feats)
  g_pids_d, g_cams_d = jnp.asarray(g_pids), jnp.asarray(g_cams)

  def score_chunk(start: int, size: int):
    rows = slice(start, start + size)
    return _chunk_stats_features(q_feats_d, start, size, g_feats_d, q_pids[rows],
                                 q_cams[rows], g_pids_d, g_cams_d)

  stats = _run_chunks(num_query, query_chunk, score_chunk)
  return summarize(stats, protocol)
