"""Server-side knowledge distillation (KD), a server stage: the paper's KD.

Every `kd.every_rounds` rounds, after aggregation, one pass over the public
set: teacher = the mean over the clients' trained models of their 512-d
embeddings of the (augmented) batch, each L2-normalised when
`kd.normalize_teachers`; student = the global model; loss = mean squared
error; server SGD (lr 5e-4, Nesterov 0.9, weight decay 5e-4) whose state is
re-created at every KD call. The distilled model is the next round's global
model.

Default: the teachers are this round's trained clients, in eval mode; the
student runs in eval mode too (BatchNorm statistics frozen, no dropout: the
public set's statistics do not leak into the global model) and is normalised
like its teachers; the last partial public batch is dropped (one compiled
shape). `reference` mode: teachers and student in train mode (dropout on,
the student's statistics updated), the student unnormalised even when the
teachers are, every client a teacher (stale unselected ones too), the last
partial batch kept.

Teachers run one after another (`lax.map` over the stacked client axis): a
vmapped forward with per-client weights becomes grouped convolutions, which
are slower than one client at a time on both CPU and GPU
(benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated.state import ServerState
from fedreid_jax.federated.tracing import jit_counted
from fedreid_jax.models.preprocess import l2_normalize, train_inputs

MODES = ("default", "reference")


def make_server_optimizer(kd_cfg) -> optax.GradientTransformation:
  """The clients' SGD (coupled weight decay) with the KD settings, as the reference's server."""
  return local_lib.sgd(kd_cfg.lr, kd_cfg)


def teacher_embeddings(model, teachers, x: jax.Array, normalize_each: bool, train: bool,
                       key: jax.Array) -> jax.Array:
  """Each of the stacked teachers' `[T, ...]` embeddings of `x` `[B, H, W, 3]`
  (normalised images) -> `[T, B, E]`."""
  keys = jax.random.split(key, jax.tree.leaves(teachers)[0].shape[0])

  def one(args):
    variables, k = args
    if train:
      f, _ = model.apply(variables, x, train=True, method=type(model).embed,
                         mutable=["batch_stats"], rngs={"dropout": k})
    else:
      f = model.apply(variables, x, train=False, method=type(model).embed)
    return l2_normalize(f) if normalize_each else f

  return jax.lax.map(one, (teachers, keys))


def teacher_embedding(model, teachers, x: jax.Array, normalize_each: bool, train: bool,
                      key: jax.Array) -> jax.Array:
  """Mean over the stacked teachers `[T, ...]` of their embeddings of `x` -> `[B, E]`."""
  return jnp.mean(teacher_embeddings(model, teachers, x, normalize_each, train, key), axis=0)


def make_kd_step(model, kd_cfg, train_cfg, tx: optax.GradientTransformation,
                 teacher_mean=None):
  """(params, stats, opt_state, teachers `[T, ...]`, images uint8 `[B, H, W, 3]`, key)
  -> (params, stats, opt_state, loss). `teacher_mean`: None (the plain mean
  over the teachers) or `(embeddings [T, B, E], key) -> [B, E]` (secure
  aggregation's, `secagg.secure_teacher_mean`)."""
  reference = kd_cfg.mode == "reference"

  def step(params, stats, opt_state, teachers, images, key):
    aug_key, t_key, s_key = jax.random.split(key, 3)
    x = train_inputs(aug_key, images, train_cfg)
    each = teacher_embeddings(model, teachers, x, kd_cfg.normalize_teachers, reference, t_key)
    target = jax.lax.stop_gradient(jnp.mean(each, axis=0) if teacher_mean is None
                                   else teacher_mean(each, key))

    def loss_fn(p):
      variables = {"params": p, "batch_stats": stats}
      if reference:
        f, upd = model.apply(variables, x, train=True, method=type(model).embed,
                             mutable=["batch_stats"], rngs={"dropout": s_key})
        new_stats = upd["batch_stats"]
      else:
        f, new_stats = model.apply(variables, x, train=False, method=type(model).embed), stats
        f = l2_normalize(f) if kd_cfg.normalize_teachers else f
      return jnp.mean(jnp.square(f - target)), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


class Distillation:
  """The KD server stage: `stage(server, context) -> (server, {"kd/loss", "kd/steps"})`
  on KD rounds, the server unchanged otherwise. `teacher_mean`: see `make_kd_step`."""

  def __init__(self, model, kd_cfg, train_cfg, teacher_mean=None):
    self.every = kd_cfg.every_rounds
    self.reference = kd_cfg.mode == "reference"
    self.tx = make_server_optimizer(kd_cfg)
    self._step = jit_counted("kd_step", make_kd_step(model, kd_cfg, train_cfg, self.tx,
                                                     teacher_mean))
    self._init = jax.jit(self.tx.init)
    shared = params_lib.prefix_predicate(params_lib.FEATURE_EXTRACTOR)

    def teachers(clients, ids):
      sel = jax.tree.map(lambda x: x[ids], (clients.params, clients.batch_stats))
      return {"params": params_lib.split_tree(sel[0], shared)[0],
              "batch_stats": params_lib.split_tree(sel[1], shared)[0]}
    self._teachers = jax.jit(teachers)

  def active(self, round_index: int) -> bool:
    """KD runs after rounds every, 2 every, ... (1-based round numbers)."""
    return (round_index + 1) % self.every == 0

  def batches(self, public, round_index: int):
    """The public set's batches of this KD call (+ the partial one in reference mode)."""
    yield from public.stream(0, round_index)
    if self.reference:
      rest = public.leftover_rows(0, round_index)
      if len(rest):
        yield public.gather(0, rest)

  def __call__(self, server: ServerState, ctx) -> Any:
    if not self.active(ctx.round_index):
      return server
    ids = (jnp.arange(jax.tree.leaves(ctx.clients.params)[0].shape[0]) if self.reference
           else ctx.selected)
    teachers = self._teachers(ctx.clients, ids)
    params, stats = server.params, server.batch_stats
    opt_state = self._init(params)
    key = jax.random.fold_in(jax.random.fold_in(server.rng, 0x4B44), ctx.round_index)
    losses = []
    for i, batch in enumerate(self.batches(ctx.public, ctx.round_index)):
      params, stats, opt_state, loss = self._step(params, stats, opt_state, teachers,
                                                  batch["image"], jax.random.fold_in(key, i))
      losses.append(loss)
    losses = np.asarray(ctx.topology.to_host(losses), np.float64)  # replicated over hosts
    metrics = {"kd/loss": float(losses.mean()) if len(losses) else float("nan"),
               "kd/loss_last": float(losses[-1]) if len(losses) else float("nan"),
               "kd/steps": float(len(losses))}
    return server._replace(params=params, batch_stats=stats), metrics
