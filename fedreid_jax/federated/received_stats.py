"""The reference CDW's received statistics: in the reference, each client's
CDW pass over the received global model updates that model's BatchNorm
running statistics in place, so a client receives statistics changed by the
clients measured before it in the round's order (`cdw.received_stats`,
`cdw.chain_stats`). This holds them for the stacked selected clients, or
client by client on the host holding each (a split state, several hosts)."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedreid_jax.federated import cdw as cdw_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.tracing import jit_counted


class ReceivedStats:
  """The reference CDW's received statistics (`cdw.received_stats`): for a
  stacked batch of the selected clients, or client by client on the host that
  holds each (a split state, several hosts). Both draw client i's pass from
  `split(fold_in(server.rng, server.round), S)[i]`, i its position in the round."""

  def __init__(self, model, train_cfg):
    key = lambda server: jax.random.fold_in(server.rng, server.round)
    self._stacked = jit_counted("received_stats", lambda server, images, order: (
        cdw_lib.received_stats(model, server.params, server.batch_stats, images, order,
                               train_cfg, key(server))))
    self._one = jit_counted("received_stats/one", lambda server, images, position, num: (
        cdw_lib.stat_contribution(model, server.params, server.batch_stats, images,
                                  jax.random.split(key(server), num)[position], train_cfg)),
                            static_argnums=3)
    self._chain = jit_counted("received_stats/chain", lambda server, contributions, order: (
        cdw_lib.chain_stats(server.batch_stats, contributions, order)))
    self._rows = jit_counted("received_stats/rows", merge_received_rows)

  def __call__(self, server, images: jax.Array, order: jax.Array):
    """images `[S, B, H, W, 3]` of the S selected clients, order `[S]` -> stats `[S, ...]`."""
    return self._stacked(server, images, order)

  def into_rows(self, server, selected, images: dict[int, jax.Array], ids: np.ndarray,
                order: np.ndarray, mask: np.ndarray, topology):
    """`selected` (every client's row `[C, ...]`, maybe split over hosts) with
    the selected clients' received statistics. `images`: {client: its CDW batch}
    of this host's selected clients; `ids` `[S]` the selected clients, `order`
    `[S]` positions in `ids`, `mask` `[C]`. Each pass runs on this host (all
    processes call this together; the contributions are summed over hosts by
    `topology`, a `topology.Topology`)."""
    local = topology.local_copy(server)
    position = {int(c): i for i, c in enumerate(ids)}
    like = jax.eval_shape(lambda s: s.batch_stats, local)
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(like)]
    table = np.zeros((len(ids), sum(sizes)))  # a row per selected client, flattened
    for client, batch in images.items():
      out = self._one(local, batch, position[client], len(ids))
      table[position[client]] = np.concatenate(
          [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(out)])
    table = topology.sum_over_hosts(table)
    parts = np.split(table, np.cumsum(sizes)[:-1], axis=1)
    contributions = jax.tree.unflatten(jax.tree.structure(like), [
        p.reshape(len(ids), *x.shape).astype(x.dtype) for p, x in zip(parts, jax.tree.leaves(like))])
    stats = jax.tree.map(np.asarray, self._chain(local, contributions, jnp.asarray(order)))
    row_position = np.array([position.get(c, 0) for c in range(mask.shape[0])], np.int32)
    return self._rows(selected, stats, row_position, mask)


def merge_received_rows(selected, stats, row_position: jax.Array, mask: jax.Array):
  """Rows of `selected` `[C, ...]` where `mask` get `stats[row_position]`
  (`stats` `[S, ...]`, the shared BatchNorm statistics); the others keep theirs."""
  old = traverse_util.flatten_dict(flax.core.unfreeze(selected.batch_stats))
  new = traverse_util.flatten_dict(flax.core.unfreeze(stats))
  return with_received_stats(selected, traverse_util.unflatten_dict(params_lib.where_rows(
      mask, {path: x[row_position] for path, x in new.items()},
      {path: old[path] for path in new})))


def with_received_stats(selected, stats):
  """The selected clients `[S, ...]` with the shared BatchNorm statistics
  `stats` `[S, ...]` (the reference CDW's per-client received statistics)."""
  return selected._replace(batch_stats=params_lib.merge_trees(selected.batch_stats, stats))
