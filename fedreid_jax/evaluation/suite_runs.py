"""The runs of a suite folder, the paper's columns, and the two result selections.

A run is a folder holding `config.json` and `metrics.jsonl` (what a training
run writes). A suite folder may itself be a run, and so may its subfolders
and theirs (`DIR/seed0/fedpav_kd/`), so one folder can hold several
algorithms and several seeds.

A column of the paper's table is one algorithm read through one metrics
prefix: `eval/` (the global model) or `eval_client/` (each client's own model
before upload). What a column is called, its place and whether the algorithm
has a global model come from the run's `algorithm.json` (written by training:
`{"name", "label", "shares", "order"}`); no algorithm is named here. Its value
per client comes from one of two selections:

- `select_final`: the last evaluation;
- `select_best` (the paper's): among the evaluations at round <= 300, the 3
  with the highest mean rank-1 over the big datasets; per client and metric,
  the mean over those 3.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

from fedreid_jax.errors import ReportInputMissing
from fedreid_jax.evaluation import report

RUN_FILES = ("config.json", "metrics.jsonl")
BIG_DATASETS = ("market", "duke", "cuhk03", "msmt17")
BEST_OF = 3
BEST_WITHIN = 300

ALGORITHM_FILE = "algorithm.json"
UNKNOWN_ORDER = 10**6  # runs without algorithm.json: after the registered ones, by name


def config_value(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
  """`config["fed"]["algorithm"]` for `"fed.algorithm"`; `default` when absent."""
  node: Any = config
  for key in dotted.split("."):
    if not isinstance(node, Mapping) or key not in node:
      return default
    node = node[key]
  return node


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: its folder, name relative to the suite, config, records
  and `card` (its `algorithm.json`; empty for runs written before it)."""
  path: str
  name: str
  config: dict
  records: list
  card: dict = dataclasses.field(default_factory=dict)

  @property
  def algorithm(self) -> str:
    return str(config_value(self.config, "fed.algorithm", self.card.get("name", "unknown")))

  @property
  def seed(self) -> int:
    return int(config_value(self.config, "seed", 0) or 0)

  @property
  def label(self) -> str:
    """The algorithm's label; without a card, its name."""
    label = self.card.get("label")
    return label if isinstance(label, str) and label else self.algorithm

  @property
  def shares(self) -> bool:
    """Whether the algorithm has a global model; without a card, True unless
    the run logged client models (`eval_client/`) but no global one (`eval/`)."""
    if isinstance(self.card.get("shares"), bool):
      return self.card["shares"]
    return bool(eval_records(self.records, "eval")
                or not eval_records(self.records, "eval_client"))

  @property
  def order(self) -> int:
    """The algorithm's place in the registry; without a card, `UNKNOWN_ORDER`."""
    order = self.card.get("order")
    ok = isinstance(order, int) and not isinstance(order, bool)
    return order if ok else UNKNOWN_ORDER


def _candidate_dirs(workdir: str) -> list[tuple[str, str]]:
  """`(path, name)` of `workdir`, its subfolders and theirs, sorted by name."""
  out = [(workdir, ".")]
  level = [(workdir, "")]
  for _ in range(2):
    nxt = []
    for path, name in level:
      for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir():
          nxt.append((entry.path, f"{name}{entry.name}/"))
    out += [(p, n.rstrip("/")) for p, n in nxt]
    level = nxt
  return out


def _load_run(path: str, name: str) -> Run | None:
  """The run in `path`, or None (with a warning) when its config is unreadable."""
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    logging.warning("skipping %s: cannot read config.json (%s)", path, e)
    return None
  records = report.read_metrics_jsonl(os.path.join(path, "metrics.jsonl"))
  return Run(path, name, config if isinstance(config, dict) else {}, records, _read_card(path))


