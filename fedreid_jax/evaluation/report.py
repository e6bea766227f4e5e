"""Result reporting: paper-style markdown tables and convergence plots.

- `format_results_table`: per-client metrics of one or more models ("global",
  "local", ...) as a markdown table in percent, with a mean row; a value may
  be a list over seeds, shown as mean ± std.
- `read_metrics_jsonl` / `plot_convergence`: the per-round JSON-lines log
  (`{"round": 3, "kind": "eval", "eval/<client>/rank1": 0.42, ...}` and
  `{"round": 3, "kind": "train", "train/loss": ..., "client/<name>/loss": ...}`)
  as a two-panel PNG: an evaluation metric per client vs round, and the
  training loss vs round.

Plots use matplotlib's object API with the Agg canvas, so importing this
module never changes the global pyplot backend.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

DEFAULT_METRICS = ("rank1", "rank5", "rank10", "mAP")
METRIC_LABELS = {"rank1": "R-1", "rank5": "R-5", "rank10": "R-10",
                 "mAP": "mAP", "mINP": "mINP"}
# the re-ranked and query-expanded metrics an evaluation may add (`features.extra_metrics`)
VARIANTS = {"_rr": "RR", "_aqe": "AQE"}


def metric_label(metric: str) -> str:
  """A column label: `R-1` for rank1, `R-1 RR` for rank1_rr, `mAP AQE` for mAP_aqe."""
  for suffix, tag in VARIANTS.items():
    base = metric[:-len(suffix)]
    if metric.endswith(suffix) and base in METRIC_LABELS:
      return f"{METRIC_LABELS[base]} {tag}"
  return METRIC_LABELS.get(metric, metric)


def with_variants(metrics: Sequence[str], present, of: Sequence[str] | None = None
                  ) -> list[str]:
  """`metrics`, then the re-ranked (`_rr`) and then the query-expanded (`_aqe`)
  form of each of `of` (default: `metrics`) that is among `present` (metric
  names found in the results): `["rank1", "mAP", "rank1_rr", "mAP_rr"]` for
  `("rank1", "mAP")` after re-ranking."""
  present = set(present)
  return list(metrics) + [m + suffix for suffix in VARIANTS for m in (of or metrics)
                          if m + suffix in present]


def metric_names(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> set[str]:
  """The metric names of `results[model][client][metric]`."""
  return {m for per_client in results.values() for v in per_client.values() for m in (v or {})}


def _percent(value: Any) -> str:
  """A fraction as a percent with one decimal; "-" when missing or not finite."""
  if value is None:
    return "-"
  try:
    value = float(value)
  except (TypeError, ValueError):
    return "-"
  return f"{100.0 * value:.1f}" if math.isfinite(value) else "-"


def _row_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Client names over all models, in first-seen order."""
  names: list[str] = []
  for per_client in results.values():
    for name in per_client:
      if name not in names:
        names.append(name)
  return names


def _finite(values: Sequence[Any]) -> list[float]:
  """The values that are finite numbers, as floats (None and the rest dropped)."""
  finite = []
  for v in values:
    try:
      v = float(v)
    except (TypeError, ValueError):
      continue
    if math.isfinite(v):
      finite.append(v)
  return finite


def finite_mean(values: Sequence[Any]) -> float | None:
  """Mean of the finite values, None when there are none."""
  finite = _finite(values)
  return sum(finite) / len(finite) if finite else None


def _is_seq(value: Any) -> bool:
  return isinstance(value, (list, tuple))


def cell(value: Any) -> str:
  """A fraction as `_percent`; a list of fractions (one per seed) as
  "mean ± std" in percent (sample std, n - 1), plain when one is finite."""
  if not _is_seq(value):
    return _percent(value)
  finite = _finite(value)
  if len(finite) < 2:
    return _percent(finite[0] if finite else None)
  mean = sum(finite) / len(finite)
  std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
  return f"{100.0 * mean:.1f} ± {100.0 * std:.1f}"


