"""2-D convolution that picks, per layer, the faster of two lowerings.

XLA's CPU convolution is very slow on tiny feature maps (a ResNet's last
stages at re-ID input sizes): batch 32, 3x3 256->256 on a 4x2 map took 255 ms
forward and backward, while the same convolution written as im2col (strided
slices, concatenated along channels) and one matmul took 10 ms. On larger maps XLA's convolution wins. So each layer chooses by its
static shapes and the backend (`choose`), and the config can force a choice:

- `"xla"`: `lax.conv_general_dilated`, always.
- `"patches"`: im2col + matmul (`conv_patches`), for every NHWC/HWIO layer
  without dilation or groups (others fall back to XLA).
- `"auto"`: on CPU, `patches` for every 1x1 convolution (a strided slice and
  a matmul) and for larger kernels whose output map has at most
  `CPU_PATCHES_MAX_PIXELS` pixels (`choose` shows the measured table); `xla`
  everywhere else, and always on GPU and TPU, where the vendor convolutions
  are the fast path.

The module is `nn.Conv` itself with its `conv_general_dilated` hook set
(`conv_fn`), so parameter names, shapes, initialisation, padding rules and
dtype promotion are exactly `nn.Conv`'s: checkpoints and ImageNet weights
load the same whichever lowering runs.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "patches")
# `auto` on CPU: im2col + matmul for kernels larger than 1x1 when the output
# map has at most this many pixels (H_out * W_out); see `choose`.
CPU_PATCHES_MAX_PIXELS = 8
NHWC = ("NHWC", "HWIO", "NHWC")


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
  """Spatial output length of a convolution along one axis."""
  return (size + pad[0] + pad[1] - kernel) // stride + 1


def explicit_padding(padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """`"SAME"`/`"VALID"` or `[(lo, hi), ...]` -> explicit `((lo, hi), (lo, hi))`."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def window_slices(x: jax.Array, kernel_hw: Sequence[int], strides: Sequence[int],
                  pads: Sequence[tuple[int, int]], pad_value=0) -> list[jax.Array]:
  """`[B, H, W, C]` -> the `kh * kw` strided views `[B, Ho, Wo, C]` of a
  sliding window, in row-major window order (i, j): view (i, j) holds, at each
  output pixel, the input under window offset (i, j). Padding is `pad_value`."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  ho = output_size(x.shape[1], kh, sh, pads[0])
  wo = output_size(x.shape[2], kw, sw, pads[1])
  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)),
                constant_values=jnp.asarray(pad_value, x.dtype))
  return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + (ho - 1) * sh + 1,
                                      j + (wo - 1) * sw + 1, x.shape[3]), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def im2col(x: jax.Array, kernel_hw: Sequence[int], strides: Sequence[int],
           pads: Sequence[tuple[int, int]]) -> jax.Array:
  """`[B, H, W, C]` -> patches `[B, Ho, Wo, kh * kw * C]`, ordered (kh, kw, C)
  like a flattened HWIO kernel, so `patches @ kernel.reshape(-1, O)` is the conv."""
  cols = window_slices(x, kernel_hw, strides, pads)
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv_patches(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], padding,
                 precision=None) -> jax.Array:
  """NHWC `lhs [B, H, W, C]` * HWIO `rhs [kh, kw, C, O]` -> `[B, Ho, Wo, O]` as
  im2col + one matmul; equal to `lax.conv_general_dilated` up to float summation order.

  The matmul is 2-D (`[B*Ho*Wo, K] @ [K, O]`): its kernel gradient is then
  `cols.T @ dy`, which XLA's CPU backend runs in place, whereas the 4-D
  contraction made it copy `dy` transposed first (ResNet-50, 64x32, batch 32:
  forward + backward 328 -> 274 ms, one thread)."""
  kh, kw, cin, cout = rhs.shape
  pads = explicit_padding(padding, lhs.shape[1:3], (kh, kw), strides)
  cols = im2col(lhs, (kh, kw), strides, pads)
  b, ho, wo, k = cols.shape
  out = lax.dot_general(cols.reshape(b * ho * wo, k), rhs.reshape(k, cout),
                        (((1,), (0,)), ((), ())), precision=precision)
  return out.reshape(b, ho, wo, cout)


def choose(impl: str, lhs_shape: Sequence[int], rhs_shape: Sequence[int],
           strides: Sequence[int], padding, backend: str) -> str:
  """The lowering for one layer: `"xla"` or `"patches"`.

  `impl` other than `"auto"` is returned as is. `"auto"` picks `patches`
  only on CPU: for 1x1 kernels, and for larger kernels whose output map has
  at most `CPU_PATCHES_MAX_PIXELS` pixels. Measured on a 2-core AMD EPYC, one
  thread, batch 32, forward + input and kernel gradients, ms, xla / patches
  (benchmarks/conv_choice.py; every distinct layer of ResNet-18/50 at 64x32
  and 128x64 is in benchmarks/RESULTS.md):

  | output map | conv | xla | patches |
  |---|---|---|---|
  | 32x16 | 3x3 64->64 | 40.8 | 100.8 |
  | 16x8 | 3x3 128->128 | 37.2 | 71.4 |
  | 8x4 | 3x3 256->256 | 36.6 | 39.6 |
  | 4x2 | 3x3 256->256 | 255.2 | 10.2 |
  | 4x2 | 3x3 512->512 | 3253.5 | 39.4 |
  | 2x1 | 3x3 512->512 | 187.3 | 11.1 |
  | 32x16 | 1x1 64->256 | 83.8 | 43.3 |
  | 8x4 | 1x1 1024->512 | 47.9 | 35.8 |
  | 16x8 | 1x1 64->64 | 1.9 | 2.1 |

  1x1: patches faster in 34 of 36 layers (the other two within 15%); larger
  kernels: patches 7-83x faster on every map of <= 8 pixels; on maps of >= 32
  pixels XLA is faster or within 8%.
  """
  if impl not in IMPLS:
    raise ValueError(f"conv impl {impl!r}; choose one of {list(IMPLS)}")
  if impl != "auto":
    return impl
  if backend != "cpu":
    return "xla"
  kh, kw = rhs_shape[:2]
  pads = explicit_padding(padding, lhs_shape[1:3], (kh, kw), strides)
  ho = output_size(lhs_shape[1], kh, strides[0], pads[0])
  wo = output_size(lhs_shape[2], kw, strides[1], pads[1])
  return "patches" if kh * kw == 1 or ho * wo <= CPU_PATCHES_MAX_PIXELS else "xla"


def _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count) -> bool:
  """Whether `conv_patches` covers this call (NHWC/HWIO, no dilation, no groups)."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
  given = (dimension_numbers if isinstance(dimension_numbers, lax.ConvDimensionNumbers)
           else lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers))
  return (lhs.ndim == 4 and given == dn and feature_group_count == 1
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1))))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, *, impl: str = "auto"):
  """`lax.conv_general_dilated`'s signature (as `nn.Conv` calls it), lowered
  by `choose(impl, ...)` on the default backend at trace time."""
  strides = tuple(window_strides)
  plain = _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count)
  if plain and choose(impl, lhs.shape, rhs.shape, strides, padding,
                      jax.default_backend()) == "patches":
    return conv_patches(lhs, rhs, strides, padding, precision)
  return lax.conv_general_dilated(lhs, rhs, strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation,
                                  dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count,
                                  precision=precision)


# One function object per impl, so modules built twice compare equal.
CONV_FNS = {impl: functools.partial(conv_general_dilated, impl=impl) for impl in IMPLS}


def conv_fn(impl: str):
  """The `nn.Conv(conv_general_dilated=...)` hook for `impl` (one of IMPLS)."""
  if impl not in CONV_FNS:
    raise ValueError(f"conv impl {impl!r}; choose one of {list(IMPLS)}")
  return CONV_FNS[impl]
