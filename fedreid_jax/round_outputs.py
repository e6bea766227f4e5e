"""What a run writes besides checkpoints: the round's flat record, evaluation
records, the best model's export, and one clear line when the disk is full."""
from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np

from fedreid_jax import checkpoint as checkpoint_lib
from fedreid_jax import export as export_lib
from fedreid_jax.errors import DiskFull
from fedreid_jax.federated import rounds as rounds_lib

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def round_record(names, metrics: dict, measured: dict, weights) -> dict[str, float]:
  """A round's named per-client arrays `[S]` -> the flat record that is logged:
  `train/<metric>` (step-weighted means; `steps` summed; `padding_waste` =
  step slots computed / real steps) and `client/<name>/<metric>` (also each
  measurement and the normalised aggregation `weight`)."""
  m = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
  steps = m.pop("steps")
  slots = m.pop("slots")
  total = max(float(steps.sum()), 1.0)
  record = {f"train/{k}": float((v * steps).sum() / total) for k, v in m.items()}
  record["train/steps"] = float(steps.sum())
  record["train/padding_waste"] = float(slots.sum() / total)
  per_client = dict(m, steps=steps, **{k: np.asarray(v) for k, v in measured.items()})
  w = np.asarray(weights, np.float64)
  per_client["weight"] = w / w.sum()
  for key, values in per_client.items():
    for name, value in zip(names, values):
      record[f"client/{name}/{key}"] = float(value)
  return record


def flatten_eval(results: dict, global_prefix: str = "eval") -> dict[str, float]:
  """`{kind: {client: {metric: value}}}` -> `{"<prefix>/<client>/<metric>": value}`
  (kinds global, client and unseen: prefixes `global_prefix`, eval_client and
  eval_unseen): the plain metrics (`METRICS`), then any others the evaluation added (the
  re-ranked `*_rr` and query-expanded `*_aqe` ones when configured)."""
  prefixes = {"global": global_prefix, "client": "eval_client", "unseen": "eval_unseen"}
  names = lambda v: [m for m in METRICS if m in v] + [m for m in v if m not in METRICS]
  return {f"{prefixes[kind]}/{name}/{m}": v[m]
          for kind, per_client in results.items() for name, v in per_client.items()
          for m in names(v)}


def best_score(meta_path: str) -> float:
  """The score recorded in an export's `model.json`; -1 when there is none or
  the file is unreadable (a damaged best export is replaced)."""
  if not os.path.exists(meta_path):
    return -1.0
  try:
    with open(meta_path, encoding="utf-8") as f:
      return float(json.load(f).get("score", -1.0))
  except (OSError, ValueError, TypeError, AttributeError) as e:
    logging.warning("%s is unreadable (%s: %s); the next best model replaces it", meta_path,
                    type(e).__name__, e)
    return -1.0


def export_if_best(server, config, workdir: str, round_done: int, results: dict) -> None:
  """Exports the global model to <workdir>/export_best when its mean
  `config.eval.best_metric` over clients beats every earlier evaluation
  (`export_best/model.json` records the score and round)."""
  if "global" not in results:
    return
  metric = config.eval.best_metric
  score = float(np.mean([v[metric] for v in results["global"].values()]))
  folder = os.path.join(workdir, "export_best")
  meta_path = os.path.join(folder, "model.json")
  if best_score(meta_path) >= score:
    return
  export_lib.save(folder, config.model, config.data.image_size,
                  rounds_lib.global_variables(server),
                  {"algorithm": config.fed.algorithm, "round": round_done, "metric": metric,
                   "score": score, "data": config.data.name})
  logging.info("round %d: best mean %s so far (%.1f%%), exported to %s", round_done, metric,
               100 * score, folder)


@contextlib.contextmanager
def disk_full_guard(workdir: str, checkpoints):
  """Turns 'no space left on device' anywhere in the loop into one line that
  says what to do and where the run will resume. That round is read from the
  disk as a rerun reads it (`checkpoint.resume_round`: the newest finished,
  intact checkpoint), once `checkpoints` is closed: a write that finished
  even though its checksums could not be written counts, one that failed
  does not."""
  try:
    yield
  except OSError as e:
    full = checkpoint_lib.full_disk_errors(e)
    if not full:
      raise
    where = next((f.filename for f in full if f.filename), None) or workdir
    try:
      resumes = checkpoint_lib.resume_round(workdir)
    except OSError:  # cannot read the workdir: the newest checkpoint this run finished
      resumes = checkpoints.saved
    raise DiskFull(f"no space left on device while writing {where}; free space and rerun the "
                   f"same command: it resumes from round {resumes}") from e