def _mean_cell(values: Sequence[Any]) -> str:
  """The mean row's cell of one column: the mean over clients; with per-seed
  lists, the mean over clients per seed, then mean ± std over seeds."""
  if not any(_is_seq(v) for v in values):
    return _percent(finite_mean(values))
  lists = [v for v in values if _is_seq(v)]
  seeds = max(len(v) for v in lists)
  return cell([finite_mean([v[i] for v in lists if i < len(v)]) for i in range(seeds)])


def format_results_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                         title: str = "",
                         metrics: Sequence[str] = DEFAULT_METRICS) -> str:
  """A markdown table like the paper's: one row per client, columns per model.

  Args:
    results: `results[model][client][metric]`, metrics as fractions in [0, 1]
      (what `evaluate_rankings` returns), e.g.
      `{"global": {"market1501": {"rank1": 0.83, ...}}, "local": {...}}`.
    title: printed as a bold line above the table (skipped when empty).
      A value may also be a list with one fraction per seed: the cell is
      then "mean ± std" over the seeds.
    metrics: metric keys to show, in order (default rank-1/5/10 and mAP).

  Returns:
    The table as a string; values in percent with one decimal, "-" where a
    model has no value for a client. The last row is the mean over the
    clients that have a value (with seeds: per seed, then mean ± std).
  """
  models = list(results)
  clients = _row_names(results)
  header = ["Client"] + [f"{model} {metric_label(m)}"
                         for model in models for m in metrics]
  align = ["---"] + ["---:"] * (len(header) - 1)
  lines = []
  if title:
    lines += [f"**{title}**", ""]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join(align) + "|")
  for client in clients:
    cells = [client]
    for model in models:
      row = results[model].get(client) or {}
      cells += [cell(row.get(m)) for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  mean_cells = ["**Mean**"]
  for model in models:
    per_client = results[model]
    for m in metrics:
      mean_cells.append(_mean_cell([(r or {}).get(m) for r in per_client.values()]))
  lines.append("| " + " | ".join(mean_cells) + " |")
  return "\n".join(lines) + "\n"


def format_terminal_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                          title: str = "", name_width: int = 12, cell_width: int = 16) -> str:
  """A plain-text table for the terminal: rank-1 / mAP (%) per client and
  model, columns `cell_width` wide (4 models fit 80 columns with the defaults;
  longer model names wrap onto two header lines). The full table is
  `format_results_table`."""
  models = list(results)
  clients = _row_names(results)
  cut = lambda text, width: (text[:width - 1] + "~") if len(text) > width else text

  def row(first, cells):
    return f"{cut(first, name_width):<{name_width}}" + "".join(
        f" {cut(c, cell_width):>{cell_width}}" for c in cells)

  def cell(values):
    return f"{_percent(values.get('rank1'))} / {_percent(values.get('mAP'))}"

  words = [m.split(" ", 1) + [""] if " " in m and len(m) > cell_width else [m, ""]
           for m in models]
  lines = [title] if title else []
  lines.append(row("", [w[0] for w in words]))
  if any(w[1] for w in words):
    lines.append(row("", [w[1] for w in words]))
  lines.append(row("client", ["R-1 / mAP"] * len(models)))
  for client in clients:
    lines.append(row(client, [cell(results[m].get(client) or {}) for m in models]))
  means = [{k: finite_mean([(r or {}).get(k) for r in results[m].values()])
            for k in ("rank1", "mAP")}
           for m in models]
  lines.append(row("mean", [cell(v) for v in means]))
  return "\n".join(lines) + "\n"


