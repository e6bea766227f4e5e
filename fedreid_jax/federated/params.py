"""Splitting parameter trees into the shared (federated) and private parts.

What is shared is a predicate over parameter paths: FedPav shares the
backbone and the embedding block; each client's classifier stays private.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

Path = tuple[str, ...]
FEATURE_EXTRACTOR = ("backbone", "embedding")  # the re-ID model without a classifier
PathPredicate = Callable[[Path], bool]


def prefix_predicate(prefixes: Sequence[str]) -> PathPredicate:
  """True for paths whose first key is one of `prefixes` (e.g. backbone, embedding)."""
  prefixes = tuple(prefixes)
  return lambda path: path[0] in prefixes


def split_tree(tree, predicate: PathPredicate):
  """Nested dict -> (selected, rest) nested dicts, by path predicate."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree))
  selected = {k: v for k, v in flat.items() if predicate(k)}
  rest = {k: v for k, v in flat.items() if not predicate(k)}
  return traverse_util.unflatten_dict(selected), traverse_util.unflatten_dict(rest)


def merge_trees(base, override):
  """`base` with every leaf that `override` also has replaced by it."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(base))
  flat.update(traverse_util.flatten_dict(flax.core.unfreeze(override)))
  return traverse_util.unflatten_dict(flat)


def weighted_mean(stacked, weights: jax.Array):
  """Mean over the leading client axis. `[S, ...]`, weights `[S]` -> `[...]`.

  Weights are normalised here, so any positive scale works.
  """
  w = weights / jnp.sum(weights)
  return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), stacked)


def take_client(stacked, index):
  """Leaf `[S, ...]` -> `[...]` for one client."""
  return jax.tree.map(lambda x: x[index], stacked)


def put_client(stacked, index, one):
  """`stacked` `[S, ...]` with client `index`'s row replaced by `one` `[...]`."""
  return jax.tree.map(lambda x, o: x.at[index].set(o), stacked, one)


def where_rows(mask: jax.Array, new, old):
  """Leaves `[C, ...]`: `new`'s row where `mask` `[C]` is True, `old`'s elsewhere."""
  return jax.tree.map(
      lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old)
