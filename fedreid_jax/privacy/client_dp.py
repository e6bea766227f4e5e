"""Client-level DP (DP-FedAvg, McMahan et al., ICLR 2018), `dp.mode="client"`:
whatever algorithm is configured, its server mean replaced by

    Delta_k = shared update of sampled client k (params and BatchNorm statistics)
    mean    = server + (sum_k Delta_k * min(1, C / ||Delta_k||) + N(0, (sigma C)^2 I)) / (q N)

with Poisson sampling of the clients (rate q = `dp.client_rate`, N clients)
and a fixed denominator, the expected number of sampled clients q N. The
BatchNorm running statistics are part of the clipped, noised update: they
are computed on private data too (the mean is released under the same
guarantee; a client's statistics never reach the server unclipped).

Adaptive clipping (Andrew et al., NeurIPS 2021; `dp.adaptive_clip`): the clip
C lives in the server's `algorithm_state` (checkpointed); after each round
C <- C exp(-eta (b - gamma)), b the noisy share of sampled clients whose
update was not clipped (count noise std sigma_b, default q N / 20), and the
update's noise multiplier becomes (sigma^-2 - (2 sigma_b)^-2)^-1/2 so that the
two releases together cost what `dp.noise_multiplier` alone states.

Poisson sampling in a compiled engine: every client is selected each round
(`fed.clients_per_round=0`); the ones the round's draw leaves out train no
step, weigh 0 and keep their state (`sampled_plan`), like a failed client.
The cost: broadcast and aggregation over all N rows each round; local
training only for the sampled clients under `serial`/`devices`, masked
steps for all N under the lockstep strategies.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated.algorithm import FEATURE_EXTRACTOR, Algorithm
from fedreid_jax.federated.failures import RoundFailures
from fedreid_jax.privacy import accountant
from fedreid_jax.privacy.settings import refuse, settings

NOISE_SALT, COUNT_SALT, SAMPLE_SALT = 0xD9, 0xC0, 0x9015


def tree_norms(tree) -> jax.Array:
  """Per-row L2 norm over every leaf `[S, ...]` -> `[S]`."""
  squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=1)
             for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def clip_rows(tree, clip: jax.Array):
  """Each row `[S, ...]` scaled to L2 norm at most `clip` (over all leaves
  together): (clipped tree, norms `[S]` before clipping)."""
  norms = tree_norms(tree)
  factor = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))
  return jax.tree.map(lambda x: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)), tree), norms


def gaussian_like(key: jax.Array, tree, std: jax.Array):
  """Independent N(0, std^2) noise shaped like every leaf of `tree`."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([std * jax.random.normal(k, x.shape, jnp.float32)
                            for k, x in zip(keys, leaves)])


def noisy_sum(key: jax.Array, rows, sampled: jax.Array, std: jax.Array):
  """sum over sampled rows `[S, ...]` (`sampled` `[S]` bool) + N(0, std^2)."""
  total = jax.tree.map(lambda x: jnp.tensordot(sampled.astype(x.dtype), x, axes=1), rows)
  return jax.tree.map(jnp.add, total, gaussian_like(key, total, std))


def round_key(server, salt: int) -> jax.Array:
  """The server's noise key of this round, one stream per `salt`."""
  return jax.random.fold_in(jax.random.fold_in(server.rng, server.round), salt)


def update_noise(sigma: float, count_stddev: float) -> float:
  """Andrew et al.'s update noise multiplier sigma_Delta, leaving room for the
  clipped-count release of std sigma_b: (sigma^-2 - (2 sigma_b)^-2)^-1/2."""
  if count_stddev <= 0 or sigma <= 0:
    return sigma
  rest = sigma ** -2 - (2 * count_stddev) ** -2
  if rest <= 0:
    raise ConfigError(f"config.dp.count_stddev={count_stddev} leaves no budget for the update "
                      f"at dp.noise_multiplier={sigma}; raise the count noise above "
                      f"{1 / (2 * sigma):.3g}")
  return rest ** -0.5


def shared_update(state, with_stats: bool = True) -> dict:
  """{"params", "stats"}: the feature extractor's parameters and BatchNorm
  statistics of a server or of stacked clients (what DP-FedAvg clips)."""
  out = {"params": {k: state.params[k] for k in FEATURE_EXTRACTOR}}
  if with_stats:
    out["stats"] = {k: state.batch_stats[k] for k in FEATURE_EXTRACTOR}
  return out


