"""Failing and slow clients, seeded per round (FedProx's setting).

    plan = round_failures(seed, round_index, ids, num_steps, dropout=0.2,
                          straggler_fraction=0.3, straggler_steps=0.5)
    plan.steps   # {client: local steps it runs this round}
    plan.failed  # clients whose update is lost (weight 0, state as before the round)

- dropout: `round(dropout * S)` of the S selected clients fail mid-round,
  each after a uniform share of its steps (at least one): the work is done,
  nothing of it survives (its state stays as it was before the round, its
  aggregation weight is 0).
- stragglers: `round(straggler_fraction * S')` of the S' clients that do not
  fail complete only `ceil(straggler_steps * n)` of their n local steps
  (at least one); their partial update counts as usual.

The draws depend only on (seed, round, selected ids), never on the strategy,
the devices or a resume: every strategy sees the same failures.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from fedreid_jax.errors import ConfigError


class RoundFailures(NamedTuple):
  steps: dict  # {client: local steps run this round}
  failed: frozenset  # clients whose update is lost
  stragglers: frozenset  # clients that stop early but deliver


def active(fed_cfg) -> bool:
  """Whether the config makes any client fail or straggle."""
  given = settings(fed_cfg)
  return given["dropout"] > 0 or given["straggler_fraction"] > 0


def record(plan: RoundFailures, names: Sequence[str], ids: Sequence[int]) -> dict[str, float]:
  """The round record's entries: how many failed and straggled, and which."""
  out = {"train/failed": float(len(plan.failed)), "train/stragglers": float(len(plan.stragglers))}
  for name, c in zip(names, ids):
    out[f"client/{name}/failed"] = float(int(c) in plan.failed)
    out[f"client/{name}/straggler"] = float(int(c) in plan.stragglers)
  return out


def num_failing(dropout: float, num_selected: int) -> int:
  """How many of `num_selected` clients fail each round."""
  return int(math.floor(dropout * num_selected + 0.5))


def settings(fed_cfg) -> dict:
  """`round_failures`' keywords from `config.fed` (absent in older configs: off)."""
  return {"dropout": fed_cfg.get("dropout", 0.0),
          "straggler_fraction": fed_cfg.get("straggler_fraction", 0.0),
          "straggler_steps": fed_cfg.get("straggler_steps", 1.0)}


def check(dropout: float, straggler_fraction: float, straggler_steps: float,
          num_selected: int | None = None) -> None:
  """ConfigError (one line) for values out of range or, given the round's
  `num_selected`, a dropout that fails every selected client of a round."""
  for name, value in (("dropout", dropout), ("straggler_fraction", straggler_fraction),
                      ("straggler_steps", straggler_steps)):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config.fed.{name}={value!r} must be a number")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"config.fed.dropout={dropout!r} must be in [0, 1) (a fraction of the "
                      "selected clients that fail each round)")
  if not 0.0 <= straggler_fraction <= 1.0:
    raise ConfigError(f"config.fed.straggler_fraction={straggler_fraction!r} must be in [0, 1]")
  if not 0.0 < straggler_steps <= 1.0:
    raise ConfigError(f"config.fed.straggler_steps={straggler_steps!r} must be in (0, 1] (the "
                      "share of its local steps a straggler completes)")
  if num_selected is not None and num_failing(dropout, num_selected) >= num_selected:
    top = (num_selected - 0.5) / num_selected
    raise ConfigError(f"config.fed.dropout={dropout} fails all {num_selected} selected clients "
                      f"of a round; keep it below {top:.3f} or select more clients "
                      "(config.fed.clients_per_round)")


def round_failures(seed: int, round_index: int, ids: Sequence[int], num_steps: Sequence[int],
                   dropout: float = 0.0, straggler_fraction: float = 0.0,
                   straggler_steps: float = 1.0) -> RoundFailures:
  """This round's failures and stragglers among the selected `ids` (sorted),
  `num_steps[i]`: client `ids[i]`'s full local steps."""
  ids = [int(c) for c in ids]
  steps = dict(zip(ids, (int(n) for n in num_steps)))
  rng = np.random.default_rng([seed, round_index, 0xFA11])
  failed = sorted(rng.choice(ids, size=num_failing(dropout, len(ids)), replace=False).tolist())
  for c, share in zip(failed, rng.uniform(size=len(failed))):
    steps[c] = max(1, int(share * steps[c]))
  alive = [c for c in ids if c not in failed]
  slow_rng = np.random.default_rng([seed, round_index, 0x5109])
  count = int(math.floor(straggler_fraction * len(alive) + 0.5))
  slow = sorted(slow_rng.choice(alive, size=count, replace=False).tolist()) if count else []
  for c in slow:
    steps[c] = max(1, math.ceil(straggler_steps * steps[c]))
  return RoundFailures(steps, frozenset(failed), frozenset(slow))


def truncated(stream: Iterator, steps: int, total: int) -> Iterator:
  """The first `steps` batches of a stream of `total`; the rest is read and
  dropped with the last one, so a consumer reading clients in order (one
  loader for the run) finds the next client where it expects it."""
  for i in range(steps):
    batch = next(stream)
    if i == steps - 1:
      for _ in range(total - steps):
        next(stream)
    yield batch
