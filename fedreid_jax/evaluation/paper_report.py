"""The suite report: from the runs' metrics files alone, a Markdown report
with the paper-style tables, convergence plots and retrieval pictures.

    path = write_report("runs/suite")   # -> runs/suite/report/report.md

Writes into the output folder (default `<workdir>/report/`):
- `report.md`: the runs; the paper's table (rank-1 / mAP per dataset and
  column, and their re-ranked / query-expanded forms when the runs logged
  them) under the final-round and the best-3 selections (`suite_runs`); the
  global models on unseen domains (`eval.unseen`);
  the rounds each selection used; client models against local training;
  KD before/after on KD rounds; CDW weights; the pictures below;
- `convergence_<metric>.png` (default rank1 and mAP): a panel per client;
- `cdw_weights.png` when a CDW run logged `client/<name>/weight`;
- `retrieval_<client>.png` from one run's `retrieval/<client>.npz`.

Column labels and order come from each run's `algorithm.json` (`suite_runs`).
"""
from __future__ import annotations

import functools
import glob
import logging
import math
import os
from typing import Sequence

from fedreid_jax.evaluation import report, suite_plots, suite_runs
from fedreid_jax.evaluation.retrieval_examples import draw_retrieval, load_examples
from fedreid_jax.evaluation.suite_runs import Column, Run
from fedreid_jax.privacy import report as privacy_report


def _wrote(path: str) -> str:
  logging.info("wrote %s", path)
  return path


def _values(runs: Sequence[Run], dotted: str) -> str:
  """The distinct values of a config field over `runs`, comma-separated."""
  seen = []
  for run in runs:
    v = suite_runs.config_value(run.config, dotted, "?")
    if v not in seen:
      seen.append(v)
  return ", ".join(str(v) for v in seen)


def header(workdir: str, runs: Sequence[Run]) -> str:
  """Title and the list of runs."""
  seeds = sorted({r.seed for r in runs})
  lines = [f"# FedReID report: {_values(runs, 'data.name')}", "",
           f"{len(runs)} runs under `{workdir}`; seeds {', '.join(map(str, seeds))} "
           f"({len(seeds)} seed{'s' if len(seeds) > 1 else ''}); {_values(runs, 'fed.rounds')} "
           f"rounds; evaluation every {_values(runs, 'eval.every_rounds')} rounds; "
           f"{_values(runs, 'eval.protocol')} protocol. Values are percentages"
           + (", mean ± std over seeds (sample std)." if len(seeds) > 1 else "."), "",
           "| run | algorithm | seed | rounds | evaluations | last evaluated |",
           "|---|---|---:|---:|---:|---:|"]
  for r in runs:
    evals = [x["round"] for x in r.records if x.get("kind") == "eval" and "round" in x]
    lines.append(f"| `{r.name}` | {r.algorithm} | {r.seed} | "
                 f"{suite_runs.config_value(r.config, 'fed.rounds', '?')} | {len(evals)} | "
                 f"{max(evals) if evals else '-'} |")
  return "\n".join(lines) + "\n"


def selections(columns: Sequence[Column], within: int) -> dict:
  """`{name: (select, what it selects)}`: the final round and the paper's best-3."""
  big = suite_runs.big_clients(suite_plots.grid_clients(columns, "rank1"))
  return {
      "Final round": (suite_runs.select_final, "the last evaluation of each run."),
      "Best-3": (functools.partial(suite_runs.select_best, within=within),
                 f"the paper's: per column, the {suite_runs.BEST_OF} evaluations at "
                 f"round <= {within} with the highest mean rank-1 over {', '.join(big)}; "
                 "per dataset the mean over those evaluations."),
  }


def selection_tables(columns: Sequence[Column], metrics: Sequence[str],
                     within: int) -> tuple[str, dict]:
  """The paper table under both selections; returns `(markdown, {name: selections})`."""
  parts, used = [], {}
  for name, (select, what) in selections(columns, within).items():
    results, used[name] = {}, {}
    for column in columns:
      results[column.label], used[name][column.label] = suite_runs.column_results(column, select)
    parts += [f"## {name}", "", f"Selection: {what}", "",
              report.format_results_table(results, metrics=metrics)]
  return "\n".join(parts), used


