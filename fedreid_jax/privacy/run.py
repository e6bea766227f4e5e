"""A run's privacy, as the experiment uses it (`train.Experiment`):

    privacy = RunPrivacy(config, clients_data, algorithm)  # checks, calibrates (one line on bad input)
    algorithm = privacy.wrap(algorithm)          # client mode: DP-FedAvg's server mean
    inputs = privacy.input_class(splits, ...)    # sgd mode: padded Poisson batches
    step = privacy.make_local_step(model, tx, train_cfg, regularizer, personal_mu)
    plan = privacy.round_plan(plan, round_index) # client mode: the round's Poisson sample
    record.update(privacy.record(round_index, server))  # privacy/... entries

With `dp.mode="off"` every method leaves its input as it is.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import sampling
from fedreid_jax.federated.failures import RoundFailures
from fedreid_jax.input.train_input import TrainInput
from fedreid_jax.privacy import accountant, client_dp, dp_sgd, poisson_input
from fedreid_jax.privacy.settings import check_settings, check_sizes, refuse, settings


def check_sgd_algorithm(algorithm, config) -> None:
  """ConfigError (one line) for what DP-SGD inside the clients cannot protect."""
  why = None
  if algorithm.personal_mu is not None:
    why = "Ditto's personal model trains on the private data without DP-SGD"
  elif algorithm.measurements or algorithm.received_stats is not None:
    if config.cdw.form != "delta":
      why = ("CDW's logit distances are computed on each client's private data and sent "
             "un-noised; use cdw.form='delta' (from the DP-trained models only)")
  elif algorithm.centralised:
    why = "the centralised baseline merges every client (use dp.mode='sgd' per client)"
  refuse("sgd", algorithm.name, why, config.data.in_memory,
         "Poisson batches are drawn from the decoded images")


class RunPrivacy:
  """The `dp` settings of one run, checked against its clients."""

  def __init__(self, config, clients_data, algorithm):
    """ConfigError (one line) when `config.dp` cannot protect `algorithm` (as
    `config_lib.describe_algorithm` builds it) over `clients_data`."""
    self.config = config
    self.dp = settings(config)
    self.mode = self.dp["mode"]
    self.names = [c.name for c in clients_data]
    self.num_clients = len(clients_data)
    self.sigma = float(self.dp["noise_multiplier"])
    if self.mode == "off":
      return
    check_settings(config)
    if self.mode == "client":
      client_dp.check_algorithm(algorithm, config)
      self.sigma = check_sizes(config, self.num_clients)
      return
    check_sgd_algorithm(algorithm, config)
    self.per_unit = self.dp["images_per_identity"] if self.dp["unit"] == "identity" else 1
    units = [poisson_input.num_units(c.train, self.dp["unit"]) for c in clients_data]
    self.rates = [poisson_input.sampling_rate(n, config.train.batch_size, self.per_unit)
                  for n in units]
    self.steps = [poisson_input.steps_per_round(q, config.train.local_epochs)
                  for q in self.rates]
    planned = self.noisy_steps(config.fed.rounds - 1)
    worst = max(range(self.num_clients),  # the client the target costs most noise
                key=lambda k: accountant.epsilon(self.rates[k], 1.0, planned[k],
                                                 self.dp["delta"], self.dp["accountant"]))
    self.sigma = check_sizes(config, min(units), self.rates[worst], planned[worst])

  @functools.lru_cache(maxsize=None)
  def selected(self, round_index: int) -> frozenset:
    """The clients the engine selects in `round_index` (sgd mode)."""
    count = sampling.num_selected(self.config.fed.clients_per_round, self.num_clients)
    return frozenset(int(c) for c in sampling.sample_clients(
        self.config.seed, round_index, self.num_clients, count))

  def noisy_steps(self, round_index: int) -> list[int]:
    """Each client's noisy steps through `round_index`: its steps per round
    times the rounds it was selected in (stragglers and failed clients
    counted in full: an upper bound)."""
    rounds = [sum(k in self.selected(r) for r in range(round_index + 1))
              for k in range(self.num_clients)]
    return [n * s for n, s in zip(rounds, self.steps)]

  def wrap(self, algorithm):
    """`algorithm` under this run's DP (client mode: `client_dp.with_client_dp`)."""
    if self.mode == "client":
      return client_dp.with_client_dp(algorithm, self.config, self.num_clients, self.sigma)
    return algorithm

  def input_class(self, splits, **kw) -> TrainInput:
    """The clients' training input: padded Poisson batches in sgd mode."""
    if self.mode == "sgd":
      return poisson_input.PoissonInput(splits, unit=self.dp["unit"],
                                        images_per_identity=self.per_unit, **kw)
    return TrainInput(splits, **kw)

  def make_local_step(self, model, tx, train_cfg, regularizer=None, personal_mu=None):
    """The clients' local step: DP-SGD's in sgd mode, else `local.make_local_step`."""
    if self.mode == "sgd":
      return dp_sgd.make_dp_local_step(model, tx, train_cfg, self.dp["clip_norm"], self.sigma,
                                       self.per_unit, regularizer)
    return local_lib.make_local_step(model, tx, train_cfg, regularizer, personal_mu)

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
    the server state after the round (client mode: its `algorithm_state`
    holds the run's noise). Functions of the round count: a resume continues
    them exactly."""
    if self.mode == "client":
      return client_dp.record(self.config, round_index,
                              jax.device_get(server.algorithm_state),
                              len(self.sampled(round_index)))
    if self.mode != "sgd":
      return {}
    out = {"privacy/noise_multiplier": self.sigma}
    for name, q, steps in zip(self.names, self.rates, self.noisy_steps(round_index)):
      out[f"privacy/{name}/epsilon"] = accountant.epsilon(q, self.sigma, steps,
                                                          self.dp["delta"], self.dp["accountant"])
      out[f"privacy/{name}/steps"] = float(steps)
      out[f"privacy/{name}/sampling_rate"] = q
    out["privacy/epsilon"] = float(np.max([out[f"privacy/{n}/epsilon"] for n in self.names]))
    return out
