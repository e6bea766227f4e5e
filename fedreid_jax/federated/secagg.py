"""Secure aggregation over any algorithm (`config.secagg`; docs/secure_aggregation.md).

    alg = with_secure_aggregation(alg, config, model)  # registry.build_algorithm does it
                                                       # when config.secagg.enabled

The server's mean (`Algorithm.aggregator`) becomes `SecureMean`: each
client's update of the shared parameters and BatchNorm statistics against
the global model it received, scaled by its weight (data size, or CDW's
d_k: `weighting` runs on the clients' side) and sent with that weight as
one masked vector; the server learns two sums and divides
(`secure_aggregation.secure_weighted_mean`). KD's teacher becomes the secure
mean of the teachers' embeddings of each public batch, computed by each
client on its own model (`kd.Distillation(teacher_mean=...)`). The pairwise
seeds derive from `config.seed`, the round (KD: and the public batch) and
the pair of lanes.

Refused, in one line (`refusal`): what reads a single client's values on
the server outside the sum (the reference CDW's in-flight statistics,
`fed.bn_aggregation="first_client"`, `update_server_state`), and an
aggregator already replaced (client-level DP).
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import algorithm as alg_lib
from fedreid_jax.federated import kd as kd_lib
from fedreid_jax.federated import secure_aggregation as sa

# BatchNorm statistics move far more in a round than parameters (the stem's running
# variance by up to 388 in the default run, a parameter by under 0.4): their own clip, with
# a coarser step of the same integer range (4096 * 2^11 = 8 * 2^20).
DEFAULTS = {"enabled": False, **sa.Settings()._asdict(), "stats_clip": 4096.0,
            "stats_frac_bits": 11}
AGGREGATION_SALT = 0x5EC
KD_SALT = 0x5ED


def settings(config) -> dict:
  """`config.secagg` over `DEFAULTS` (a config saved before the section existed: off)."""
  given = config.get("secagg")
  given = {} if given is None else given
  return {k: given.get(k, v) for k, v in DEFAULTS.items()}


def enabled(config) -> bool:
  return settings(config)["enabled"] is True


def protocol_settings(config, part: str = "params") -> sa.Settings:
  """The fixed point of the parameters (and KD's embeddings), or of the
  BatchNorm statistics (`part="batch_stats"`: `stats_clip`, `stats_frac_bits`)."""
  given = settings(config)
  prefix = "stats_" if part == "batch_stats" else ""
  return sa.Settings(bits=given["bits"], frac_bits=given[f"{prefix}frac_bits"],
                     clip=float(given[f"{prefix}clip"]))


def check_settings(config, num_clients: int | None = None) -> None:
  """ConfigError (one line) for an invalid `config.secagg`, too few bits for
  the run's `num_clients` (when the config tells it; else checked at the
  first aggregation), or a combination that cannot run under it."""
  given = settings(config)
  if not isinstance(given["enabled"], bool):
    raise ConfigError(f"config.secagg.enabled={given['enabled']!r} must be True or False")
  for field, low, high in (("bits", 2, 32), ("frac_bits", 0, 30), ("stats_frac_bits", 0, 30)):
    value = given[field]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
      raise ConfigError(f"config.secagg.{field}={value!r} must be an integer in [{low}, {high}]")
  for field in ("clip", "stats_clip"):
    clip = given[field]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
      raise ConfigError(f"config.secagg.{field}={clip!r} must be a positive number (each "
                        f"client's weighted update is clipped to [-{field}, {field}])")
  if not given["enabled"]:
    return
  for part in ("params", "batch_stats"):
    sa.check_capacity(num_clients or 1, protocol_settings(config, part),
                      "stats_" if part == "batch_stats" else "")
  dp = config.get("dp")
  if dp is not None and dp.get("mode", "off") == "client":
    raise ConfigError("config.secagg.enabled with config.dp.mode='client' is refused: both "
                      "replace the server's mean (Algorithm.aggregator) and do not compose "
                      "yet (docs/secure_aggregation.md); turn one of them off")


def reference_like(server_tree, stacked):
  """The server's leaf for each leaf path of `stacked` `[S, ...]` (zeros where
  the server has none of that shape, e.g. FedAvg's classifier in round one):
  the public point the clients' updates are taken against."""
  own = traverse_util.flatten_dict(flax.core.unfreeze(server_tree))

  def pick(path, x):
    value = own.get(path)
    return value if value is not None and value.shape == x.shape[1:] else jnp.zeros(
        x.shape[1:], x.dtype)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(stacked))
  return traverse_util.unflatten_dict({path: pick(path, x) for path, x in flat.items()})


