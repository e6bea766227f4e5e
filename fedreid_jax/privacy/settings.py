"""The `dp` config section: its defaults and its checks, in one place.

    settings(config)          # {field: value}; a config saved before the section: defaults
    check_settings(config)    # ConfigError (one line) for what the config alone refutes
    check_sizes(config, n)    # ... and for what needs the data (delta >= 1/n, unreachable target)

Modes: "off"; "sgd" (DP-SGD inside each client, `unit` "image" or
"identity"); "client" (DP-FedAvg: each sampled client's update clipped and
noised on the server, `client_rate` Poisson sampling of clients).
"""
from __future__ import annotations

from fedreid_jax.errors import ConfigError
from fedreid_jax.privacy import accountant

MODES = ("off", "sgd", "client")
UNITS = ("image", "identity")
ACCOUNTANTS = ("pld", "rdp")
DP_DEFAULTS = {
    "mode": "off", "unit": "image", "clip_norm": 1.0, "noise_multiplier": 1.0,
    "delta": 1e-5, "target_epsilon": 0.0, "accountant": "pld", "images_per_identity": 4,
    "client_rate": 0.2,  # client mode: each client's chance of joining a round (Poisson)
    # client mode, Andrew et al. 2021: the clip tracks the `clip_quantile` of the update
    # norms, geometric step `clip_lr`; the clipped-count noise is `count_stddev` (0: m / 20)
    "adaptive_clip": False, "clip_quantile": 0.5, "clip_lr": 0.2, "count_stddev": 0.0,
}
MAX_NOISE = 1000.0  # the calibration's search bound for dp.target_epsilon


def settings(config) -> dict:
  """`config.dp` over `DP_DEFAULTS` (a config saved before the section: off)."""
  given = config.get("dp")
  given = {} if given is None else given
  return {k: given.get(k, v) for k, v in DP_DEFAULTS.items()}


def enabled(config) -> bool:
  return settings(config)["mode"] != "off"


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(value, choices, field):
  if value not in choices:
    raise ConfigError(f"config.dp.{field}={value!r} must be one of {', '.join(choices)}")


def check_settings(config, num_clients: int | None = None) -> None:
  """ConfigError (one line) for an invalid `config.dp`; `num_clients`: the
  run's client count when the config tells it (client mode's checks)."""
  dp = settings(config)
  _choice(dp["mode"], MODES, "mode")
  if dp["mode"] == "off":
    return
  _choice(dp["unit"], UNITS, "unit")
  _choice(dp["accountant"], ACCOUNTANTS, "accountant")
  sigma, clip = dp["noise_multiplier"], dp["clip_norm"]
  if not _number(sigma) or sigma < 0:
    raise ConfigError(f"config.dp.noise_multiplier={sigma!r} must be a non-negative number "
                      "(the noise's std over the clip norm; 0: no noise, no guarantee)")
  if not _number(clip) or clip <= 0:
    raise ConfigError(f"config.dp.clip_norm={clip!r} must be a positive number (the bound "
                      "on each unit's gradient or each client's update)")
  if not _number(dp["delta"]) or not 0 < dp["delta"] < 1:
    raise ConfigError(f"config.dp.delta={dp['delta']!r} must be in (0, 1), well below 1/n")
  target = dp["target_epsilon"]
  if target is not None and (not _number(target) or target < 0):
    raise ConfigError(f"config.dp.target_epsilon={target!r} must be a non-negative number "
                      "(0: off, dp.noise_multiplier is used as given)")
  count = dp["images_per_identity"]
  if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
    raise ConfigError(f"config.dp.images_per_identity={count!r} must be a positive integer")
  if dp["mode"] == "client":
    check_client_mode(config, dp, num_clients)


def check_client_mode(config, dp: dict, num_clients: int | None) -> None:
  """Client mode's own checks: rate, adaptive clipping, clients per round, and
  (count known) enough clients for the sampling, delta below 1/C and a reachable
  target epsilon."""
  q = dp["client_rate"]
  if not _number(q) or not 0 < q <= 1:
    raise ConfigError(f"config.dp.client_rate={q!r} must be in (0, 1] (each client's chance "
                      "of joining a round)")
  if not _number(dp["clip_quantile"]) or not 0 < dp["clip_quantile"] < 1:
    raise ConfigError(f"config.dp.clip_quantile={dp['clip_quantile']!r} must be in (0, 1)")
  for field in ("clip_lr", "count_stddev"):
    if not _number(dp[field]) or dp[field] < 0:
      raise ConfigError(f"config.dp.{field}={dp[field]!r} must be a non-negative number")
  if config.fed.clients_per_round != 0:
    raise ConfigError(f"config.fed.clients_per_round={config.fed.clients_per_round} with "
                      "dp.mode='client': clients are Poisson-sampled at dp.client_rate; set "
                      "fed.clients_per_round=0")
  if num_clients is not None:
    check_sizes(config, num_clients)


def check_sizes(config, smallest: int, rate: float | None = None, steps: int | None = None
                ) -> float:
  """With the data known: ConfigError (one line) when `dp.delta >= 1/smallest`
  (`smallest`: the client count in client mode, the fewest units of a client in
  sgd mode), when client mode expects under one client a round, or when
  `dp.target_epsilon` cannot be reached; returns the noise multiplier to use
  (the calibrated one when a target is set). `rate`, `steps`: sgd mode's
  worst client's sampling rate and noisy steps (client mode: from the config)."""
  dp = settings(config)
  unit = "clients" if dp["mode"] == "client" else f"{dp['unit']}s of the smallest client"
  if dp["delta"] >= 1 / smallest:
    raise ConfigError(f"config.dp.delta={dp['delta']} must be below 1/n = 1/{smallest} ({unit}); "
                      f"take delta <= {1 / (10 * smallest):.2g}")
  if dp["mode"] == "client":
    rate, steps = dp["client_rate"], config.fed.rounds
    if rate * smallest < 1:
      raise ConfigError(f"dp.mode='client' with {smallest} clients at dp.client_rate={rate}: "
                        f"{rate * smallest:.2g} expected per round, needs at least 1; raise the "
                        "rate or use more clients (data.scenario='by_identity', "
                        "data.scenario_clients)")
  if not dp["target_epsilon"]:
    return float(dp["noise_multiplier"])
  return accountant.calibrate(rate, steps, dp["target_epsilon"], dp["delta"], dp["accountant"])


def refuse(mode: str, name: str, why: str | None, in_memory: bool, reading: str) -> None:
  """ConfigError (one line) when dp `mode` cannot protect algorithm `name`
  (`why`, None: it can) or the data is streamed (`reading`: why that matters)."""
  if why:
    raise ConfigError(f"dp.mode={mode!r} cannot protect {name!r}: {why}")
  if not in_memory:
    raise ConfigError(f"dp.mode={mode!r} needs data.in_memory=True ({reading})")
