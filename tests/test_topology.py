"""Multi-host logic in one process: the `Rows` placement's measurement and the
reference CDW's received statistics with a fake two-host topology (each
"host" passes only the clients it holds; the sum over hosts is simulated)
equal one process holding every client."""
import jax
import jax.numpy as jnp
import numpy as np

import fakes
from fedreid_jax import train
from fedreid_jax.federated import placement, rounds, sampling


class SendingHost:
  """Host B: records what it contributes to each sum over hosts."""

  def __init__(self):
    self.sent = []

  def sum_over_hosts(self, values):
    self.sent.append(np.array(values, np.float64))
    return np.asarray(values, np.float64)

  def local_copy(self, tree):
    return tree


class ReceivingHost:
  """Host A: each sum over hosts adds what host B contributed to the same call."""

  def __init__(self, other: SendingHost):
    self.pending = list(other.sent)

  def sum_over_hosts(self, values):
    return np.asarray(values, np.float64) + self.pending.pop(0)

  def local_copy(self, tree):
    return tree


def copy(tree):
  return jax.tree.map(jnp.copy, tree)  # the placement donates the rows it writes


def test_two_fake_hosts_measure_and_receive_like_one_process():
  cfg = fakes.tiny_config(**{"fed.algorithm": "fedpav_cdw", "cdw.mode": "reference"})
  exp = train.Experiment(cfg, fakes.fake_clients())
  server, clients = exp.state
  # the stages of a client state kept in rows (here all on one device)
  stages = rounds.make_round_stages(exp.algorithm, exp.tx, every_client_sharding=(
      jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  ids = np.arange(3)
  order = sampling.round_order(cfg.seed, 0, 3)
  batches = exp.measurement_batches([0, 1, 2], 0)
  images = {c: b[0] for c, b in batches.items()}
  held = {"A": [0, 1], "B": [2]}

  def run(rows, clients_held):
    sel = rows.select(server, copy(clients), ids)
    received = rows.receive_stats(exp.received_stats, server, sel,
                                  {c: images[c] for c in clients_held}, ids, order)
    values, after = rows.measure(copy(received), copy(clients),
                                 {c: batches[c] for c in clients_held})
    return received, values, after

  want = run(placement.Rows(stages, 3), [0, 1, 2])
  host_b = SendingHost()
  run(placement.Rows(stages, 3, host_b), held["B"])
  got = run(placement.Rows(stages, 3, ReceivingHost(host_b)), held["A"])
  assert len(host_b.sent) == 2  # the statistics table, then the measurements
  for x, y in zip(jax.tree.leaves(want[0].batch_stats), jax.tree.leaves(got[0].batch_stats)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # every selected row
  assert list(want[1]) == list(got[1]) == ["cdw_distance"]
  np.testing.assert_array_equal(want[1]["cdw_distance"], got[1]["cdw_distance"])
  assert (want[1]["cdw_distance"] > 0).all()
  for x, y in zip(jax.tree.leaves(want[2].batch_stats), jax.tree.leaves(got[2].batch_stats)):
    np.testing.assert_array_equal(np.asarray(x)[held["A"]], np.asarray(y)[held["A"]])
