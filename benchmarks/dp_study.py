"""Privacy-utility study on the synthetic benchmark: mean rank-1 of the global
model against epsilon, for image- and identity-level DP-SGD and for
client-level DP-FedAvg over a many-client by-identity split (docs/privacy.md).

  nice -n 10 python benchmarks/dp_study.py --out runs/dp_study --seeds 0 1 2

Reduced scale so that the whole grid fits ~45 minutes of a shared 2-core CPU
(the table says what ran):
- DP-SGD: FedPav on three domains (syn_market, syn_cuhk03, syn_cuhk01),
  `--rounds` rounds, every client each round; non-private FedPav (dp off),
  then per unit (image, identity) each noise multiplier of `--sgd_sigmas`
  (clip 1.0, delta 1e-4).
- client-level: FedPav over syn_msmt17 split by identity into
  `--clients` clients, Poisson rate 0.2, batch 8, `--client_rounds` rounds;
  non-private FedPav on the same split, then each of `--client_sigmas`
  (clip 0.5, delta 1e-3 < 1/clients); learning rates `--client_lr` (0.01:
  the default 0.05 diverged at batch 8 even without DP).

Every run is `train.run` in its own workdir `<out>/<name>_s<seed>`; a
finished one (results.json) is not rerun. Seeds run one after another, each
whole; no run starts after `--budget_s`, and the table holds what finished
(its `seeds` column says how many). Prints a markdown table (mean +- std
over seeds of rank-1 and epsilon) and writes `<out>/dp_study.md` and
`<out>/dp_study.png` (rank-1 against epsilon, log scale; non-private at the
right edge).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedreid_jax import config_lib, train  # noqa: E402

SGD_DOMAINS = ("syn_market", "syn_cuhk03", "syn_cuhk01")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--sgd_sigmas", type=float, nargs="+", default=[0.7, 1.5])
  p.add_argument("--clients", type=int, default=50)
  p.add_argument("--client_rounds", type=int, default=4)
  p.add_argument("--client_sigmas", type=float, nargs="+", default=[0.5])
  p.add_argument("--client_lr", type=float, default=0.01,
                 help="both learning rates of the client-level runs (batch 8: 0.05 diverged)")
  p.add_argument("--parts", nargs="+", default=["sgd", "client"], choices=["sgd", "client"])
  p.add_argument("--data_root", default=str(ROOT / "data"))
  p.add_argument("--budget_s", type=float, default=45 * 60,
                 help="no new run starts after this many seconds (finished ones are read)")
  p.add_argument("--no_run", action="store_true", help="only read finished runs")
  return p.parse_args(argv)


def base_config(args, seed: int):
  c = config_lib.load_config_file(str(ROOT / "configs" / "synthetic.py"))
  c.seed, c.data.root, c.baselines = seed, args.data_root, ()
  c.eval.client_models = False
  c.checkpoint_every = 1000
  return c


def grid(args):
  """(name, part, x-label, {field: value}) of every run of one seed."""
  runs = []
  if "sgd" in args.parts:
    sgd = {"data.clients": SGD_DOMAINS, "fed.rounds": args.rounds, "dp.delta": 1e-4}
    runs.append(("sgd_off", "sgd", "non-private", sgd))
    for unit in ("image", "identity"):
      for s in args.sgd_sigmas:
        runs.append((f"sgd_{unit}_{s:g}", "sgd", unit,
                     dict(sgd, **{"dp.mode": "sgd", "dp.unit": unit,
                                  "dp.noise_multiplier": s})))
  if "client" in args.parts:
    cl = {"data.clients": ("syn_msmt17",), "data.scenario": "by_identity",
          "data.scenario_clients": args.clients, "train.batch_size": 8,
          "train.lr_backbone": args.client_lr, "train.lr_head": args.client_lr,
          "fed.rounds": args.client_rounds, "dp.delta": 1e-3, "dp.client_rate": 0.2,
          "dp.clip_norm": 0.5}
    runs.append(("client_off", "client", "non-private", cl))
    for s in args.client_sigmas:
      runs.append((f"client_{s:g}", "client", "client",
                   dict(cl, **{"dp.mode": "client", "dp.noise_multiplier": s})))
  return runs


def run_one(args, name, overrides, seed) -> dict:
  """Trains (unless finished) and reads: mean rank-1 (%) and the final epsilon."""
  workdir = pathlib.Path(args.out) / f"{name}_s{seed}"
  if not (workdir / "results.json").exists():
    cfg = base_config(args, seed)
    for key, value in overrides.items():
      section, field = key.split(".")
      cfg[section][field] = value
    cfg.eval.every_rounds = cfg.fed.rounds
    t0 = time.time()
    train.run(cfg, str(workdir))
    logging.warning("%s seed %d: %.0f s", name, seed, time.time() - t0)
  results = json.loads((workdir / "results.json").read_text())
  rank1 = 100 * np.mean([m["rank1"] for m in results["global"].values()])
  train_records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in train_records if r["kind"] == "train"][-1]
  return {"rank1": rank1, "epsilon": last.get("privacy/epsilon", math.inf)}


def table(rows) -> str:
  lines = ["| run | unit | sigma | epsilon (mean) | mean rank-1 % (mean +- std) | seeds |",
           "|---|---|---|---|---|---|"]
  for name, unit, sigma, eps, r1 in rows:
    lines.append(f"| {name} | {unit} | {sigma} | {np.mean(eps):.3g} | "
                 f"{np.mean(r1):.1f} +- {np.std(r1, ddof=1) if len(r1) > 1 else 0:.1f} | {len(r1)} |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, part in zip(axes, ("sgd", "client")):
    mine = [r for r in rows if r[0].startswith(part)]
    finite = [np.mean(r[3]) for r in mine if np.isfinite(np.mean(r[3]))]
    right = 2 * max(finite) if finite else 10
    for unit in sorted({r[1] for r in mine if r[1] != "non-private"}):
      pts = sorted((np.mean(r[3]), np.mean(r[4]), np.std(r[4])) for r in mine if r[1] == unit)
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o",
                  label=unit, capsize=3)
    for r in mine:
      if r[1] == "non-private":
        ax.axhline(np.mean(r[4]), color="gray", ls="--", label="non-private")
    ax.set_xscale("log")
    ax.set_xlim(right=right)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("mean rank-1 (%)")
    ax.set_title("DP-SGD (per image / identity)" if part == "sgd" else "client-level DP-FedAvg")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv=None):
  args = parse_args(argv)
  pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
  start, got = time.time(), {}
  for seed in args.seeds:  # a whole seed first: a budget cut leaves complete seeds
    for name, _, _, overrides in grid(args):
      finished = (pathlib.Path(args.out) / f"{name}_s{seed}" / "results.json").exists()
      if not finished and (args.no_run or time.time() - start > args.budget_s):
        continue
      got.setdefault(name, []).append(run_one(args, name, overrides, seed))
  rows = [(name, unit, overrides.get("dp.noise_multiplier", "-"),
           [g["epsilon"] for g in got[name]], [g["rank1"] for g in got[name]])
          for name, _, unit, overrides in grid(args) if name in got]
  text = table(rows)
  print(text)
  (pathlib.Path(args.out) / "dp_study.md").write_text(text + "\n")
  plot(rows, pathlib.Path(args.out) / "dp_study.png")


if __name__ == "__main__":
  main()