def _read_card(path: str) -> dict:
  """The run's `algorithm.json`, or {} when absent or unreadable (with a warning)."""
  file = os.path.join(path, ALGORITHM_FILE)
  if not os.path.isfile(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      card = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    logging.warning("%s: cannot read %s (%s); using the run's config", path, ALGORITHM_FILE, e)
    return {}
  return card if isinstance(card, dict) else {}


def _missing_message(workdir: str, partial: list[str]) -> str:
  where = (f"looked for {' + '.join(RUN_FILES)} in {workdir!r}, its subfolders and "
           "theirs")
  if not os.path.isdir(workdir):
    where = f"{workdir!r} is not a folder"
  extra = (f"; config.json without metrics.jsonl in: {', '.join(partial)}" if partial else "")
  return (f"no runs to report: {where}{extra}. A training run writes both files: "
          f"python -m fedreid_jax.main --config configs/synthetic.py --workdir {workdir}")


def find_runs(workdir: str) -> list[Run]:
  """Every run in `workdir`, its subfolders and theirs (sorted by name).

  Raises `ReportInputMissing` (naming the folder and the files) when none.
  """
  workdir = os.fspath(workdir)
  runs, partial = [], []
  for path, name in (_candidate_dirs(workdir) if os.path.isdir(workdir) else []):
    has = [os.path.isfile(os.path.join(path, f)) for f in RUN_FILES]
    if all(has):
      run = _load_run(path, name)
      runs += [run] if run else []
    elif has[0]:
      partial.append(name)
  if not runs:
    raise ReportInputMissing(_missing_message(workdir, partial))
  return runs


def eval_records(records: Sequence[Mapping[str, Any]], prefix: str) -> list[dict]:
  """Eval records holding some `<prefix>/...` key, by round."""
  head = prefix + "/"
  out = [r for r in records if r.get("kind") == "eval" and "round" in r
         and any(k.startswith(head) for k in r)]
  return sorted(out, key=lambda r: r["round"])


def with_evaluations(runs: Sequence[Run]) -> list[Run]:
  """The runs with at least one eval record; the others are skipped with a
  warning. Raises `ReportInputMissing` when none is left."""
  kept = []
  for run in runs:
    if any(x.get("kind") == "eval" for x in run.records):
      kept.append(run)
    else:
      logging.warning("skipping run %s: its metrics.jsonl has no evaluation records", run.path)
  if not kept:
    raise ReportInputMissing(
        f"runs found ({', '.join(r.path for r in runs)}) but none has evaluation records "
        "in its metrics.jsonl: let a run reach its first evaluation (eval.every_rounds)")
  return kept


def by_algorithm(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """`{algorithm: runs}`, one run per seed (sorted by seed). Of two runs with
  the same algorithm and seed, the one with more evaluations is kept."""
  groups: dict[str, dict[int, Run]] = {}
  for run in runs:
    seeds = groups.setdefault(run.algorithm, {})
    other = seeds.get(run.seed)
    if other is not None:
      keep = max((other, run), key=lambda r: len(eval_records(r.records, "eval"))
                 + len(eval_records(r.records, "eval_client")))
      logging.warning("two %s runs with seed %d (%s, %s): using %s", run.algorithm, run.seed,
                      other.path, run.path, keep.path)
      run = keep
    seeds[run.seed] = run
  return {alg: [seeds[s] for s in sorted(seeds)] for alg, seeds in groups.items()}


@dataclasses.dataclass(frozen=True)
class Column:
  """A table column: `label`, the algorithm's runs (one per seed), the prefix read."""
  label: str
  algorithm: str
  prefix: str
  runs: tuple


def ordered(groups: Mapping[str, Sequence[Run]]) -> list[str]:
  """The algorithms of `groups` by (order, name) of their first run."""
  return sorted(groups, key=lambda alg: (groups[alg][0].order, alg))


def column_specs(groups: Mapping[str, Sequence[Run]], client_models: bool = False
                 ) -> list[tuple[str, str, str]]:
  """`(label, algorithm, prefix)` per algorithm in `ordered` order. Main table:
  the global model (`eval`) of a sharing algorithm, else its clients' models
  (`eval_client`). With `client_models`: `eval_client`, as "<label> local"
  for a sharing algorithm."""
  out = []
  for alg in ordered(groups):
    run = groups[alg][0]
    if client_models:
      out.append((f"{run.label} local" if run.shares else run.label, alg, "eval_client"))
    else:
      out.append((run.label, alg, "eval" if run.shares else "eval_client"))
  return out


def make_columns(groups: Mapping[str, Sequence[Run]], client_models: bool = False
                 ) -> list[Column]:
  """The `column_specs` columns whose algorithm (in `groups`, from
  `by_algorithm`) has runs with that prefix logged. A label already taken
  gets the algorithm's name appended."""
  out, seen = [], set()
  for label, alg, prefix in column_specs(groups, client_models):
    if any(eval_records(r.records, prefix) for r in groups[alg]):
      label = f"{label} ({alg})" if label in seen else label
      seen.add(label)
      out.append(Column(label, alg, prefix, tuple(groups[alg])))
  return out


@dataclasses.dataclass(frozen=True)
class Selection:
  """Per-client metrics `{client: {metric: fraction}}` and the rounds they come from."""
  values: dict
  rounds: tuple
  complete: bool = True  # False: fewer evaluations than the selection asks for


def per_client(record: Mapping[str, Any], prefix: str) -> dict[str, dict[str, float]]:
  """`{client: {metric: value}}` of the `<prefix>/<client>/<metric>` keys of a record."""
  out: dict[str, dict[str, float]] = {}
  for key, value in record.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == prefix:
      out.setdefault(parts[1], {})[parts[2]] = value
  return out


def big_clients(clients: Sequence[str]) -> list[str]:
  """Clients named like the four big datasets; all of them when none is."""
  big = [c for c in clients if any(b in c.lower() for b in BIG_DATASETS)]
  return big or list(clients)


def mean_over(records: Sequence[Mapping[str, Any]], prefix: str) -> dict:
  """Per client and metric, the mean of the finite values over `records`."""
  values: dict[str, dict[str, list]] = {}
  for r in records:
    for client, metrics in per_client(r, prefix).items():
      for metric, v in metrics.items():
        values.setdefault(client, {}).setdefault(metric, []).append(v)
  return {c: {m: report.finite_mean(vs) for m, vs in ms.items()} for c, ms in values.items()}


def select_final(records: Sequence[Mapping[str, Any]], prefix: str) -> Selection:
  """The last evaluation's metrics."""
  evals = eval_records(records, prefix)
  if not evals:
    return Selection({}, (), False)
  return Selection(mean_over(evals[-1:], prefix), (evals[-1]["round"],))


def select_best(records: Sequence[Mapping[str, Any]], prefix: str, k: int = BEST_OF,
                within: int = BEST_WITHIN) -> Selection:
  """The paper's selection: the `k` evaluations at round <= `within` with the
  highest mean rank-1 over `big_clients` (ties: the earlier round), averaged.
  With fewer than `k` evaluations, all of them (`complete=False`)."""
  evals = [r for r in eval_records(records, prefix) if r["round"] <= within]
  big = big_clients(report.eval_clients(evals, "rank1", prefix))
  scored = []
  for r in evals:
    score = report.finite_mean([r.get(f"{prefix}/{c}/rank1") for c in big])
    if score is not None:
      scored.append((-score, r["round"], r))
  chosen = [r for _, _, r in sorted(scored, key=lambda t: t[:2])[:k]]
  rounds = tuple(sorted(r["round"] for r in chosen))
  return Selection(mean_over(chosen, prefix), rounds, len(chosen) >= k)


def at_selected_rounds(select: Callable[..., Selection], prefix: str
                       ) -> Callable[..., Selection]:
  """A selection reading `prefix` (e.g. `eval_unseen`) at the rounds `select`
  picks from the column's own prefix: the unseen clients are scored at the
  rounds chosen on the training clients, never chosen by their own scores."""
  def select_at(records: Sequence[Mapping[str, Any]], own_prefix: str) -> Selection:
    chosen = select(records, own_prefix)
    evals = [r for r in eval_records(records, prefix) if r["round"] in chosen.rounds]
    return Selection(mean_over(evals, prefix), chosen.rounds, chosen.complete)
  return select_at


def recorded_metrics(runs: Sequence[Run]) -> set[str]:
  """The metric names of the runs' `<prefix>/<client>/<metric>` eval keys."""
  return {key.split("/")[2] for run in runs for r in run.records if r.get("kind") == "eval"
          for key in r if key.count("/") == 2}


def column_results(column: Column, select: Callable[..., Selection]
                   ) -> tuple[dict, list[Selection]]:
  """`({client: {metric: [value per seed]}}, [selection per seed])` of a column.

  Seeds missing a client or metric hold None in its place.
  """
  selections = [select(run.records, column.prefix) for run in column.runs]
  table: dict[str, dict[str, list]] = {}
  for i, sel in enumerate(selections):
    for client, metrics in sel.values.items():
      for metric, v in metrics.items():
        cell = table.setdefault(client, {}).setdefault(metric, [None] * len(selections))
        cell[i] = v if v is None or math.isfinite(v) else None
  return table, selections
