"""Several hosts: one process per host, the JAX way (`jax.distributed`).

    hosts.initialize(config)          # before anything touches a device
    hosts.check_same_config(config)   # every process runs the same experiment
    if hosts.is_main(): write_logs()  # process 0 writes the workdir's files

Every process runs the same command with the same config and workdir (a
folder all hosts share, as Orbax's multi-host checkpoints need); only
`config.hosts.process_id` differs, or the cluster's environment tells it
(SLURM, Open MPI, ...: `jax.distributed`'s auto-detection). The client state
is one global array split over every host's devices (`federated/
device_queues.py`); each host trains, evaluates and reads the data of the
clients whose rows its devices hold. Per-client figures are combined with
`sum_over_hosts` (zeros where a host has no row). On CPU the processes talk
through Gloo collectives.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from fedreid_jax import run_config
from fedreid_jax.arrays import first_replica
from fedreid_jax.errors import ConfigError

# Fields that may differ between the processes of one run.
PER_PROCESS_FIELDS = ("hosts.process_id",)


def settings(config) -> dict:
  """`config.hosts` with defaults (configs written before it existed run on one host)."""
  hosts = config.get("hosts") or {}
  return {"num_processes": int(hosts.get("num_processes", 1)),
          "process_id": int(hosts.get("process_id", -1)),
          "coordinator_address": str(hosts.get("coordinator_address", "")),
          "timeout_s": int(hosts.get("timeout_s", 300))}


def check_settings(config) -> dict:
  """`settings(config)`, or a ConfigError naming what is missing, before any device starts."""
  s = settings(config)
  n = s["num_processes"]
  if n < 0:
    raise ConfigError(f"config.hosts.num_processes={n} must be 1 (one host), >1, or 0 "
                      "(detect from the cluster's environment, e.g. SLURM)")
  if n == 1:
    return s
  address = s["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if n > 1 and not address:
    raise ConfigError(
        f"config.hosts.num_processes={n} but no coordinator address: set "
        "--config.hosts.coordinator_address=HOST:PORT (process 0's machine, a free port) or "
        "the JAX_COORDINATOR_ADDRESS environment variable, the same on every host")
  if n > 1 and not 0 <= s["process_id"] < n:
    raise ConfigError(
        f"config.hosts.process_id={s['process_id']} must be in [0, {n}) on a run over "
        f"{n} processes: pass --config.hosts.process_id=K (K = 0 on the coordinator's host)")
  if s["timeout_s"] <= 0:
    raise ConfigError(f"config.hosts.timeout_s={s['timeout_s']} must be positive")
  return dict(s, coordinator_address=address)


def initialize(config) -> None:
  """Joins this process to the run's other processes (nothing on one host).

  Must run before any JAX computation. On CPU the collectives go through Gloo."""
  s = check_settings(config)
  if s["num_processes"] == 1 or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"initialization_timeout": s["timeout_s"]}
  if s["num_processes"] > 1:
    kwargs.update(coordinator_address=s["coordinator_address"],
                  num_processes=s["num_processes"], process_id=s["process_id"])
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "must be called before" in str(e):  # a library caller's order, not the user's
      raise RuntimeError("fedreid_jax.hosts.initialize(config) must run before anything "
                         "uses JAX (a computation, jax.devices())") from e
    raise _join_error(s, e) from None
  except ValueError as e:
    raise _join_error(s, e) from None


def _join_error(s: dict, e: Exception) -> ConfigError:
  return ConfigError(
      f"could not join the run's {s['num_processes'] or 'detected'} processes through "
      f"{s['coordinator_address'] or 'the cluster environment'} within {s['timeout_s']} s "
      f"({str(e).splitlines()[0][:200]}); start every process with the same "
      "coordinator address, each with its own config.hosts.process_id")


def is_multihost() -> bool:
  return jax.process_count() > 1


def is_main() -> bool:
  """Process 0: it writes the workdir's logs, tables and exports."""
  return jax.process_index() == 0


