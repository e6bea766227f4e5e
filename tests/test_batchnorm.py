"""Training-mode BatchNorm with the closed-form gradient (models/batchnorm.py,
resnet.BatchNorm(closed_form_grad=True)): the same variables as nn.BatchNorm;
outputs, running averages and gradients equal up to float rounding."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedreid_jax.models import batchnorm, resnet


def normal(shape, seed, loc=0.0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def inputs(shape=(4, 3, 2, 6)):
  """Activations with a non-zero mean per channel and one all-zero channel
  (variance 0: the clipped case)."""
  return normal(shape, 0, loc=1.5, scale=3.0).at[..., 2].set(0.0)


def module_vjp(module, variables, x, cotangent):
  """(y, new batch_stats, dx, dparams) of a training call, compiled as one."""
  def run(params, x, cotangent):
    def f(params, x):
      return module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          mutable=["batch_stats"])
    (y, stats), vjp = jax.vjp(f, params, x)
    dparams, dx = vjp((cotangent, jax.tree.map(jnp.zeros_like, stats)))
    return y, stats["batch_stats"], dx, dparams
  return jax.jit(run)(variables["params"], x, cotangent)


@pytest.mark.parametrize("unbiased_var", [False, True])
def test_closed_form_equals_nn_batchnorm(unbiased_var):
  x = inputs()
  cotangent = normal(x.shape, 1)
  plain = resnet.BatchNorm(use_running_average=False, unbiased_var=unbiased_var)
  ours = resnet.BatchNorm(use_running_average=False, unbiased_var=unbiased_var,
                          closed_form_grad=True)
  variables = plain.init(jax.random.key(0, impl="rbg"), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0, impl="rbg"), x)) == \
      jax.tree.map(jnp.shape, variables)
  variables = {"params": {"scale": normal((6,), 2, 1.0, 0.3), "bias": normal((6,), 3)},
               "batch_stats": {"mean": normal((6,), 4), "var": normal((6,), 5, 2.0, 0.1)}}
  want = module_vjp(plain, variables, x, cotangent)
  got = module_vjp(ours, variables, x, cotangent)
  for name, g, w in zip(("output", "batch_stats", "input gradient", "param gradients"),
                        got, want):
    assert jax.tree.structure(g) == jax.tree.structure(w), name
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()),
                                 err_msg=name)


def test_statistics_outputs_carry_their_own_gradient():
  """Cotangents on the returned mean and variance reach x as through `moments`."""
  x = inputs()
  scale, bias = normal((6,), 2, 1.0, 0.3), normal((6,), 3)

  def through_norm(x):
    _, mean, var = batchnorm.train_norm(x, scale, bias, 1e-5, jnp.float32)
    return jnp.sum(mean * jnp.arange(6.0)) + jnp.sum(var * jnp.arange(6.0, 0.0, -1.0))

  def through_moments(x):
    mean, _, var = batchnorm.moments(x)
    return jnp.sum(mean * jnp.arange(6.0)) + jnp.sum(var * jnp.arange(6.0, 0.0, -1.0))

  np.testing.assert_allclose(jax.jit(jax.grad(through_norm))(x),
                             jax.jit(jax.grad(through_moments))(x), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_dtypes():
  x = inputs().astype(jnp.bfloat16)
  y, mean, var = jax.jit(functools.partial(batchnorm.train_norm, epsilon=1e-5,
                                           dtype=jnp.bfloat16))(x, jnp.ones(6), jnp.zeros(6))
  assert (y.dtype, mean.dtype, var.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  dx = jax.jit(jax.grad(lambda x: batchnorm.train_norm(
      x, jnp.ones(6), jnp.zeros(6), 1e-5, jnp.bfloat16)[0].astype(jnp.float32).sum()))(x)
  assert dx.dtype == jnp.bfloat16


def test_eval_mode_and_init_take_nn_batchnorms_path():
  """Only a training call differs: running-average calls are nn.BatchNorm's."""
  x = inputs()
  ours = resnet.BatchNorm(closed_form_grad=True)
  plain = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
  variables = plain.init(jax.random.key(0, impl="rbg"), x)
  apply = lambda train: lambda x: ours.apply(variables, x, use_running_average=not train,
                                             mutable=["batch_stats"])
  assert "train_norm" not in str(jax.make_jaxpr(apply(False))(x))
  assert "train_norm" in str(jax.make_jaxpr(apply(True))(x))
  np.testing.assert_array_equal(apply(False)(x)[0], plain.apply(variables, x))


def test_resnet_training_gradients_match_the_plain_lowering():
  """A training step's loss gradient through a whole (tiny) ResNet: `auto`
  (closed-form BatchNorm, im2col convs, sliced max pool on CPU) against
  `xla` (nn.BatchNorm, XLA convs, nn.max_pool)."""
  x = normal((8, 32, 16, 3), 0)
  nets = {impl: resnet.make_backbone("resnet_tiny", 4, 2, False, conv_impl=impl)
          for impl in ("xla", "auto")}
  variables = jax.eval_shape(functools.partial(nets["xla"].init, train=False),
                             jax.random.key(1), x)
  leaves, treedef = jax.tree.flatten(variables)
  variables = jax.tree.unflatten(treedef, [jnp.abs(normal(leaf.shape, i) * 0.3 + 1.0)
                                           for i, leaf in enumerate(leaves)])
  target = normal((8, 1, 1, 32), 9)

  def grads(net):
    def loss(params):
      y, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                       train=True, mutable=["batch_stats"])
      return jnp.sum((y - target) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  (loss_xla, g_xla), (loss_auto, g_auto) = grads(nets["xla"]), grads(nets["auto"])
  np.testing.assert_allclose(loss_auto, loss_xla, rtol=1e-5)
  for path, a in jax.tree_util.tree_leaves_with_path(g_auto):
    b = g_xla
    for key in path:
      b = b[key.key]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()),
                               err_msg=jax.tree_util.keystr(path))
