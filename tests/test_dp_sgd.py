"""DP-SGD inside a client (fedreid_jax/privacy/dp_sgd.py, poisson_input.py):
each unit's gradient clipped (per image, per identity), the noise's std,
sigma=0 with a large clip equal to plain SGD on the same Poisson batch, and
the padded Poisson batches themselves; each mechanism against an independent
numpy computation from single-example gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax.federated.local import masked_cross_entropy
from fedreid_jax.models.reid import build_model
from fedreid_jax.privacy import dp_sgd, poisson_input

NUM_CLASSES = 5


@functools.lru_cache(maxsize=1)
def model_and_batch():
  """A tiny re-ID model (frozen statistics), 6 slots (2 of them padding); as
  identity units of 2 slots: person 0 twice, person 3 once, person 4 once."""
  cfg = fakes.tiny_config()
  model = build_model(cfg.model, NUM_CLASSES)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                         jnp.zeros((1, 32, 16, 3)), train=False)
  x = jax.random.normal(jax.random.key(1), (6, 32, 16, 3))
  labels = jnp.array([0, 0, 3, -1, 4, -1], jnp.int32)  # pairs: one person each
  return model, variables["params"], variables["batch_stats"], x, labels


def example_grads(model, params, stats, x, labels):
  """Each present example's gradient on its own (no vmap), flattened: `[B, P]` numpy, NaN-free."""
  @jax.jit
  def grad(p, xi, yi):
    def loss(p):
      _, logits = model.apply({"params": p, "batch_stats": stats}, xi[None], train=False)
      return masked_cross_entropy(logits, yi[None], NUM_CLASSES)
    return jax.grad(loss)(p)
  rows = []
  for xi, yi in zip(x, labels):
    if yi < 0:
      rows.append(None)
      continue
    g = grad(params, xi, yi)
    rows.append(np.concatenate([np.ravel(l) for l in jax.tree.leaves(g)]))
  size = next(r for r in rows if r is not None).size
  return np.stack([np.zeros(size) if r is None else r for r in rows])


def numpy_dp_gradient(grads, per_unit, clip, batch_size):
  """Units of `per_unit` consecutive examples, their summed gradient clipped to `clip`."""
  units = grads.reshape(-1, per_unit, grads.shape[1]).sum(1)
  norms = np.linalg.norm(units, axis=1)
  clipped = units * np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]
  return clipped.sum(0) / batch_size, norms


@functools.lru_cache(maxsize=None)
def compiled(per_unit):
  """`private_gradient` on the test batch, compiled once per unit size."""
  model, params, stats, x, labels = model_and_batch()
  return jax.jit(lambda k, clip, sigma: dp_sgd.private_gradient(
      model, params, stats, x, labels, NUM_CLASSES, jax.random.key(k), clip, sigma, per_unit, 4))


def ours(per_unit, clip, sigma, key=0):
  grad, _, norms = compiled(per_unit)(key, clip, sigma)
  return np.concatenate([np.ravel(l) for l in jax.tree.leaves(grad)]), np.asarray(norms)


@pytest.mark.parametrize("per_unit", [1, 2])  # per image; per identity (pairs of slots)
def test_each_unit_clipped(per_unit):
  model, params, stats, x, labels = model_and_batch()
  want, norms = numpy_dp_gradient(example_grads(model, params, stats, x, labels), per_unit,
                                  0.05, 4)
  assert (norms[norms > 0] > 0.05).all()  # every present unit is clipped
  got, got_norms = ours(per_unit, 0.05, 0.0)
  np.testing.assert_allclose(got_norms, norms, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert np.linalg.norm(got) * 4 <= 0.05 * (norms > 0).sum() + 1e-6  # the sum's bound


def test_no_noise_large_clip_is_plain_sgd_on_the_poisson_batch():
  """sigma=0, clip above every gradient: the batch gradient of the present
  examples' summed loss over B, frozen statistics (one batched pass)."""
  model, params, stats, x, labels = model_and_batch()
  present = labels >= 0

  def batch_loss(p):
    _, logits = model.apply({"params": p, "batch_stats": stats}, x, train=False)
    each = jax.vmap(lambda lg, y: masked_cross_entropy(lg[None], y[None], NUM_CLASSES))(
        logits, jnp.where(present, labels, 0))
    return jnp.sum(each * present) / 4
  plain = np.concatenate([np.ravel(l) for l in jax.tree.leaves(jax.grad(batch_loss)(params))])
  got, _ = ours(1, 1e6, 0.0)
  np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-6)


def test_noise_std_is_sigma_clip_over_b():
  """(noisy - noiseless) * B over every parameter coordinate: mean 0 and std
  sigma * C within 3% (the model has several thousand parameters)."""
  clean, _ = ours(1, 0.3, 0.0)
  noisy, _ = ours(1, 0.3, 2.0, key=5)
  noise = (noisy - clean) * 4
  assert noise.size > 3000
  assert noise.std() == pytest.approx(2.0 * 0.3, rel=0.03)
  assert abs(noise.mean()) < 5 * 0.6 / np.sqrt(noise.size)


def test_poisson_batches_image_and_identity():
  client = fakes.fake_client("c", 6, 10, seed=0)  # 60 images of 6 people
  kw = dict(image_size=(32, 16), batch_size=8, epochs=1, seed=0, in_memory=True)
  images = poisson_input.PoissonInput([client.train], unit="image", images_per_identity=1, **kw)
  assert images.rate(0) == pytest.approx(8 / 60) and images.num_steps(0) == 8
  plan = images.plan(0, 0)
  assert plan.shape == (8, poisson_input.capacity(8))
  counts = [(images.plan(0, r) >= 0).sum(1) for r in range(60)]
  assert np.mean(counts) == pytest.approx(8, abs=0.4)  # E|batch| = q n = B
  batch = next(images.stream(0, 0))
  assert ((batch["label"] == -1) == (plan[0] == -1)).all()
  people = poisson_input.PoissonInput([client.train], unit="identity", images_per_identity=3, **kw)
  assert people.rate(0) == pytest.approx(8 / 18)
  pids = np.asarray(client.train.pids)
  for row in people.plan(0, 1):
    for unit in row.reshape(-1, 3):
      real = unit[unit >= 0]
      assert len(set(pids[real])) <= 1  # one person a unit, at most m images of it
      assert len(set(real)) == len(real)
