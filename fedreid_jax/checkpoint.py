"""Orbax checkpoints of the whole federated state, resumable.

PRNG keys are stored as raw key data; a checkpoint from a different config is
refused with a message that names the differing fields.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from fedreid_jax.errors import CheckpointMismatch

# Config fields that change the shapes or meaning of the saved state.
STATE_FIELDS = ("seed", "data.name", "data.clients", "data.image_size", "data.scenario",
                "data.scenario_clients", "model", "fed.algorithm", "train.batch_size",
                "train.local_epochs", "fed.clients_per_round")
# `model` fields that change how the state is computed, not its shapes or
# meaning (float32 params either way): a run may resume with other values.
RUNTIME_MODEL_FIELDS = ("conv_impl", "dtype")


def _field(cfg: dict, dotted: str):
  for key in dotted.split("."):
    cfg = cfg.get(key, {}) if isinstance(cfg, dict) else None
  if dotted == "model" and isinstance(cfg, dict):
    cfg = {k: v for k, v in cfg.items() if k not in RUNTIME_MODEL_FIELDS}
  return cfg


def check_compatible(saved_config: dict, config: dict, workdir: str) -> None:
  diffs = [f"{f}: saved {_field(saved_config, f)!r} vs now {_field(config, f)!r}"
           for f in STATE_FIELDS if _field(saved_config, f) != _field(config, f)]
  if diffs:
    raise CheckpointMismatch(
        f"workdir {workdir!r} holds a checkpoint of another config ({'; '.join(diffs)}); "
        "use a new --workdir, or rerun with the saved config.json")


def make_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=("state",))


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unkey(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def save(manager: ocp.CheckpointManager, round_index: int, state) -> None:
  """Saves `state` (any pytree of arrays) as step `round_index` (rounds done)."""
  manager.save(round_index, args=ocp.args.Composite(state=ocp.args.StandardSave(_unkey(state))))
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, like):
  """(rounds done, state shaped like `like`) or (0, like) when there is none."""
  step = manager.latest_step()
  if step is None:
    return 0, like
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _unkey(like))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  state = jax.tree.map(lambda ref, x: jax.random.wrap_key_data(x) if _is_key(ref) else x,
                       like, restored.state)
  return int(step), state


def load_saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
