"""Re-ID features on the device: f(img) + f(flip(img)), L2-normalised."""
from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.data.base import ClientData
from fedreid_jax.input.reader import load_images
from fedreid_jax.models.preprocess import l2_normalize, normalize


def make_embed_fn(model):
  """Jitted (variables, uint8 `[B, H, W, 3]`) -> unit-norm features `[B, E]` (eval mode)."""
  def embed(variables, images):
    x = normalize(images)
    f = model.apply(variables, x, train=False, method=type(model).embed)
    f = f + model.apply(variables, x[:, :, ::-1], train=False, method=type(model).embed)
    return l2_normalize(f)
  return jax.jit(embed)


def padded_size(real: int, batch_size: int) -> int:
  """The compiled batch size a short batch of `real` images is padded to: the
  next power of two, at least `batch_size // 8`, at most `batch_size` (a few
  compiled shapes; a 22-image test set costs 32 rows, not 256)."""
  smallest = max(1, batch_size // 8)
  return min(batch_size, max(smallest, 1 << max(0, real - 1).bit_length()))


def embed_batches(embed_fn, variables, batches: Iterable[np.ndarray], batch_size: int,
                  image_shape: tuple[int, ...]) -> jax.Array:
  """Consecutive uint8 batches `[<=B, H, W, 3]` -> features `[N, E]` on the device;
  a short batch is zero-padded to `padded_size` (at most four compiled shapes when
  B is a power of two, five otherwise)."""
  chunks = []
  for batch in batches:
    real = batch.shape[0]
    size = padded_size(real, batch_size)
    if real < size:
      batch = np.concatenate([batch, np.zeros((size - real, *batch.shape[1:]), batch.dtype)])
    chunks.append(embed_fn(variables, batch)[:real])
  if not chunks:
    return embed_fn(variables, np.zeros((padded_size(0, batch_size), *image_shape),
                                        np.uint8))[:0]
  return jnp.concatenate(chunks, 0)


def extract_features(embed_fn, variables, images: np.ndarray, batch_size: int) -> jax.Array:
  """uint8 `[N, H, W, 3]` -> `[N, E]`, in batches of `batch_size` (`embed_batches`)."""
  starts = range(0, images.shape[0], batch_size)
  return embed_batches(embed_fn, variables, (images[s:s + batch_size] for s in starts),
                       batch_size, tuple(images.shape[1:]))


@dataclasses.dataclass(frozen=True)
class TestSet:
  """A client's query and gallery, decoded at model size."""
  name: str
  query_images: np.ndarray  # [Q, H, W, 3] uint8
  gallery_images: np.ndarray  # [G, H, W, 3] uint8
  query_pids: np.ndarray
  gallery_pids: np.ndarray
  query_cams: np.ndarray
  gallery_cams: np.ndarray


def load_test_set(client: ClientData, size: tuple[int, int]) -> TestSet:
  return TestSet(client.name, load_images(client.query, size, f"decoding {client.name} query"),
                 load_images(client.gallery, size, f"decoding {client.name} gallery"),
                 client.query.pids, client.gallery.pids, client.query.camids, client.gallery.camids)


def extra_metrics(qf, gf, test, protocol: str, options=None) -> dict:
  """Metrics after k-reciprocal re-ranking (`<metric>_rr`) and after alpha
  query expansion (`<metric>_aqe`), each when `options` (`config.eval`, or
  any mapping) turns it on: `re_ranking` with `rr_k1`, `rr_k2`, `rr_lambda`;
  `aqe_k` > 0 with `aqe_alpha`. `{}` when both are off (the default)."""
  options = options if options is not None else {}
  out = {}
  ids = (test.query_pids, test.gallery_pids, test.query_cams, test.gallery_cams)
  if options.get("re_ranking", False):
    from fedreid_jax.evaluation.re_ranking import evaluate_re_ranking
    metrics = evaluate_re_ranking(np.asarray(qf), np.asarray(gf), *ids, protocol,
                                  k1=options.get("rr_k1", 20), k2=options.get("rr_k2", 6),
                                  lambda_value=options.get("rr_lambda", 0.3))
    out.update({f"{name}_rr": value for name, value in metrics.items()})
  if options.get("aqe_k", 0) > 0:
    from fedreid_jax.evaluation.query_expansion import aqe
    from fedreid_jax.evaluation.retrieval import evaluate_features
    q_new, g_new = aqe(qf, gf, options.get("aqe_k"), options.get("aqe_alpha", 3.0))
    metrics = evaluate_features(q_new, g_new, *ids, protocol=protocol)
    out.update({f"{name}_aqe": value for name, value in metrics.items()})
  return out


def evaluate_model(embed_fn, variables, test: TestSet, protocol: str, batch_size: int,
                   examples_path: str | None = None, options=None) -> dict:
  """rank1/5/10, mAP, mINP of one model on one client's query/gallery; with
  `examples_path`, also saves retrieval examples there (`retrieval_examples`);
  `options` (`config.eval`): also re-ranked / AQE metrics (`extra_metrics`)."""
  from fedreid_jax.evaluation.retrieval import evaluate_features
  qf = extract_features(embed_fn, variables, test.query_images, batch_size)
  gf = extract_features(embed_fn, variables, test.gallery_images, batch_size)
  if examples_path:
    from fedreid_jax.evaluation import retrieval_examples as examples_lib
    examples_lib.save_examples(examples_path, examples_lib.retrieval_examples(qf, gf, test))
  metrics = evaluate_features(qf, gf, test.query_pids, test.gallery_pids, test.query_cams,
                              test.gallery_cams, protocol=protocol)
  return {**metrics, **extra_metrics(qf, gf, test, protocol, options)}
