"""Leave-one-domain-out on the synthetic benchmark: FedPav's global model on a
domain it never trained on, against the same domain when it trains.

  nice -n 10 python benchmarks/unseen_domains.py --seeds 0 1 2 \\
      --held_out syn_market syn_cuhk01 syn_viper --out runs/unseen --plot docs/unseen_domains.png

For each seed: one run with every domain training (`<out>/seed<s>/all`) and,
per held-out domain d, one run with `--config.eval.unseen="('d',)"`
(`<out>/seed<s>/without_<d>`): FedPav only (`baselines=()`), no client-model
evaluation. Each is the CLI (`python -m fedreid_jax.main --config
configs/synthetic.py`, log beside the workdir); a workdir that already holds
results.json is not rerun. Runs go domain by domain, so a longer list of
domains only adds runs. Extra `--config.<field>=<value>` arguments are
forwarded to every run (e.g. `--config.fed.rounds=10`).

Prints (and writes to `<out>/unseen_domains.md`) per held-out domain: its
rank-1 and mAP (%) trained and unseen, mean ± sample std (min-max) over the
seeds, their paired drop (trained - unseen, same seed: the same data) and in
how many seeds it is positive, and the mean rank-1 of the other domains
when all train and its paired change when d is held out (what leaving one
out costs the rest); then the mean over the held-out domains. `--plot`
draws the rank-1 and mAP of both as bars (seed mean, one std) with the seeds
as dots.
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

from seed_spread import saved_rounds, spread

ROOT = pathlib.Path(__file__).resolve().parent.parent
METRICS = ("rank1", "mAP")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--held_out", nargs="+", default=["syn_market", "syn_cuhk01", "syn_viper"])
  p.add_argument("--out", required=True, help="folder holding <out>/seed<s>/<run>/")
  p.add_argument("--data_root", default=None, help="--config.data.root (default: the config's)")
  p.add_argument("--plot", default=None, help="write the figure to this PNG")
  p.add_argument("--no_run", action="store_true", help="only read finished workdirs")
  args, extra = p.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (only --config.<field>=<value> is forwarded)")
  args.extra, args.out = extra, os.path.abspath(args.out)
  return args


def workdir(out: str, seed: int, held_out: str | None) -> str:
  """`<out>/seed<s>/all` (every domain trains) or `<out>/seed<s>/without_<d>`."""
  return os.path.join(out, f"seed{seed}", f"without_{held_out}" if held_out else "all")


def command(args, seed: int, held_out: str | None) -> list[str]:
  """The CLI command of one run."""
  data = [] if args.data_root is None else [f"--config.data.root={os.path.abspath(args.data_root)}"]
  unseen = [f"--config.eval.unseen=('{held_out}',)"] if held_out else []
  return [sys.executable, "-m", "fedreid_jax.main", "--config",
          str(ROOT / "configs" / "synthetic.py"), "--workdir", workdir(args.out, seed, held_out),
          f"--config.seed={seed}", "--config.baselines=()", "--config.eval.client_models=False",
          *unseen, *data, *args.extra]


def run(args, seed: int, held_out: str | None) -> None:
  """One run, unless its workdir holds results.json; exits with its log's end on failure."""
  folder = workdir(args.out, seed, held_out)
  if os.path.exists(os.path.join(folder, "results.json")):
    logging.info("%s finished (%s rounds), not rerun", folder, saved_rounds(folder))
    return
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  log_path, t0 = folder + ".log", time.time()
  with open(log_path, "w", encoding="utf-8") as log:
    rc = subprocess.run(command(args, seed, held_out), cwd=ROOT, stdout=log,
                        stderr=subprocess.STDOUT, check=False).returncode
  if rc:
    with open(log_path, encoding="utf-8") as log:
      sys.exit(f"error: {folder} failed (exit {rc}); end of {log_path}:\n{log.read()[-2000:]}")
  logging.info("%s done in %.0f s", folder, time.time() - t0)


def results(folder: str) -> dict:
  with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def load(args) -> dict:
  """`{domain: {"trained"|"unseen": [seed, metric], "others_trained"|"others_unseen":
  [seed]}}` in %, over the seeds whose two runs both finished; `"seeds"`: those."""
  out = {}
  for d in args.held_out:
    rows = []
    for seed in args.seeds:
      full, held = (workdir(args.out, seed, x) for x in (None, d))
      if not all(os.path.exists(os.path.join(f, "results.json")) for f in (full, held)):
        continue
      a, b = results(full)["global"], results(held)
      others = [c for c in a if c != d]
      rows.append((seed, [100 * a[d][m] for m in METRICS],
                   [100 * b["unseen"][d][m] for m in METRICS],
                   np.mean([100 * a[c]["rank1"] for c in others]),
                   np.mean([100 * b["global"][c]["rank1"] for c in others])))
    if rows:
      seeds, trained, unseen, o_t, o_u = map(list, zip(*rows))
      out[d] = {"seeds": seeds, "trained": np.array(trained), "unseen": np.array(unseen),
                "others_trained": np.array(o_t), "others_unseen": np.array(o_u)}
  return out


