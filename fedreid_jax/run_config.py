"""The config a workdir's run was started with, and how later launches changed it.

- Fields that change what a run means without changing the state's shapes
  (seed, data, algorithm, batch size) must not change on resume: a launch
  that changes them is refused (`check_meaning`). Shape changes (model, client
  count) are caught from the checkpoint itself (`checkpoint.shape_mismatches`).
- Any other field may change on resume (rounds, logging, evaluation,
  learning rates, strategy, ...); each change is appended to
  `<workdir>/run_history.jsonl` with the round it took effect after
  (`record_changes`), so the workdir says which config held for which rounds.
"""
from __future__ import annotations

import json
import logging
import os
import time

from fedreid_jax.errors import CheckpointMismatch
from fedreid_jax.workdir import write_atomic

MEANING_FIELDS = ("seed", "data.name", "data.clients", "data.scenario", "data.scenario_clients",
                  "data.image_size", "fed.algorithm", "train.batch_size", "cdw.form", "cdw.mode",
                  "kd.mode",
                  # the model's shapes: a checkpoint of another model cannot be restored, so
                  # the launch is refused here, before any data is loaded or model built
                  "model.backbone", "model.width", "model.embed_dim", "model.last_stride",
                  "model.small_stem",
                  "eval.unseen",  # which clients train (docs/evaluation_and_report.md)
                  # the DP mechanism: its accounting is of one noise, clip and sampling
                  "dp.mode", "dp.unit", "dp.images_per_identity", "dp.client_rate",
                  "dp.noise_multiplier", "dp.clip_norm", "dp.target_epsilon")


def flatten(config: dict, prefix: str = "") -> dict:
  """Nested config dict -> `{"fed.rounds": 15, ...}` (lists as lists)."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def changes(saved: dict, now: dict) -> dict[str, list]:
  """`{field: [saved, now]}` for every field that differs."""
  a, b = flatten(saved), flatten(now)
  return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def meaning(config: dict) -> dict:
  """`{field: value}` of the MEANING_FIELDS in a nested config dict (the
  fields stored with each checkpoint, `check_meaning` accepts it as `saved`)."""
  flat = flatten(config)
  return {k: flat[k] for k in MEANING_FIELDS if k in flat}


def rerun_advice(workdir: str) -> str:
  """How to rerun with the config a workdir's checkpoints were trained with."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    return f"rerun with --config {path}"
  return "rerun with the saved values of those fields"


def check_meaning(saved: dict, now: dict, workdir: str) -> None:
  """Refuses a resume that changes a field in MEANING_FIELDS (a field the saved
  config predates counts as unchanged). `saved`: a nested config dict or its
  `meaning`."""
  present = flatten(saved)
  diffs = [f"{k}: saved {v[0]!r} vs now {v[1]!r}" for k, v in changes(saved, now).items()
           if k in MEANING_FIELDS and k in present]
  if diffs:
    raise CheckpointMismatch(
        f"workdir {workdir!r} holds a checkpoint of another config ({'; '.join(diffs)}); "
        f"use a new --workdir, or {rerun_advice(workdir)}")


def complete_lines(path: str) -> str:
  """The text of a JSON-lines file without a last line cut short (a kill
  mid-write; dropped with one warning); "" when there is no file."""
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  head, _, last = text.rstrip("\n").rpartition("\n")
  if not last or text.endswith("\n"):
    return text
  try:
    json.loads(last)
    return text + "\n"
  except ValueError:
    logging.warning("%s: dropped its last line, cut short: the run was stopped while "
                    "writing it", path)
    return head + "\n" if head else ""


def record_changes(workdir: str, saved: dict | None, now: dict, after_round: int) -> dict:
  """Appends the fields changed since `saved` to run_history.jsonl (with the
  round they apply after) and logs them; returns the changes. No `saved`
  config: a start (`"started"`) at round 0; after a checkpoint (`config.json`
  was deleted) a resume whose changes are unknown (`"resumed"`,
  `"config_json_missing"`)."""
  diff = changes(saved, now) if saved is not None else {}
  if saved is None or diff:
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "after_round": after_round}
    if saved is not None:
      entry["changes"] = diff
    elif after_round > 0:
      entry.update(resumed=True, config_json_missing=True)
    else:
      entry["started"] = True
    path = os.path.join(workdir, "run_history.jsonl")
    write_atomic(path, complete_lines(path) + json.dumps(entry) + "\n")
  for key, (old, new) in diff.items():
    logging.info("config changed on resume after round %d: %s %r -> %r", after_round, key,
                 old, new)
  return diff
