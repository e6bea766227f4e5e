"""SIGTERM / SIGINT (Ctrl-C) during training: finish the round, save, exit.

    with StopOnSignal(checkpoints) as stop:
      for r in ...:
        train a round, log, checkpoint
        if stop.requested:
          save; raise errors.Interrupted(...)

The first signal sets `requested` (the loop finishes the round in flight,
saves a checkpoint and stops with a one-line message); a second signal stops
at once with `errors.Interrupted`, losing only the rounds since the last
checkpoint (`checkpoints.saved`, or the write in flight, which the loop's
cleanup finishes). Handlers are installed only in the main thread and
restored on exit.
"""
from __future__ import annotations

import logging
import signal
import threading

from fedreid_jax.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
  """Context manager recording the first stop signal; see the module docstring."""

  def __init__(self, checkpoints):
    self.requested: str | None = None  # the signal's name once one arrived
    self.checkpoints = checkpoints  # `.saved`, `.in_flight`: see `checkpoint.Checkpoints`
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      # a write in flight is finished on the way out (its error, if any, is logged)
      held = self.checkpoints.in_flight or self.checkpoints.saved
      raise Interrupted(f"stopped at once by a second {name}; the latest checkpoint holds "
                        f"{held} rounds; rerun the same command to resume from it")
    self.requested = name
    logging.warning("%s received: finishing this round, then saving a checkpoint and stopping "
                    "(send it again to stop at once)", name)

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
