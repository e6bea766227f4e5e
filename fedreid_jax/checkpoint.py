"""Orbax checkpoints of the whole federated state, resumable.

PRNG keys are stored as raw key data. Whether a checkpoint fits is derived
from the state itself: a saved state whose arrays differ in number, shape or
dtype from the current config's is refused (`CheckpointMismatch`, naming the
first differing array); fields that change a run's meaning without changing
shapes are checked by `run_config`, against `config.json` or, where that is
missing, against those fields as stored with each checkpoint
(`checksums/<step>.meaning.json`). Each checkpoint's files are hashed once
written and verified before a restore; a damaged one falls back to the
previous. An unreadable checksums file is reported in one line and its step
is checked by Orbax's restore alone (then hashed again). `Checkpoints`
writes in the background (Orbax's async save) and, on one host, hashes the
finished write in a thread of its own: the loop waits only for the copy to
host memory.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time

import jax
import orbax.checkpoint as ocp

from fedreid_jax import hosts, run_config
from fedreid_jax.errors import CheckpointDamaged, CheckpointMismatch, ConfigError
from fedreid_jax.workdir import write_atomic

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


def make_manager(workdir: str, max_to_keep: int = 2, on_written=None) -> ocp.CheckpointManager:
  """Orbax's manager of `<workdir>/checkpoints`, saving asynchronously;
  `on_written()` runs in Orbax's thread once a write has finished."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
          async_options=ocp.AsyncOptions(post_finalization_callback=on_written)),
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


def meaning_path(workdir: str, step: int) -> str:
  """Where the config fields a resume must match are stored for `step`."""
  return os.path.join(workdir, "checksums", f"{step}.meaning.json")


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


