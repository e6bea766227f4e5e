"""The report's privacy section: epsilon against round and the final
(epsilon, delta) per client of every run trained with `dp` on, read from its
round records alone (`privacy/epsilon`, `privacy/<client>/epsilon`).

    section = privacy_section(runs, out_dir)   # markdown ("" when no run used DP)
"""
from __future__ import annotations

import os
from typing import Sequence

EPSILON = "privacy/epsilon"


def client_names(records: Sequence[dict]) -> list[str]:
  """Clients with a `privacy/<client>/epsilon` entry (sgd mode), first-seen order."""
  names: list[str] = []
  for r in records:
    for key in r:
      parts = key.split("/")
      if len(parts) == 3 and parts[0] == "privacy" and parts[2] == "epsilon":
        if parts[1] not in names:
          names.append(parts[1])
  return names


def epsilon_series(records: Sequence[dict], key: str = EPSILON) -> tuple[list, list]:
  """(rounds, epsilons) of `key` over the train records."""
  points = sorted((r["round"], r[key]) for r in records
                  if r.get("kind") == "train" and key in r)
  return [p[0] for p in points], [p[1] for p in points]


def final_table(run_label: str, records: Sequence[dict], delta: float) -> list[str]:
  """Markdown rows `| run | client | epsilon | delta | steps or rounds |` of the last round."""
  last = [r for r in records if r.get("kind") == "train" and EPSILON in r]
  if not last:
    return []
  last = last[-1]
  names = client_names([last])
  if not names:  # client mode: one guarantee for every client's whole data
    return [f"| {run_label} | every client (client-level) | {last[EPSILON]:.3g} | {delta:g} | "
            f"{last.get('privacy/rounds', 0):.0f} rounds |"]
  return [f"| {run_label} | {n} | {last[f'privacy/{n}/epsilon']:.3g} | {delta:g} | "
          f"{last.get(f'privacy/{n}/steps', 0):.0f} steps |" for n in names]


def plot_epsilon(runs, out_png: str) -> str:
  """One panel: epsilon against round, a line per run (sgd mode: its worst client)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for run in runs:
    rounds, eps = epsilon_series(run.records)
    ax.plot(rounds, eps, marker="o", markersize=3, label=f"{run.name} (seed {run.seed})")
  ax.set_xlabel("round")
  ax.set_ylabel("epsilon")
  ax.set_title("privacy spent")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
  fig.savefig(out_png, dpi=100)
  return out_png


def privacy_section(runs, out_dir: str) -> str:
  """Markdown: the epsilon-vs-round plot and the final (epsilon, delta) per
  client of the runs with privacy records; "" when there are none. `runs`:
  `suite_runs.Run`s (name, seed, config, records)."""
  private = [r for r in runs if any(EPSILON in rec for rec in r.records)]
  if not private:
    return ""
  png = plot_epsilon(private, os.path.join(out_dir, "privacy_epsilon.png"))
  rows = ["| run | client | epsilon | delta | spent over |", "|---|---|---|---|---|"]
  for run in private:
    delta = run.config.get("dp", {}).get("delta", float("nan"))
    rows += final_table(f"{run.name} (seed {run.seed})", run.records, delta)
  return ("## Differential privacy\n\nEpsilon spent against round (sgd mode: the client "
          "spending most), and each run's final (epsilon, delta): per client for DP-SGD, one "
          "client-level guarantee for DP-FedAvg (docs/privacy.md).\n\n"
          f"![epsilon against round]({os.path.basename(png)})\n\n" + "\n".join(rows) + "\n")
