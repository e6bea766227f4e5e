"""Max pooling as strided slices, with the gradient written out.

`nn.max_pool` differentiates through XLA's `reduce_window`; on the CPU its
JVP builds argmax indices with a variadic `reduce_window` over iotas, which
took 13 ms of a 274 ms ResNet-50 forward + backward step (64x32 input,
batch 32, one thread; the stem's 3x3 stride-2 pool). Here the pool is the
elementwise maximum of the window's `kh * kw` strided views
(`conv.window_slices`) and the gradient is routed, as XLA's
`select_and_scatter` routes it, to the first maximal element of each window
in row-major order, so forward and gradient equal `nn.max_pool`'s exactly.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedreid_jax.models import conv as conv_lib


def _views(x, window, strides, pads):
  """The `kh * kw` views `[B, Ho, Wo, C]` of `x`, padded with -inf."""
  return conv_lib.window_slices(x, window, strides, pads, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return functools.reduce(jnp.maximum, _views(x, window, strides, pads))


def _max_pool_fwd(x, window, strides, pads):
  out = _max_pool(x, window, strides, pads)
  return out, (x, out)


def _max_pool_bwd(window, strides, pads, residuals, g):
  """Each window's cotangent goes to its first maximal element (row-major)."""
  x, out = residuals
  views, views_vjp = jax.vjp(lambda x: _views(x, window, strides, pads), x)
  free = jnp.ones(out.shape, bool)
  parts = []
  for view in views:
    hit = free & (view == out)
    free = free & ~hit
    parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
  return views_vjp(parts)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]], impl: str = "auto") -> jax.Array:
  """`nn.max_pool(x, window, strides, padding)` for NHWC `x [B, H, W, C]` with
  explicit `padding ((lo, hi), (lo, hi))` -> `[B, Ho, Wo, C]`.

  `impl` is the model's `conv_impl` (`conv.IMPLS`): `"xla"` is `nn.max_pool`;
  `"patches"` the strided views; `"auto"` the views on CPU and `nn.max_pool`
  on GPU and TPU."""
  if impl not in conv_lib.IMPLS:
    raise ValueError(f"pool impl {impl!r}; choose one of {list(conv_lib.IMPLS)}")
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if impl == "xla" or (impl == "auto" and jax.default_backend() != "cpu"):
    return nn.max_pool(x, tuple(window), tuple(strides), padding=pads)
  return _max_pool(x, tuple(window), tuple(strides), pads)