def start_save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Starts writing `state` (any pytree of arrays) as `step`; returns once
  Orbax has copied it to host memory (the arrays may then change or be
  donated). Any earlier checksums of `step` (a step of an earlier run,
  removed as damaged) are deleted first."""
  if hosts.is_main() and os.path.exists(_checksum_path(manager, step)):
    os.remove(_checksum_path(manager, step))
  with full_disk_as_oserror(_step_dir(manager, step)):
    started = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_unkey(state))))
  if not started:  # Orbax skips a step not above its latest: nothing must be hashed
    raise RuntimeError(f"Orbax skipped saving step {step} (latest {manager.latest_step()})")


def wait_written(manager: ocp.CheckpointManager, step: int) -> None:
  """Blocks until the write in flight (`step`) has finished; raises its error,
  a full disk as OSError(ENOSPC)."""
  with full_disk_as_oserror(_step_dir(manager, step)):
    manager.wait_until_finished()


def write_checksums(manager: ocp.CheckpointManager, step: int,
                    digests: dict[str, str] | None = None) -> None:
  """Process 0 writes the sha256 of each of finished `step`'s files
  (`<workdir>/checksums/<step>.json`; `digests`: already computed, else hashed
  now) once every process has written its part. Collective: every process
  calls it."""
  hosts.barrier(f"checkpoint {step} written")  # several hosts: every shard is on disk
  if hosts.is_main():
    path = _checksum_path(manager, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if digests is None:
      digests = file_digests(_step_dir(manager, step))
    write_atomic(path, json.dumps(digests))
  hosts.barrier(f"checkpoint {step} hashed")


def write_meaning(workdir: str, step: int, meaning: dict) -> None:
  """Stores `meaning` (the config fields a resume must match) with `step`."""
  path = meaning_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_atomic(path, json.dumps(meaning, sort_keys=True))


def saved_meaning(workdir: str) -> dict | None:
  """The stored config fields of the newest checkpoint that has them, or None."""
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted((int(n) for n in os.listdir(folder) if n.isdigit()), reverse=True) \
      if os.path.isdir(folder) else []
  for step in steps:
    path = meaning_path(workdir, step)
    if not os.path.exists(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        meaning = json.load(f)
      if isinstance(meaning, dict):
        return meaning
    except (OSError, ValueError):
      pass
    logging.warning("%s is unreadable; ignored", path)
  return None


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoints in `<workdir>/checkpoints` (folders named by a
  number: Orbax writes under a temporary name and renames once finished)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n)))


def remove_orphan_checksums(workdir: str) -> list[str]:
  """Deletes `checksums/<step>.json` and `<step>.meaning.json` of steps that no
  longer exist (pruned by Orbax, `checkpoint_keep`, or removed by hand);
  returns their names. Call it with no write in flight (its step has none yet)."""
  folder = os.path.join(workdir, "checksums")
  if not os.path.isdir(folder):
    return []
  steps, removed = set(saved_steps(workdir)), []
  for name in os.listdir(folder):
    step = name.split(".", 1)[0]
    if (step.isdigit() and int(step) not in steps
        and name in (f"{step}.json", f"{step}.meaning.json")):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, name))
      removed.append(name)
  return sorted(removed)


def resume_round(workdir: str) -> int:
  """The round a rerun resumes from, as `restore_latest` will choose it: the
  newest finished checkpoint whose files match their checksums (one without
  readable checksums counts as intact: Orbax checks it); 0 when there is none."""
  for step in reversed(saved_steps(workdir)):
    want, _ = _load_checksums(os.path.join(workdir, "checksums", f"{step}.json"))
    if want is None:
      return step
    try:
      have = file_digests(os.path.join(workdir, "checkpoints", str(step)))
    except OSError:
      continue
    if all(have.get(k) == v for k, v in want.items()):
      return step
  return 0


class BackgroundHash:
  """One host: a thread that waits for `step`'s write to finish, then hashes
  its files, while training goes on. `result()` joins it and returns the
  digests, or raises its error. The caller waits for the write itself first,
  which raises a write's error in the caller's thread (Orbax raises it once
  in each waiting thread); what `result()` raises after that is the hashing's."""

  def __init__(self, manager: ocp.CheckpointManager, step: int):
    self.digests, self.error, self.seconds = None, None, 0.0
    self._thread = threading.Thread(target=self._run, args=(manager, step), daemon=True,
                                    name=f"checkpoint-{step}-hash")
    self._thread.start()

  def _run(self, manager: ocp.CheckpointManager, step: int) -> None:
    try:
      wait_written(manager, step)
      begin = time.perf_counter()
      self.digests = file_digests(_step_dir(manager, step))
      self.seconds = time.perf_counter() - begin
    except BaseException as e:  # re-raised in the training thread by result()
      self.error = e

  def result(self) -> dict[str, str]:
    self._thread.join()
    if self.error is not None:
      raise self.error
    return self.digests


def full_disk_errors(e: BaseException | None) -> list[OSError]:
  """The OSError(ENOSPC)s in `e`'s chain of causes and contexts, outermost first."""
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      out.append(e)
    e = e.__cause__ or e.__context__
  return out


@contextlib.contextmanager
def full_disk_as_oserror(path: str):
  """Tensorstore reports a full disk as a ValueError naming OS error 28; this
  re-raises it as OSError(ENOSPC, path), which `disk_full_guard` explains."""
  try:
    yield
  except ValueError as e:
    if "os_error_code='28'" in str(e) or "No space left on device" in str(e):
      raise OSError(errno.ENOSPC, "No space left on device", path) from e
    raise