class SecureMean:
  """`algorithm.Aggregator`: the weighted mean of the clients' shared params
  (and statistics) from secure sums of their weighted updates. A client with
  weight 0 (failed, unselected) dropped out after masking: its pair masks
  are recovered from the survivors' revealed seeds."""

  def __init__(self, protocol: sa.Settings, stats_protocol: sa.Settings, seed: int):
    self.protocol = protocol  # the parameters'
    self.stats_protocol = stats_protocol  # the BatchNorm statistics'
    self.seed = seed

  def round_key(self, round_index) -> jax.Array:
    """The round's key, which the pair seeds fold in (config.seed, round)."""
    base = jax.random.fold_in(jax.random.key(self.seed), AGGREGATION_SALT)
    return jax.random.fold_in(base, round_index)

  def __call__(self, server, params, stats, weights: jax.Array) -> tuple:
    key = self.round_key(server.round)
    means = [self.mean(server.params, params, weights, jax.random.fold_in(key, 0), self.protocol)]
    if stats is not None:  # their own sum: another clip and step
      means.append(self.mean(server.batch_stats, stats, weights, jax.random.fold_in(key, 1),
                             self.stats_protocol))
    return means[0], means[1] if stats is not None else None

  @staticmethod
  def mean(server_tree, stacked, weights: jax.Array, key: jax.Array, protocol: sa.Settings):
    """The secure weighted mean of `stacked` `[S, ...]`: each client's update
    against the server's `server_tree` (`reference_like`), flattened."""
    reference = reference_like(server_tree, stacked)
    ref_flat, unravel = ravel_pytree(reference)
    updates = jax.vmap(lambda tree: ravel_pytree(tree)[0])(stacked) - ref_flat  # [S, n]
    return unravel(ref_flat + sa.secure_weighted_mean(updates, weights, key, protocol))


def secure_teacher_mean(protocol: sa.Settings):
  """KD's teacher under secure aggregation: `(embeddings [T, B, E], the KD
  step's key) -> [B, E]`, the secure mean (weight 1 each) of the teachers'
  flattened embeddings of the batch."""
  def mean(embeddings: jax.Array, key: jax.Array) -> jax.Array:
    count = embeddings.shape[0]
    flat = embeddings.reshape(count, -1)
    out = sa.secure_weighted_mean(flat, jnp.ones((count,), jnp.float32),
                                  jax.random.fold_in(key, KD_SALT), protocol)
    return out.reshape(embeddings.shape[1:])
  return mean


def refusal(algorithm: alg_lib.Algorithm) -> str | None:
  """Why `algorithm` cannot run under secure aggregation (one line), or None."""
  why = None
  if algorithm.received_stats is not None:
    why = ("cdw.mode='reference' (logit form) hands each client BatchNorm statistics "
           "computed on the previous client's data, outside the sum; use cdw.mode='default' "
           "or cdw.form='delta'")
  elif algorithm.bn_aggregation != "mean":
    why = ("fed.bn_aggregation='first_client' gives the server one client's BatchNorm "
           "statistics in the clear; use fed.bn_aggregation='mean'")
  elif algorithm.update_server_state is not None:
    why = ("its update_server_state reads each client's trained state on the server "
           "(e.g. SCAFFOLD's control variates), outside the sum")
  elif not (algorithm.aggregator is alg_lib.weighted_mean
            or isinstance(algorithm.aggregator, SecureMean)):
    why = ("its aggregator (the server's mean) is already replaced, e.g. by client-level DP; "
           "secure aggregation replaces the same part")
  return None if why is None else (f"config.secagg.enabled with algorithm {algorithm.name!r} "
                                   f"is refused: {why}")


def with_secure_aggregation(algorithm: alg_lib.Algorithm, config, model) -> alg_lib.Algorithm:
  """`algorithm` whose server learns only secure sums (module docstring).
  ConfigError (one line) for an algorithm that cannot run under it;
  unchanged when applied twice or when nothing is shared."""
  problem = refusal(algorithm)
  if problem is not None:
    raise ConfigError(problem)
  if not algorithm.shares or isinstance(algorithm.aggregator, SecureMean):
    return algorithm
  protocol = protocol_settings(config)
  stats_protocol = protocol_settings(config, "batch_stats")
  stages = tuple(kd_lib.Distillation(model, config.kd, config.train,
                                     teacher_mean=secure_teacher_mean(protocol))
                 if isinstance(stage, kd_lib.Distillation) else stage
                 for stage in algorithm.server_stages)
  return dataclasses.replace(algorithm, label=f"{algorithm.label}+SecAgg",
                             aggregator=SecureMean(protocol, stats_protocol, int(config.seed)),
                             server_stages=stages)
