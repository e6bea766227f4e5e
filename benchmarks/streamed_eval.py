"""Streamed evaluation at MSMT17 size: features + metrics, never the test set in host memory.

  python benchmarks/streamed_eval.py --scale 8 --size 256,128   # CPU: 1/8 of MSMT17, test model
  python benchmarks/streamed_eval.py --paper          # GPU: 11,659 x 82,161 at 256x128, ResNet-50
  python benchmarks/streamed_eval.py --paper --dtypes bfloat16,float32   # both, one after another

Query and gallery are splits whose images are made on demand from their
index (random pixels: only speed is measured), so nothing is stored
anywhere; the evaluation reads them batch by batch through
`input.reader.read_resized` with `--threads` reading ahead, exactly as a
prepared dataset is read. Prints the time of the query features, the gallery
features and the metrics, the host's peak resident memory, what the
in-memory path would have decoded, and the device's peak memory where the
backend reports it.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

QUERY, GALLERY, IDS = 11659, 82161, 3060  # MSMT17 test split (the paper's table)


class MadeImages:
  """index -> uint8 `[H, W, 3]`, deterministic, made on demand (picklable)."""

  def __init__(self, size):
    self.size = tuple(size)

  def __call__(self, i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (*self.size, 3), dtype=np.uint8)


def made_split(n: int, size, seed: int):
  from fedreid_jax.data.base import ReIDSplit
  rng = np.random.default_rng(seed)
  return ReIDSplit(MadeImages(size), rng.integers(0, IDS, n).astype(np.int32),
                   rng.integers(0, 15, n).astype(np.int32))


def timed_evaluation(config, size, args) -> tuple[dict, dict]:
  """Query features, gallery features and metrics of a random `config.model`
  -> ({step: seconds}, metrics); a warm-up batch compiles the embedding first."""
  import jax
  from fedreid_jax.evaluation.features import make_embed_fn
  from fedreid_jax.evaluation.retrieval import evaluate_features
  from fedreid_jax.evaluation.streamed import split_features
  from fedreid_jax.models.reid import build_model

  model = build_model(config.model, 16)
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k},
                                           np.zeros((1, *size, 3), np.float32), train=False))(
                                               jax.random.key(0))
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  embed = make_embed_fn(model)
  query = made_split(QUERY // args.scale, size, 1)
  gallery = made_split(GALLERY // args.scale, size, 2)
  split_features(embed, variables, made_split(args.batch, size, 3), size, args.batch, 1)
  times = {}
  t0 = time.perf_counter()
  qf = jax.block_until_ready(split_features(embed, variables, query, size, args.batch,
                                            args.threads))
  times["query features"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  gf = jax.block_until_ready(split_features(embed, variables, gallery, size, args.batch,
                                            args.threads))
  times["gallery features"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  metrics = evaluate_features(qf, gf, query.pids, gallery.pids, query.camids, gallery.camids)
  times["metrics (incl. compile)"] = time.perf_counter() - t0
  return times, metrics


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=int, default=1, help="divide MSMT17's sizes by")
  parser.add_argument("--paper", action="store_true", help="ResNet-50 at 256x128")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--threads", type=int, default=8)
  parser.add_argument("--size", default="", help="image size H,W (default: the config's)")
  parser.add_argument("--dtypes", default="", help="model.dtype values, comma-separated "
                      "(default: the config's)")
  args = parser.parse_args()

  import jax
  import fakes
  from round_throughput import load_config

  config = load_config("fedreid_paper") if args.paper else fakes.tiny_config()
  size = tuple(int(x) for x in args.size.split(",")) if args.size else tuple(
      config.data.image_size)
  n_query, n_gallery = QUERY // args.scale, GALLERY // args.scale
  print(f"\n{platform.node()}: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"{config.model.backbone} w{config.model.width} {size}, eval batch {args.batch}, "
        f"{args.threads} reading threads; {n_query} queries x {n_gallery} gallery", flush=True)
  in_memory = (n_query + n_gallery) * np.prod(size) * 3 / 2**30
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  rows = []
  for dtype in (args.dtypes.split(",") if args.dtypes else [config.model.dtype]):
    config.model.dtype = dtype
    times, metrics = timed_evaluation(config, size, args)
    for name, sec in times.items():
      n = {"query features": n_query, "gallery features": n_gallery}.get(name)
      rows.append(f"| {dtype} | {name} | {sec:.1f} | " + (f"{n / sec:.0f} |" if n else "- |"))
    rows.append(f"| {dtype} | **total** | {sum(times.values()):.1f} | "
                f"{(n_query + n_gallery) / sum(times.values()):.0f} |")
    print("\n".join(rows[-4:]) + f"\nrank-1 {metrics['rank1']:.4f} (random model, random "
          "images)", flush=True)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.devices()[0].memory_stats()
  device_peak = (f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB" if stats and
                 "peak_bytes_in_use" in stats else "n/a (not reported by this backend)")
  print("\n| dtype | step | seconds | images/s |\n|---|---|---|---|")
  print("\n".join(rows))
  print(f"\nhost peak RSS {rss:.2f} GiB (before the evaluation {rss0:.2f} GiB); the in-memory "
        f"path would decode {in_memory:.2f} GiB of images; device peak {device_peak}")


if __name__ == "__main__":
  main()
