"""A full evaluation of the synthetic benchmark: short batches padded to the whole batch vs to buckets.

  python benchmarks/eval_padding.py                                   # the default model
  python benchmarks/eval_padding.py --backbone resnet18 --width 64 --conv-impl auto

One process, the default config's nine clients and test sets; each variant
evaluates the global model and the nine client models (what a round's
evaluation does), compiled first, then timed in interleaved repetitions.
"pad to B" zero-pads every short batch to `eval.batch_size` (before);
"buckets" pads it to `features.padded_size` (the next power of two, at least
B/8). Prints the rows embedded and the best time of each, and checks that
both give the same metrics.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="resnet_tiny")
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--conv-impl", default="xla")
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()

  from fedreid_jax import config_lib, train
  from fedreid_jax.data import registry
  from fedreid_jax.evaluation import features

  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "synthetic.py"))
  config.model.backbone, config.model.width = args.backbone, args.width
  config.model.conv_impl = args.conv_impl
  clients, public = registry.load(config.data, config.seed)
  exp = train.Experiment(config, clients, public)
  bucket = features.padded_size
  variants = {"pad to B": lambda real, batch_size: batch_size, "buckets": bucket}
  b = config.eval.batch_size
  sizes = [n for c in clients for n in (len(c.query), len(c.gallery))]
  for name, pad in variants.items():
    rows = sum((n // b) * b + (pad(n % b, b) if n % b else 0) for n in sizes)
    print(f"{name}: {rows} rows embedded per model for {sum(sizes)} images")
  times, metrics = {k: [] for k in variants}, {}
  try:
    for rep in range(args.reps + 1):  # the first: compilation
      for name, pad in variants.items():
        features.padded_size = pad
        start = time.perf_counter()
        out = exp.evaluate(client_models=True)
        if rep:
          times[name].append(time.perf_counter() - start)
        metrics[name] = out
  finally:
    features.padded_size = bucket
  assert metrics["pad to B"] == metrics["buckets"], "the padding changed the metrics"
  print(f"{args.backbone} width {args.width} conv_impl {args.conv_impl}, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}")
  for name, t in times.items():
    print(f"{name}: best {min(t):.2f} s, median {np.median(t):.2f} s over {len(t)}")
  print(f"ratio (pad to B / buckets, best): {min(times['pad to B']) / min(times['buckets']):.2f}")


if __name__ == "__main__":
  main()
