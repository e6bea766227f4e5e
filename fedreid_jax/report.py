"""Command line: the report of a suite folder, from its metrics files alone.

    python -m fedreid_jax.report --workdir runs/suite [--out runs/suite/report]
        [--metric rank1 --metric mAP] [--within 300]

Finds every run (a folder with config.json and metrics.jsonl) in the
workdir, its subfolders and theirs, and writes `report.md` (the paper-style
tables under the final-round and best-3 selections), `convergence_<metric>.png`,
`cdw_weights.png` (CDW runs) and `retrieval_<client>.png` into `--out`
(default `<workdir>/report`). See `evaluation/paper_report.py`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fedreid_jax.evaluation import paper_report, suite_runs


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m fedreid_jax.report",
                              description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True,
                 help="a run's or a suite's folder (runs in it, its subfolders and theirs)")
  p.add_argument("--out", default=None, help="output folder (default: <workdir>/report)")
  p.add_argument("--metric", action="append", default=None,
                 choices=("rank1", "rank5", "rank10", "mAP", "mINP"),
                 help="metric of the tables and convergence plots; repeat for several "
                      "(default: rank1 and mAP)")
  p.add_argument("--within", type=int, default=suite_runs.BEST_WITHIN,
                 help="best-3 selection: only evaluations at round <= this (default 300)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  from fedreid_jax.main import run_or_exit
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)
  path = run_or_exit(lambda: paper_report.write_report(
      args.workdir, args.out, tuple(args.metric or ("rank1", "mAP")), args.within))
  print(f"report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
