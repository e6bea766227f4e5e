"""Privacy accounting with dp-accounting: a run's noisy steps (DP-SGD) or
rounds (client-level DP) are Poisson-subsampled Gaussian mechanisms,
self-composed; epsilon at delta by PLD (default) or RDP.

    event(q, sigma, count)                     # dp_accounting.DpEvent
    epsilon(q, sigma, count, delta, "pld")     # float (inf when sigma == 0)
    calibrate(q, count, target_eps, delta)     # the noise multiplier reaching target_eps

Everything is a function of (rate, noise multiplier, count): a resumed run
recomputes its epsilon from the round it resumes at, exactly.
"""
from __future__ import annotations

import functools
import math

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedreid_jax.errors import ConfigError


def event(rate: float, noise_multiplier: float, count: int) -> dp_accounting.DpEvent:
  """`count` compositions of a Gaussian mechanism (std `noise_multiplier` x
  sensitivity) on a Poisson sample of rate `rate`."""
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  one = gaussian if rate >= 1 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
  return dp_accounting.SelfComposedDpEvent(one, int(count))


# PLD's loss grid step: 1e-3 is ~10x faster than the default 1e-4 and its epsilon
# differs by under 1e-5 relative (still a pessimistic, i.e. valid, bound)
PLD_DISCRETIZATION = 1e-3


def new_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
  """A fresh PLD (`"pld"`, grid `PLD_DISCRETIZATION`) or RDP (`"rdp"`)
  accountant, add-or-remove-one."""
  if kind == "pld":
    return pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)
  if kind == "rdp":
    return rdp_privacy_accountant.RdpAccountant()
  raise ValueError(f"accountant {kind!r} is not pld or rdp")


@functools.lru_cache(maxsize=4096)
def epsilon(rate: float, noise_multiplier: float, count: int, delta: float,
            kind: str = "pld") -> float:
  """Epsilon at `delta` after `count` noisy steps at (rate, noise multiplier);
  0 before any step, inf without noise."""
  if count <= 0 or rate <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  accountant = new_accountant(kind)
  accountant.compose(event(rate, noise_multiplier, count))
  return float(accountant.get_epsilon(delta))


MIN_NOISE = 0.3  # the calibration's floor (below it a PLD grid grows to gigabytes)


@functools.lru_cache(maxsize=64)
def calibrate(rate: float, count: int, target_epsilon: float, delta: float,
              kind: str = "pld", max_noise: float = 1000.0) -> float:
  """The smallest noise multiplier in [MIN_NOISE, max_noise] whose `count`
  steps at `rate` stay within (target_epsilon, delta) (dp_accounting's
  calibration, to 0.01; MIN_NOISE when that already does); ConfigError (one line) when
  even `max_noise` does not reach it."""
  if epsilon(rate, MIN_NOISE, count, delta, kind) <= target_epsilon:
    return MIN_NOISE
  if epsilon(rate, max_noise, count, delta, kind) > target_epsilon:
    raise ConfigError(f"config.dp.target_epsilon={target_epsilon} cannot be reached in {count} "
                      f"noisy steps at sampling rate {rate:.3g} (delta {delta:g}) even with "
                      f"noise multiplier {max_noise:g}; raise the target or plan fewer rounds")
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: new_accountant(kind), lambda sigma: event(rate, sigma, count), target_epsilon,
      delta, dp_accounting.ExplicitBracketInterval(MIN_NOISE, max_noise), tol=1e-2))
