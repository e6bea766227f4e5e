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
  are the fast path. On CPU the XLA-lowered layers with output maps of at
  least `CPU_KERNEL_GRAD_MIN_PIXELS` pixels keep XLA's forward and input
  gradient but take their kernel gradient as im2col + matmul
  (`conv_xla_patches_grad`): XLA's took 20-25 ms for a 32x16 3x3 64->64
  layer at batch 32, PyTorch's 6 ms.

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
# `auto` on CPU: kernel gradients of XLA-lowered layers with output maps of at
# least this many pixels as im2col + matmul (`conv_xla_patches_grad`), over
# chunks of images whose patches take at most KERNEL_GRAD_CHUNK_BYTES. Whole
# fwd + bwd steps, 128x64 input: ResNet-18 and -50 1.04x; at 64x32 (only the
# stem qualifies) 1.00x; a 32-pixel threshold lost 3-10% at 64x32.
CPU_KERNEL_GRAD_MIN_PIXELS = 512
KERNEL_GRAD_CHUNK_BYTES = 2 << 20


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


def chunk_images(batch: int, image_bytes: int, max_bytes: int) -> int:
  """The largest divisor of `batch` whose `image_bytes` each fit in `max_bytes` (>= 1)."""
  fits = [d for d in range(1, batch + 1) if batch % d == 0 and d * image_bytes <= max_bytes]
  return max(fits, default=1)


def kernel_grad_patches(lhs: jax.Array, g: jax.Array, kernel_hw: Sequence[int],
                        strides: Sequence[int], pads, precision=None) -> jax.Array:
  """d<conv(lhs, k), g>/dk `[kh, kw, C, O]` for NHWC `lhs [B, H, W, C]` and
  `g [B, Ho, Wo, O]`, as `cols.T @ g` over chunks of images whose patches fit
  in `KERNEL_GRAD_CHUNK_BYTES` (in cache), one chunk at a time.

  Each chunk's `cols.T [kh * kw * C, n * Ho * Wo]` is built channel-major
  (the views of `x` transposed to `[C, n, H, W]`, stacked along rows), so the
  product is a plain `[K, M] @ [M, O]` matmul: XLA's CPU backend runs it in
  its fast matmul, where `cols` with its transposed contraction ran in a
  slower one."""
  (kh, kw), b, cin, cout = kernel_hw, lhs.shape[0], lhs.shape[3], g.shape[3]
  k = kh * kw * cin
  n = chunk_images(b, g.shape[1] * g.shape[2] * k * lhs.dtype.itemsize,
                   KERNEL_GRAD_CHUNK_BYTES)
  (sh, sw), ho, wo = strides, g.shape[1], g.shape[2]

  def chunk(acc, xs):
    x, dy = xs  # [n, H, W, C], [n, Ho, Wo, O]
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)),
                 ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))  # [C, n, Hp, Wp]
    rows = [lax.slice(xt, (0, 0, i, j), (cin, n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1),
                      (1, 1, sh, sw)).reshape(cin, n * ho * wo)
            for i in range(kh) for j in range(kw)]  # (i, j, C) order, as im2col
    cols_t = jnp.concatenate(rows, axis=0)  # [K, n * Ho * Wo]
    return acc + lax.dot_general(cols_t, dy.reshape(-1, cout), (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32), None

  split = lambda a: a.reshape(b // n, n, *a.shape[1:])
  acc, _ = lax.scan(chunk, jnp.zeros((k, cout), jnp.float32), (split(lhs), split(g)))
  return acc.reshape(kh, kw, cin, cout)


def _xla_conv(lhs, rhs, strides, pads, precision):
  return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_xla_patches_grad(lhs: jax.Array, rhs: jax.Array, strides, pads, precision=None):
  """XLA's NHWC/HWIO convolution (explicit `pads`), forward and input
  gradient; its kernel gradient is `kernel_grad_patches`."""
  return _xla_conv(lhs, rhs, strides, pads, precision)


def _conv_fwd(lhs, rhs, strides, pads, precision):
  return _xla_conv(lhs, rhs, strides, pads, precision), (lhs, rhs)


def _conv_bwd(strides, pads, precision, residuals, g):
  lhs, rhs = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, rhs, strides, pads, precision), lhs)
  dk = kernel_grad_patches(lhs, g, rhs.shape[:2], strides, pads, precision)
  return input_vjp(g)[0], dk.astype(rhs.dtype)


conv_xla_patches_grad.defvjp(_conv_fwd, _conv_bwd)


def choose(impl: str, lhs_shape: Sequence[int], rhs_shape: Sequence[int],
           strides: Sequence[int], padding, backend: str) -> str:
  """The lowering for one layer: `"xla"` or `"patches"`.

  `impl` other than `"auto"` is returned as is. `"auto"` picks `patches`
  only on CPU: for 1x1 kernels, and for larger kernels whose output map has
  at most `CPU_PATCHES_MAX_PIXELS` pixels. Measured on a 2-core AMD EPYC, one
  thread, batch 32, forward + input and kernel gradients, ms, xla / patches
  (benchmarks/conv_choice.py, after the 2-D matmul of `conv_patches`; every
  distinct layer of ResNet-18/50 at 64x32 and 128x64 is in
  benchmarks/RESULTS.md):

  | output map | conv | xla | patches |
  |---|---|---|---|
  | 32x16 | 3x3 64->64 | 26.1 | 71.1 |
  | 16x8 | 3x3 128->128 | 21.4 | 40.6 |
  | 8x4 | 3x3 256->256 | 19.8 | 21.5 |
  | 4x2 | 3x3 256->256 | 284.5 | 4.6 |
  | 4x2 | 3x3 512->512 | 1947.2 | 23.1 |
  | 2x1 | 3x3 512->512 | 158.9 | 5.3 |
  | 32x16 | 1x1 64->256 | 45.1 | 9.5 |
  | 8x4 | 1x1 1024->512 | 31.0 | 16.2 |
  | 16x8 | 1x1 64->64 | 1.2 | 0.6 |

  1x1: patches faster in all 36 layers (1.2-4.7x); larger kernels: patches
  20-136x faster on every map of <= 8 pixels; on larger maps XLA is faster
  or within 16%. Patches for the stride-2 3x3 layers with 8x4 outputs (within
  16% in isolation) made whole ResNet steps slower (0.90-0.98x), so the rule
  stays.
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


def cpu_rewrites(impl: str, backend: str | None = None) -> bool:
  """Whether `impl` takes the CPU rewrites beside the convolutions (the stem's
  max pool as strided views, BatchNorm's closed-form gradient): `"patches"`
  always, `"auto"` on CPU (`backend`, default the default backend), `"xla"`
  never."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl {impl!r}; choose one of {list(IMPLS)}")
  return impl == "patches" or (impl == "auto" and (backend or jax.default_backend()) == "cpu")


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
  backend = jax.default_backend()
  if plain and choose(impl, lhs.shape, rhs.shape, strides, padding, backend) == "patches":
    return conv_patches(lhs, rhs, strides, padding, precision)
  if plain and impl == "auto" and backend == "cpu":
    pads = explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    ho = output_size(lhs.shape[1], rhs.shape[0], strides[0], pads[0])
    wo = output_size(lhs.shape[2], rhs.shape[1], strides[1], pads[1])
    if ho * wo >= CPU_KERNEL_GRAD_MIN_PIXELS:
      return conv_xla_patches_grad(lhs, rhs, strides, pads, precision)
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
