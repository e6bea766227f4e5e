"""Local training of one client: the optimizer, the masked SGD step, and a
scanned chunk of K steps. How the selected clients execute these (one after
another, vmapped, sharded) is `execution.py`.

A step whose mask is False leaves params, BatchNorm statistics, optimizer
state and step counter unchanged (ragged clients within one compiled shape).
The mask is applied with a select, not `lax.cond`: on XLA CPU a ResNet step
inside a cond branch ran 2.7x slower (118 vs 42 ms, benchmarks/RESULTS.md),
and under `vmap` a cond becomes a select anyway.

Metrics are dicts of named arrays: a step returns `{"loss", "accuracy",
"steps"}` already multiplied by its mask, so sums over steps are sums over
real steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from fedreid_jax.federated.state import ClientStates
from fedreid_jax.models.preprocess import train_inputs


def sgd(lr: float, cfg) -> optax.GradientTransformation:
  """SGD with PyTorch-style coupled weight decay (`cfg.weight_decay`,
  `cfg.momentum`, `cfg.nesterov`): the clients' and the KD server's optimizer."""
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD (Nesterov) with PyTorch-style coupled weight decay on every parameter,
  lr `lr_backbone` for the backbone and `lr_head` for embedding + classifier."""

  def labels(params):
    return {k: jax.tree.map(lambda _: "backbone" if k == "backbone" else "head", v)
            for k, v in params.items()}

  return optax.multi_transform(
      {"backbone": sgd(train_cfg.lr_backbone, train_cfg),
       "head": sgd(train_cfg.lr_head, train_cfg)}, labels)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, num_classes) -> jax.Array:
  """Mean softmax CE over `[B, Cmax]` logits, classes >= num_classes masked out;
  computed in float32 whatever the model's compute dtype."""
  logits = logits.astype(jnp.float32)
  valid = jnp.arange(logits.shape[-1]) < num_classes
  logits = jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_local_step(model, tx: optax.GradientTransformation, train_cfg, regularizer=None,
                    personal_mu: float | None = None):
  """(client state, images `[B, H, W, 3]` uint8, labels `[B]`, mask, shared)
  -> (state, metrics). `regularizer(params, shared, own) -> scalar` (an
  algorithm's `client_regularizer`; None: none) is added to the
  cross-entropy; `shared` is the round's input common to every client
  (`algorithm.round_input`), `own` the client's `algorithm_state`.
  `personal_mu` (Ditto): the client's personal model (`algorithm_state`:
  {"params", "batch_stats", "opt_state"}) also takes a step on the same
  augmented batch, its loss plus (mu / 2) ||v - shared||^2 over the shared
  subtree (`shared`: the global params)."""

  def loss_fn(params, batch_stats, images, labels, num_classes, dropout_key, extra):
    (_, logits), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = masked_cross_entropy(logits, labels, num_classes)
    if extra is not None:
      loss = loss + extra(params)
    return loss, (updates["batch_stats"], logits)

  def train(params, batch_stats, opt_state, x, labels, num_classes, dropout_key, extra):
    """One optimizer step of one model: (params, stats, opt_state, loss, logits)."""
    (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, labels, num_classes, dropout_key, extra)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, logits

  def do_step(state: ClientStates, images, labels, shared):
    key = jax.random.fold_in(state.rng, state.step)
    aug_key, dropout_key = jax.random.split(key)
    x = train_inputs(aug_key, images, train_cfg)
    extra = (None if regularizer is None else
             lambda p: regularizer(p, shared, state.algorithm_state))
    params, stats, opt_state, loss, logits = train(
        state.params, state.batch_stats, state.opt_state, x, labels, state.num_classes,
        dropout_key, extra)
    own = state.algorithm_state
    if personal_mu is not None:  # Ditto: the personal model's step on the same batch
      v = own
      prox = lambda p: proximal(personal_mu, p, shared)
      v_params, v_stats, v_opt, _, _ = train(
          v["params"], v["batch_stats"], v["opt_state"], x, labels, state.num_classes,
          jax.random.fold_in(dropout_key, 1), prox)
      own = {"params": v_params, "batch_stats": v_stats, "opt_state": v_opt}
    state = state._replace(params=params, batch_stats=stats, opt_state=opt_state,
                           step=state.step + 1, algorithm_state=own)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"loss": loss, "accuracy": accuracy, "steps": jnp.ones((), jnp.float32)}

  def step(state: ClientStates, images, labels, mask, shared=()):
    new, metrics = do_step(state, images, labels, shared)
    keep = lambda n, o: jnp.where(mask, n, o)
    state = state._replace(params=jax.tree.map(keep, new.params, state.params),
                           batch_stats=jax.tree.map(keep, new.batch_stats, state.batch_stats),
                           opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                           algorithm_state=jax.tree.map(keep, new.algorithm_state,
                                                        state.algorithm_state),
                           step=jnp.where(mask, new.step, state.step))
    return state, jax.tree.map(lambda m: m * mask, metrics)

  return step


def proximal(mu: float, params, global_params) -> jax.Array:
  """(mu / 2) ||w - w_global||^2 over the leaves of `global_params` (a subtree
  of `params`: BatchNorm scale and bias included, running statistics are not
  parameters)."""
  own = {k: params[k] for k in global_params}
  squares = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), own, global_params)
  return mu / 2 * sum(jax.tree.leaves(squares))


def make_client_chunk(local_step):
  """One client, K steps: images `[K, B, H, W, 3]`, labels `[K, B]`, mask `[K]`,
  `shared` the round's common input (every step's).

  Returns the new state and metric sums `{"loss", "accuracy", "steps"}` (scalars)."""
  def chunk(state, images, labels, mask, shared=()):
    def body(s, xs):
      return local_step(s, *xs, shared)
    state, metrics = lax.scan(body, state, (images, labels, mask))
    return state, jax.tree.map(lambda m: m.sum(0), metrics)
  return chunk
