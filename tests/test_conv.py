"""Per-layer conv lowering (models/conv.py): the im2col + matmul path equals
XLA's convolution, forward and gradients; `auto` picks by shape and backend;
parameters are exactly nn.Conv's."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedreid_jax.models import conv, resnet

# (input [B, H, W, C], kernel [kh, kw, C, O], strides, padding as nn.Conv takes it)
CASES = [
    ((2, 6, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),  # 3x3, same size
    ((2, 7, 4, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),  # 3x3 stride 2, odd height
    ((2, 5, 3, 4), (1, 1, 4, 6), (2, 2), "SAME"),  # downsample 1x1 (nn.Conv's default padding)
    ((1, 9, 6, 3), (7, 7, 3, 2), (2, 2), ((3, 3), (3, 3))),  # ResNet stem
    ((3, 2, 1, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1))),  # 2x1 map, the slow XLA case
    ((2, 5, 4, 2), (2, 3, 2, 3), (1, 2), "VALID"),  # non-square kernel and strides
]


def xla_conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=conv.NHWC)


def normal(shape, seed):
  """numpy, not jax.random: eager PRNG ops compile for seconds on CPU."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def forward_and_grads(f, x, k, cotangent, strides, padding):
  """(f(x, k), d<f, cotangent>/dx, d<f, cotangent>/dk), compiled as one function."""
  def run(x, k, cotangent):
    y, vjp = jax.vjp(lambda x, k: f(x, k, strides, padding), x, k)
    return (y, *vjp(cotangent))
  return jax.jit(run)(x, k, cotangent)


@pytest.mark.parametrize("shape_x, shape_k, strides, padding", CASES)
def test_patches_equals_xla_forward_and_gradients(shape_x, shape_k, strides, padding):
  x, k = normal(shape_x, 0), normal(shape_k, 1)
  cotangent = normal(jax.eval_shape(lambda: xla_conv(x, k, strides, padding)).shape, 2)
  want = forward_and_grads(xla_conv, x, k, cotangent, strides, padding)
  got = forward_and_grads(conv.conv_patches, x, k, cotangent, strides, padding)
  for g, w, name in zip(got, want, ("output", "input gradient", "kernel gradient")):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4, err_msg=name)


def test_im2col_orders_patches_like_a_flattened_hwio_kernel():
  x = jnp.arange(1 * 3 * 3 * 2, dtype=jnp.float32).reshape(1, 3, 3, 2)
  cols = conv.im2col(x, (2, 2), (1, 1), ((0, 0), (0, 0)))
  assert cols.shape == (1, 2, 2, 8)
  # output (0, 0): window rows 0-1, cols 0-1, each pixel's 2 channels in turn
  np.testing.assert_array_equal(cols[0, 0, 0], [0, 1, 2, 3, 6, 7, 8, 9])


@pytest.mark.parametrize("backend, hw, want", [
    ("cpu", (4, 2), "patches"),  # 4x2 output map: 8 pixels
    ("cpu", (2, 1), "patches"),
    ("cpu", (8, 4), "xla"),  # 32 pixels
    ("cpu", (16, 8), "xla"),
    ("gpu", (2, 1), "xla"),  # GPU/TPU: always XLA's convolution
    ("tpu", (4, 2), "xla"),
])
def test_auto_picks_by_output_size_and_backend(backend, hw, want):
  shape_x = (32, *hw, 256)
  assert conv.choose("auto", shape_x, (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)),
                     backend) == want


def test_auto_runs_1x1_convs_as_a_matmul_on_cpu_only():
  for hw in ((2, 1), (32, 16)):
    assert conv.choose("auto", (32, *hw, 64), (1, 1, 64, 256), (1, 1), "SAME", "cpu") == "patches"
    assert conv.choose("auto", (32, *hw, 64), (1, 1, 64, 256), (1, 1), "SAME", "gpu") == "xla"


