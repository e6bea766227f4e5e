"""One run per workdir: an exclusive lock held for the run's lifetime.

    with workdir_lock("runs/demo"):
      ...  # a second process on runs/demo gets a one-line WorkdirBusy error

The lock is `fcntl.flock` on `<workdir>/.lock`, which also records the
holder's PID and host. The kernel drops it when the holder exits, however it
exits (kill -9 included), so a lock left by a killed run is taken over at
once. Re-entering the same workdir in the same process is allowed (the
experiment holds it around its runs).

Also the workdir's file hygiene: `write_atomic` (temporary name, then
`os.replace`: a kill never leaves half a file), `remove_temporaries` (those a
killed run left), `check_layout` (a file where the run writes a folder, or
the reverse) and `untouched_if_refused` (a launch refused before it starts
leaves the workdir as it found it).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from typing import Iterator

from fedreid_jax.errors import ConfigError, WorkdirBusy

_HELD: dict[str, int] = {}  # realpath -> depth, for re-entry within this process


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/.lock` exclusively, or raises WorkdirBusy naming the holder."""
  key = os.path.realpath(workdir)
  if _HELD.get(key):
    _HELD[key] += 1
    try:
      yield
    finally:
      _HELD[key] -= 1
    return
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirBusy(f"workdir {workdir!r} is in use by {holder}; wait for that run to "
                        "finish or stop it, or pass another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _HELD[key] = 1
    try:
      yield
    finally:
      del _HELD[key]
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


FOLDERS = ("checkpoints", "checksums", "export", "export_best", "retrieval", "tensorboard")
FILES = ("config.json", "metrics.jsonl", "results.json", "run_history.jsonl")


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` under a temporary name (`<path>.tmp`), then renames
  it over `path`: readers see the old file or the new one, never a part. A
  failed write (a full disk) removes its temporary."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb" if isinstance(data, bytes) else "w",
              **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:  # a full disk, a signal: no part of a file is left behind
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def is_temporary(name: str) -> bool:
  """A temporary file name of this project (`*.tmp`, `.tmp-*`)."""
  return name.endswith(".tmp") or name.startswith(".tmp-")


def remove_temporaries(workdir: str) -> list[str]:
  """Deletes the temporary files a killed run left in `workdir` and its
  folders (Orbax's `checkpoints/` excepted: Orbax cleans its own); returns them."""
  removed = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d != "checkpoints"]
    for name in files:
      if is_temporary(name):
        os.remove(os.path.join(root, name))
        removed.append(os.path.relpath(os.path.join(root, name), workdir))
  if removed:
    logging.info("removed %d temporary file(s) left by an interrupted run in %s: %s",
                 len(removed), workdir, ", ".join(sorted(removed)))
  return removed


def check_layout(workdir: str) -> None:
  """Raises ConfigError (one line) when a name the run writes a folder to is a
  file, or a name it writes a file to is a folder."""
  for name, want_dir in [(n, True) for n in FOLDERS] + [(n, False) for n in FILES]:
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != want_dir:
      kind, other = ("a file", "a folder") if want_dir else ("a folder", "a file")
      raise ConfigError(f"{path!r} is {kind}, but a run writes {other} there; move it aside "
                        "and rerun")


def _created_root(path: str) -> str | None:
  """The highest missing folder on the way to `path` (what makedirs would create)."""
  path, top = os.path.abspath(path), None
  while not os.path.exists(path):
    top, path = path, os.path.dirname(path)
  return top


@contextlib.contextmanager
def untouched_if_refused(workdir: str) -> Iterator[None]:
  """On an error, deletes what the launch added to `workdir` when that is only
  its `.lock` and empty folders (a launch refused before it started), and
  the folders it created; a run that wrote anything more is left as it is."""
  created = _created_root(workdir)
  before = set(os.listdir(workdir)) if created is None and os.path.isdir(workdir) else set()
  try:
    yield
  except BaseException:
    if os.path.isdir(workdir):
      _remove_launch_traces(workdir, before, created)
    raise


def _is_empty_tree(path: str) -> bool:
  return os.path.isdir(path) and all(_is_empty_tree(os.path.join(path, n))
                                     for n in os.listdir(path))


def _remove_launch_traces(workdir: str, before: set[str], created: str | None) -> None:
  added = set(os.listdir(workdir)) - before
  if not all(n == ".lock" or _is_empty_tree(os.path.join(workdir, n)) for n in added):
    return
  for name in added:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      for root, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
        os.rmdir(root)
    else:
      os.remove(path)
  if created is None:
    return
  path = os.path.abspath(workdir)
  while ((path == created or path.startswith(created + os.sep)) and os.path.isdir(path)
         and not os.listdir(path)):
    os.rmdir(path)
    path = os.path.dirname(path)
