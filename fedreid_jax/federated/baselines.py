"""Baselines from the federated-learning literature, each FedPav with one part
changed (docs/algorithms.md, "Baselines"); registered by name after the
built-in algorithms (`fedreid_jax.federated` imports this module).

- `fedprox` (Li et al., MLSys 2020): each client adds (mu / 2) ||w - w_global||^2
  over the shared subtree to its loss (`config.prox.mu`).
- `fedavgm`, `fedadagrad`, `fedadam`, `fedyogi` (Reddi et al., ICLR 2021,
  "Adaptive Federated Optimization"): the server steps along the round's
  pseudo-gradient with server momentum or an adaptive optimizer
  (`config.server_opt`); the adaptive ones follow the paper's Algorithm 2
  exactly (`scale_by_fedopt`), not optax's Adam / Yogi / Adagrad.
- `fedbn` (Li et al., ICLR 2021): every BatchNorm scale, bias and running
  statistic stays with its client (`Algorithm.keep_local`).
- `scaffold` (Karimireddy et al., ICML 2020): control variates, option II
  (`scaffold.py`).
- `ditto` (Li et al., ICML 2021): a personal model on each client, trained
  with a proximal term towards the global model (`ditto.py`).
- each of them with `_kd`, `_cdw` and `_kd_cdw` (the combinators).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import algorithm as alg_lib
from fedreid_jax.federated import ditto as ditto_lib
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import scaffold as scaffold_lib
from fedreid_jax.federated.registry import composed, register_algorithm

PROX_DEFAULTS = {"mu": 0.01}
# lr None: the algorithm's own default (SERVER_LR); eps is the paper's tau.
SERVER_OPT_DEFAULTS = {"lr": None, "momentum": 0.9, "b1": 0.9, "b2": 0.99, "eps": 1e-3}
SERVER_LR = {"fedavgm": 1.0, "fedadagrad": 1e-2, "fedadam": 1e-2, "fedyogi": 1e-2}
FEDOPT_VARIANTS = ("adagrad", "adam", "yogi")


def _settings(config, section: str, defaults: dict) -> dict:
  """`config.<section>` over `defaults` (a config saved before the section
  existed has none: the defaults)."""
  given = config.get(section)
  given = {} if given is None else given
  return {k: given.get(k, v) for k, v in defaults.items()}


def prox_settings(config) -> dict:
  return _settings(config, "prox", PROX_DEFAULTS)


def server_opt_settings(config) -> dict:
  return _settings(config, "server_opt", SERVER_OPT_DEFAULTS)


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_settings(config) -> None:
  """ConfigError (one line) for an invalid `config.prox` or `config.server_opt`."""
  mu = prox_settings(config)["mu"]
  if not _number(mu) or mu < 0:
    raise ConfigError(f"config.prox.mu={mu!r} must be a non-negative number (FedProx's "
                      f"proximal weight; 0: FedPav's loss; default {PROX_DEFAULTS['mu']})")
  opt = server_opt_settings(config)
  if opt["lr"] is not None and (not _number(opt["lr"]) or opt["lr"] <= 0):
    raise ConfigError(f"config.server_opt.lr={opt['lr']!r} must be a positive number, or None "
                      "for the algorithm's default (fedavgm 1.0; fedadagrad, fedadam, "
                      "fedyogi 0.01)")
  if not _number(opt["eps"]) or opt["eps"] < 0:
    raise ConfigError(f"config.server_opt.eps={opt['eps']!r} must be a non-negative number "
                      "(the adaptivity tau of Reddi et al.; default 0.001)")
  for field in ("momentum", "b1", "b2"):
    value = opt[field]
    if not _number(value) or not 0 <= value < 1:
      raise ConfigError(f"config.server_opt.{field}={value!r} must be in [0, 1) (default "
                        f"{SERVER_OPT_DEFAULTS[field]})")


# --- FedProx ---------------------------------------------------------------


def proximal_term(mu: float) -> alg_lib.Regularizer:
  """`Regularizer`: (mu / 2) ||w - w_global||^2 over the global shared subtree
  (the round's shared input; BatchNorm scale and bias included)."""
  return lambda params, global_params, own: local_lib.proximal(mu, params, global_params)


def fedprox(config, model=None) -> alg_lib.Algorithm:
  """FedPav whose clients add FedProx's proximal term (`config.prox.mu`)."""
  del model
  return dataclasses.replace(alg_lib.fedpav(config), name="fedprox", label="FedProx",
                             client_regularizer=proximal_term(prox_settings(config)["mu"]))


# --- Server optimizers (Reddi et al.) --------------------------------------


class FedOptState(NamedTuple):
  """`scale_by_fedopt`'s state: the moments of the pseudo-gradient."""
  mu: Any  # m: first moment, starts at 0
  nu: Any  # v: second moment, starts at tau^2


def scale_by_fedopt(variant: str, b1: float, b2: float, tau: float
                    ) -> optax.GradientTransformation:
  """Reddi et al. (ICLR 2021), Algorithm 2, as an optax transformation of the
  pseudo-gradient g = server - mean = -Delta:

    m_t = b1 m_{t-1} + (1 - b1) g
    v_t = v_{t-1} + g^2                                  (adagrad)
        = b2 v_{t-1} + (1 - b2) g^2                      (adam)
        = v_{t-1} - (1 - b2) g^2 sign(v_{t-1} - g^2)     (yogi)
    update = m_t / (sqrt(v_t) + tau),   m_{-1} = 0, v_{-1} = tau^2

  chained with `optax.scale_by_learning_rate(lr)` this is the paper's
  x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau) (m of -g is -m). Unlike optax's
  adam / yogi: no bias correction, v starts at tau^2 (optax: 0, or yogi's
  1e-6 for m and v); unlike optax's adagrad: momentum b1, tau outside the
  root, v starts at tau^2 (optax: eps inside the root, 0.1). A coordinate
  with sqrt(v) + tau = 0 (tau = 0 and no change yet) moves by 0."""
  if variant not in FEDOPT_VARIANTS:
    raise ValueError(f"variant {variant!r} is not one of {FEDOPT_VARIANTS}")

  def init(params):
    return FedOptState(mu=optax.tree.zeros_like(params),
                       nu=optax.tree.full_like(params, tau ** 2))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    if variant == "adam":
      nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    elif variant == "adagrad":
      nu = jax.tree.map(lambda g, v: v + jnp.square(g), updates, state.nu)
    else:
      nu = jax.tree.map(lambda g, v: v - (1 - b2) * jnp.sign(v - jnp.square(g)) * jnp.square(g),
                        updates, state.nu)

    def step(m, v):
      denominator = jnp.sqrt(v) + tau
      return jnp.where(denominator > 0, m / jnp.where(denominator > 0, denominator, 1.0), 0.0)
    return jax.tree.map(step, mu, nu), FedOptState(mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def fedopt(variant: str, lr: float, b1: float, b2: float, tau: float
           ) -> optax.GradientTransformation:
  """The paper's FedAdagrad / FedAdam / FedYogi server update at rate `lr`."""
  return optax.chain(scale_by_fedopt(variant, b1, b2, tau), optax.scale_by_learning_rate(lr))


def server_optimizer(name: str, config) -> optax.GradientTransformation:
  """The server optimizer of `name` (fedavgm, fedadagrad, fedadam, fedyogi)
  with `config.server_opt` (lr None: `SERVER_LR[name]`)."""
  opt = server_opt_settings(config)
  lr = float(SERVER_LR[name] if opt["lr"] is None else opt["lr"])
  if name == "fedavgm":  # v = momentum v + g; x -= lr v (Hsu et al. 2019; optax's sgd)
    return optax.sgd(lr, momentum=float(opt["momentum"]) or None)
  return fedopt(name[len("fed"):], lr, float(opt["b1"]), float(opt["b2"]), float(opt["eps"]))


_SERVER_LABELS = {"fedavgm": "FedAvgM", "fedadagrad": "FedAdagrad", "fedadam": "FedAdam",
                  "fedyogi": "FedYogi"}


def _with_server(name: str):
  def factory(config, model=None):
    del model
    return alg_lib.with_server_optimizer(alg_lib.fedpav(config), server_optimizer(name, config),
                                         name, _SERVER_LABELS[name])
  return factory


# --- FedBN -----------------------------------------------------------------

# BatchNorm modules of fedreid_jax.models: the stem's bn1, the blocks' bn1..bn3
# and downsample_bn (resnet.py), the embedding block's bn (reid.py).
_BATCHNORM_MODULE = re.compile(r"bn\d*|\w*_bn")


def is_batchnorm(path: tuple) -> bool:
  """A leaf path (params or batch_stats) of a BatchNorm's scale, bias, mean or var."""
  return len(path) >= 2 and bool(_BATCHNORM_MODULE.fullmatch(str(path[-2])))


def fedbn(config, model=None) -> alg_lib.Algorithm:
  """FedPav whose clients keep every BatchNorm scale, bias and statistic."""
  del model
  return dataclasses.replace(alg_lib.fedpav(config), name="fedbn", label="FedBN",
                             keep_local=is_batchnorm)


def _fedbn_cdw(algorithm, config, model):
  """`with_cdw` for FedBN; the reference CDW (`cdw.form` logit, `cdw.mode`
  reference) is refused: it overwrites the BatchNorm statistics each client
  receives with the global model's, which FedBN keeps on the client."""
  if config.cdw.form == "logit" and config.cdw.mode == "reference":
    raise ConfigError("fedbn with cdw.mode='reference' is refused: the reference CDW sends "
                      "each client the global model's BatchNorm statistics, which FedBN keeps "
                      "local; use cdw.mode='default' or cdw.form='delta'")
  return alg_lib.with_cdw(algorithm, config, model)


# --- Registration ----------------------------------------------------------


def ditto(config, model=None) -> alg_lib.Algorithm:
  """Ditto with `config.prox.mu` (ditto.py)."""
  del model
  return ditto_lib.ditto(config, prox_settings(config)["mu"])


BASES = {"fedprox": fedprox, "fedavgm": _with_server("fedavgm"),
         "fedadagrad": _with_server("fedadagrad"), "fedadam": _with_server("fedadam"),
         "fedyogi": _with_server("fedyogi"), "fedbn": fedbn, "scaffold": scaffold_lib.scaffold,
         "ditto": ditto}


def _combinations(name):
  cdw = _fedbn_cdw if name == "fedbn" else alg_lib.with_cdw
  return (("", ()), ("_kd", (alg_lib.with_kd,)), ("_cdw", (cdw,)),
          ("_kd_cdw", (alg_lib.with_kd, cdw)))


NAMES = tuple(f"{base}{suffix}" for base in BASES for suffix, _ in _combinations(base))

for _base, _factory in BASES.items():
  for _suffix, _combinators in _combinations(_base):
    register_algorithm(f"{_base}{_suffix}", composed(_factory, *_combinators))
