"""DP-SGD inside each client (`dp.mode="sgd"`; Abadi et al. 2016): a local
step with `local.make_local_step`'s signature on a padded Poisson batch
(`poisson_input.PoissonInput`: labels `PAD` mark empty slots; m consecutive
slots are one unit):

    g_u   = sum of the unit's per-example gradients          (u: an image, or a person)
    g     = (sum_u g_u min(1, C / ||g_u||) + N(0, (sigma C)^2 I)) / B
    state = optimizer step along g (+ the gradient of the algorithm's regularizer,
            which reads no data)

B is `train.batch_size`: the expected batch (image unit; the identity unit's
expected images are at most B). The gradient covers every parameter the
client trains (shared and classifier alike).

BatchNorm: per-example gradients are ill-defined when a batch's statistics
mix examples, so under DP-SGD the model runs with frozen statistics (the
running averages it received, never updated from private data: nothing to
account for) and without dropout (`model.apply(train=False)`). The
alternative, GroupNorm (De et al. 2022, jax-privacy's WideResNets), would
change the model and its checkpoints; see docs/privacy.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedreid_jax.federated.local import masked_cross_entropy
from fedreid_jax.federated.state import ClientStates
from fedreid_jax.models.preprocess import train_inputs
from fedreid_jax.privacy.client_dp import clip_rows, gaussian_like

NOISE_SALT = 0xD95C


def unit_loss(model, params, batch_stats, images, labels, num_classes) -> jax.Array:
  """Summed cross-entropy of one unit's images `[m, H, W, 3]` (labels `[m]`,
  `PAD` slots count 0), frozen statistics, no dropout."""
  present = labels >= 0
  _, logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
  per_example = jax.vmap(lambda lg, y: masked_cross_entropy(lg[None], y[None], num_classes))(
      logits, jnp.where(present, labels, 0))
  return jnp.sum(per_example * present), logits


def private_gradient(model, params, batch_stats, x, labels, num_classes, key, clip: float,
                     noise_multiplier: float, per_unit: int, batch_size: int):
  """(noisy mean gradient, logits `[U*m, C]`, per-unit norms `[U]` before
  clipping) of a padded
  Poisson batch `x` `[U*m, H, W, 3]` (module docstring)."""
  units = labels.shape[0] // per_unit
  xs = x.reshape(units, per_unit, *x.shape[1:])
  ys = labels.reshape(units, per_unit)
  grad_fn = jax.grad(lambda p, xi, yi: unit_loss(model, p, batch_stats, xi, yi, num_classes),
                     has_aux=True)
  grads, logits = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, xs, ys)
  clipped, norms = clip_rows(grads, jnp.float32(clip))
  total = jax.tree.map(lambda g: g.sum(0), clipped)
  noisy = jax.tree.map(jnp.add, total, gaussian_like(key, total, noise_multiplier * clip))
  return (jax.tree.map(lambda g: g / batch_size, noisy),
          logits.reshape(labels.shape[0], -1), norms)


def make_dp_local_step(model, tx: optax.GradientTransformation, train_cfg, clip: float,
                       noise_multiplier: float, per_unit: int, regularizer=None):
  """`local.make_local_step`'s (state, images, labels, mask, shared) -> (state,
  metrics), DP-SGD on the padded Poisson batch; loss and accuracy over the
  present examples."""
  def do_step(state: ClientStates, images, labels, shared):
    key = jax.random.fold_in(state.rng, state.step)
    aug_key, noise_key = jax.random.split(jax.random.fold_in(key, NOISE_SALT))
    x = train_inputs(aug_key, images, train_cfg)
    grads, logits, _ = private_gradient(
        model, state.params, state.batch_stats, x, labels, state.num_classes, noise_key, clip,
        noise_multiplier, per_unit, train_cfg.batch_size)
    if regularizer is not None:  # reads no private data: added after the noise
      extra = jax.grad(lambda p: regularizer(p, shared, state.algorithm_state))(state.params)
      grads = jax.tree.map(jnp.add, grads, extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    present = labels >= 0
    count = jnp.maximum(present.sum(), 1)
    loss = jax.vmap(lambda lg, y: masked_cross_entropy(lg[None], y[None], state.num_classes))(
        logits, jnp.where(present, labels, 0))
    metrics = {"loss": jnp.sum(loss * present) / count,
               "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) & present) / count,
               "steps": jnp.ones((), jnp.float32)}
    return state._replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, step=state.step + 1), metrics

  def step(state: ClientStates, images, labels, mask, shared=()):
    new, metrics = do_step(state, images, labels, shared)
    keep = lambda n, o: jnp.where(mask, n, o)
    state = state._replace(params=jax.tree.map(keep, new.params, state.params),
                           opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                           step=jnp.where(mask, new.step, state.step))
    return state, jax.tree.map(lambda m: m * mask, metrics)

  return step
