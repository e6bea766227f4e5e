"""Where the client state lives during a round, apart from how clients run.

A placement owns the round's layout-dependent steps: selecting the clients
(the broadcast), measuring them after training, and writing them back
(scatter), plus what follows from the layout (which lanes the strategy
runs, the weights' and the record's rows). Two placements:

- `Gathered`: the S selected clients gathered into `[S, ...]`, written back
  into `[C, ...]` after the round (`serial`, `vmap`, `sequential`, `sharded`).
- `Rows`: every client's row stays where it lives, split along the client
  axis over a device mesh and hosts (`devices`); the selected rows change in
  place, unselected ones train no step and weigh 0, each client is measured
  on the device holding it, and nothing is gathered.

Both take the round's per-client measurement batches as `{client: (images
`[B, H, W, 3]`, labels `[B]`)}` of this host's selected clients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.federated import device_queues
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.received_stats import with_received_stats
from fedreid_jax.federated.topology import ONE_PROCESS
from fedreid_jax.federated.tracing import jit_counted


class Gathered:
  """The selected clients gathered into `[S, ...]` (lane i: client `ids[i]`)."""

  def __init__(self, stages, num_clients: int):
    self.stages, self.num_clients = stages, num_clients
    self._restore = jit_counted("restore", lambda lost, clients, ids, trained: (
        params_lib.where_rows(lost, jax.tree.map(lambda x: x[ids], clients), trained)))

  def lanes(self, ids: np.ndarray) -> list[int]:
    """The client each lane of the selected state holds."""
    return [int(c) for c in ids]

  def select(self, server, clients, ids: np.ndarray):
    """The selected clients `[S, ...]` as the server hands them out."""
    return self.stages.broadcast(server, clients, jnp.asarray(ids, jnp.int32))

  def receive_stats(self, received, server, selected, images: dict, ids, order):
    """The reference CDW's in-flight statistics, all selected clients at once."""
    stacked = np.stack([images[int(c)] for c in ids])
    return with_received_stats(selected, received(server, stacked, jnp.asarray(order)))

  def measure(self, before, trained, batches: dict):
    """({name: `[S]`}, trained) of every selected client, measured stacked."""
    ids = list(batches)
    images = np.stack([batches[c][0] for c in ids])
    labels = np.stack([batches[c][1] for c in ids])
    return self.stages.measure(before, trained, images, labels)

  def weights(self, weights, ids):
    return weights

  def first(self, ids: np.ndarray, position: int) -> int:
    """The index in the selected state of the round's `position`-th client."""
    return position

  def restore(self, trained, clients, failed, ids: np.ndarray):
    """`trained` `[S, ...]` with the lanes of the `failed` clients as they were
    in `clients` before the round (their update is lost)."""
    lost = np.array([int(c) in failed for c in ids])
    return self._restore(jnp.asarray(lost), clients, jnp.asarray(ids, jnp.int32), trained)

  def write_back(self, clients, trained, ids: np.ndarray):
    """`clients` `[C, ...]` with the trained selected clients in their rows."""
    return self.stages.scatter(clients, trained, jnp.asarray(ids, jnp.int32))

  def of_selected(self, tree, ids: np.ndarray):
    """Per-lane values `[S]` as the selected clients' (they already are)."""
    return tree


class Rows:
  """Every client's row `[C, ...]` in place over a mesh (and hosts)."""

  def __init__(self, stages, num_clients: int, topology=ONE_PROCESS):
    self.stages, self.num_clients, self.topology = stages, num_clients, topology
    self._take = jit_counted("rows/take", params_lib.take_client)
    self._put = jit_counted("rows/put", params_lib.put_client, donate_argnums=0)
    self._restore = jit_counted("rows/restore", params_lib.where_rows)

  def mask(self, ids: np.ndarray) -> np.ndarray:
    return np.isin(np.arange(self.num_clients), ids)

  def lanes(self, ids: np.ndarray) -> list[int]:
    return list(range(self.num_clients))

  def select(self, server, clients, ids: np.ndarray):
    """Every row, the selected ones ready to train (no gather)."""
    return self.stages.broadcast(server, clients, self.mask(ids))

  def receive_stats(self, received, server, selected, images: dict, ids, order):
    """The reference CDW's statistics, each client's pass on the host holding it."""
    return received.into_rows(server, selected, images, ids, order, self.mask(ids),
                              self.topology)

  def measure(self, before, after, batches: dict):
    """Each client measured on the device holding its row (a host measures the
    clients it holds, possibly none): ({name: `[C]` numpy, every host's;
    unselected rows 0}, after in its layout)."""
    blocks_before = device_queues.row_blocks(before)
    blocks_after = device_queues.row_blocks(after)
    if blocks_before is None or blocks_after is None:
      raise ValueError("measure expects the client state split along its client axis")
    values, measured = {}, {}
    for (device, start, stop, block_after), (_, _, _, block_before) in zip(
        blocks_after, blocks_before):
      for lane in range(start, stop):
        if lane in measured or lane not in batches:  # done, or not selected: row kept
          continue
        images, labels = (jax.device_put(x, device) for x in batches[lane])
        values[lane], measured[lane] = self.stages.measure_one(
            self._take(block_before, lane - start), self._take(block_after, lane - start),
            images, labels)
    names = list(self.stages.measure_names)
    table = np.zeros((len(names), self.num_clients))
    for lane, v in values.items():
      table[:, lane] = [float(v[k]) for k in names]
    table = self.topology.sum_over_hosts(table)
    return dict(zip(names, table)), device_queues.assemble_rows(blocks_after, measured, after,
                                                                self._put)

  def weights(self, weights, ids):
    """Unselected rows weigh 0."""
    return weights * self.mask(ids)

  def first(self, ids: np.ndarray, position: int) -> int:
    return int(ids[position])

  def restore(self, trained, clients, failed, ids: np.ndarray):
    """`trained` `[C, ...]` with the `failed` clients' rows as they were in
    `clients` before the round (their update is lost)."""
    lost = np.isin(np.arange(self.num_clients), sorted(failed))
    return self._restore(jnp.asarray(lost), clients, trained)

  def write_back(self, clients, trained, ids: np.ndarray):
    """The trained rows are the clients (changed in place)."""
    return trained

  def of_selected(self, tree, ids: np.ndarray):
    """Per-row values `[C]` -> the selected clients' `[S]` (numpy)."""
    return jax.tree.map(lambda v: np.asarray(v)[ids], tree)