def test_auto_judges_the_output_map_of_a_strided_layer():
  # 8x4 input, stride 2 -> 4x2 output: patches; the same input at stride 1: xla
  assert conv.choose("auto", (32, 8, 4, 128), (3, 3, 128, 256), (2, 2), ((1, 1), (1, 1)),
                     "cpu") == "patches"
  assert conv.choose("auto", (32, 8, 4, 128), (3, 3, 128, 256), (1, 1), ((1, 1), (1, 1)),
                     "cpu") == "xla"


@pytest.mark.parametrize("impl", ["xla", "patches"])
def test_forced_impl_is_kept_on_every_backend(impl):
  for backend in ("cpu", "gpu"):
    for hw in ((2, 1), (32, 16)):
      assert conv.choose(impl, (8, *hw, 4), (3, 3, 4, 4), (1, 1), "SAME", backend) == impl


def test_unknown_impl_is_refused():
  with pytest.raises(ValueError, match="choose one of"):
    conv.conv_fn("winograd")


def test_patches_runs_through_the_hook_and_dilated_convs_fall_back_to_xla():
  x, k = normal((2, 4, 2, 3), 0), normal((3, 3, 3, 4), 1)
  jaxpr = str(jax.make_jaxpr(functools.partial(conv.CONV_FNS["patches"], window_strides=(1, 1),
                                               padding="SAME",
                                               dimension_numbers=conv.NHWC))(x, k))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
  dilated = conv.CONV_FNS["patches"](x, k, (1, 1), "SAME", rhs_dilation=(2, 2),
                                     dimension_numbers=conv.NHWC)
  want = lax.conv_general_dilated(x, k, (1, 1), "SAME", rhs_dilation=(2, 2),
                                  dimension_numbers=conv.NHWC)
  np.testing.assert_array_equal(dilated, want)


@pytest.mark.parametrize("impl", conv.IMPLS)
def test_conv_module_has_nn_conv_parameters_and_output(impl):
  x = normal((2, 4, 2, 3), 0)
  plain = nn.Conv(5, (3, 3), 2, padding=1)
  ours = nn.Conv(5, (3, 3), 2, padding=1, conv_general_dilated=conv.conv_fn(impl))
  key = jax.random.key(1, impl="rbg")  # threefry would compile for seconds
  v_plain, v_ours = plain.init(key, x), ours.init(key, x)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_plain)
  assert set(v_ours["params"]) == {"kernel", "bias"}
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_plain)
  np.testing.assert_allclose(jax.jit(ours.apply)(v_plain, x), jax.jit(plain.apply)(v_plain, x),
                             rtol=1e-5, atol=1e-5)


def test_resnet_same_tree_and_close_features_for_every_impl():
  """The hook changes no parameter and, through a whole network, no output
  beyond rounding (per-layer gradients are checked above)."""
  x = normal((2, 32, 16, 3), 0)
  nets = {impl: resnet.make_backbone("resnet_tiny", 4, 2, False, conv_impl=impl)
          for impl in ("xla", "patches")}
  shapes = {impl: jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(1), x)
            for impl, net in nets.items()}
  assert shapes["patches"] == shapes["xla"]
  # Random weights from numpy (a jitted flax init compiles for seconds on CPU).
  leaves, treedef = jax.tree.flatten(shapes["xla"])
  variables = jax.tree.unflatten(treedef, [jnp.abs(normal(leaf.shape, i) * 0.3 + 1.0)
                                           for i, leaf in enumerate(leaves)])
  # eval-mode BatchNorm: batch statistics of 2 samples would amplify rounding
  out = {impl: jax.jit(functools.partial(net.apply, train=False))(variables, x)
         for impl, net in nets.items()}
  assert out["xla"].shape == (2, 1, 1, 32)
  np.testing.assert_allclose(out["patches"], out["xla"], rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(out["xla"]).max()))


