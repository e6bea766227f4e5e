"""Plots over the runs of a suite: convergence per client, CDW weights.

- `plot_convergence_grid`: one panel per client, one line per table column
  (algorithm and prefix), a metric in percent against round; with several
  seeds the line is their mean and a band spans mean ± std.
- `plot_client_weights`: the aggregation weight of each client against
  round (`client/<name>/weight`), one panel per run; a reference run (FedPav's
  data-size weights) is drawn dashed in the same colours.

Matplotlib's object API with the Agg canvas, as in `report.py`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fedreid_jax.evaluation import report
from fedreid_jax.evaluation.suite_runs import Column, Run


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def seed_mean(column: Column, client: str, metric: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(rounds, mean, std)` of `<prefix>/<client>/<metric>` over the column's
  seeds, at every round any seed evaluated (std 0 where one seed has it)."""
  key = f"{column.prefix}/{client}/{metric}"
  by_round: dict[float, list[float]] = {}
  for run in column.runs:
    for r, v in zip(*report.series(run.records, key, kind="eval")):
      by_round.setdefault(r, []).append(v)
  rounds = np.asarray(sorted(by_round), np.float64)
  values = [np.asarray(by_round[r]) for r in rounds]
  mean = np.asarray([v.mean() for v in values])
  std = np.asarray([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
  return rounds, mean, std


def grid_clients(columns: Sequence[Column], metric: str) -> list[str]:
  """Clients evaluated by any column, in first-seen order."""
  names: list[str] = []
  for column in columns:
    for run in column.runs:
      for name in report.eval_clients(run.records, metric, column.prefix):
        if name not in names:
          names.append(name)
  return names


def _panel_grid(fig, count: int, ncols: int = 3):
  """`count` axes in rows of `ncols`; unused cells hidden."""
  ncols = max(1, min(ncols, count))
  nrows = max(1, math.ceil(count / ncols))
  axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
  for ax in axes[count:]:
    ax.axis("off")
  return axes[:count]


def plot_convergence_grid(columns: Sequence[Column], metric: str, out_png: str) -> str:
  """Writes the grid (one panel per client, one line per column); returns `out_png`."""
  clients = grid_clients(columns, metric)
  ncols = min(3, max(1, len(clients)))
  nrows = max(1, math.ceil(len(clients) / ncols))
  fig = _figure(4.2 * ncols, 3.0 * nrows + 0.8)
  label = report.METRIC_LABELS.get(metric, metric)
  fig.suptitle(f"{label} (%) against round, per client")
  if not clients:
    fig.text(0.5, 0.5, f"no {metric} evaluations", ha="center", va="center")
    return report.save_figure(fig, out_png)
  axes = _panel_grid(fig, len(clients), ncols)
  for i, column in enumerate(columns):
    color, dashed = f"C{i % 10}", column.prefix == "eval_client" and column.algorithm != "local"
    for ax, client in zip(axes, clients):
      rounds, mean, std = seed_mean(column, client, metric)
      if not len(rounds):
        continue
      ax.plot(rounds, 100 * mean, color=color, linestyle="--" if dashed else "-",
              marker="o", markersize=2.5, linewidth=1.2, label=column.label)
      if std.any():
        ax.fill_between(rounds, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.15)
  for ax, client in zip(axes, clients):
    ax.set_title(client, fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{label} (%)")
    ax.grid(True, alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  for ax in axes[1:]:
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize="small")
  fig.tight_layout(rect=(0, 0.06, 1, 0.97))
  return report.save_figure(fig, out_png)


def weight_keys(records) -> list[str]:
  """Clients with a `client/<name>/weight` key, first-seen order."""
  names: list[str] = []
  for r in records:
    for key in r:
      parts = key.split("/")
      if len(parts) == 3 and parts[0] == "client" and parts[2] == "weight" \
          and parts[1] not in names:
        names.append(parts[1])
  return names


def plot_client_weights(runs: dict[str, Run], out_png: str,
                        reference: tuple[str, Run] | None = None) -> str:
  """One panel per `{label: run}`: each client's aggregation weight against
  round; `reference` `(label, run)` drawn dashed on every panel."""
  fig = _figure(6.0 * max(1, len(runs)), 4.2)
  axes = _panel_grid(fig, max(1, len(runs)), ncols=max(1, len(runs)))
  for ax, (label, run) in zip(axes, runs.items()):
    clients = weight_keys(run.records)
    for i, client in enumerate(clients):
      rounds, values = report.series(run.records, f"client/{client}/weight", kind="train")
      ax.plot(rounds, values, color=f"C{i % 10}", linewidth=1.2, label=client)
      if reference is not None:
        last = max(rounds, default=0)
        ref = zip(*report.series(reference[1].records, f"client/{client}/weight", kind="train"))
        ref = [(r, v) for r, v in ref if r <= last]
        if ref:
          ax.plot(*zip(*ref), color=f"C{i % 10}", linewidth=0.8, linestyle="--")
    note = f" (dashed: {reference[0]})" if reference is not None else ""
    ax.set_title(f"{label}: aggregation weights{note}", fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel("weight")
    ax.grid(True, alpha=0.3)
    if clients:
      ax.legend(fontsize="x-small", ncol=2)
  fig.tight_layout()
  return report.save_figure(fig, out_png)
