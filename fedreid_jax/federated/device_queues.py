"""Clients over devices without padding: the `devices` strategy.

    queues = longest_first([1019, 516, 404, 230, 117, 60, 19, 14, 7], 4)
    # [[0], [1], [2], [3, 4, 5, 6, 7, 8]]: makespan 1019 = the longest client
    execute = DeviceQueues(local_step, chunk_steps=1, devices=jax.devices())
    trained, metrics = execute(shared, selected, streams, num_steps)

Within a round clients are independent, so a device can run several of them
one after another (lane packing). The selected clients are
assigned to devices longest first (LPT: each client, longest first, goes to
the least-loaded device); each device runs its queue with `Serial`'s
compiled step (`execution.ClientSteps`; no padded steps, the fastest single-device path on CPU and
GPU). The host dispatches one step per device in turn; JAX dispatch is
asynchronous, so every device stays busy without threads. Each client's
computation is the same compiled function on the same inputs as under
`serial`, so results do not depend on the device count.

Layout: `selected` may live on one device or be split along the client axis
over a mesh (`state_mesh`, `placed_init`). A client's state is read from the
device that holds its row and moved to its queue's device (a no-op when they
agree); the trained states go back into the caller's layout, each row to the
device that holds it, so no device gathers every client. Any other layout
is gathered on the first device and restored after (correct, not fast).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import execution
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.topology import ONE_PROCESS
from fedreid_jax.federated.tracing import jit_counted

AXIS = "clients"


def longest_first(num_steps: Sequence[int], num_devices: int) -> list[list[int]]:
  """LPT schedule: client indices per device, each queue longest first.

  Ties go to the lower client index and the lower device, so the schedule is
  deterministic. With n clients and d devices the makespan is at most
  max(longest client, 4/3 of the optimum)."""
  loads, queues = [0] * num_devices, [[] for _ in range(num_devices)]
  for i in sorted(range(len(num_steps)), key=lambda i: (-num_steps[i], i)):
    d = min(range(num_devices), key=lambda d: (loads[d], d))
    queues[d].append(i)
    loads[d] += int(num_steps[i])
  return queues


def schedule_report(num_steps: Sequence[int], queues: Sequence[Sequence[int]]) -> dict:
  """Steps per device of a schedule: `makespan` (the busiest device), `longest`
  (the longest client: the critical path), `makespan_ratio` = makespan /
  longest, `idle` = idle fraction of device-steps up to the makespan,
  `padding_waste` = step slots / real steps (1: queues pad nothing)."""
  loads = [sum(int(num_steps[i]) for i in q) for q in queues]
  makespan, total = max(loads), sum(loads)
  longest = max(int(n) for n in num_steps)
  return {"devices": len(queues), "makespan": makespan, "longest": longest,
          "makespan_ratio": makespan / max(longest, 1),
          "idle": 1.0 - total / max(len(queues) * makespan, 1), "padding_waste": 1.0}


def queue_devices(num_devices: int = 0) -> list:
  """The first `num_devices` devices (0: all) of this process; ConfigError when
  fewer are present. On several hosts a process queues clients on its own devices."""
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ConfigError(f"config.fed.num_devices={num_devices} but only {len(devices)} "
                      f"device(s) are present ({devices[0].platform}); lower it, or 0 for all")
  return devices[:num_devices or len(devices)]


def spread_over_hosts(n: int, devices: Sequence) -> list | None:
  """`n` of `devices`, as evenly over their hosts as they go (host by host; the
  first `n % hosts` hosts give one more); None when some host would get none or
  more than it has. On one host: the first `n`."""
  by_host: dict[int, list] = {}
  for d in devices:
    by_host.setdefault(d.process_index, []).append(d)
  if len(by_host) == 1:
    return list(devices[:n])
  counts = [n // len(by_host) + (i < n % len(by_host)) for i in range(len(by_host))]
  if min(counts) == 0 or any(c > len(ds) for c, ds in zip(counts, by_host.values())):
    return None
  return [d for c, ds in zip(counts, by_host.values()) for d in ds[:c]]


def state_mesh(num_clients: int, devices: Sequence,
               num_steps: Sequence[int] | None = None) -> jax.sharding.Mesh | None:
  """A 1-D `clients` mesh over the most devices (of `devices`) dividing the
  client count; None when that is one device on one host. With client
  sampling the state stays split too: each round updates the selected rows in
  place (`rounds.broadcast_rows`), gathering nothing. Over several hosts
  (`devices` = every host's) the mesh spans every host, or a ConfigError says
  why it cannot; given the clients' `num_steps`, the blocks of rows are dealt
  to hosts by load (`balance_blocks`)."""
  hosts = len({d.process_index for d in devices})
  fits = [d for d in range(1, len(devices) + 1)
          if num_clients % d == 0 and spread_over_hosts(d, devices) is not None]
  if not fits:
    raise ConfigError(
        f"{num_clients} clients cannot be split over {hosts} hosts: the client state needs a "
        f"divisor of {num_clients} between {hosts} and {len(devices)} (the devices present) "
        "to give every host clients; change the client count (config.data.clients) or the "
        "number of hosts")
  n = max(fits)
  if hosts == 1 and n == 1:
    return None
  chosen = spread_over_hosts(n, devices)
  if hosts > 1 and num_steps is not None:
    chosen = balance_blocks(chosen, num_steps, len(devices) // hosts)
  return jax.make_mesh((n,), (AXIS,), devices=chosen, axis_types=(jax.sharding.AxisType.Auto,))


def balance_blocks(devices: Sequence, num_steps: Sequence[int], devices_per_host: int) -> list:
  """`devices` reordered so that the client blocks (mesh position i holds rows
  `[i * k, (i + 1) * k)`) go to hosts by load: blocks heaviest first, each to
  the host whose longest-first makespan over its own devices would grow least,
  among hosts with a free slot. The mesh still has each host's same devices;
  only which rows they hold changes (so the paper's MSMT17 shares no host with
  the other big clients)."""
  k = len(num_steps) // len(devices)
  blocks = [list(range(i * k, (i + 1) * k)) for i in range(len(devices))]
  slots: dict[int, list] = {}
  for d in devices:
    slots.setdefault(d.process_index, []).append(d)
  held: dict[int, list[int]] = {h: [] for h in slots}
  order = [None] * len(devices)

  def makespan(rows):
    steps = [num_steps[r] for r in rows]
    return max(sum(steps[i] for i in q) for q in longest_first(steps, devices_per_host))

  for b in sorted(range(len(blocks)), key=lambda b: (-sum(num_steps[r] for r in blocks[b]), b)):
    free = [h for h in slots if len(held[h]) < len(slots[h]) * k]
    h = min(free, key=lambda h: (makespan(held[h] + blocks[b]), h))
    order[b] = slots[h][len(held[h]) // k]
    held[h] += blocks[b]
  return order


def placed_init(init_fn, key, mesh: jax.sharding.Mesh | None, device):
  """`init_fn(key) -> (server, clients)` created where the run keeps them:
  with a `mesh`, the server replicated over it and every client leaf split
  along its client axis (`jax.eval_shape` -> shardings -> `jit(out_shardings)`:
  nothing is materialised on one device first); else on `device`, committed
  there as the trained states will be (so round two compiles nothing new)."""
  if mesh is None:
    return jax.jit(init_fn, out_shardings=jax.sharding.SingleDeviceSharding(device))(key)
  server_shape, clients_shape = jax.eval_shape(init_fn, key)
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(AXIS))
  shardings = (jax.tree.map(lambda _: replicated, server_shape),
               jax.tree.map(lambda _: split, clients_shape))
  return jax.jit(init_fn, out_shardings=shardings)(key)


def row_blocks(tree) -> list[tuple] | None:
  """`[(device, start, stop, block)]`: which rows of the leading axis each
  device holds (`block`: that device's tree of rows `[start, stop)`); None
  when the leaves are not all split the same way along the first axis only."""
  leaves, treedef = jax.tree.flatten(tree)
  layout, blocks = None, {}
  for leaf in leaves:
    rows = []
    for s in leaf.addressable_shards:
      if s.data.shape[1:] != leaf.shape[1:]:
        return None
      start, stop, _ = s.index[0].indices(leaf.shape[0])
      rows.append((s.device, start, stop))
      blocks.setdefault(s.device, []).append(s.data)
    if layout is None:
      layout = rows
    elif rows != layout:
      return None
  return [(d, start, stop, jax.tree.unflatten(treedef, blocks[d])) for d, start, stop in layout]


def local_row(tree, index: int):
  """Row `index` of a client-axis tree, read from this host's device that holds it
  (several hosts: a host reads only the clients it holds)."""
  blocks = row_blocks(tree)
  if blocks is None:
    return params_lib.take_client(tree, index)
  _, start, _, block = next(b for b in blocks if b[1] <= index < b[2])
  return params_lib.take_client(block, index - start)


def lanes_by_host(sharding: jax.sharding.Sharding, num_rows: int) -> dict[int, list[int]]:
  """{process index: the rows (clients) its devices hold}, from the sharding of
  a `[S, ...]` client leaf (every host computes every host's)."""
  out: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((num_rows,)).items():
    out.setdefault(device.process_index, set()).update(range(*index[0].indices(num_rows)))
  return {h: sorted(rows) for h, rows in out.items()}


def host_queues(num_steps: Sequence[int], lanes: dict[int, list[int]],
                devices_per_host: int) -> dict[int, list[list[int]]]:
  """{host: its longest-first queues of the clients it holds, one per device}."""
  return {h: [[held[i] for i in q] for q in
              longest_first([num_steps[c] for c in held], devices_per_host)]
          for h, held in lanes.items()}


def on_device(tree, device):
  """`tree` on `device`; a leaf spread over several hosts (replicated) is
  taken from this host's copy first."""
  local = lambda x: x if getattr(x, "is_fully_addressable", True) else x.addressable_data(0)
  return jax.tree.map(lambda x: jax.device_put(local(x), device), tree)


class DeviceQueues:
  """`devices`: longest-first queues of whole clients, one per device."""

  def __init__(self, local_step, chunk_steps: int, devices: Sequence, topology=ONE_PROCESS):
    self.devices = list(devices)
    self.topology = topology  # sums the clients' metrics over hosts
    self.steps = execution.ClientSteps(local_step, chunk_steps)  # `serial`'s compiled pieces
    self._take = jit_counted("devices/take", params_lib.take_client)
    self._put = self.steps.put  # one row of a block replaced in place (donated)
    self.last_report: dict = {}

  def report(self) -> dict[str, float]:
    """The last round's schedule as `train/...` record entries."""
    r = self.last_report
    return {"train/devices": float(r["devices"]), "train/makespan_ratio": r["makespan_ratio"],
            "train/device_idle": r["idle"]} if r else {}

  def __call__(self, shared, selected, streams, num_steps, on_steps=None):
    layout = None
    blocks = row_blocks(selected)
    if blocks is None:  # an unexpected layout: through the first device, and back
      if not jax.tree.leaves(selected)[0].is_fully_addressable:
        raise ValueError("the client state over several hosts must be split along its "
                         "client axis (device_queues.state_mesh)")
      layout = jax.tree.map(lambda x: x.sharding, selected)
      selected = jax.device_put(selected, self.devices[0])
      blocks = row_blocks(selected)
    leaf = jax.tree.leaves(selected)[0]
    every_host = host_queues(num_steps, lanes_by_host(leaf.sharding, leaf.shape[0]),
                             len(self.devices))
    self.last_report = schedule_report(num_steps, [q for h in sorted(every_host)
                                                   for q in every_host[h]])
    done: dict[int, tuple] = {}
    runs = [self._run_queue(dev, q, blocks, on_device(shared, dev), streams, num_steps, done)
            for dev, q in zip(self.devices, every_host[jax.process_index()]) if q]
    while runs:  # one dispatch per device in turn: the devices overlap
      for run in list(runs):
        length = next(run, None)
        if length is None:
          runs.remove(run)
        elif on_steps is not None:
          on_steps(length)
    trained = assemble_rows(blocks, {lane: state for lane, (state, _) in done.items()},
                            selected, self._put)
    if layout is not None:
      trained = jax.device_put(trained, layout)
    sums = np.zeros((3, len(num_steps)))  # this host's clients; the others' are zeros
    for lane, (_, lane_sums) in done.items():
      sums[:, lane] = [float(v) for v in jax.device_get(
          [lane_sums["loss"], lane_sums["accuracy"], lane_sums["steps"]])]
    sums = self.topology.sum_over_hosts(sums)
    stacked = {k: jnp.asarray(v, jnp.float32) for k, v in zip(("loss", "accuracy", "steps"), sums)}
    return trained, execution.means_over_steps(stacked, num_steps)

  def _run_queue(self, device, queue, blocks, shared, streams, num_steps, done):
    """Trains `queue`'s clients on `device`, one after another; yields the
    steps of each dispatched piece; `done[lane] = (state, metric sums)`."""
    for lane in queue:
      if not num_steps[lane]:  # not selected this round: its row stays as it is
        continue
      state = jax.device_put(self._take_lane(blocks, lane, device), device)
      for state, sums, length in self.steps.pieces(state, shared, streams[lane], num_steps[lane]):
        yield length
      done[lane] = (state, sums)

  def _take_lane(self, blocks, lane: int, device):
    """Client `lane`'s state from a device holding its row (`device` first)."""
    holding = [b for b in blocks if b[1] <= lane < b[2]]
    dev, start, _, block = next((b for b in holding if b[0] == device), holding[0])
    return self._take(block, lane - start)


def assemble_rows(blocks, changed: dict, like, put):
  """`like` with the rows in `changed` ({lane: state}) replaced, each in place
  in every device block holding it by `put(block, row, state)` (the blocks
  are donated; rows not in `changed` are neither copied nor moved)."""
  per_device = {}
  for dev, start, stop, block in blocks:
    for lane in range(start, stop):
      if lane in changed:
        block = put(block, lane - start, jax.device_put(changed[lane], dev))
    per_device[dev] = block
  if len(jax.tree.leaves(like)[0].sharding.device_set) == 1:
    return next(iter(per_device.values()))
  leaves, treedef = jax.tree.flatten(like)
  parts = [jax.tree.leaves(per_device[dev]) for dev, *_ in blocks]
  return jax.tree.unflatten(treedef, [
      jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding,
                                               [p[i] for p in parts])
      for i, leaf in enumerate(leaves)])