def test_patches_in_bfloat16_stays_bfloat16_and_close():
  x, k = normal((4, 4, 2, 16), 0), normal((3, 3, 16, 8), 1)
  pads = ((1, 1), (1, 1))
  got = jax.jit(conv.conv_patches, static_argnums=(2, 3))(
      x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (1, 1), pads)
  assert got.dtype == jnp.bfloat16
  want = xla_conv(x, k, (1, 1), pads)
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05,
                             atol=0.02 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("impl, backend, want", [
    ("auto", "cpu", True), ("auto", "gpu", False), ("auto", "tpu", False),
    ("patches", "gpu", True), ("xla", "cpu", False),
])
def test_cpu_rewrites_follow_the_conv_impl(impl, backend, want):
  """The stem pool and BatchNorm rewrites go with `auto` on CPU only, and
  with a forced `patches`; `xla` is the plain flax model everywhere."""
  assert conv.cpu_rewrites(impl, backend) is want


def test_patches_matmuls_are_2d_forward_and_backward():
  """`[B*Ho*Wo, K] @ [K, O]`: the kernel gradient is then `cols.T @ dy`, which
  XLA's CPU backend runs without the transposed copy of `dy` that the 4-D
  contraction cost (benchmarks/RESULTS.md)."""
  x, k = normal((2, 4, 2, 3), 0), normal((3, 3, 3, 4), 1)
  f = lambda x, k: conv.conv_patches(x, k, (1, 1), "SAME")
  g = jnp.ones((2, 4, 2, 4))
  jaxpr = jax.make_jaxpr(lambda x, k: jax.vjp(f, x, k)[1](g))(x, k)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3  # forward, input gradient, kernel gradient
  assert all(v.aval.ndim == 2 for e in dots for v in e.invars)


@pytest.mark.parametrize("shape_x, shape_k, strides, padding", CASES)
def test_xla_conv_with_patches_kernel_gradient_equals_xla(shape_x, shape_k, strides, padding):
  """`conv_xla_patches_grad`: XLA's forward and input gradient as they are,
  the kernel gradient by chunked im2col + matmul equal up to rounding."""
  x, k = normal(shape_x, 0), normal(shape_k, 1)
  pads = conv.explicit_padding(padding, shape_x[1:3], shape_k[:2], strides)
  hybrid = lambda x, k, strides, padding: conv.conv_xla_patches_grad(x, k, strides, pads)
  cotangent = normal(jax.eval_shape(lambda: xla_conv(x, k, strides, padding)).shape, 2)
  want = forward_and_grads(xla_conv, x, k, cotangent, strides, padding)
  got = forward_and_grads(hybrid, x, k, cotangent, strides, padding)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-4, err_msg="kernel gradient")


def test_kernel_gradient_chunks_divide_the_batch_and_fit_the_bound():
  assert conv.chunk_images(32, 1 << 20, 2 << 20) == 2
  assert conv.chunk_images(6, 1 << 20, 4 << 20) == 3  # 4 does not divide 6
  assert conv.chunk_images(8, 8 << 20, 2 << 20) == 1  # one image over the bound: 1
  x, k = normal((3, 4, 2, 2), 0), normal((3, 3, 2, 2), 1)
  g = normal((3, 4, 2, 2), 2)
  pads = ((1, 1), (1, 1))
  whole = conv.kernel_grad_patches(x, g, (3, 3), (1, 1), pads)
  old, conv.KERNEL_GRAD_CHUNK_BYTES = conv.KERNEL_GRAD_CHUNK_BYTES, 1  # one image a chunk
  try:
    chunked = conv.kernel_grad_patches(x, g, (3, 3), (1, 1), pads)
  finally:
    conv.KERNEL_GRAD_CHUNK_BYTES = old
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_auto_takes_the_patches_kernel_gradient_on_large_maps_only():
  def lowered(shape_x):
    x, k = jnp.zeros(shape_x), jnp.zeros((3, 3, shape_x[3], 4))
    return str(jax.make_jaxpr(functools.partial(
        conv.CONV_FNS["auto"], window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=conv.NHWC))(x, k))
  big, mid = lowered((1, 32, 16, 2)), lowered((1, 16, 8, 2))  # 512 and 128 pixels
  if jax.default_backend() == "cpu":
    assert "custom_vjp_call" in big and "custom_vjp_call" not in mid
  assert "conv_general_dilated" in big and "conv_general_dilated" in mid