def nonnegative_variances(stats):
  """BatchNorm statistics with each running `var` floored at 0 (noise may push
  it below; post-processing, free under DP)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.maximum(x, 0.0) if getattr(path[-1], "key", None) == "var" else x,
      stats)


def make_aggregator(expected: float):
  """`algorithm.Aggregator`: the DP-FedAvg mean above over `expected` = q N;
  the clip and the update's noise multiplier are the server's
  `algorithm_state` ("clip", "update_noise")."""
  def aggregate(server, params, stats, weights):
    own = server.algorithm_state
    sampled = weights > 0
    update = {"params": params} if stats is None else {"params": params, "stats": stats}
    reference = shared_update(server, stats is not None)
    delta = jax.tree.map(lambda x, r: x - r[None], update, reference)
    clipped, _ = clip_rows(delta, own["clip"])
    total = noisy_sum(round_key(server, NOISE_SALT), clipped, sampled,
                      own["update_noise"] * own["clip"])
    mean = jax.tree.map(lambda r, t: r + t / expected, reference, total)
    return mean["params"], None if stats is None else nonnegative_variances(mean["stats"])
  return aggregate


def make_init_state(clip: float, sigma: float, update_sigma: float):
  """`Algorithm.init_state`: the server's {"clip", "noise_multiplier" (the
  accounted one), "update_noise"} fixed when the run starts and checkpointed
  (a relaunch with other `dp` numbers continues with the run's own: its
  accounting stays exact)."""
  def init_state(server, clients):
    del server, clients
    return {"clip": jnp.float32(clip), "noise_multiplier": jnp.float32(sigma),
            "update_noise": jnp.float32(update_sigma)}, ()
  return init_state


def make_clip_update(quantile: float, lr: float, count_std: float, expected: float):
  """`Algorithm.update_server_state`: Andrew et al.'s geometric clip update
  C <- C exp(-lr (b - quantile)), b the noisy share of unclipped sampled clients."""
  def update(before, trained, weights, num_clients):
    del num_clients
    own = before.algorithm_state
    delta = jax.tree.map(lambda x, r: x - r[None], shared_update(trained), shared_update(before))
    unclipped = (tree_norms(delta) <= own["clip"]) & (weights > 0)
    noise = count_std * jax.random.normal(round_key(before, COUNT_SALT))
    share = (jnp.sum(unclipped) + noise) / expected
    return dict(own, clip=own["clip"] * jnp.exp(-lr * (share - quantile)))
  return update


def check_algorithm(algorithm: Algorithm, config) -> None:
  """ConfigError (one line) for an algorithm client-level DP cannot wrap."""
  why = None
  if not algorithm.shares or algorithm.centralised:
    why = "it shares nothing with a server (nothing to protect at the client level)"
  elif tuple(algorithm.shared) != FEATURE_EXTRACTOR:
    why = "it shares more than the feature extractor (the clients' padded classifiers)"
  elif algorithm.needs_public:
    why = ("its KD stage reads each selected client's own, un-noised model; client-level DP "
           "protects only the noised mean")
  elif algorithm.measurements:
    why = ("CDW weights clients by measurements of their private data; DP-FedAvg weighs the "
           "sampled clients alike")
  elif (algorithm.init_state or algorithm.update_server_state or algorithm.after_training
        or algorithm.personal_mu is not None):
    why = "it keeps per-client or server state of its own (SCAFFOLD, Ditto)"
  elif algorithm.bn_aggregation != "mean":
    why = "fed.bn_aggregation='first_client' releases one client's statistics un-noised"
  refuse("client", algorithm.name, why, config.data.in_memory,
         "clients left out of a round skip their data; the streamed in-order loader cannot")


def with_client_dp(algorithm: Algorithm, config, num_clients: int, sigma: float) -> Algorithm:
  """`algorithm` whose server mean is DP-FedAvg's (module docstring) over
  `num_clients` Poisson-sampled clients at noise multiplier `sigma` (the
  calibrated one when `dp.target_epsilon` is set)."""
  check_algorithm(algorithm, config)
  dp = settings(config)
  expected = dp["client_rate"] * num_clients
  update_sigma, clip_update = sigma, None
  if dp["adaptive_clip"]:
    count_std = dp["count_stddev"] or expected / 20
    update_sigma = update_noise(sigma, count_std)
    clip_update = make_clip_update(dp["clip_quantile"], dp["clip_lr"], count_std, expected)
  return dataclasses.replace(
      algorithm, label=f"{algorithm.label}+DP", aggregator=make_aggregator(expected),
      init_state=make_init_state(dp["clip_norm"], sigma, update_sigma),
      update_server_state=clip_update)


def poisson_sample(seed: int, round_index: int, num_clients: int, rate: float) -> np.ndarray:
  """Sorted ids of the clients sampled in `round_index`, each with
  probability `rate`, independently (seeded; the same on resume)."""
  draws = np.random.default_rng([seed, round_index, SAMPLE_SALT]).uniform(size=num_clients)
  return np.flatnonzero(draws < rate)


def sampled_plan(plan: RoundFailures, sampled) -> RoundFailures:
  """The round's plan with every client outside `sampled` failed at 0 steps
  (weight 0, state as before the round, no step trained)."""
  left_out = frozenset(c for c in plan.steps if c not in set(int(s) for s in sampled))
  return RoundFailures({c: 0 if c in left_out else n for c, n in plan.steps.items()},
                       plan.failed | left_out, plan.stragglers - left_out)


def record(config, round_index: int, server_state: dict, num_sampled: int) -> dict[str, float]:
  """The round's privacy entries: epsilon after `round_index + 1` rounds at
  (client_rate, the run's noise multiplier from `server_state`, the server's
  `algorithm_state` on the host), `dp.delta`, by `dp.accountant`: a function
  of the round count and the checkpointed noise, so a resume continues it
  exactly. Also the clip in force (adaptive clipping moves it)."""
  dp = settings(config)
  rounds = round_index + 1
  sigma = float(server_state["noise_multiplier"])
  return {"privacy/epsilon": accountant.epsilon(dp["client_rate"], sigma, rounds, dp["delta"],
                                                dp["accountant"]),
          "privacy/rounds": float(rounds), "privacy/sampling_rate": float(dp["client_rate"]),
          "privacy/noise_multiplier": sigma, "privacy/clip_norm": float(server_state["clip"]),
          "privacy/sampled": float(num_sampled)}
