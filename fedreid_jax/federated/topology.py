"""Where a run's processes are, as the federated core sees them: one object
holding the collectives the core needs, so the core never imports `hosts`.

    topology.sum_over_hosts(values)  # every process's float64 values, summed
    topology.to_host(tree)           # numpy copies, also of arrays over hosts
    topology.local_copy(tree)        # this host's first copy of a replicated tree

`OneProcess` is one process with any number of its devices; the run passes
`hosts.HostTopology()` over several hosts. Tests pass fakes (two simulated
hosts in one process).
"""
from __future__ import annotations

from typing import Protocol

import jax
import numpy as np

from fedreid_jax.arrays import first_replica


class Topology(Protocol):
  def sum_over_hosts(self, values: np.ndarray) -> np.ndarray: ...

  def to_host(self, tree): ...

  def local_copy(self, tree): ...


class OneProcess:
  """A single process: a sum over hosts is the values themselves."""

  def sum_over_hosts(self, values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, np.float64)

  def to_host(self, tree):
    return jax.tree.map(np.asarray, tree)

  def local_copy(self, tree):
    return first_replica(tree)


ONE_PROCESS = OneProcess()