def table(found: dict, rounds) -> str:
  """The markdown table of `load`'s figures."""
  after = f" after {'/'.join(map(str, sorted(rounds, key=str)))} rounds" if rounds else ""
  lines = [f"**FedPav global model, held-out domain trained vs unseen (%){after}: mean ± "
           "sample std (min-max) over seeds**", "",
           "| domain | seeds | trained R-1 | unseen R-1 | R-1 drop (paired) | unseen R-1 lower "
           "| trained mAP | unseen mAP | mAP drop (paired) | others' R-1, all train "
           "| others' R-1 change, d held out (paired) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for d, f in found.items():
    drop = f["trained"] - f["unseen"]  # [seed, metric]: the same seed's data in both runs
    lines.append(f"| {d} | {', '.join(map(str, f['seeds']))} | {spread(f['trained'][:, 0])} | "
                 f"{spread(f['unseen'][:, 0])} | {spread(drop[:, 0])} | "
                 f"{int((drop[:, 0] > 0).sum())}/{len(f['seeds'])} | "
                 f"{spread(f['trained'][:, 1])} | {spread(f['unseen'][:, 1])} | "
                 f"{spread(drop[:, 1])} | {spread(f['others_trained'])} | "
                 f"{spread(f['others_unseen'] - f['others_trained'])} |")
  means = {k: np.mean([f[k] for f in found.values()], 0) for k in ("trained", "unseen")}
  if len(found) > 1 and len({tuple(f["seeds"]) for f in found.values()}) == 1:
    drop = means["trained"] - means["unseen"]  # per seed, mean over the held-out domains
    lines.append(f"| **Mean** | {', '.join(map(str, next(iter(found.values()))['seeds']))} | "
                 f"{spread(means['trained'][:, 0])} | {spread(means['unseen'][:, 0])} | "
                 f"{spread(drop[:, 0])} | {int((drop[:, 0] > 0).sum())}/{len(drop)} | "
                 f"{spread(means['trained'][:, 1])} | {spread(means['unseen'][:, 1])} | "
                 f"{spread(drop[:, 1])} | | |")
  return "\n".join(lines)


def plot(found: dict, path: str, rounds) -> str:
  """Bars of trained vs unseen rank-1 and mAP per domain (seed mean ± std), seeds as dots."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(max(8.0, 3 + 1.4 * len(found)), 4.6))
  FigureCanvasAgg(fig)
  x = np.arange(len(found))
  for k, (ax, metric) in enumerate(zip(fig.subplots(1, 2), ("R-1", "mAP"))):
    for j, (kind, colour) in enumerate((("trained", "tab:blue"), ("unseen", "tab:orange"))):
      values = [f[kind][:, k] for f in found.values()]
      pos = x + (j - 0.5) * 0.38
      ax.bar(pos, [v.mean() for v in values], 0.36, color=colour, alpha=0.75,
             yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in values], capsize=3,
             label=f"{kind}" + (" (all domains train)" if kind == "trained" else " (held out)"))
      for p, v in zip(pos, values):
        ax.plot(np.full(len(v), p), v, "k.", markersize=4)
    ax.set_xticks(x, list(found), rotation=20)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
  handles, labels = fig.axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize="small", loc="lower center", ncol=2)
  after = f", {'/'.join(map(str, sorted(rounds, key=str)))} rounds" if rounds else ""
  fig.suptitle(f"FedPav global model on a held-out synthetic domain (seed mean ± std{after})",
               fontsize="medium")
  fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend below the panels
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  args = parse_args(argv)
  if not args.no_run:
    for held_out in (None, *args.held_out):
      for seed in args.seeds:
        run(args, seed, held_out)
  found = load(args)
  if not found:
    sys.exit(f"error: no finished pair of runs under {args.out}")
  rounds = {saved_rounds(workdir(args.out, s, None)) for f in found.values() for s in f["seeds"]}
  text = table(found, rounds)
  with open(os.path.join(args.out, "unseen_domains.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text)
  if args.plot:
    logging.info("wrote %s", plot(found, args.plot, rounds))


if __name__ == "__main__":
  main()
