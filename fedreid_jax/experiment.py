"""A full experiment: the configured algorithm, then its baselines, on the
same data and seed; a combined table (the paper's format) and plots."""
from __future__ import annotations

import logging
import os

from fedreid_jax import config_lib, hosts, train
from fedreid_jax.data import registry
from fedreid_jax.federated import checks


def result_columns(label: str, results: dict) -> dict:
  """Run results -> {column label: {client: metrics}} (`label`: the algorithm's)."""
  cols = {}
  if "global" in results:
    cols[label] = results["global"]
    if "client" in results:
      cols[f"{label} (client models)"] = results["client"]
  else:
    cols[label] = results["client"]
  if "unseen" in results:  # eval.unseen: the global model on clients that never trained
    cols[f"{label} (unseen domains)"] = results["unseen"]
  return cols


def _report(columns: dict, config, run_dir: str) -> str:
  """Writes `run_dir`'s results.md (the full table) and convergence.png."""
  from fedreid_jax.evaluation import report
  title = (f"{config.data.name}: rank-1 / rank-5 / rank-10 / mAP (%), {config.eval.protocol} "
           f"protocol, after {config.fed.rounds} rounds")
  with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
    metrics = report.with_variants(report.DEFAULT_METRICS, report.metric_names(columns),
                                   of=("rank1", "mAP"))  # re-ranked / AQE ones, if any
    f.write(report.format_results_table(columns, title, metrics) + "\n")
  return report.plot_convergence(os.path.join(run_dir, "metrics.jsonl"),
                                 os.path.join(run_dir, "convergence.png"))


def baseline_dir(workdir: str, baseline: str) -> str:
  """Where the suite runs `baseline`."""
  return os.path.join(workdir, f"baseline_{baseline}")


def _with_algorithm(config, algorithm: str):
  """A copy of `config` running `algorithm` (a baseline of the suite)."""
  sub_cfg = config.copy_and_resolve_references()
  sub_cfg.fed.algorithm = algorithm
  return sub_cfg


def run(config, workdir: str) -> str:
  """Runs everything; returns a terminal-width table of rank-1 / mAP. The full
  tables are in `<workdir>/results.md` (all runs) and each baseline's folder.
  Holds the workdir's lock throughout (`workdir.workdir_lock`)."""
  with train.run_entry(config, workdir):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> str:
  from fedreid_jax.evaluation import report
  train.check_resume(config, workdir)  # another run's workdir: refused before the data
  for baseline in config.baselines:
    if baseline != config.fed.algorithm:
      train.check_resume(_with_algorithm(config, baseline), baseline_dir(workdir, baseline))
  clients_data, public = registry.load(config.data, config.seed)
  described = {name: config_lib.describe_algorithm(name, config)
               for name in (config.fed.algorithm, *config.baselines)}
  for name, algorithm in described.items():  # bad input before any training
    checks.check_input(_with_algorithm(config, name), algorithm, clients_data, public)
  label = lambda name: described[name].label
  columns = result_columns(label(config.fed.algorithm),
                           train.run(config, workdir, clients_data, public))
  plots = []
  for baseline in config.baselines:
    if baseline == config.fed.algorithm:
      continue
    sub_cfg = _with_algorithm(config, baseline)
    sub_dir = baseline_dir(workdir, baseline)
    logging.info("baseline %s -> %s", baseline, sub_dir)
    sub = result_columns(label(baseline), train.run(sub_cfg, sub_dir, clients_data, public))
    if hosts.is_main():  # process 0 writes the tables and plots
      plots.append(_report(sub, sub_cfg, sub_dir))
    columns.update(sub)
  if not hosts.is_main():
    return ""
  plots.insert(0, _report(columns, config, workdir))  # its table holds the baselines too
  logging.info("tables: %s; plots: %s", os.path.join(workdir, "results.md"), ", ".join(plots))
  if config.baselines:  # the suite's paper-style report (python -m fedreid_jax.report)
    from fedreid_jax.evaluation import paper_report
    logging.info("report: %s", paper_report.write_report(workdir))
  return report.format_terminal_table(
      columns, f"{config.data.name}, {config.eval.protocol} protocol, after "
      f"{config.fed.rounds} rounds: rank-1 / mAP (%); full table in results.md")
