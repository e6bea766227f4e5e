"""A full experiment: the configured algorithm, then its baselines, on the
same data and seed; a combined table (the paper's format) and plots."""
from __future__ import annotations

import logging
import os

from fedreid_jax import config_lib, train
from fedreid_jax.data import registry

MODEL_LABELS = {"fedpav": "FedPav", "local": "Local training", "fedavg": "FedAvg"}


def _columns(algorithm: str, results: dict) -> dict:
  """Run results -> {column label: {client: metrics}}."""
  label = MODEL_LABELS[algorithm]
  cols = {}
  if "global" in results:
    cols[label] = results["global"]
    if "client" in results:
      cols[f"{label} (client models)"] = results["client"]
  else:
    cols[label] = results["client"]
  return cols


def run(config, workdir: str) -> str:
  """Runs everything; returns the markdown results table (also in results.md)."""
  from fedreid_jax.evaluation import report
  config_lib.validate(config)
  config_lib.check_workdir(workdir)
  clients_data, public = registry.load(config.data, config.seed)
  columns = _columns(config.fed.algorithm, train.run(config, workdir, clients_data, public))
  plots = [report.plot_convergence(os.path.join(workdir, "metrics.jsonl"),
                                   os.path.join(workdir, "convergence.png"))]
  for baseline in config.baselines:
    if baseline == config.fed.algorithm:
      continue
    sub_cfg = config.copy_and_resolve_references()
    sub_cfg.fed.algorithm = baseline
    sub_dir = os.path.join(workdir, f"baseline_{baseline}")
    logging.info("baseline %s -> %s", baseline, sub_dir)
    columns.update(_columns(baseline, train.run(sub_cfg, sub_dir, clients_data, public)))
    plots.append(report.plot_convergence(os.path.join(sub_dir, "metrics.jsonl"),
                                         os.path.join(sub_dir, "convergence.png")))
  title = (f"{config.data.name}: rank-1 / rank-5 / rank-10 / mAP (%), {config.eval.protocol} "
           f"protocol, after {config.fed.rounds} rounds")
  table = report.format_results_table(columns, title)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  logging.info("plots: %s", ", ".join(plots))
  return table
