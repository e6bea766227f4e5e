"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), dense and memory-bounded.

Two entry points with the same numbers:

- `re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`: the
  published signature and semantics (the code every re-ID toolkit copies),
  from three distance blocks. Holds `(Q+G)^2` floats: for test-set sizes of
  a few thousand images.
- `re_ranking_from_features(query, gallery, ...)` / `evaluate_re_ranking`:
  the same re-ranked distances from features, never holding a `(Q+G)^2` or a
  `Q x G` matrix: only each item's `max(k1+1, k2)` nearest neighbours, a
  sparse `V` (a few hundred non-zeros a row) and one `[chunk, G]` block of
  re-ranked rows at a time, which is scored (CMC/mAP) and dropped.

The definition (N = Q + G items, queries first; `d` the input distance):

1. `original[i, j] = d(i, j)^2 / max_k d(k, i)^2` (the published code squares
   its input, divides each column by its max and transposes: for a symmetric
   `d`, each row divided by its own max over all N items).
2. `R(i, k)`: the k-reciprocal set: those of `i`'s k+1 nearest items (itself
   included) that have `i` among their own k+1 nearest.
3. Expansion: `R*(i) = R(i, k1)` united with every `R(c, round(k1/2))`,
   `c` in `R(i, k1)`, that shares more than 2/3 of its members with
   `R(i, k1)` (`round` as numpy's, halves to even).
4. `V[i, j] = exp(-original[i, j]) / sum_{j' in R*(i)} exp(-original[i, j'])`
   for `j` in `R*(i)`, 0 elsewhere.
5. Local query expansion (when `k2 != 1`): `V[i] <- mean of V[n]` over `i`'s
   k2 nearest items `n` (itself first).
6. `jaccard[i, j] = 1 - s / (2 - s)`, `s = sum_k min(V[i, k], V[j, k])`.
7. `final = jaccard * (1 - lambda) + original * lambda`, the `[Q, G]` block.

`re_ranking_from_features` uses the Euclidean distance between features as
`d` (so `original` is the squared distance, normalised); for unit-norm
features that ranks like cosine similarity. Ties are broken as the sorts
happen to break them (numpy's `argsort` in the dense path, `lax.top_k` in
the streamed one); with real-valued features they do not occur.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse  # a dependency of jax itself

from fedreid_jax.evaluation import retrieval
from fedreid_jax.evaluation.reference_metrics import check_protocol

_ROWS = 4096  # rows per vectorised step of the neighbour-set arithmetic (memory bound)


def check_parameters(k1: int, k2: int, lambda_value: float) -> None:
  """Raises ValueError unless k1, k2 >= 1 and 0 <= lambda_value <= 1."""
  for name, k in (("k1", k1), ("k2", k2)):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"re-ranking {name}={k!r} must be a positive integer")
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"re-ranking lambda_value={lambda_value!r} must be in [0, 1]")


def _list_length(k1: int, k2: int, num_items: int) -> int:
  """Neighbours kept per item: k1+1 for the reciprocal sets, k2 for query expansion."""
  return min(max(k1 + 1, k2), num_items)


def _reciprocal_mask(lists: np.ndarray) -> np.ndarray:
  """`[N, k]` nearest-item lists -> `[N, k]` bool: is row i in its m-th neighbour's list?"""
  out = np.empty(lists.shape, bool)
  for s in range(0, lists.shape[0], _ROWS):
    rows = np.arange(s, min(s + _ROWS, lists.shape[0]))
    back = lists[lists[rows]]                         # [r, k, k]
    out[rows] = (back == rows[:, None, None]).any(-1)
  return out


