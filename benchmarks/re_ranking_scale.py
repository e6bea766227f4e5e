"""k-reciprocal re-ranking at MSMT17 size from features: time and peak host memory.

  python benchmarks/re_ranking_scale.py              # 11,659 x 82,161, 512-d (the target: < 8 GB)
  python benchmarks/re_ranking_scale.py --scale 4    # a quarter of each split
  python benchmarks/re_ranking_scale.py --scale 4 --aqe-k 10   # also alpha query expansion

Features are random gaussian clusters (one centre per identity, MSMT17's
3,060 test identities divided by --scale), L2-normalised: only cost is
measured, though the printed metrics show re-ranking doing its job. Runs
`evaluation.evaluate_re_ranking` (neighbour lists, sparse V, query chunks
scored as they are made) after the plain `evaluate_features` of the same
features, and prints the time of each and the process's peak resident memory
(`ru_maxrss`) after the features were made and at the end. The dense
published algorithm would hold `(Q+G)^2` float32 several times over
(35 GB for one copy at full size).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUERY, GALLERY, IDS = 11659, 82161, 3060  # MSMT17 test split


def peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def clustered(n: int, centres: np.ndarray, spread: float, rng, cams: int = 15):
  pids = rng.integers(0, centres.shape[0], n)
  dim = centres.shape[1]
  feats = np.empty((n, dim), np.float32)
  for s in range(0, n, 8192):  # no float64 [n, D] at once
    p = pids[s:s + 8192]
    f = centres[p] + spread * rng.standard_normal((len(p), dim), np.float32) / np.sqrt(dim)
    feats[s:s + 8192] = f / np.linalg.norm(f, axis=1, keepdims=True)
  return feats, (pids + 1).astype(np.int32), rng.integers(0, cams, n).astype(np.int32)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--scale", type=float, default=1.0, help="divide Q, G and ids by this")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--spread", type=float, default=3.0, help="noise norm / centre norm")
  parser.add_argument("--k1", type=int, default=20)
  parser.add_argument("--k2", type=int, default=6)
  parser.add_argument("--lambda-value", type=float, default=0.3)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--aqe-k", type=int, default=0, help="also time AQE with this k (0: no)")
  parser.add_argument("--skip-plain", action="store_true")
  args = parser.parse_args(argv)

  import jax
  import scipy
  from fedreid_jax.evaluation import evaluate_features
  from fedreid_jax.evaluation.query_expansion import aqe
  from fedreid_jax.evaluation.re_ranking import evaluate_re_ranking

  nq, ng = int(QUERY / args.scale), int(GALLERY / args.scale)
  ids = max(2, int(IDS / args.scale))
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.2f}; python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), numpy {np.__version__}, "
        f"scipy {scipy.__version__}")
  print(f"{nq} queries x {ng} gallery, {args.dim}-d, {ids} ids; k1={args.k1} k2={args.k2} "
        f"lambda={args.lambda_value} chunk={args.chunk}")
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((ids, args.dim), np.float32) / np.sqrt(args.dim)
  (q, qp, qc), (g, gp, gc) = (clustered(n, centres, args.spread, rng) for n in (nq, ng))
  print(f"features made: peak RSS {peak_gb():.2f} GB")

  def show(name, t0, metrics):
    print(f"{name:>10}: {time.time() - t0:8.1f} s  rank1 {metrics['rank1']:.4f}  "
          f"mAP {metrics['mAP']:.4f}  peak RSS so far {peak_gb():.2f} GB", flush=True)

  if not args.skip_plain:
    t0 = time.time()
    show("plain", t0, evaluate_features(q, g, qp, gp, qc, gc))
  t0 = time.time()
  show("re-ranked", t0, evaluate_re_ranking(q, g, qp, gp, qc, gc, k1=args.k1, k2=args.k2,
                                            lambda_value=args.lambda_value,
                                            chunk=args.chunk))
  if args.aqe_k:
    t0 = time.time()
    q2, g2 = aqe(q, g, args.aqe_k, 3.0)
    show("aqe", t0, evaluate_features(q2, g2, qp, gp, qc, gc))
  print(f"peak RSS {peak_gb():.2f} GB (target < 8 GB at full size)")


if __name__ == "__main__":
  main()