class Checkpoints:
  """A workdir's checkpoints, each written in the background while training goes on.

  `save` returns once Orbax has copied the state to host memory (the next
  round may donate or change it) and first finishes the previous write. A
  step is hashed only once its write has finished: in the next `save`, in
  `finish` or in `close`. `saved` is the newest finished step (the restored
  one at first), `in_flight` the one being written. A write's error (a full
  disk: OSError ENOSPC) is raised by the call that finishes it. On several
  hosts every process calls `save` and `finish` at the same points (their
  barriers are collective)."""

  def __init__(self, workdir: str, keep: int = 2, meaning: dict | None = None):
    self.manager = make_manager(workdir, keep, on_written=self._on_written)
    self.workdir, self.meaning = workdir, meaning  # stored with each finished step
    self.saved, self.in_flight = 0, None
    self._times = {}  # the write in flight: start, copy seconds, written-at
    self._hash: BackgroundHash | None = None  # one host: the write in flight's hashing

  def _on_written(self) -> None:  # Orbax's thread, once the write has finished
    self._times["written"] = time.perf_counter()

  def restore_latest(self, like):
    """`restore_latest` after finishing any write in flight; sets `saved`; deletes
    the checksums of steps that no longer exist."""
    self.finish()
    self.saved, state = restore_latest(self.manager, like)
    if hosts.is_main():  # left by an earlier version or a kill between a prune and this
      remove_orphan_checksums(self.workdir)
    return self.saved, state

  def save(self, step: int, state) -> None:
    """Finishes the previous write, then starts writing `state` as `step`
    (on one host, hashed in a background thread once written)."""
    self.finish()
    self._times = {"start": time.perf_counter()}
    start_save(self.manager, step, state)
    self.in_flight = step
    self._times["copy"] = time.perf_counter() - self._times["start"]
    if not hosts.is_multihost():
      self._hash = BackgroundHash(self.manager, step)

  def finish(self) -> None:
    """Waits for the write in flight and its hashing, then records the checksums
    (collective; on several hosts process 0 hashes here, after a barrier)."""
    step = self.in_flight
    if step is None:
      return
    background, self._hash = self._hash, None
    begin = time.perf_counter()
    try:
      # the write's error is raised here even when the hashing thread saw it first:
      # Orbax raises it once in each thread that waits
      wait_written(self.manager, step)
    finally:
      self.in_flight = None  # failed or finished: never hashed later
    self.saved = step  # on disk: a rerun resumes from it even if what follows fails
    digests, unhashed = None, None
    if background is not None:
      try:
        digests = background.result()
      except Exception as e:  # the write itself finished: keep the step, without checksums
        unhashed = e
    waited = time.perf_counter() - begin
    if self.meaning is not None and hosts.is_main():
      write_meaning(self.workdir, step, self.meaning)
    if unhashed is None:
      write_checksums(self.manager, step, digests)
    else:
      logging.warning("checkpoint of round %d was written but could not be hashed (%s: %s); "
                      "it is kept without checksums (a restore checks it with Orbax only)",
                      step, type(unhashed).__name__, unhashed)
    if hosts.is_main():
      remove_orphan_checksums(self.workdir)  # of the steps Orbax pruned (checkpoint_keep)
    hashed = time.perf_counter() - begin - waited
    t = self._times
    written = t.get("written", begin + waited) - t["start"]
    hashing = background is not None
    parts = ("end of the write and its hashing %.2f s, checksum file %.2f s" if hashing
             else "end of the write %.2f s, checksums %.2f s")
    logging.info("checkpoint of round %d: training waited %.2f s (copy to host %.2f s, "
                 + parts + "); written in %.2f s"
                 + (", hashed in the background in %.2f s" % background.seconds
                    if hashing else ""),
                 step, t["copy"] + waited + hashed, t["copy"], waited, hashed, written)

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(failed=exc_type is not None, error=exc)

  def close(self, failed: bool = False, error: BaseException | None = None) -> None:
    """Finishes the write in flight and closes the manager. After an error
    (`failed`) on several hosts, possibly one host's, the write is only
    waited for (by Orbax), without checksums: their barriers could hang. After
    an error on one host, a failing write is logged, not raised: the error
    that ended the run is the one reported. When both are a full disk, that
    log record is marked `console=False` (the CLI writes it to errors.log
    only: the run's one line already says where it resumes)."""
    try:
      if failed and hosts.is_multihost():
        self.in_flight = None  # (no BackgroundHash on several hosts)
      elif failed:
        step = self.in_flight
        try:
          self.finish()
        except Exception as e:  # the run's own error propagates
          logging.error("the checkpoint write of round %s failed too (%s: %s); the latest "
                        "intact checkpoint holds round %d", step, type(e).__name__, e,
                        self.saved, extra={"console": not (full_disk_errors(e) and
                                                           full_disk_errors(error))})
      else:
        self.finish()
    finally:
      self.manager.close()