def _expansion_pairs(neighbours: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
  """`(rows, cols)` of every `(i, j in R*(i))`, sorted by row then column (steps 2-3)."""
  num_items = neighbours.shape[0]
  full = neighbours[:, :k1 + 1]
  half = neighbours[:, :int(np.around(k1 / 2.0)) + 1]
  full_ok = _reciprocal_mask(full)                    # R(i, k1) as a mask over full[i]
  half_ok = _reciprocal_mask(half)                    # R(c, k1/2) as a mask over half[c]
  keys = []
  for s in range(0, num_items, _ROWS):
    rows = np.arange(s, min(s + _ROWS, num_items))
    f, f_ok = full[rows], full_ok[rows]               # [r, K1]
    h, h_ok = half[f], half_ok[f]                     # [r, K1, K2]: R(c, k1/2) of each c
    # |R(c, k1/2) & R(i, k1)|: members of c's half set found among i's reciprocal ones.
    found = ((h[..., None] == f[:, None, None, :]) & f_ok[:, None, None, :]).any(-1)
    shared = (found & h_ok).sum(-1)
    size = h_ok.sum(-1)
    grow = f_ok & (shared > 2.0 / 3 * size)           # candidates c that expand R(i, k1)
    take = np.concatenate([f_ok, (grow[..., None] & h_ok).reshape(len(rows), -1)], 1)
    cols = np.concatenate([f, h.reshape(len(rows), -1)], 1)
    row_ids = np.broadcast_to(rows[:, None], cols.shape)
    keys.append(np.unique(row_ids[take].astype(np.int64) * num_items + cols[take]))
  keys = np.concatenate(keys)
  return keys // num_items, keys % num_items


def _build_v(neighbours: np.ndarray, k1: int, k2: int,
             distance: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> scipy.sparse.csr_matrix:
  """The sparse `V` after local query expansion (steps 2-5), `[N, N]` float32 CSR.

  `distance(rows, cols)` -> `original[rows, cols]` (float32) for index arrays.
  """
  num_items = neighbours.shape[0]
  rows, cols = _expansion_pairs(neighbours, k1)
  weight = np.exp(-distance(rows, cols)).astype(np.float32)
  starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
  total = np.add.reduceat(weight, starts).astype(np.float32)
  weight /= np.repeat(total, np.diff(np.r_[starts, len(rows)]))
  v = scipy.sparse.csr_matrix((weight, (rows, cols)), shape=(num_items, num_items),
                              dtype=np.float32)
  if k2 != 1:  # V[i] <- mean of V over i's k2 nearest items
    near = neighbours[:, :k2]
    mean = scipy.sparse.csr_matrix(
        (np.full(near.size, 1.0, np.float32),
         (np.repeat(np.arange(num_items), near.shape[1]), near.reshape(-1))),
        shape=(num_items, num_items))
    v = (mean @ v).astype(np.float32) / np.float32(near.shape[1])
    v = scipy.sparse.csr_matrix(v)
  v.sort_indices()
  return v


def _jaccard(v_query: scipy.sparse.csr_matrix, v_gallery: scipy.sparse.csc_matrix
             ) -> np.ndarray:
  """Jaccard distance `[B, G]` float32 of query rows of V against the gallery rows (step 6).

  `s[i, g] = sum_k min(V[i, k], V[g, k])` over the columns k non-zero in both:
  each query entry `(i, k)` meets the gallery entries of column k.
  """
  num_rows, num_gallery = v_query.shape[0], v_gallery.shape[0]
  q_row = np.repeat(np.arange(num_rows), np.diff(v_query.indptr))
  q_col, q_val = v_query.indices, v_query.data
  begin, end = v_gallery.indptr[q_col], v_gallery.indptr[q_col + 1]
  counts = end - begin
  total = int(counts.sum())
  # Position of every gallery entry met: begin[e] + 0 .. counts[e] - 1, per query entry e.
  offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
  at = np.repeat(begin, counts) + offsets
  overlap = np.minimum(np.repeat(q_val, counts), v_gallery.data[at])
  target = np.repeat(q_row, counts).astype(np.int64) * num_gallery + v_gallery.indices[at]
  s = np.bincount(target, weights=overlap, minlength=num_rows * num_gallery)
  s = s.reshape(num_rows, num_gallery).astype(np.float32)
  return 1 - s / (2 - s)


def re_ranking(q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
  """k-reciprocal re-ranked distances `[Q, G]` float32 (the published function).

  Args:
    q_g_dist: `[Q, G]` query-gallery distances; q_q_dist: `[Q, Q]`;
      g_g_dist: `[G, G]` (Euclidean distances, as in the paper's code, which
      squares them).
    k1: size of the k-reciprocal neighbourhoods (20 in the paper).
    k2: neighbours averaged by local query expansion (6; 1 = off).
    lambda_value: weight of the original distance (0.3).

  Returns:
    `jaccard * (1 - lambda_value) + original * lambda_value`, lower = closer.
  """
  check_parameters(k1, k2, lambda_value)
  q_g = np.asarray(q_g_dist, np.float32)
  num_query = q_g.shape[0]
  original = np.concatenate(
      [np.concatenate([np.asarray(q_q_dist, np.float32), q_g], 1),
       np.concatenate([q_g.T, np.asarray(g_g_dist, np.float32)], 1)], 0)
  original = np.power(original, 2).astype(np.float32)
  original = np.transpose(original / np.max(original, axis=0))
  num_items = original.shape[0]
  neighbours = np.argsort(original, axis=1)[:, :_list_length(k1, k2, num_items)]
  v = _build_v(neighbours, k1, k2, lambda r, c: original[r, c])
  jaccard = _jaccard(v[:num_query], v[num_query:].tocsc())
  final = jaccard * (1 - lambda_value) + original[:num_query, num_query:] * lambda_value
  return final.astype(np.float32)


# ---------------------------------------------------------------------------
# From features, memory-bounded.

@functools.partial(jax.jit, static_argnames="k")
def _nearest(rows: jax.Array, items: jax.Array, items_sq: jax.Array, k: int):
  """Squared distances of `rows` `[B, D]` to `items` `[N, D]`: the k nearest
  `(indices [B, k], ascending)` and every row's max `[B]`."""
  dist = _squared_distance(rows, items, items_sq)
  _, index = jax.lax.top_k(-dist, k)
  return index, jnp.max(dist, axis=1)


def _squared_distance(rows: jax.Array, items: jax.Array, items_sq: jax.Array) -> jax.Array:
  """`|a|^2 + |b|^2 - 2 a.b`, clamped at 0, full f32 precision. `[B, D] x [N, D] -> [B, N]`."""
  rows = rows.astype(jnp.float32)
  dot = jnp.dot(rows, items.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(rows * rows, 1)[:, None] + items_sq[None, :] - 2 * dot, 0.0)


_squared_distance_jit = jax.jit(_squared_distance)


def fixed_chunks(num_rows: int, size: int) -> list[tuple[int, int]]:
  """`(start, skip)` per chunk of `min(size, num_rows)` rows: rows
  `[start + skip, start + size)` are new. As in `retrieval`, the last chunk is
  shifted back to end at `num_rows` (one compiled shape, nothing padded)."""
  size = min(size, num_rows)
  return [(min(s, num_rows - size), s - min(s, num_rows - size))
          for s in range(0, num_rows, max(size, 1))]


class _ReRanker:
  """Neighbour lists, row maxima and the sparse V of query + gallery features;
  `rows(start, size)` gives re-ranked query rows `[size, G]`."""

  def __init__(self, query: Any, gallery: Any, k1: int, k2: int, lambda_value: float,
               chunk: int):
    check_parameters(k1, k2, lambda_value)
    if chunk < 1:
      raise ValueError(f"re-ranking chunk must be positive, got {chunk}")
    query = np.asarray(query, np.float32)
    gallery = np.asarray(gallery, np.float32)
    self.num_query = query.shape[0]
    self.lambda_value = lambda_value
    items = np.concatenate([query, gallery], 0)
    num_items = items.shape[0]
    self.items = jnp.asarray(items)
    self.items_sq = jnp.sum(self.items * self.items, 1)
    self.gallery = self.items[self.num_query:]
    self.gallery_sq = self.items_sq[self.num_query:]
    k = _list_length(k1, k2, num_items)
    neighbours = np.empty((num_items, k), np.int32)
    row_max = np.empty(num_items, np.float32)
    size = min(chunk, num_items)
    for start, skip in fixed_chunks(num_items, size):
      index, top = _nearest(self.items[start:start + size], self.items, self.items_sq, k)
      neighbours[start + skip:start + size] = np.asarray(index)[skip:]
      row_max[start + skip:start + size] = np.asarray(top)[skip:]
    self.row_max = row_max
    sq = np.asarray(self.items_sq)

    def original(r: np.ndarray, c: np.ndarray) -> np.ndarray:
      out = np.empty(len(r), np.float32)
      for s in range(0, len(r), 1 << 16):
        a, b = r[s:s + (1 << 16)], c[s:s + (1 << 16)]
        dot = np.einsum("nd,nd->n", items[a], items[b])
        out[s:s + len(a)] = np.maximum(sq[a] + sq[b] - 2 * dot, 0) / row_max[a]
      return out

    v = _build_v(neighbours, k1, k2, original)
    self.v_query = v[:self.num_query]
    self.v_gallery = v[self.num_query:].tocsc()

  def rows(self, start: int, size: int) -> np.ndarray:
    """Re-ranked distances of queries `[start, start + size)`: `[size, G]` float32."""
    dist = _squared_distance_jit(self.items[start:start + size], self.gallery,
                                 self.gallery_sq)
    original = np.asarray(dist) / self.row_max[start:start + size, None]
    jaccard = _jaccard(self.v_query[start:start + size], self.v_gallery)
    final = jaccard * (1 - self.lambda_value) + original * self.lambda_value
    return final.astype(np.float32)


def re_ranking_from_features(query: Any, gallery: Any, k1: int = 20, k2: int = 6,
                             lambda_value: float = 0.3, chunk: int = 256
                             ) -> Iterator[tuple[int, np.ndarray]]:
  """`re_ranking` of the Euclidean distances of features, chunk by chunk.

  Yields `(start, rows)`: the re-ranked distances `[<=chunk, G]` float32 of
  queries `start, start + 1, ...`, in order. Equal to
  `re_ranking(d(q, g), d(q, q), d(g, g), k1, k2, lambda_value)` (tested), but
  holds only the features, `max(k1+1, k2)` neighbours per item, the sparse
  V and one block: peak memory grows like `(Q+G) x D + chunk x (Q+G)`.

  Args:
    query: `[Q, D]`; gallery: `[G, D]` features (numpy or device arrays).
    k1, k2, lambda_value: as in `re_ranking`.
    chunk: rows per step, both for the neighbour pass and for the output.
  """
  ranker = _ReRanker(query, gallery, k1, k2, lambda_value, chunk)  # now: errors at the call
  num_query = ranker.num_query
  return ((start, ranker.rows(start, min(chunk, num_query - start)))
          for start in range(0, num_query, chunk))


def evaluate_re_ranking(query_feats: Any, gallery_feats: Any, q_pids: Any, g_pids: Any,
                        q_cams: Any, g_cams: Any, protocol: str = "standard", *,
                        k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        chunk: int = 256) -> dict[str, float]:
  """`retrieval.evaluate_features` on re-ranked distances: rank1/5/10, mAP, mINP.

  Each `[chunk, G]` block of re-ranked rows is scored (`retrieval.chunk_stats`,
  ranking by ascending distance) as soon as it is made; no `Q x G` matrix.
  """
  check_protocol(protocol)
  q_pids, q_cams = np.asarray(q_pids, np.int32), np.asarray(q_cams, np.int32)
  g_pids, g_cams = np.asarray(g_pids, np.int32), np.asarray(g_cams, np.int32)
  num_query = q_pids.shape[0]
  if (num_query, g_pids.shape[0]) != (query_feats.shape[0], gallery_feats.shape[0]):
    raise ValueError(f"features {query_feats.shape} / {gallery_feats.shape} do not "
                     f"match {num_query} queries / {g_pids.shape[0]} gallery.")
  if num_query == 0 or g_pids.shape[0] == 0:
    return retrieval.evaluate_rankings(np.zeros((num_query, g_pids.shape[0]), np.float32),
                                       q_pids, g_pids, q_cams, g_cams, protocol)
  ranker = _ReRanker(query_feats, gallery_feats, k1, k2, lambda_value, chunk)
  g_pids_d, g_cams_d = jnp.asarray(g_pids), jnp.asarray(g_cams)
  pieces = []
  for start, skip in fixed_chunks(num_query, chunk):  # each block scored, then dropped
    size = min(chunk, num_query)
    rows = slice(start, start + size)
    stats = jax.device_get(retrieval.chunk_stats(-ranker.rows(start, size), q_pids[rows],
                                                 q_cams[rows], g_pids_d, g_cams_d))
    pieces.append({name: value[skip:] for name, value in stats.items()})
  return retrieval.summarize({name: np.concatenate([p[name] for p in pieces])
                              for name in pieces[0]}, protocol)
