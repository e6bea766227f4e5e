"""The loop over rounds: each round, the round itself, then a visible list of
periodic actions run in order (`ACTIONS`):

    train round -> write record -> finite check -> log -> evaluate
                -> export best -> checkpoint -> stop on signal

The round is `state, record = exp.round_fn(state, r)` then the server stages
(`exp.server_fn`); evaluating the global model before a server stage that
changes it (KD) is the loop's decision (`eval.before_kd`), not the round's.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
import tqdm

from fedreid_jax import hosts
from fedreid_jax.errors import Interrupted
from fedreid_jax.round_outputs import export_if_best, flatten_eval


@dataclasses.dataclass
class Loop:
  """What the actions share: the experiment and the run's outputs, and this
  round's values (`round_index`, `record`, `before`: the global model's
  evaluation before the server stages, `evaluated`: this round evaluated)."""
  exp: Any
  config: Any
  workdir: str
  ckpts: Any
  writer: Any
  bar: Any
  stop: Any
  results: dict
  round_index: int = 0
  record: dict = dataclasses.field(default_factory=dict)
  before: dict | None = None
  evaluated: bool = False

  @property
  def number(self) -> int:
    """The round's 1-based number."""
    return self.round_index + 1

  @property
  def last(self) -> bool:
    return self.number == self.config.fed.rounds


def bars_disabled() -> bool | None:
  """tqdm's `disable` for the run's bars: off on processes other than 0, and
  (None) off when the output is not a terminal: in a file (nohup, CI) their
  refreshes would pile up; each round's log line says the same."""
  return True if not hosts.is_main() else None


def steps_per_round(exp, round_index: int) -> int:
  """This host's local steps in the round (its progress bar's total)."""
  return sum(exp.inputs.num_steps(int(c)) for c in exp.selected(round_index) if int(c) in exp.own)


def train_round(loop: Loop) -> None:
  """The round's clients, then (after an evaluation of the global model when
  a server stage is about to change it and `eval.before_kd`) its server stages."""
  exp, r = loop.exp, loop.round_index
  t0 = time.time()
  with tqdm.tqdm(total=steps_per_round(exp, r), desc=f"round {loop.number} local steps",
                 unit="step", leave=False, disable=bars_disabled()) as steps_bar:
    exp.state, record = exp.round_fn(exp.state, r, steps_bar.update)
  loop.before = (exp.evaluate(client_models=False)
                 if exp.server_stages_active(r) and loop.config.eval.before_kd else None)
  exp.state, extra = exp.server_fn(exp.state, r)
  loop.record = {**record, **extra, "train/round_seconds": time.time() - t0}


def write_record(loop: Loop) -> None:
  loop.writer.write(loop.number, "train", loop.record)


def check_finite(loop: Loop) -> None:
  loop.exp.check_finite(loop.round_index, loop.record)


def log_round(loop: Loop) -> None:
  """The rounds bar, and every `log_every` rounds a log line (KD: one more)."""
  record, rounds = loop.record, loop.config.fed.rounds
  loop.bar.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/accuracy']:.2f}")
  loop.bar.update(1)
  if loop.number % loop.config.log_every == 0:
    logging.info("round %d/%d loss %.4f acc %.3f padding x%.2f (%.1fs)", loop.number, rounds,
                 record["train/loss"], record["train/accuracy"],
                 record["train/padding_waste"], record["train/round_seconds"])
  if "kd/loss" in record:
    logging.info("round %d: knowledge distillation, %d public batches, mean MSE %.5f "
                 "(last batch %.5f)", loop.number, record["kd/steps"], record["kd/loss"],
                 record["kd/loss_last"])


def evaluate(loop: Loop) -> None:
  """Every `eval.every_rounds` rounds, at the last, and on rounds evaluated
  before their server stages: the global (and client) models; the last
  round also saves retrieval examples."""
  cfg, before = loop.config, loop.before
  loop.evaluated = loop.number % cfg.eval.every_rounds == 0 or loop.last or before is not None
  if not loop.evaluated:
    return
  loop.results.clear()
  loop.results.update(loop.exp.evaluate(
      cfg.eval.client_models, os.path.join(loop.workdir, "retrieval") if loop.last else None))
  record = flatten_eval(loop.results)
  shown = dict(loop.results)
  if before is not None:
    record.update(flatten_eval({"global": before["global"]}, "eval_before_kd"))
    shown["global before KD"] = before["global"]
  for kind, per_client in shown.items():
    mean_r1 = np.mean([v["rank1"] for v in per_client.values()])
    what = "global model on unseen domains" if kind == "unseen" else f"{kind} models"
    logging.info("round %d eval (%s): mean rank-1 %.1f%%", loop.number, what, 100 * mean_r1)
  loop.writer.write(loop.number, "eval", record)


def export_best(loop: Loop) -> None:
  """After an evaluation, the global model to `export_best` when it is the best so far."""
  if loop.evaluated and hosts.is_main():
    export_if_best(hosts.local_copy(loop.exp.server), loop.config, loop.workdir, loop.number,
                   loop.results)


def checkpoint(loop: Loop) -> None:
  """Every `checkpoint_every` rounds, at the last, and when a stop was asked
  for on any host (written while the next round trains)."""
  stop = loop.stop
  if hosts.any_host(bool(stop.requested)) and not stop.requested:  # a signal elsewhere
    stop.requested = "a stop signal on another host"
  if loop.number % loop.config.checkpoint_every == 0 or loop.last or stop.requested:
    loop.ckpts.save(loop.number, (loop.exp.server, loop.exp.clients))


def stop_on_signal(loop: Loop) -> None:
  """After a stop signal: the round's checkpoint finished, then `Interrupted`."""
  if loop.stop.requested and not loop.last:
    loop.ckpts.finish()  # the message says it is saved
    raise Interrupted(f"stopped by {loop.stop.requested} after round {loop.number} of "
                      f"{loop.config.fed.rounds}; saved a checkpoint of round {loop.number} "
                      f"in {loop.workdir!r}; rerun the same command to resume")


ACTIONS = (write_record, check_finite, log_round, evaluate, export_best, checkpoint,
           stop_on_signal)


def train_rounds(loop: Loop, start: int) -> None:
  """Rounds `start..config.fed.rounds-1`, each trained then passed through
  `ACTIONS`; `loop.results` holds the latest evaluation. The last checkpoint
  may still be in flight on return."""
  for r in range(start, loop.config.fed.rounds):
    loop.round_index = r
    train_round(loop)
    for action in ACTIONS:
      action(loop)
