"""Compile-once bookkeeping: every compiled function of a round counts its traces.

Tests assert that a run traces each function once, however many rounds it
trains (a retrace means a shape or a Python value leaked into a signature).
"""
from __future__ import annotations

import collections
import functools
from typing import Callable

import jax

TRACE_COUNTS: collections.Counter = collections.Counter()


def jit_counted(name: str, fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fn)` that adds 1 to `TRACE_COUNTS[name]` each time it is traced."""
  @functools.wraps(fn)
  def counted(*args, **kwargs):
    TRACE_COUNTS[name] += 1
    return fn(*args, **kwargs)
  return jax.jit(counted, **jit_kwargs)
