"""Client execution: how the selected clients run their local training.

One interface, several backends (fedjax's `for_each_client` idea):

    execute = strategies.make_execution("serial", local_step, chunk_steps=1)
    trained, metrics = execute(shared, selected, streams, num_steps, on_steps=bar.update)

- `shared`: the round's input common to every client, passed to each local
  step (the global shared parameters for a client regularizer; `()`: none).

- `selected`: `ClientStates` of the S selected clients, leaves `[S, ...]`
  (donated: do not reuse it after the call).
- `streams[i]`: an iterator of client i's batches `{"image": uint8 [B, H, W, 3],
  "label": int32 [B]}`; `num_steps[i]` of them. Streams know nothing of lanes
  or chunks: the strategy groups the batches.
- returns the trained states `[S, ...]` and per-client metrics, a dict of
  named `[S]` arrays: `loss` and `accuracy` (means over the client's steps),
  `steps` (real steps) and `slots` (step slots computed, padding included).

Backends:
- `serial`: one client after another, no padded steps: each client's steps
  run as scanned chunks of K, then single steps (two compiled shapes). With
  K=1 every step is dispatched directly (fastest on XLA CPU, where a step in
  a loop body runs ~2.5x slower).
- `vmap`: all clients in lockstep, chunk by chunk (`[S, K, B, ...]`, masked
  steps past a client's end), vmapped over the client axis.
- `sequential`: the same lockstep chunks, `lax.map` over clients in the jit.
- `sharded`: the lockstep chunks with the client axis split over a
  `clients` device mesh (`jax.shard_map`), sequential within each device.
- `devices`: whole clients queued on devices longest first, each device
  running its queue like `serial` (no padded steps; `device_queues.py`).
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.state import ClientStates
from fedreid_jax.federated.tracing import jit_counted

Metrics = dict  # name -> jax.Array


class ClientExecution(Protocol):
  def __call__(self, shared, selected: ClientStates, streams: Sequence[Iterator[dict]],
               num_steps: Sequence[int], on_steps: Callable[[int], None] | None = None
               ) -> tuple[ClientStates, Metrics]: ...


def means_over_steps(sums: Metrics, slots) -> Metrics:
  """Per-client sums -> means over real steps (+ `steps`, `slots`)."""
  steps = sums["steps"]
  out = {k: v / jnp.maximum(steps, 1.0) for k, v in sums.items() if k != "steps"}
  return dict(out, steps=steps, slots=jnp.asarray(slots, jnp.float32))


def stack_batches(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Batches `{"image", "label"}` -> images `[K, B, H, W, 3]`, labels `[K, B]`."""
  return (np.stack([b["image"] for b in batches]), np.stack([b["label"] for b in batches]))


def piece_lengths(num_steps: int, chunk_steps: int) -> list[int]:
  """`serial`: a client's steps as full chunks of K, then single steps."""
  full = num_steps // chunk_steps
  return [chunk_steps] * full + [1] * (num_steps - full * chunk_steps)


ZERO_SUMS = {"loss": 0.0, "accuracy": 0.0, "steps": 0.0}


class ClientSteps:
  """One client's compiled training, shared by `serial` and `devices`: its
  steps as scanned chunks of K then single steps (two compiled shapes, each
  donating the state), and a client's row taken from / put back into a
  stacked state."""

  def __init__(self, local_step: Callable, chunk_steps: int):
    self.chunk_steps = chunk_steps
    chunk = local_lib.make_client_chunk(local_step)
    one = lambda state, shared, images, labels: local_step(state, images[0], labels[0],
                                                           jnp.array(True), shared)
    full = lambda state, shared, images, labels: chunk(state, images, labels,
                                                       jnp.ones(images.shape[0], bool), shared)
    self.step = jit_counted("serial/step", one, donate_argnums=0)
    self.chunk = jit_counted("serial/chunk", full, donate_argnums=0)
    self.take = jit_counted("serial/take", params_lib.take_client)
    self.put = jit_counted("serial/put", params_lib.put_client, donate_argnums=0)

  def pieces(self, state, shared, stream: Iterator[dict], num_steps: int):
    """Trains one client (`state` without the client axis, donated) for
    `num_steps` steps of `stream`; yields `(state, metric sums, steps)` after
    each dispatched piece (the last yield holds the trained client)."""
    sums = ZERO_SUMS
    for length in piece_lengths(num_steps, self.chunk_steps):
      images, labels = stack_batches([next(stream) for _ in range(length)])
      fn = self.step if length == 1 else self.chunk
      state, metrics = fn(state, shared, images, labels)  # runs where `state` is
      sums = jax.tree.map(jnp.add, sums, metrics)
      yield state, sums, length


