"""Federated engine: stacked client state, rounds as stages, CDW and KD."""
from fedreid_jax.federated.cdw import cosine_distance_weights

__all__ = ["cosine_distance_weights"]