def _load_checksums(path: str) -> tuple[dict | None, str | None]:
  """(checksums, None) from `path`, (None, what is wrong) when unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      want = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not text
    return None, f"{type(e).__name__}: {e}"
  if isinstance(want, dict) and all(isinstance(v, str) for v in want.values()):
    return want, None
  return None, "not a table of checksums"


def read_checksums(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """`step`'s recorded checksums; None when there are none or their file is
  unreadable (reported in one line: the step is then checked by Orbax alone)."""
  path = _checksum_path(manager, step)
  if not os.path.exists(path):
    return None
  want, problem = _load_checksums(path)
  if problem is not None:
    logging.warning("checksums file %s is unreadable (%s); checking the checkpoint of round "
                    "%d by restoring it instead", path, problem, step)
  return want


def checksums_unreadable(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` has a checksums file that `read_checksums` cannot use."""
  path = _checksum_path(manager, step)
  return os.path.exists(path) and _load_checksums(path)[1] is not None


def verify(manager: ocp.CheckpointManager, step: int) -> str | None:
  """None when step's files match their recorded checksums, else what is wrong.
  A step saved without checksums (an interrupted save) or whose checksums file
  is unreadable is checked by Orbax only."""
  want = read_checksums(manager, step)
  if want is None:
    return None
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
  one is tried; nothing of a damaged one is used. Once an older one is
  restored, the damaged newer ones are deleted (their rounds are trained and
  saved again; Orbax would skip saving a step it still lists)."""
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _unkey(like))
  for step in steps:
    rehash = checksums_unreadable(manager, step)
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
            f"new --workdir, or {run_config.rerun_advice(os.path.dirname(str(manager.directory)))}")
    if problem is None:
      try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # Orbax raises many kinds for a truncated or partial step
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if problem is not None:
      logging.warning("checkpoint of round %d in %s is damaged (%s); trying an older one",
                      step, manager.directory, problem)
      damaged.append(step)
      continue
    _delete_damaged(manager, damaged)
    if rehash and hosts.is_main():  # restored intact: its files get checksums again
      write_atomic(_checksum_path(manager, step),
                   json.dumps(file_digests(_step_dir(manager, step))))
    state = jax.tree.map(lambda ref, x: jax.random.wrap_key_data(x) if _is_key(ref) else x,
                         like, restored.state)
    return int(step), state
  if steps:
    raise CheckpointDamaged(f"every checkpoint in {str(manager.directory)!r} (rounds "
                            f"{sorted(steps)}) is damaged; move that folder aside to start "
                            "over")
  return 0, like


def _delete_damaged(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Deletes damaged `steps` (collective on several hosts) and their checksums."""
  for step in steps:
    manager.delete(step)
    if hosts.is_main() and os.path.exists(_checksum_path(manager, step)):
      os.remove(_checksum_path(manager, step))
  if steps:
    logging.warning("deleted the damaged checkpoint(s) of round(s) %s; those rounds are "
                    "trained again", ", ".join(map(str, steps)))


def has_checkpoint(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a saved step (a folder named by a number)."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def load_saved_config(workdir: str) -> dict | None:
  """The workdir's `config.json` as a dict, None when there is none; a damaged
  one raises ConfigError (one line: which file, what to do)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not text
    problem = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
    saved = None
  else:
    problem = None if isinstance(saved, dict) else f"a JSON {type(saved).__name__}"
  if problem is not None:
    raise ConfigError(f"{path!r} is damaged ({problem}); delete it and rerun: a resume is "
                      "checked against the config fields stored with the checkpoints, and "
                      "the run writes config.json again")
  return saved
