"""Spread over seeds of the default experiment: FedPav vs local training, per client.

  python benchmarks/seed_spread.py --seeds 0 1 2 3 --out runs/seed_spread --data_root data

About 5 minutes per seed on a 2-core CPU (the full default config: 15 FedPav
rounds, then the local-training baseline), so ~20 minutes for four seeds.
Each seed runs the CLI (`python -m fedreid_jax.main --config configs/synthetic.py`)
with `--config.seed=<s>` in its own workdir `<out>/seed<s>` (log in
`<out>/seed<s>.log`); a seed whose workdir already holds both results files is
not rerun (delete the workdir to rerun it; the table names the round counts
found), and an interrupted one resumes from its checkpoint. `--no_run` only
reads finished workdirs. Extra `--config.<field>=<value>` arguments (or
`--override config.<field>=<value>`, repeatable) are forwarded to every run,
e.g. `--config.fed.rounds=1` for a smoke test.

Prints (and writes to `<out>/seed_spread.md`) a markdown table: per client,
FedPav's global-model rank-1 and local training's rank-1 (%) as mean ± sample
std and min–max over seeds, the mean-over-clients row, and in how many seeds
FedPav beat local training (strictly). Why this matters: XLA CPU results differ
in the last bits between CPUs and thread counts, and SGD grows a last-bit
difference into a different trained model within one round, so a single run
is one sample of the training noise and its per-client conclusion is only as
firm as this spread (see benchmarks/cpu_reproducibility.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
  p.add_argument("--out", required=True, help="folder holding one workdir per seed")
  p.add_argument("--data_root", default=None,
                 help="passed as --config.data.root (default: the config's, relative to the repo)")
  p.add_argument("--config", default=str(ROOT / "configs" / "synthetic.py"))
  p.add_argument("--baseline", default="local", help="baseline whose baseline_<name>/ to compare")
  p.add_argument("--metric", default="rank1", choices=["rank1", "rank5", "rank10", "mAP", "mINP"])
  p.add_argument("--override", action="append", default=[],
                 help="config override forwarded to the CLI, e.g. config.fed.rounds=1 (repeatable)")
  p.add_argument("--no_run", action="store_true", help="only read finished workdirs")
  args, extra = p.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (only --config.<field>=<value> is forwarded)")
  args.override = ["--" + o.lstrip("-") for o in args.override] + extra
  args.out, args.config = os.path.abspath(args.out), os.path.abspath(args.config)  # CLI cwd: repo
  if args.data_root is not None:
    args.data_root = os.path.abspath(args.data_root)
  return args


def result_paths(workdir: str, baseline: str) -> tuple[str, str]:
  return (os.path.join(workdir, "results.json"),
          os.path.join(workdir, f"baseline_{baseline}", "results.json"))


def run_seed(seed: int, args) -> None:
  workdir = os.path.join(args.out, f"seed{seed}")
  if all(os.path.exists(p) for p in result_paths(workdir, args.baseline)):
    logging.info("seed %d: %s already finished (%s rounds), not rerun; delete it to rerun",
                 seed, workdir, saved_rounds(workdir))
    return
  data = [] if args.data_root is None else [f"--config.data.root={args.data_root}"]
  cmd = [sys.executable, "-m", "fedreid_jax.main", "--config", args.config, "--workdir", workdir,
         f"--config.seed={seed}", *data, *args.override]
  log_path = os.path.join(args.out, f"seed{seed}.log")
  logging.info("seed %d: %s  (log: %s)", seed, " ".join(cmd[1:]), log_path)
  t0 = time.time()
  with open(log_path, "w", encoding="utf-8") as log:
    rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
  if rc:
    with open(log_path, encoding="utf-8") as log:
      tail = log.read()[-2000:]
    sys.exit(f"error: seed {seed} failed (exit {rc}); end of {log_path}:\n{tail}")
  logging.info("seed %d done in %.0f s", seed, time.time() - t0)


def model_results(path: str, prefer: str) -> dict[str, dict[str, float]]:
  """{client: metrics} of a results.json; `prefer` is "global" or "client" (the
  other kind is the fallback: a non-sharing algorithm has only client models)."""
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  other = "client" if prefer == "global" else "global"
  if prefer in results:
    return results[prefer]
  if other in results:
    return results[other]
  raise ValueError(f"{path} has neither 'global' nor 'client' results")


def saved_rounds(workdir: str):
  """fed.rounds of the workdir's saved config.json (None when absent)."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      return json.load(f)["fed"]["rounds"]
  except (OSError, KeyError, ValueError):
    return None