def rounds_table(columns: Sequence[Column], used: dict) -> str:
  """Which rounds each column's selections used, per seed."""
  lines = ["## Rounds selected", "", "| column | seed | " + " | ".join(used) + " |",
           "|---|---:|" + "---|" * len(used)]
  notes = []
  for column in columns:
    for i, run in enumerate(column.runs):
      cells = []
      for name, per_column in used.items():
        sel = per_column[column.label][i]
        cells.append(", ".join(map(str, sel.rounds)) or "-")
        if not sel.complete and name != "Final round":
          notes.append(f"{column.label} (seed {run.seed}): only {len(sel.rounds)} "
                       f"evaluation(s) in range, all used")
      lines.append(f"| {column.label} | {run.seed} | " + " | ".join(cells) + " |")
  if notes:
    lines += ["", "Fewer evaluations than the selection asks for: " + "; ".join(notes) + "."]
  return "\n".join(lines) + "\n"


def client_models_table(groups: dict, metrics: Sequence[str], within: int) -> str:
  """Each client's own model before upload (best-3) against local training."""
  columns = suite_runs.make_columns(groups, client_models=True)
  if len(columns) < 2:
    return ""
  select = functools.partial(suite_runs.select_best, within=within)
  results = {c.label: suite_runs.column_results(c, select)[0] for c in columns}
  return "\n".join([
      "## Client models against local training", "",
      "Each client's own model after local training, before upload, on its own test set "
      "(best-3 selection); the paper's claim: with CDW it beats local training everywhere.",
      "", report.format_results_table(results, metrics=metrics)])


def unseen_section(columns: Sequence[Column], metrics: Sequence[str], within: int) -> str:
  """The global models on the clients held out of training (`eval.unseen`,
  `eval_unseen/` records), at the rounds each selection picks on the
  training clients; the mean row is over the unseen clients."""
  held = [c for c in columns if c.prefix == "eval"
          and any(suite_runs.eval_records(r.records, "eval_unseen") for r in c.runs)]
  if not held:
    return ""
  parts = ["## Unseen domains", "",
           "Clients held out of training (`eval.unseen`): never selected, their training "
           "data never read. Each column's global model on their test sets, at the rounds "
           "its selection chose on the training clients (never by these scores); the mean "
           "row is over the unseen clients.", ""]
  for name, (select, _) in selections(columns, within).items():
    pick = suite_runs.at_selected_rounds(select, "eval_unseen")
    results = {c.label: suite_runs.column_results(c, pick)[0] for c in held}
    parts += [report.format_results_table(results, name, metrics=metrics)]
  return "\n".join(parts)


def fluctuation(records: Sequence[dict], prefix: str, metric: str = "rank1") -> float | None:
  """Mean over clients of the mean |change| of `metric` between consecutive
  evaluations (fractions): how much a convergence curve jumps."""
  jumps = []
  for client in report.eval_clients(records, metric, prefix):
    _, values = report.series(records, f"{prefix}/{client}/{metric}", kind="eval")
    jumps += [abs(b - a) for a, b in zip(values, values[1:])]
  return sum(jumps) / len(jumps) if jumps else None


def fluctuation_section(columns, metric: str = "rank1") -> str:
  """Per column: mean |change| between consecutive evaluations (seeds: mean ± std)."""
  rows = []
  for column in columns:
    values = [v for v in (fluctuation(run.records, column.prefix, metric)
                          for run in column.runs) if v is not None]
    if values:
      spread = report.cell(values if len(values) > 1 else values[0])
      rows.append(f"| {column.label} | {spread} | {len(values)} |")
  if not rows:
    return ""
  return "\n".join([
      "## Fluctuation", "",
      f"Mean absolute change of each client's {metric} between consecutive evaluations "
      "(points, averaged over clients and evaluations): lower is a smoother curve; the "
      "paper's claim: KD smooths FedPav's convergence.", "",
      "| column | mean jump | seeds |", "|---|---:|---:|"] + rows) + "\n"


def kd_section(groups: dict, metrics: Sequence[str]) -> str:
  """Before/after KD means over the KD rounds of each KD run (all seeds pooled)."""
  parts = []
  for alg, runs in groups.items():
    records = [r for run in runs for r in suite_runs.eval_records(run.records, "eval_before_kd")]
    if not records:
      continue
    rounds = sorted({r["round"] for r in records})
    results = {"before KD": suite_runs.mean_over(records, "eval_before_kd"),
               "after KD": suite_runs.mean_over(records, "eval")}
    title = (f"{runs[0].label}: mean over {len(records)} KD evaluations "
             f"(rounds {', '.join(map(str, rounds))}; {len(runs)} seed(s) pooled)")
    parts.append(report.format_results_table(results, title, metrics=metrics))
  if not parts:
    return ""
  return "\n".join(["## Knowledge distillation: before and after", "",
                    "The global model evaluated just before and just after server-side "
                    "distillation, on the rounds that distil.", ""] + parts)


