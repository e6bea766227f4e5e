"""Orbax checkpoints of the whole federated state, resumable.

PRNG keys are stored as raw key data. Whether a checkpoint fits is derived
from the state itself: a saved state whose arrays differ in number, shape or
dtype from the current config's is refused (`CheckpointMismatch`, naming the
first differing array); fields that change a run's meaning without changing
shapes are checked by `run_config`. Each checkpoint's files are hashed on
save and verified before a restore; a damaged one falls back to the previous.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from fedreid_jax import hosts
from fedreid_jax.errors import CheckpointDamaged, CheckpointMismatch

def _plain(tree):
  """NamedTuples as dicts of their fields (how Orbax stores them), recursively."""
  if hasattr(tree, "_fields"):
    return {f: _plain(getattr(tree, f)) for f in tree._fields}
  if isinstance(tree, dict):
    return {k: _plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_plain(v) for v in tree)
  return tree


def _arrays(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatches(manager: ocp.CheckpointManager, step: int, like) -> list[str]:
  """How the saved state's arrays differ from `like`'s (empty when they fit):
  missing or extra arrays and differing shapes/dtypes, by tree path."""
  saved = _arrays(manager.item_metadata(step)["state"])
  now = _arrays(_plain(_unkey(like)))
  out = [f"{k}: saved {saved[k][0]} {saved[k][1]} vs now {now[k][0]} {now[k][1]}"
         for k in now if k in saved and saved[k] != now[k]]
  out += [f"{k}: not in the checkpoint" for k in now if k not in saved]
  out += [f"{k}: in the checkpoint only" for k in saved if k not in now]
  return out


def make_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=("state",), item_handlers={"state": ocp.StandardCheckpointHandler()})


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
  hosts.barrier(f"checkpoint {round_index} written")  # several hosts: every shard is on disk
  if hosts.is_main():
    path = _checksum_path(manager, round_index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(file_digests(_step_dir(manager, round_index)), f)
    os.replace(path + ".tmp", path)
  hosts.barrier(f"checkpoint {round_index} hashed")


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
        mismatches = shape_mismatches(manager, step, like)
      except Exception as e:  # unreadable metadata: a damaged checkpoint
        problem, mismatches = f"{type(e).__name__} reading its metadata", []
      if mismatches:
        raise CheckpointMismatch(
            f"{str(manager.directory)!r} holds a checkpoint (round {step}) of another model "
            f"or client set: {len(mismatches)} array(s) differ, e.g. {mismatches[0]}; use a "
            "new --workdir, or rerun with the saved config.json")
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
