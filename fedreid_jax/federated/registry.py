"""Algorithms by name: `register_algorithm(name, factory)`, `build_algorithm`.

    def fedprox(config, model):
      return dataclasses.replace(build_algorithm("fedpav", config, model),
                                 name="fedprox", label="FedProx", client_regularizer=...)
    register_algorithm("fedprox", fedprox)   # e.g. in the user's own config file

`config.fed.algorithm` and `config.baselines` take any registered name. The
built-in names are registered below in the order of the paper's table, which
is the order of report columns; labels come from the built algorithm.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from fedreid_jax.errors import ConfigError
from fedreid_jax.federated import algorithm as alg_lib
from fedreid_jax.federated import secagg
from fedreid_jax.federated.algorithm import Algorithm

Factory = Callable[..., Algorithm]  # (config, model) -> Algorithm
_FACTORIES: dict[str, Factory] = {}


def _same_definition(a: Factory, b: Factory) -> bool:
  """The same function object, or the same function of the same file re-run
  (a config file loaded twice defines its factory twice)."""
  code = lambda f: getattr(f, "__code__", None)
  cells = lambda f: tuple(c.cell_contents for c in (getattr(f, "__closure__", None) or ()))
  return a is b or (code(a) is not None and code(b) is not None
                    and a.__qualname__ == b.__qualname__
                    and os.path.realpath(code(a).co_filename)
                    == os.path.realpath(code(b).co_filename)
                    and code(a).co_firstlineno == code(b).co_firstlineno
                    and cells(a) == cells(b))


def register_algorithm(name: str, factory: Factory) -> None:
  """Registers `factory(config, model) -> Algorithm` as `name`. ConfigError
  when `name` is taken by a different factory."""
  if not isinstance(name, str) or not name.isidentifier():
    raise ConfigError(f"algorithm name {name!r} must be an identifier (letters, digits, _)")
  if not callable(factory):
    raise ConfigError(f"register_algorithm({name!r}, ...): the factory {factory!r} is not "
                      "callable; pass a function (config, model) -> Algorithm")
  other = _FACTORIES.get(name)
  if other is not None and not _same_definition(other, factory):
    raise ConfigError(f"algorithm {name!r} is already registered by "
                      f"{getattr(other, '__module__', '?')}.{getattr(other, '__qualname__', other)}; "
                      f"pick another name (registered: {', '.join(registered())})")
  _FACTORIES[name] = factory


def registered() -> tuple[str, ...]:
  """Every registered name, in registration order (the report's column order)."""
  return tuple(_FACTORIES)


def check_name(name: str, field: str = "fed.algorithm") -> None:
  """ConfigError naming the registered algorithms when `name` is not one."""
  if name not in _FACTORIES:
    raise ConfigError(f"config.{field}={name!r} is not a registered algorithm; choose one of "
                      f"{', '.join(registered())} (or register yours with "
                      "fedreid_jax.federated.register_algorithm in your config file)")


def build_algorithm(name: str, config, model) -> Algorithm:
  """The algorithm registered as `name`, for `config` and `model`. Its `name`
  is the registered one; under `config.secagg.enabled`, with secure
  aggregation (`secagg.with_secure_aggregation`). ConfigError when the name
  is unknown, the factory returns something other than an `Algorithm`, or it
  cannot run under secure aggregation."""
  check_name(name)
  built = _FACTORIES[name](config, model)
  if not isinstance(built, Algorithm):
    raise ConfigError(f"the factory registered as algorithm {name!r} returned "
                      f"{type(built).__name__}, not a fedreid_jax.federated.Algorithm "
                      f"(registered: {', '.join(registered())})")
  if built.name != name:
    built = dataclasses.replace(built, name=name)
  if secagg.enabled(config):  # here, so config validation refuses what cannot run under it
    built = secagg.with_secure_aggregation(built, config, model)
  return built


def composed(base: Factory, *combinators) -> Factory:
  """The factory of `base` with `combinators` applied in order (each
  `(algorithm, config, model) -> algorithm`, e.g. `algorithm.with_kd`)."""
  def factory(config, model):
    out = base(config, model)
    for combine in combinators:
      out = combine(out, config, model)
    return out
  return factory


for _name, _factory in (
    ("local", alg_lib.local),
    ("fedpav", alg_lib.fedpav),
    ("fedpav_kd", composed(alg_lib.fedpav, alg_lib.with_kd)),
    ("fedpav_cdw", composed(alg_lib.fedpav, alg_lib.with_cdw)),
    ("fedpav_kd_cdw", composed(alg_lib.fedpav, alg_lib.with_kd, alg_lib.with_cdw)),
    ("fedavg", alg_lib.fedavg),
    ("centralised", alg_lib.centralised)):
  register_algorithm(_name, _factory)
