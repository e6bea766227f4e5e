"""Max pooling as strided views (models/pool.py): forward and gradient equal
`nn.max_pool`'s exactly, ties included; `impl` picks the lowering."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedreid_jax.models import pool

STEM = ((3, 3), (2, 2), ((1, 1), (1, 1)))  # the ResNet stem's pool


def value_and_vjp(f, x, cotangent):
  def run(x, cotangent):
    y, vjp = jax.vjp(f, x)
    return y, vjp(cotangent)[0]
  return jax.jit(run)(x, cotangent)


@pytest.mark.parametrize("shape, integers", [
    ((2, 9, 6, 3), False),  # odd height, distinct values
    ((2, 8, 5, 4), True),  # values in {0, 1, 2}: ties in most windows
    ((1, 4, 4, 1), True),
])
def test_views_equal_nn_max_pool_forward_and_gradient(shape, integers):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, shape) if integers else rng.standard_normal(shape)
  x = jnp.asarray(x, jnp.float32)
  ref = lambda x: nn.max_pool(x, *STEM[:2], padding=STEM[2])
  cotangent = jnp.asarray(rng.standard_normal(jax.eval_shape(ref, x).shape), jnp.float32)
  want = value_and_vjp(ref, x, cotangent)
  got = value_and_vjp(lambda x: pool.max_pool(x, *STEM, impl="patches"), x, cotangent)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)  # max and routing are exact


def test_ties_go_to_the_first_maximum_in_row_major_order():
  x = jnp.asarray([[1, 2, 2, 0], [2, 1, 0, 2], [0, 2, 2, 1], [1, 1, 1, 1]],
                  jnp.float32).reshape(1, 4, 4, 1)
  _, grad = value_and_vjp(lambda x: pool.max_pool(x, *STEM, impl="patches"), x,
                          jnp.ones((1, 2, 2, 1)))
  # windows (0,0) and (0,1) both pick (0,1); (1,0) picks (1,0); (1,1) picks (1,3)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[0, 2, 0, 0], [1, 0, 0, 1],
                                                   [0, 0, 0, 0], [0, 0, 0, 0]])


def test_impl_picks_the_lowering():
  x = jnp.zeros((1, 4, 4, 2))
  lowered = lambda impl: str(jax.make_jaxpr(lambda x: pool.max_pool(x, *STEM, impl=impl))(x))
  assert "reduce_window_max" in lowered("xla")
  assert "reduce_window" not in lowered("patches")
  assert ("reduce_window" not in lowered("auto")) == (jax.default_backend() == "cpu")
  with pytest.raises(ValueError, match="choose one of"):
    pool.max_pool(x, *STEM, impl="winograd")
