"""Metrics out: one JSON line per record, TensorBoard event files, log lines."""
from __future__ import annotations

import json
import logging
import math
import os

from tensorboardX import SummaryWriter

from fedreid_jax.errors import ConfigError
from fedreid_jax.workdir import write_atomic


def read_records(path: str) -> tuple[list[str], list[dict]]:
  """(lines, their records) of a JSON-lines file. A last line cut short (a
  kill or a full disk mid-append) is dropped with one warning naming the
  file; an unreadable line before it raises ConfigError (one line)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    elif number == len(lines):
      logging.warning("%s: dropped its last line, cut short (%d characters): the run was "
                      "stopped while writing it", path, len(line.strip()))
      lines.pop()
    else:
      raise ConfigError(f"{path!r} line {number} is not a JSON record; delete that line "
                        "(or the file) and rerun")
  return lines, records


def trim_jsonl(path: str, last_round: int) -> int:
  """Drops records of rounds after `last_round` (written after the checkpoint
  a run resumes from) and a last line cut short; returns how many records
  were dropped. Atomic rewrite."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    raw = f.read()
  lines, records = read_records(path)
  keep = [line for line, record in zip(lines, records) if record.get("round", 0) <= last_round]
  if "".join(keep).encode() != raw:
    write_atomic(path, "".join(keep))
  return len(records) - len(keep)


class MetricWriter:
  """Writes `{"round": r, "kind": k, **scalars}` to metrics.jsonl and TensorBoard.

  `resume_round`: the round a run resumes after; records of later rounds
  (from the interrupted run) are dropped from metrics.jsonl, and TensorBoard
  purges its events from `resume_round + 1` on, so a resumed run's logs equal
  an uninterrupted run's."""

  def __init__(self, workdir: str, resume_round: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    dropped = trim_jsonl(self.path, resume_round)
    if dropped:
      logging.info("dropped %d log records of rounds after %d (not in the checkpoint)",
                   dropped, resume_round)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_round + 1 if resume_round else None)

  def write(self, round_index: int, kind: str, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    bad = [k for k, v in scalars.items() if not math.isfinite(v)]
    if bad:
      logging.warning("round %d: non-finite %s", round_index, ", ".join(bad))
    self._jsonl.write(json.dumps({"round": round_index, "kind": kind, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, round_index)
    self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()


class NullWriter:
  """A MetricWriter that writes nothing (the processes other than 0 of a run
  over several hosts)."""

  def write(self, round_index: int, kind: str, scalars: dict[str, float]) -> None:
    del round_index, kind, scalars

  def close(self) -> None:
    pass
