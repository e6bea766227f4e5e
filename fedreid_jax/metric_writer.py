"""Metrics out: one JSON line per record, TensorBoard event files, log lines."""
from __future__ import annotations

import json
import logging
import math
import os

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes `{"round": r, "kind": k, **scalars}` to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.path, "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