def read_metrics_jsonl(path: str | os.PathLike[str]) -> list[dict]:
  """Records of a JSON-lines metrics file; blank and unparsable lines skipped.

  A run killed mid-write leaves a truncated last line: it is logged and
  skipped rather than failing the report.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d: skipping unparsable line", path, line_no)
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def series(records: Sequence[Mapping[str, Any]], key: str,
            kind: str | None = None) -> tuple[list[float], list[float]]:
  """`(rounds, values)` of `key` over records (of `kind`, if given), by round."""
  points = []
  for r in records:
    if kind is not None and r.get("kind", kind) != kind:
      continue
    if key not in r or "round" not in r:
      continue
    try:
      points.append((float(r["round"]), float(r[key])))
    except (TypeError, ValueError):
      continue
  points.sort(key=lambda p: p[0])
  return [p[0] for p in points], [p[1] for p in points]


def eval_prefix(records: Sequence[Mapping[str, Any]]) -> str:
  """`eval` (the global model) when logged, else `eval_client` (each client's
  own model: the local-training baseline has no global model)."""
  keys = {k.split("/", 1)[0] for r in records for k in r}
  return "eval" if "eval" in keys or "eval_client" not in keys else "eval_client"


def eval_clients(records: Sequence[Mapping[str, Any]], metric: str,
                 prefix: str = "eval") -> list[str]:
  """Client names with a `<prefix>/<client>/<metric>` key, in first-seen order."""
  suffix = "/" + metric
  names: list[str] = []
  for r in records:
    for key in r:
      if key.startswith(prefix + "/") and key.endswith(suffix):
        name = key[len(prefix) + 1:-len(suffix)]
        if name and name not in names:
          names.append(name)
  return names


def _train_loss_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """`client/<name>/loss` keys present in the records, first-seen order."""
  keys: list[str] = []
  for r in records:
    for key in r:
      if key.startswith("client/") and key.endswith("/loss") and key not in keys:
        keys.append(key)
  return keys


def _plot_eval(ax, records, metric: str) -> None:
  """Panel 1: `eval/<client>/<metric>` (in percent) vs round, one line per
  client (`eval_client/...` for runs without a global model)."""
  prefix = eval_prefix(records)
  clients = eval_clients(records, metric, prefix)
  for client in clients:
    rounds, values = series(records, f"{prefix}/{client}/{metric}", kind="eval")
    ax.plot(rounds, [100.0 * v for v in values], marker="o", markersize=3,
            label=client)
  ax.set_xlabel("round")
  ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
  ax.set_title(f"evaluation: {metric}" + (" (client models)" if prefix == "eval_client" else ""))
  if clients:
    ax.legend(fontsize="small", ncol=2)
  else:
    ax.text(0.5, 0.5, "no evaluation records", ha="center", va="center",
            transform=ax.transAxes)
  ax.grid(True, alpha=0.3)


def _plot_train(ax, records) -> None:
  """Panel 2: `train/loss` vs round, per-client losses as thin lines."""
  drawn = False
  for key in _train_loss_keys(records):
    rounds, values = series(records, key, kind="train")
    if rounds:
      ax.plot(rounds, values, linewidth=0.8, alpha=0.5,
              label=key[len("client/"):-len("/loss")])
      drawn = True
  rounds, values = series(records, "train/loss", kind="train")
  if rounds:
    ax.plot(rounds, values, color="black", linewidth=2.0, label="mean")
    drawn = True
  ax.set_xlabel("round")
  ax.set_ylabel("loss")
  ax.set_title("training loss")
  if drawn:
    ax.legend(fontsize="small", ncol=2)
  else:
    ax.text(0.5, 0.5, "no training records", ha="center", va="center",
            transform=ax.transAxes)
  ax.grid(True, alpha=0.3)


def plot_convergence(metrics_jsonl_path: str | os.PathLike[str],
                     out_png: str | os.PathLike[str],
                     metric: str = "rank1") -> str:
  """Writes a two-panel PNG: `eval/<client>/<metric>` and training loss vs round.

  Missing keys, clients evaluated only in some rounds and logs without any
  eval or train records all give a (partly empty) plot, not an error.

  Returns:
    `out_png` as a string.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = read_metrics_jsonl(metrics_jsonl_path)
  fig = Figure(figsize=(12, 4.5))
  FigureCanvasAgg(fig)
  ax_eval, ax_train = fig.subplots(1, 2)
  _plot_eval(ax_eval, records, metric)
  _plot_train(ax_train, records)
  fig.tight_layout()
  return save_figure(fig, out_png)


def save_figure(fig, out_png: str | os.PathLike[str], dpi: int = 100) -> str:
  """Saves a matplotlib `Figure` as PNG (parent folders created); returns the path."""
  out_png = os.fspath(out_png)
  parent = os.path.dirname(out_png)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(out_png, dpi=dpi)
  return out_png