def cdw_section(groups: dict, out_dir: str) -> str:
  """The CDW runs' per-client aggregation weights against round (first seed)."""
  cdw = {runs[0].label: runs[0] for alg, runs in groups.items()
         if "cdw" in alg and suite_plots.weight_keys(runs[0].records)}
  if not cdw:
    return ""
  ref = groups.get("fedpav", [None])[0]
  reference = ("FedPav, data size", ref) if ref and suite_plots.weight_keys(ref.records) else None
  path = _wrote(suite_plots.plot_client_weights(cdw, os.path.join(out_dir, "cdw_weights.png"),
                                                reference))
  return ("## CDW aggregation weights\n\nEach client's aggregation weight against round "
          f"(seed {next(iter(cdw.values())).seed}).\n\n![CDW weights]({os.path.basename(path)})\n")


def _with_retrieval(runs: Sequence[Run]) -> Run | None:
  """The first of `runs` (lowest seed) holding `retrieval/*.npz`, or None."""
  for run in runs:
    if glob.glob(os.path.join(run.path, "retrieval", "*.npz")):
      return run
  return None


def _last_rank1(run: Run) -> float:
  """The mean rank-1 over clients of the run's last `eval` record; -inf when none."""
  values = suite_runs.select_final(run.records, "eval").values.values()
  mean = report.finite_mean([m.get("rank1") for m in values])
  return -math.inf if mean is None else mean


def retrieval_run(groups: dict) -> tuple[str, Run] | None:
  """`(algorithm, run)` whose retrieval pictures to draw, among each
  algorithm's `_with_retrieval` run: of the sharing ones, the highest
  `_last_rank1` (ties: the higher order); when none shares, the first."""
  found = [(alg, run) for alg, run in ((a, _with_retrieval(rs)) for a, rs in groups.items())
           if run is not None]
  sharing = [(alg, run) for alg, run in found if run.shares]
  if sharing:
    return max(sharing, key=lambda t: (_last_rank1(t[1]), t[1].order))
  return found[0] if found else None


def retrieval_section(groups: dict, out_dir: str) -> str:
  """Draws `retrieval_<client>.png` per npz of `retrieval_run`; their Markdown."""
  found = retrieval_run(groups)
  if found is None:
    return ("## Retrieval examples\n\nNo run holds `retrieval/<client>.npz` files "
            "(written at the end of a run).\n")
  _, run = found
  label = run.label
  lines = ["## Retrieval examples", "",
           f"From `{run.name}` ({label}, seed {run.seed}): each row a query, then its most "
           "similar gallery images, junk included. Green: the same person seen by "
           "another camera (correct); red: another person; grey and faded: junk, which "
           "the metrics ignore.", ""]
  for npz in sorted(glob.glob(os.path.join(run.path, "retrieval", "*.npz"))):
    client = os.path.splitext(os.path.basename(npz))[0]
    png = os.path.join(out_dir, f"retrieval_{client}.png")
    examples = load_examples(npz)
    _wrote(draw_retrieval(examples, png, f"{client}: {label} ({run.name}), top "
                          f"{examples['status'].shape[-1]}"))
    lines += [f"### {client}", "", f"![{client}]({os.path.basename(png)})", ""]
  return "\n".join(lines)


def write_report(workdir: str, out_dir: str | None = None,
                 metrics: Sequence[str] = ("rank1", "mAP"),
                 within: int = suite_runs.BEST_WITHIN) -> str:
  """Writes the report of every run under `workdir`; returns report.md's path.

  Raises `errors.ReportInputMissing` when `workdir` holds no run with evaluations.
  """
  runs = suite_runs.with_evaluations(suite_runs.find_runs(workdir))
  out_dir = out_dir or os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  groups = suite_runs.by_algorithm(runs)
  columns = suite_runs.make_columns(groups)
  shown = report.with_variants(metrics, suite_runs.recorded_metrics(runs))  # + re-ranked
  tables, used = selection_tables(columns, shown, within)
  convergence = ["## Convergence", "",
                 "One panel per client, one line per column (dashed: client models); with "
                 "several seeds, the mean and a band of ± one std.", ""]
  for metric in metrics:
    png = _wrote(suite_plots.plot_convergence_grid(
        columns, metric, os.path.join(out_dir, f"convergence_{metric}.png")))
    convergence += [f"![{metric} against round]({os.path.basename(png)})", ""]
  parts = [header(workdir, runs), tables, unseen_section(columns, shown, within),
           rounds_table(columns, used), client_models_table(groups, shown, within),
           "\n".join(convergence), fluctuation_section(columns),
           kd_section(groups, shown), cdw_section(groups, out_dir),
           privacy_report.privacy_section(runs, out_dir),  # dp runs: epsilon vs round
           retrieval_section(groups, out_dir)]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(p.rstrip() + "\n" for p in parts if p))
  return _wrote(path)
