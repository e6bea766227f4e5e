"""Federated engine: stacked client state, rounds as stages, algorithms as
registered values (`Algorithm`, `register_algorithm`, `build_algorithm`);
the literature's baselines (`baselines.py`) registered after the built-ins."""
from fedreid_jax.federated.algorithm import (Algorithm, round_input, with_cdw, with_kd,
                                             with_server_optimizer)
from fedreid_jax.federated.cdw import cosine_distance_weights
from fedreid_jax.federated.registry import (build_algorithm, register_algorithm,
                                            registered)
from fedreid_jax.federated import baselines  # noqa: F401  (registers fedprox ... fedbn)

__all__ = ["Algorithm", "build_algorithm", "cosine_distance_weights", "register_algorithm",
           "registered", "round_input", "with_cdw", "with_kd", "with_server_optimizer"]
