"""Alpha query expansion (alpha-QE; Radenovic et al., as fast-reid's `aqe`).

Query and gallery features together (N = Q + G items): each item's top-k
items by cosine similarity (itself included: it is its own first, similarity
1) are averaged, weighted by `similarity ** alpha`:

    new_i = normalise( mean_{j in topk(i)} sim(i, j) ** alpha * f_j )

and that is repeated `times` times (fast-reid's `qe_times`, default 1),
each round on the previous round's features. fast-reid returns the
unnormalised mean; it is returned L2-normalised here, which changes no
cosine similarity (this repository's features are unit-norm and compared by
dot product). Computed chunk by chunk on the device: `[chunk, N]`
similarities at a time, never `N x N`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_parameters(k: int, alpha: float) -> None:
  """Raises ValueError unless k >= 1 and alpha > 0."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"query expansion k={k!r} must be a positive integer")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"query expansion alpha={alpha!r} must be a positive number")


def _normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k",))
def _expand_rows(rows: jax.Array, rows_unit: jax.Array, items: jax.Array,
                 items_unit: jax.Array, k: int, alpha: float) -> jax.Array:
  """New (unit-norm) features `[B, D]` of `rows`: weighted mean of their top-k items."""
  del rows
  sims = jnp.dot(rows_unit, items_unit.T, precision=jax.lax.Precision.HIGHEST)
  top, index = jax.lax.top_k(sims, k)                 # [B, k]
  weights = jnp.power(top, alpha)
  mixed = jnp.einsum("bk,bkd->bd", weights, items[index],
                     precision=jax.lax.Precision.HIGHEST) / k
  return _normalise(mixed)


def aqe(query_feats: Any, gallery_feats: Any, k: int = 10, alpha: float = 3.0, *,
        times: int = 1, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Alpha query expansion of query and gallery features.

  Args:
    query_feats: `[Q, D]`; gallery_feats: `[G, D]`.
    k: items averaged per item, itself included (fast-reid's `qe_k`; 1 = unchanged).
    alpha: similarity exponent of the weights (3.0 as in fast-reid).
    times: rounds of expansion (fast-reid's `qe_times`).
    chunk: rows per compiled step (memory ~ 4 B x chunk x (Q + G)).

  Returns:
    `(query [Q, D], gallery [G, D])` float32 numpy, L2-normalised. With
    non-integral alpha a negative similarity among the top-k gives NaN, as
    in fast-reid (features of real models have none).
  """
  check_parameters(k, alpha)
  if chunk < 1:
    raise ValueError(f"query expansion chunk must be positive, got {chunk}")
  from fedreid_jax.evaluation.re_ranking import fixed_chunks
  query = np.asarray(query_feats, np.float32)
  gallery = np.asarray(gallery_feats, np.float32)
  num_query = query.shape[0]
  items = jnp.asarray(np.concatenate([query, gallery], 0))
  num_items = items.shape[0]
  if num_items == 0:
    return query, gallery
  k = min(k, num_items)
  for _ in range(times):
    unit = _normalise(items)
    size = min(chunk, num_items)
    out = np.empty(items.shape, np.float32)
    for start, skip in fixed_chunks(num_items, size):
      new = _expand_rows(items[start:start + size], unit[start:start + size], items, unit,
                         k, float(alpha))
      out[start + skip:start + size] = np.asarray(new)[skip:]
    items = jnp.asarray(out)
  out = np.asarray(items)
  return out[:num_query], out[num_query:]
