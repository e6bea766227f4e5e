"""Retrieval examples: a few queries with their top-k gallery images, as a picture.

At the end of a run, per client:

    ex = retrieval_examples(query_feats, gallery_feats, test)   # small numpy arrays
    save_examples(f"{run}/retrieval/{test.name}.npz", ex)

and the report draws them: `draw_retrieval(load_examples(path), "x.png", title)`.

The ranking excludes nothing: the top-k are the k most similar gallery
entries, junk included (the metrics ignore junk, but the picture shows what
the model puts first). Each entry's status follows the metrics' rule
(`retrieval.status`): 1 correct (same id, other camera), 2 junk (id -1, or
same id and same camera), 0 wrong.

Queries are chosen deterministically: a seeded sample of candidate queries is
ranked; one in four picks (at least one, from two queries on) is a rank-1
failure when there is one, so the picture shows a confusion; the others are
rank-1 successes, then further failures, then queries without any correct
match in the gallery; each group picked evenly over the query set.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.data.images import resize_bicubic
from fedreid_jax.evaluation import report
from fedreid_jax.evaluation import retrieval

CANDIDATES = 128  # queries ranked before choosing (bounds memory: 128 x G similarities)
COLORS = {0: "#d62728", 1: "#2ca02c", 2: "#8c8c8c"}  # wrong, correct, junk
QUERY_COLOR = "#1f77b4"


def _spread(items: np.ndarray, n: int) -> list[int]:
  """`n` entries of `items`, evenly spaced, each the middle of its share
  (all when `n >= len(items)`)."""
  if n <= 0 or len(items) == 0:
    return []
  n = min(n, len(items))
  return [int(items[j]) for j in ((np.arange(n) + 0.5) * len(items) / n).astype(int)]


def choose_queries(n_good: np.ndarray, first: np.ndarray, num_queries: int) -> list[int]:
  """Positions (sorted) of `num_queries` ranked candidates to show.

  Args:
    n_good: `[C]` correct matches per candidate in the whole gallery.
    first: `[C]` 0-based rank (junk removed) of its first correct match.
    num_queries: how many to choose.
  """
  matched = np.flatnonzero(n_good > 0)
  failures = matched[first[matched] > 0]
  n_fail = min(len(failures), max(1, num_queries // 4)) if num_queries >= 2 else 0
  picks = _spread(failures, n_fail)
  for group in (matched[first[matched] == 0], np.setdiff1d(failures, picks),
                np.flatnonzero(n_good == 0)):
    picks += _spread(group, num_queries - len(picks))
  return sorted(picks)


def _thumbs(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 `[N, H, W, 3]` -> `[N, h, w, 3]` (bicubic)."""
  out = np.zeros((len(images), *size, 3), np.uint8)
  for i, image in enumerate(images):
    out[i] = resize_bicubic(np.asarray(image, np.uint8), tuple(size))
  return out


def _ids(test) -> tuple[np.ndarray, ...]:
  """`(query pids, query cams, gallery pids, gallery cams)` of a TestSet, int32."""
  return tuple(np.asarray(a, np.int32) for a in (test.query_pids, test.query_cams,
                                                 test.gallery_pids, test.gallery_cams))


def _rank_candidates(query_feats, gallery_feats, test, seed: int):
  """A seeded sample of queries, ranked: `(indices [C], similarity [C, G],
  n_good [C], first [C])` (see `choose_queries`)."""
  q_pids, q_cams, g_pids, g_cams = _ids(test)
  cand = np.sort(np.random.default_rng(seed).permutation(len(q_pids))[:CANDIDATES])
  sim = jnp.dot(jnp.asarray(query_feats, jnp.float32)[cand],
                jnp.asarray(gallery_feats, jnp.float32).T,
                precision=jax.lax.Precision.HIGHEST)
  stats = jax.device_get(retrieval.chunk_stats(sim, q_pids[cand], q_cams[cand], g_pids, g_cams))
  return cand, np.asarray(sim), np.asarray(stats["n_good"]), np.asarray(stats["first"])


