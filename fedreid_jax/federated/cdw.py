"""Cosine-distance weights (CDW): clients whose model changed more get more say.

Two forms of a client's distance d_k (the paper's CDW), both client
measurements of the round (`algorithm.Measurement`), weights w_k = d_k / sum_j d_j:

- `logit` (the reference's): on one batch of the client's own training data,
  the logits of the model it received (with its pre-round classifier) against
  the logits of its trained model; d_k = mean over the batch of
  (1 - cosine similarity), padded classes excluded. Default: both passes in
  eval mode on the un-augmented batch (an unchanged model gives d_k = 0).
  `reference` mode: training augmentation, both passes in train mode (dropout
  on, batch statistics), and the passes update BatchNorm running statistics
  in place (see `received_stats`).
- `delta`: d_k = 1 - cos(theta_global, theta_k) over the flattened shared
  parameters (backbone + embedding; BatchNorm statistics excluded): the angle
  between the model sent and the model returned, the parameter-space analogue
  of the logit form. It needs no data and no forward pass, and is invariant to
  the scale of the weights. Computed as ||u - v||^2 / 2 of the unit vectors,
  which keeps its precision when the cosine is close to 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.state import ClientStates
from fedreid_jax.models.preprocess import l2_normalize, normalize, train_inputs

FORMS = ("logit", "delta")
MODES = ("default", "reference")
DISTANCE = "cdw_distance"  # the measurement's name in the round record
_EPS = 1e-12


def cosine_distance(before: jax.Array, after: jax.Array, class_mask=None) -> jax.Array:
  """Mean over the batch of 1 - cos(before_b, after_b). `[B, C]` x2, mask `[C]` -> scalar."""
  before, after = before.astype(jnp.float32), after.astype(jnp.float32)
  if class_mask is not None:
    before, after = before * class_mask, after * class_mask
  dot = jnp.sum(before * after, -1)
  norms = jnp.linalg.norm(before, axis=-1) * jnp.linalg.norm(after, axis=-1)
  return jnp.mean(1.0 - dot / jnp.maximum(norms, _EPS))


def normalized_weights(distances: jax.Array) -> jax.Array:
  """`[K]` distances -> weights summing to 1 (uniform if every distance is 0)."""
  total = jnp.sum(distances)
  return jnp.where(total > 0, distances / jnp.where(total > 0, total, 1.0),
                   jnp.ones_like(distances) / distances.shape[0])


def cosine_distance_weights(logits_before: jax.Array, logits_after: jax.Array,
                            class_mask: jax.Array | None = None) -> jax.Array:
  """CDW aggregation weights from logits.

  Args:
    logits_before: `[K, B, C]` per client, the received model's logits.
    logits_after: `[K, B, C]` the trained model's logits.
    class_mask: `[K, C]` bool, each client's real classes (padded ones never
      enter the cosine); None: every class is real.
  Returns:
    `[K]` weights summing to 1.
  """
  if class_mask is None:
    class_mask = jnp.ones((logits_before.shape[0], logits_before.shape[-1]), bool)
  d = jax.vmap(cosine_distance)(logits_before, logits_after, class_mask.astype(jnp.float32))
  return normalized_weights(d)


def parameter_distance(global_params, client_params) -> jax.Array:
  """1 - cos between two parameter trees, flattened (same structure) -> scalar."""
  a = jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(global_params)])
  b = jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(client_params)])
  return 0.5 * jnp.sum(jnp.square(l2_normalize(a) - l2_normalize(b)))


def _variables(state: ClientStates):
  return {"params": state.params, "batch_stats": state.batch_stats}


def make_measurement(model, cdw_cfg, train_cfg, shared_prefixes):
  """The configured CDW form as a `algorithm.Measurement`:
  (before, after, images uint8 `[B, H, W, 3]`, labels `[B]`) -> d or (d, after)."""
  if cdw_cfg.form == "delta":
    shared = params_lib.prefix_predicate(shared_prefixes)

    def delta(before, after, images, labels):
      del images, labels
      return parameter_distance(params_lib.split_tree(before.params, shared)[0],
                                params_lib.split_tree(after.params, shared)[0])
    return delta

  def logits_eval(state, x):
    return model.apply(_variables(state), x, train=False)[1]

  def logit(before, after, images, labels):
    del labels
    mask = (jnp.arange(model.num_classes) < before.num_classes).astype(jnp.float32)
    if cdw_cfg.mode != "reference":
      x = normalize(images)
      return cosine_distance(logits_eval(before, x), logits_eval(after, x), mask)
    key = jax.random.fold_in(after.rng, 0xCD)
    aug_key, k_before, k_after = jax.random.split(key, 3)
    x = train_inputs(aug_key, images, train_cfg)
    (_, lb), _ = model.apply(_variables(before), x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": k_before})
    (_, la), updates = model.apply(_variables(after), x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": k_after})
    return cosine_distance(lb, la, mask), after._replace(batch_stats=updates["batch_stats"])
  return logit


def cdw_weights(trained: ClientStates, measured) -> jax.Array:
  """`algorithm.Weighting`: the round's CDW distances, normalised."""
  del trained
  return normalized_weights(measured[DISTANCE])


def stat_contribution(model, server_params, server_stats, images: jax.Array, key: jax.Array,
                      train_cfg):
  """One client's reference-CDW pass: the global model in train mode on the
  client's batch (uint8 `[B, H, W, 3]`), from zero running statistics; returns
  the statistics it leaves, (1 - m) b (see `received_stats`)."""
  zeros = jax.tree.map(jnp.zeros_like, server_stats)
  aug_key, drop_key = jax.random.split(key)
  x = train_inputs(aug_key, images, train_cfg)
  _, upd = model.apply({"params": server_params, "batch_stats": zeros}, x, train=True,
                       method=type(model).embed, mutable=["batch_stats"],
                       rngs={"dropout": drop_key})
  return upd["batch_stats"]


def chain_stats(server_stats, contributions, order: jax.Array):
  """The statistics each client receives when the passes run in `order`:
  S_p = m S_{p-1} + c_{order[p-1]}, S_0 = the server's. `contributions`
  `[S, ...]` and the result `[S, ...]` by lane; `order` `[S]` lanes."""
  momentum = 0.9  # resnet.BatchNorm's

  def step(stats, lane):
    nxt = jax.tree.map(lambda s, c: momentum * s + c[lane], stats, contributions)
    return nxt, stats

  _, by_position = jax.lax.scan(step, server_stats, order)  # [S, ...] by position
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda x: x[inverse], by_position)


def received_stats(model, server_params, server_stats, images: jax.Array, order: jax.Array,
                   train_cfg, key: jax.Array):
  """Reference quirk: the BatchNorm statistics each selected client receives.

  In the reference, a client's CDW pass runs the global model in train mode,
  updating its running statistics in place, and the next client of the round
  receives those. A train-mode pass normalises with batch statistics, so each
  pass's contribution b_p is independent of the running values: starting
  from zero statistics, one pass gives (1 - m) b_p (`stat_contribution`), and
  the client at position p of `order` receives S_p = m S_{p-1} + (1 - m)
  b_{p-1}, S_0 = the server's (`chain_stats`).
  Args: images `[S, B, H, W, 3]` uint8 (each client's CDW batch); order `[S]`
  the clients' lanes in the round's order; lane i draws `split(key, S)[i]`.
  Returns stats `[S, ...]` by lane.
  """
  keys = jax.random.split(key, images.shape[0])
  contributions = jax.lax.map(lambda a: stat_contribution(
      model, server_params, server_stats, a[1], a[0], train_cfg), (keys, images))
  return chain_stats(server_stats, contributions, order)