def load(args) -> tuple[list[int], list[str], np.ndarray, np.ndarray, set]:
  """Seeds found, client names, [seed, client] arrays (%) for FedPav and the
  baseline, and the set of round counts the workdirs were trained for."""
  seeds, fed, base, clients, rounds = [], [], [], None, set()
  for seed in args.seeds:
    fed_path, base_path = result_paths(os.path.join(args.out, f"seed{seed}"), args.baseline)
    missing = [p for p in (fed_path, base_path) if not os.path.exists(p)]
    if missing:
      logging.warning("seed %d: missing %s; left out", seed, ", ".join(missing))
      continue
    f, b = model_results(fed_path, "global"), model_results(base_path, "client")
    if clients is None:
      clients = list(f)
    if set(f) != set(clients) or set(b) != set(clients):
      sys.exit(f"error: seed {seed} has other clients than seed {seeds[0]}")
    seeds.append(seed)
    rounds.add(saved_rounds(os.path.join(args.out, f"seed{seed}")))
    fed.append([100 * f[c][args.metric] for c in clients])
    base.append([100 * b[c][args.metric] for c in clients])
  if not seeds:
    sys.exit(f"error: no finished seed under {args.out} (expected seed<s>/results.json and "
             f"seed<s>/baseline_{args.baseline}/results.json)")
  if len(rounds) > 1:
    logging.warning("the seeds' workdirs were trained for different numbers of rounds: %s",
                    sorted(rounds, key=str))
  return seeds, clients, np.array(fed), np.array(base), rounds


def spread(x: np.ndarray) -> str:
  std = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
  return f"{np.mean(x):.1f} ± {std:.1f} ({np.min(x):.1f}–{np.max(x):.1f})"


def table(seeds, clients, fed, base, metric: str, baseline: str, rounds=()) -> str:
  n = len(seeds)
  wins = (fed > base).sum(0)
  ties = (fed == base).sum(0)
  name = {"rank1": "R-1"}.get(metric, metric)
  baseline = {"local": "Local training", "fedavg": "FedAvg"}.get(baseline, baseline)
  after = f" after {'/'.join(map(str, sorted(rounds, key=str)))} rounds" if rounds else ""
  lines = [f"**{metric} (%){after}, over seeds {', '.join(map(str, seeds))}: mean ± sample std "
           f"(min–max)**", "",
           f"| Client | FedPav {name} | {baseline} {name} | FedPav > {baseline} (seeds) |",
           "|---|---:|---:|---:|"]
  for j, c in enumerate(clients):
    tie = f", {ties[j]} tied" if ties[j] else ""
    lines.append(f"| {c} | {spread(fed[:, j])} | {spread(base[:, j])} | {wins[j]}/{n}{tie} |")
  fm, bm = fed.mean(1), base.mean(1)  # per-seed mean over clients
  lines.append(f"| **Mean** | {spread(fm)} | {spread(bm)} | {(fm > bm).sum()}/{n} |")
  lines += ["", "Per seed, mean over clients: " + "; ".join(
      f"seed {s}: FedPav {f:.1f}, {baseline} {b:.1f}" for s, f, b in zip(seeds, fm, bm))]
  return "\n".join(lines)


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if not args.no_run:
    for seed in args.seeds:
      run_seed(seed, args)
  seeds, clients, fed, base, rounds = load(args)
  text = table(seeds, clients, fed, base, args.metric, args.baseline, rounds)
  with open(os.path.join(args.out, "seed_spread.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
