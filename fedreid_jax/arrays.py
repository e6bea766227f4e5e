"""Array helpers below every other part (hosts, the federated core)."""
from __future__ import annotations

import jax


def first_replica(tree):
  """`tree` with every array replicated over several devices (of this host or
  of several) replaced by this host's first copy, on one device: for
  computations of one model on one device (evaluation, exports; a model
  replicated over a mesh would otherwise run every batch on every device).
  Arrays on one device are kept."""
  def one(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      shard = x.addressable_shards[0]
      if shard.data.shape != x.shape:
        raise ValueError(f"an array of shape {x.shape} is split over devices, not replicated")
      return shard.data
    return x
  return jax.tree.map(one, tree)
