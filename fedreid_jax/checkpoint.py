"""Orbax checkpoints of the whole federated state, resumable.

PRNG keys are stored as raw key data; a checkpoint from a different config is
refused with a message that names the differing fields.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from fedreid_jax.errors import CheckpointDamaged, CheckpointMismatch

# Config fields that change the shapes or meaning of the saved state.
STATE_FIELDS = ("seed", "data.name", "data.clients", "data.image_size", "data.scenario",
                "data.scenario_clients", "model", "fed.algorithm", "train.batch_size",
                "train.local_epochs", "fed.clients_per_round")


def _field(cfg: dict, dotted: str):
  for key in dotted.split("."):
    cfg = cfg.get(key, {}) if isinstance(cfg, dict) else None
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


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _checksum_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.path.dirname(os.fspath(manager.directory)), "checksums",
                      f"{step}.json")


def file_digests(folder: str) -> dict[str, str]:
  """`{relative path: sha256}` of every file below `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      out[os.path.relpath(path, folder)] = digest.hexdigest()
  return out


def save(manager: ocp.CheckpointManager, round_index: int, state) -> None:
  """Saves `state` (any pytree of arrays) as step `round_index` (rounds done),
  then the sha256 of each of its files (`<workdir>/checksums/<step>.json`)."""
  manager.save(round_index, args=ocp.args.Composite(state=ocp.args.StandardSave(_unkey(state))))
  manager.wait_until_finished()
  path = _checksum_path(manager, round_index)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(file_digests(_step_dir(manager, round_index)), f)
  os.replace(path + ".tmp", path)


def verify(manager: ocp.CheckpointManager, step: int) -> str | None:
  """None when step's files match their recorded checksums, else what is wrong.
  A step saved without checksums (an interrupted save) is checked by Orbax only."""
  path = _checksum_path(manager, step)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    want = json.load(f)
  have = file_digests(_step_dir(manager, step))
  missing = sorted(set(want) - set(have))
  changed = sorted(k for k in want if k in have and have[k] != want[k])
  if missing or changed:
    return (f"{len(missing)} file(s) missing, {len(changed)} changed "
            f"(e.g. {(missing + changed)[0]})")
  return None


def restore_latest(manager: ocp.CheckpointManager, like):
  """(rounds done, state shaped like `like`) from the newest intact checkpoint,
  or (0, like) when there is none. A damaged checkpoint (checksum mismatch,
  missing or unreadable files) is reported in one log line and the previous
  one is tried; nothing of a damaged one is used."""
  steps = sorted(manager.all_steps(), reverse=True)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _unkey(like))
  for step in steps:
    problem = verify(manager, step)
    if problem is None:
      try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # Orbax raises many kinds for a truncated or partial step
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if problem is not None:
      logging.warning("checkpoint of round %d in %s is damaged (%s); trying an older one",
                      step, manager.directory, problem)
      continue
    state = jax.tree.map(lambda ref, x: jax.random.wrap_key_data(x) if _is_key(ref) else x,
                         like, restored.state)
    return int(step), state
  if steps:
    raise CheckpointDamaged(f"every checkpoint in {str(manager.directory)!r} (rounds "
                            f"{sorted(steps)}) is damaged; move that folder aside to start "
                            "over")
  return 0, like


def has_checkpoint(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a saved step (a folder named by a number)."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def load_saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
