"""A run's privacy, as the experiment uses it (`train.Experiment`):

    privacy = RunPrivacy(config, clients_data, algorithm)  # checks and calibrates (one line on bad input)
    algorithm = privacy.wrap(algorithm)          # client mode: DP-FedAvg's server mean
    plan = privacy.round_plan(plan, round_index) # client mode: the round's Poisson sample
    record.update(privacy.record(round_index))   # privacy/... entries of the round record

With `dp.mode="off"` every method leaves its input as it is.
"""
from __future__ import annotations

import jax

from fedreid_jax.federated.failures import RoundFailures
from fedreid_jax.privacy import client_dp
from fedreid_jax.privacy.settings import check_settings, check_sizes, settings


class RunPrivacy:
  """The `dp` settings of one run, checked against its clients."""

  def __init__(self, config, clients_data, algorithm):
    """ConfigError (one line) when `config.dp` cannot protect `algorithm` (as
    `config_lib.describe_algorithm` builds it) over `clients_data`."""
    self.config = config
    self.dp = settings(config)
    self.mode = self.dp["mode"]
    self.num_clients = len(clients_data)
    self.sigma = float(self.dp["noise_multiplier"])
    if self.mode == "off":
      return
    check_settings(config)
    if self.mode == "client":
      client_dp.check_algorithm(algorithm, config)
      self.sigma = check_sizes(config, self.num_clients)

  def wrap(self, algorithm):
    """`algorithm` under this run's DP (client mode: `client_dp.with_client_dp`)."""
    if self.mode == "client":
      return client_dp.with_client_dp(algorithm, self.config, self.num_clients, self.sigma)
    return algorithm

  def round_plan(self, plan: RoundFailures, round_index: int) -> RoundFailures:
    """Client mode: `plan` with the clients outside the round's Poisson sample
    at 0 steps, weight 0 (`client_dp.sampled_plan`)."""
    if self.mode != "client":
      return plan
    return client_dp.sampled_plan(plan, self.sampled(round_index))

  def sampled(self, round_index: int):
    return client_dp.poisson_sample(self.config.seed, round_index, self.num_clients,
                                    self.dp["client_rate"])

  def record(self, round_index: int, server) -> dict[str, float]:
    """The round's `privacy/...` record entries ({} when DP is off); `server`:
    the server state after the round (its `algorithm_state` holds the noise)."""
    if self.mode == "client":
      return client_dp.record(self.config, round_index,
                              jax.device_get(server.algorithm_state),
                              len(self.sampled(round_index)))
    return {}
