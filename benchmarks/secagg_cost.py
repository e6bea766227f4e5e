"""What secure aggregation adds to a round of the default run, side by side.

  python benchmarks/secagg_cost.py                 # configs/synthetic.py (FedPav), CPU
  python benchmarks/secagg_cost.py --rounds 4 --reps 20

Builds the default experiment twice, plain and with `secagg.enabled`, on the
same data, and times (wall clock, after compilation, interleaved in
alternating order so that a busy machine slows both alike):

- whole rounds (`Experiment.train_round`: local training, aggregation), and
  the aggregation stage inside each of them (its inputs waited for first);
- the aggregation stage alone on the same trained clients: the plain
  weighted mean against the secure one (encoding, the clients' pairwise
  masks, the server's modular sum, decoding; with `--dropout`, one client's
  masks recovered from revealed seeds too).

The extra time of masking and unmasking is the median difference of the
aggregation stage alone; it is reported against the median plain round
(target: under 10%), with the largest update coordinate of a round against
`secagg.clip` and `secagg.stats_clip`. Prints every timing as it is taken,
then a summary.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import round_throughput  # noqa: E402

from fedreid_jax import train  # noqa: E402
from fedreid_jax.data import registry  # noqa: E402
from fedreid_jax.federated import params as params_lib  # noqa: E402
from fedreid_jax.federated import secagg  # noqa: E402


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def stage_timer(fn, seconds: list):
  """`fn` timed on its own: its inputs ready first, its output waited for."""
  def timed_fn(*args):
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - t0)
    return out
  timed_fn.fn = fn
  return timed_fn


def timed_round(exp, round_index: int) -> float:
  return timed(lambda: (exp.train_round(round_index), exp.server.params)[1])


def largest_update(server, clients, part: str) -> float:
  """max |theta_k - theta_global| over the clients' shared `part` (params or batch_stats)."""
  shared = params_lib.prefix_predicate(params_lib.FEATURE_EXTRACTOR)
  stacked = params_lib.split_tree(getattr(clients, part), shared)[0]
  reference = secagg.reference_like(getattr(server, part), stacked)
  return max(float(jnp.max(jnp.abs(x - r[None])))
             for x, r in zip(jax.tree.leaves(stacked), jax.tree.leaves(reference)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3, help="timed rounds each, after one warm-up")
  p.add_argument("--reps", type=int, default=20, help="timed aggregations each")
  p.add_argument("--dropout", action="store_true",
                 help="time the aggregation with one client dropped out (recovery)")
  args = p.parse_args()
  cfg = round_throughput.load_config("synthetic")
  clients, public = registry.load(cfg.data, cfg.seed)
  exps = {}
  for name, enabled in (("plain", False), ("secure", True)):
    cfg.secagg.enabled = enabled
    exps[name] = train.Experiment(cfg.copy_and_resolve_references(), clients, public)
  print(f"algorithms: {', '.join(e.algorithm.label for e in exps.values())}; "
        f"{len(clients)} clients, all selected")
  rounds = {name: [] for name in exps}
  in_round = {name: [] for name in exps}  # the aggregation stage inside each round
  for name, exp in exps.items():
    exp.stages = exp.stages._replace(aggregate=stage_timer(exp.stages.aggregate, in_round[name]))
  for r in range(args.rounds + 1):  # round 0 compiles; the order alternates
    for name, exp in sorted(exps.items(), reverse=bool(r % 2)):
      seconds = timed_round(exp, r)
      if r:
        rounds[name].append(seconds)
      print(f"round {r + 1} {name}: {seconds:.3f} s, aggregation {in_round[name][-1]:.3f} s"
            f"{' (compiles)' if not r else ''}", flush=True)
  for name, exp in exps.items():
    exp.stages = exp.stages._replace(aggregate=exp.stages.aggregate.fn)
    del in_round[name][0]
  exp = exps["plain"]  # every client selected: the written-back clients are the trained ones
  trained, server = exp.clients, exp.server
  weights = jnp.asarray(np.asarray(trained.num_examples, np.float32))
  if args.dropout:
    weights = weights.at[1].set(0.0)
  first = jnp.int32(0)
  aggregate = {name: e.stages.aggregate for name, e in exps.items()}
  for fn in aggregate.values():  # compile
    timed(fn, server, trained, weights, first)
  stage = {name: [] for name in exps}
  for i in range(args.reps):
    line = []
    for name, fn in sorted(aggregate.items(), reverse=bool(i % 2)):
      stage[name].append(timed(fn, server, trained, weights, first))
      line.append(f"{name} {stage[name][-1] * 1e3:.1f} ms")
    print(f"aggregation {i + 1}: " + ", ".join(line), flush=True)
  before = exp.server
  exp.train_round(args.rounds + 1)  # one more round: its update against the model sent
  for part, clip in (("params", cfg.secagg.clip), ("batch_stats", cfg.secagg.stats_clip)):
    print(f"largest update of a round, {part}: {largest_update(before, exp.clients, part):.3g} "
          f"(clip {clip:g})")
  extra = np.median(np.subtract(stage["secure"], stage["plain"]))
  plain_round = np.median(rounds["plain"])
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, "
        f"load average {load:.2f} at the end")
  print("| | plain | secure | extra |")
  print("|---|---:|---:|---:|")
  print(f"| round, median s | {plain_round:.2f} | {np.median(rounds['secure']):.2f} | "
        f"{np.median(rounds['secure']) - plain_round:+.2f} |")
  print(f"| aggregation inside the round, median ms | {np.median(in_round['plain']) * 1e3:.1f} | "
        f"{np.median(in_round['secure']) * 1e3:.1f} | "
        f"{(np.median(in_round['secure']) - np.median(in_round['plain'])) * 1e3:+.1f} |")
  print(f"| aggregation stage alone, median ms | {np.median(stage['plain']) * 1e3:.1f} | "
        f"{np.median(stage['secure']) * 1e3:.1f} | {extra * 1e3:+.1f} |")
  print(f"\nmasking and unmasking: {extra * 1e3:.0f} ms a round = {100 * extra / plain_round:.1f}% "
        f"of the plain round (target < 10%){'; one client dropped out' if args.dropout else ''}")


if __name__ == "__main__":
  main()
