"""What SCAFFOLD's control variates and Ditto's personal models cost per
round against FedPav, side by side in one run.

  python benchmarks/baseline_round_cost.py               # the default synthetic config, CPU
  python benchmarks/baseline_round_cost.py --rounds 6 --algorithms fedpav scaffold ditto fedprox

Builds one experiment per algorithm on the default synthetic benchmark
(configs/synthetic.py) and times whole training rounds (local training,
the algorithm's extra stages, aggregation; wall clock after compilation),
interleaved round by round so that a busy machine slows every algorithm
alike. Prints a markdown table of medians and each algorithm's ratio to
FedPav for benchmarks/RESULTS.md. The issue's target: a SCAFFOLD or Ditto
round at most 1.3x a FedPav round.
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import round_throughput  # noqa: E402

from fedreid_jax import train  # noqa: E402
from fedreid_jax.data import registry  # noqa: E402


def timed_round(exp, round_index: int) -> float:
  t0 = time.perf_counter()
  exp.train_round(round_index)
  jax.block_until_ready((exp.server.params, exp.clients.params))
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=6, help="timed rounds per algorithm")
  p.add_argument("--algorithms", nargs="+", default=["fedpav", "scaffold", "ditto"])
  args = p.parse_args()
  cfg = round_throughput.load_config("synthetic")
  clients, public = registry.load(cfg.data, cfg.seed)
  exps = {}
  for algorithm in args.algorithms:
    cfg.fed.algorithm = algorithm
    exps[algorithm] = train.Experiment(cfg.copy_and_resolve_references(), clients, public)
    timed_round(exps[algorithm], 0)  # compiles every stage
  times = {a: [] for a in exps}
  for r in range(1, 1 + args.rounds):
    for algorithm, exp in exps.items():
      times[algorithm].append(timed_round(exp, r))
  base = np.median(times[args.algorithms[0]])
  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), jax {jax.__version__}; strategy "
        f"{cfg.fed.strategy}; {args.rounds} rounds each, interleaved")
  print(f"| algorithm | median s | min-max s | vs {exps[args.algorithms[0]].algorithm.label} |")
  print("|---|---:|---:|---:|")
  for algorithm, values in times.items():
    med = np.median(values)
    print(f"| {exps[algorithm].algorithm.label} | {med:.2f} | {min(values):.2f}-"
          f"{max(values):.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
  main()