class Serial:
  """One client at a time; no padded steps."""
  reads_clients_in_order = True  # each stream to its end before the next: one loader may feed all

  def __init__(self, local_step: Callable, chunk_steps: int):
    self.steps = ClientSteps(local_step, chunk_steps)

  def __call__(self, shared, selected, streams, num_steps, on_steps=None):
    lanes = []
    for lane, (stream, n) in enumerate(zip(streams, num_steps)):
      state, sums = self.steps.take(selected, lane), ZERO_SUMS
      for state, sums, length in self.steps.pieces(state, shared, stream, n):
        if on_steps is not None:
          on_steps(length)
      selected = self.steps.put(selected, lane, state)
      lanes.append(jax.tree.map(jnp.asarray, sums))
    sums = jax.tree.map(lambda *x: jnp.stack(x), *lanes)
    return selected, means_over_steps(sums, num_steps)


def lockstep_chunk(streams, num_steps: Sequence[int], chunk: int, chunk_steps: int):
  """Chunk `chunk` of a lockstep round: images `[S, K, B, H, W, 3]`, labels
  `[S, K, B]`, mask `[S, K]` (False past a client's last step: zero batches)."""
  first = None
  rows = []
  for stream, n in zip(streams, num_steps):
    real = max(0, min(chunk_steps, n - chunk * chunk_steps))
    batches = [next(stream) for _ in range(real)]
    first = first or (batches[0] if batches else None)
    rows.append(batches)
  images = np.zeros((len(rows), chunk_steps, *first["image"].shape), first["image"].dtype)
  labels = np.zeros((len(rows), chunk_steps, *first["label"].shape), np.int32)
  mask = np.zeros((len(rows), chunk_steps), bool)
  for lane, batches in enumerate(rows):
    for k, b in enumerate(batches):
      images[lane, k], labels[lane, k], mask[lane, k] = b["image"], b["label"], True
  return images, labels, mask


class Lockstep:
  """All clients advance chunk by chunk in one compiled call (`run_clients`)."""

  def __init__(self, name: str, run_clients: Callable, chunk_steps: int,
               sharding: jax.sharding.Sharding | None = None):
    self.chunk_steps = chunk_steps
    self.sharding = sharding  # `sharded`: the client axis over the mesh
    self._chunk = jit_counted(f"{name}/chunk", run_clients, donate_argnums=0)

  def __call__(self, shared, selected, streams, num_steps, on_steps=None):
    layout = None
    if self.sharding is not None:  # every chunk sees the same input layout: one trace
      layout = jax.tree.map(lambda x: x.sharding, selected)
      selected = jax.device_put(selected, self.sharding)
      shared = jax.device_put(shared, jax.sharding.NamedSharding(  # whole on every device
          self.sharding.mesh, jax.sharding.PartitionSpec()))
    chunks = max(1, -(-max(num_steps) // self.chunk_steps))
    sums = None
    for c in range(chunks):
      images, labels, mask = lockstep_chunk(streams, num_steps, c, self.chunk_steps)
      selected, metrics = self._chunk(selected, shared, images, labels, mask)
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      if on_steps is not None:
        on_steps(int(mask.sum()))
    if layout is not None:  # hand back the caller's layout: the other stages trace once
      selected = jax.device_put(selected, layout)
    return selected, means_over_steps(sums, [chunks * self.chunk_steps] * len(num_steps))


def lockstep(name: str, local_step: Callable, chunk_steps: int,
             mesh: jax.sharding.Mesh | None = None) -> Lockstep:
  """The lockstep strategies over `local_step`: `vmap` (clients vmapped),
  `sequential` (`lax.map` over clients in the jit), `sharded` (the client axis
  split over `mesh`'s `clients` axis, sequential within each device); the
  round's shared input reaches every client unsplit."""
  chunk = local_lib.make_client_chunk(local_step)

  def mapped(selected, shared, images, labels, mask):
    return lax.map(lambda a: chunk(*a, shared), (selected, images, labels, mask))
  def vmapped(selected, shared, images, labels, mask):
    return jax.vmap(chunk, in_axes=(0, 0, 0, 0, None))(selected, images, labels, mask, shared)
  if name == "vmap":
    return Lockstep(name, vmapped, chunk_steps)
  if name == "sequential":
    return Lockstep(name, mapped, chunk_steps)
  if mesh is None:
    raise ValueError("the 'sharded' strategy needs a device mesh")
  spec, whole = jax.sharding.PartitionSpec("clients"), jax.sharding.PartitionSpec()
  return Lockstep(name, jax.shard_map(mapped, mesh=mesh, in_specs=(spec, whole, spec, spec, spec),
                                      out_specs=spec),
                  chunk_steps, jax.sharding.NamedSharding(mesh, spec))


def make_mesh(strategy: str, num_selected: int, num_devices: int = 0) -> jax.sharding.Mesh | None:
  """`sharded`: a 1-D `clients` mesh over the most devices (of the first
  `num_devices`, 0: all) dividing the selected count."""
  if strategy != "sharded":
    return None
  devices = jax.devices()[:num_devices or None]
  n = max(d for d in range(1, len(devices) + 1) if num_selected % d == 0)
  return jax.make_mesh((n,), ("clients",), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))