def check_running(config) -> None:
  """ConfigError when the config asks for several processes but this one runs alone
  (a library caller that skipped `initialize`)."""
  n = settings(config)["num_processes"]
  if n > 1 and jax.process_count() != n:
    raise ConfigError(f"config.hosts.num_processes={n} but this is one of "
                      f"{jax.process_count()} process(es): call fedreid_jax.hosts.initialize"
                      "(config) before anything else (the command line does)")


def config_fields(config) -> dict[str, object]:
  """The config as flat `{"section.field": value}`, without the per-process fields."""
  flat = run_config.flatten(json.loads(config.to_json()))
  return {k: v for k, v in flat.items() if k not in PER_PROCESS_FIELDS}


def check_same_config(config) -> None:
  """ConfigError naming the differing fields when the processes were started with
  different configs (checked through one small collective, before any model compiles)."""
  if not is_multihost():
    return
  from jax.experimental import multihost_utils
  mine = json.dumps(config_fields(config), sort_keys=True).encode()
  digest = np.frombuffer(hashlib.sha256(mine).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  if (digests == digests[0]).all():
    return
  length = int(np.max(multihost_utils.process_allgather(np.int32(len(mine)))))
  padded = np.frombuffer(mine.ljust(length, b" "), np.uint8)
  texts = [bytes(row).decode().rstrip() for row in
           np.asarray(multihost_utils.process_allgather(padded))]
  first = json.loads(texts[0])
  lines = []
  for p, text in enumerate(texts[1:], start=1):
    other = json.loads(text)
    diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    if diff:
      lines.append(f"process {p}: " + ", ".join(
          f"{k}={other.get(k)!r} (process 0: {first.get(k)!r})" for k in diff[:5]))
  raise ConfigError("the hosts disagree on the config: " + "; ".join(lines) +
                    "; start every process with the same config file and overrides "
                    "(only config.hosts.process_id differs)")


def sum_over_hosts(values: np.ndarray) -> np.ndarray:
  """Elementwise sum of every process's `values` (same shape everywhere; a host
  fills the rows of its own clients and zeros elsewhere). float64 travels as
  bytes, so the sum is exact."""
  values = np.ascontiguousarray(values, np.float64)
  if not is_multihost():
    return values
  from jax.experimental import multihost_utils
  gathered = np.asarray(multihost_utils.process_allgather(values.view(np.uint8)))
  return gathered.view(np.float64).reshape(-1, *values.shape).sum(axis=0)


def gather_per_client(per_client: dict[str, dict[str, float]], names) -> dict:
  """{client: {metric: value}} of this host's clients -> every host's (all
  processes call this together), in `names` order; unchanged on one host."""
  if not is_multihost():
    return per_client
  keys = sorted({k for metrics in per_client.values() for k in metrics})
  table = np.zeros((len(names), len(keys) + 1))  # the last column: 1 where held
  for i, name in enumerate(names):
    if name in per_client:
      table[i] = [per_client[name][k] for k in keys] + [1.0]
  table = sum_over_hosts(table)
  return {name: dict(zip(keys, map(float, table[i, :-1])))
          for i, name in enumerate(names) if table[i, -1]}


def any_host(flag: bool) -> bool:
  """True when `flag` is true on any process (all processes call this together)."""
  return bool(sum_over_hosts(np.array([float(flag)]))[0]) if is_multihost() else flag


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op on one host)."""
  if is_multihost():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """numpy copies of `tree`'s arrays, also of arrays split over several hosts
  (gathered: every process calls this together)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


local_copy = first_replica  # this host's first copy of a replicated tree (arrays.py)


class HostTopology:
  """The federated core's `topology.Topology` over this run's hosts (every
  process calls the collectives together)."""

  def sum_over_hosts(self, values: np.ndarray) -> np.ndarray:
    return sum_over_hosts(values)

  def to_host(self, tree):
    return to_host(tree)

  def local_copy(self, tree):
    return first_replica(tree)
