"""One run per workdir: an exclusive lock held for the run's lifetime.

    with workdir_lock("runs/demo"):
      ...  # a second process on runs/demo gets a one-line WorkdirBusy error

The lock is `fcntl.flock` on `<workdir>/.lock`, which also records the
holder's PID and host. The kernel drops it when the holder exits, however it
exits (kill -9 included), so a lock left by a killed run is taken over at
once. Re-entering the same workdir in the same process is allowed (the
experiment holds it around its runs).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from typing import Iterator

from fedreid_jax.errors import WorkdirBusy

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