def retrieval_examples(query_feats: Any, gallery_feats: Any, test, num_queries: int = 4,
                       top_k: int = 10, thumb_size: tuple[int, int] = (64, 32),
                       seed: int = 0) -> dict[str, np.ndarray]:
  """Chosen queries of `test` (a `features.TestSet`) and their top-k gallery entries.

  Args:
    query_feats: `[Q, D]`, gallery_feats: `[G, D]`, L2-normalised (similarity = dot).
    test: the client's images `[N, H, W, 3]` uint8, pids and cams.
    num_queries, top_k: rows and columns of the picture (fewer if the set is smaller).
    thumb_size: `(h, w)` of the stored thumbnails.
    seed: picks the candidate queries.

  Returns:
    `client` (str), `query_images` `[n, h, w, 3]`, `gallery_images` `[n, K, h, w, 3]`
    uint8; `status` `[n, K]` int8 (0 wrong, 1 correct, 2 junk); `scores` `[n, K]`;
    `query_pids`, `query_cams`, `query_index`, `num_matches` (correct matches in
    the gallery), `first_match` (1-based rank, junk removed; 0: none) `[n]`;
    `gallery_pids`, `gallery_cams`, `gallery_index` `[n, K]`.
  """
  q_pids, q_cams, g_pids, g_cams = _ids(test)
  k = min(top_k, len(g_pids))
  if len(q_pids) and len(g_pids):
    cand, sim, n_good, first = _rank_candidates(query_feats, gallery_feats, test, seed)
    rows = np.asarray(choose_queries(n_good, first, num_queries), np.int64)
  else:
    cand = rows = np.zeros(0, np.int64)
    sim, n_good, first = np.zeros((0, len(g_pids)), np.float32), rows, rows
  qi, sim = cand[rows].astype(np.int32), sim[rows]
  order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  status = np.asarray(retrieval.status(q_pids[qi], q_cams[qi], g_pids, g_cams), np.int8)
  gallery = test.gallery_images[order.reshape(-1)]
  return dict(
      client=np.asarray(test.name),
      query_images=_thumbs(test.query_images[qi], thumb_size),
      gallery_images=_thumbs(gallery, thumb_size).reshape(len(qi), k, *thumb_size, 3),
      status=np.take_along_axis(status, order, axis=1),
      scores=np.take_along_axis(sim, order, axis=1).astype(np.float32),
      query_pids=q_pids[qi], query_cams=q_cams[qi], query_index=qi,
      gallery_pids=g_pids[order], gallery_cams=g_cams[order],
      gallery_index=order.astype(np.int32),
      num_matches=n_good[rows].astype(np.int32),
      first_match=np.where(n_good[rows] > 0, first[rows] + 1, 0).astype(np.int32))


def save_examples(path: str, examples: dict) -> None:
  """Writes `examples` (numpy arrays) to `path` as a compressed .npz, atomically."""
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **{k: np.asarray(v) for k, v in examples.items()})
  os.replace(tmp, path)


def load_examples(path: str) -> dict[str, np.ndarray]:
  """The arrays `save_examples` wrote."""
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _frame(ax, image: np.ndarray, color: str, faded: bool = False) -> None:
  """Shows `image` on `ax` without ticks, framed in `color`."""
  ax.imshow(image, alpha=0.45 if faded else 1.0, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(color)
    spine.set_linewidth(3.0)


def _query_label(ex: dict, i: int) -> str:
  pid, cam, first = int(ex["query_pids"][i]), int(ex["query_cams"][i]), int(ex["first_match"][i])
  found = "no match in gallery" if not first else (
      "rank-1 correct" if first == 1 else f"1st match: rank {first}")
  return f"query id {pid} c{cam}\n{found}"


def _gallery_label(ex: dict, i: int, j: int) -> str:
  junk = "junk " if ex["status"][i, j] == retrieval.JUNK else ""
  return f"{junk}{int(ex['gallery_pids'][i, j])} c{int(ex['gallery_cams'][i, j])}\n" \
         f"{float(ex['scores'][i, j]):.2f}"


def draw_retrieval(examples: dict, out_png: str, title: str) -> str:
  """Draws one row per query: the query, then its top-k gallery images framed
  green (correct), red (wrong) or grey and faded (junk), each labelled with
  person id, camera and similarity. Returns `out_png`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  ex = examples
  n, k = ex["status"].shape if np.ndim(ex["status"]) == 2 else (0, 0)
  fig = Figure(figsize=(1.6 + 0.85 * max(k, 6), 1.1 + 1.95 * max(n, 1)))
  FigureCanvasAgg(fig)
  fig.suptitle(title, fontsize=10)
  fig.text(0.5, 0.005, "frame: green correct, red wrong person, grey + faded junk (same "
           "person and camera, or id -1;\nthe metrics skip it). Under each image: person id, "
           "camera, similarity.", ha="center", va="bottom", fontsize=7)
  if n == 0 or k == 0:
    fig.text(0.5, 0.5, "no queries", ha="center", va="center")
    return report.save_figure(fig, out_png)
  axes = fig.subplots(n, k + 2, squeeze=False,
                      gridspec_kw=dict(width_ratios=[1.0, 0.35] + [1.0] * k))
  for i in range(n):
    _frame(axes[i, 0], ex["query_images"][i], QUERY_COLOR)
    axes[i, 0].set_xlabel(_query_label(ex, i), fontsize=7)
    axes[i, 1].axis("off")
    for j in range(k):
      status = int(ex["status"][i, j])
      ax = axes[i, j + 2]
      _frame(ax, ex["gallery_images"][i, j], COLORS[status], faded=status == retrieval.JUNK)
      ax.set_xlabel(_gallery_label(ex, i, j), fontsize=7,
                    color="black" if status != retrieval.MATCH else COLORS[retrieval.MATCH])
      if i == 0:
        ax.set_title(str(j + 1), fontsize=8)
  fig.tight_layout(rect=(0, 0.05, 1, 0.97))
  return report.save_figure(fig, out_png)
