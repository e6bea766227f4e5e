"""Client strategies by name: how the selected clients run (`execution.py`,
`device_queues.py`), registered like algorithms.

    execute = make_execution("serial", local_step, chunk_steps=1)
    trained, metrics = execute(shared, selected, streams, num_steps)

A factory is `(local_step, chunk_steps, mesh, devices, topology) ->
ClientExecution` (`mesh`: the `sharded` strategy's `clients` mesh, else None;
`devices`: the devices a strategy may queue clients on; `topology`: the
run's hosts, `topology.Topology`). `config.fed.strategy` takes any
registered name.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import device_queues, execution
from fedreid_jax.federated.topology import ONE_PROCESS

StrategyFactory = Callable[..., execution.ClientExecution]
_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str, factory: StrategyFactory) -> None:
  """Registers `factory(local_step, chunk_steps, mesh, devices, topology)` as `name`."""
  if name in _STRATEGIES and _STRATEGIES[name] is not factory:
    raise ConfigError(f"client strategy {name!r} is already registered; pick another name")
  _STRATEGIES[name] = factory


def registered_strategies() -> tuple[str, ...]:
  return tuple(_STRATEGIES)


def make_execution(name: str, local_step: Callable, chunk_steps: int,
                   mesh: jax.sharding.Mesh | None = None,
                   devices: Sequence | None = None,
                   topology=ONE_PROCESS) -> execution.ClientExecution:
  """The strategy registered as `name` over `local_step`; `devices`: those the
  `devices` strategy queues clients on (default all)."""
  if name not in _STRATEGIES:
    raise ConfigError(f"unknown client strategy {name!r}; choose one of "
                      f"{', '.join(registered_strategies())}")
  return _STRATEGIES[name](local_step, chunk_steps, mesh, devices, topology)


register_strategy("serial", lambda step, k, mesh, devices, topology: execution.Serial(step, k))
register_strategy("vmap", lambda step, k, mesh, devices, topology: execution.lockstep(
    "vmap", step, k))
register_strategy("sequential", lambda step, k, mesh, devices, topology: execution.lockstep(
    "sequential", step, k))
register_strategy("sharded", lambda step, k, mesh, devices, topology: execution.lockstep(
    "sharded", step, k, mesh))
register_strategy("devices", lambda step, k, mesh, devices, topology: device_queues.DeviceQueues(
    step, k, devices or jax.devices(), topology))
