"""Mixed precision (`model.dtype`): bfloat16 compute with float32 parameters,
optimizer state, BatchNorm statistics and loss; a short bf16 run tracks f32."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import state as state_lib
from fedreid_jax.models.reid import build_model

STEPS = 3
LR = 0.01
# Relative per-step loss gap allowed between bf16 and f32 compute. bf16 keeps
# 8 mantissa bits (~0.4% per rounding). Measured with these settings (width-4
# ResNet, batch 8, lr 0.01): 0.008%, 0.07%, 0.01% at steps 1-3. The tiny
# model's BatchNorm over 8 samples of a 1x1 map amplifies rounding: by step 4
# the gap was 0.3-2.2% depending on the dropout masks, and with lr 0.05 5-10%
# by steps 3-6 (f32 with the other conv lowering stays within 0.01%), so the
# comparison is kept short.
LOSS_RTOL = 0.01


def client_state(model, tx, num_classes):
  """One client's fresh state, [1]-stacked init squeezed. rbg keys for init
  and for the step's dropout and augmentation: threefry would add seconds of
  XLA CPU compilation per run."""
  init = jax.jit(functools.partial(
      state_lib.init_states, model, tx, params_lib.prefix_predicate(("backbone", "embedding")),
      image_shape=(32, 16), num_classes=np.array([num_classes]), num_examples=np.array([40])))
  _, clients = init(jax.random.key(0, impl="rbg"))
  return params_lib.take_client(clients, 0)._replace(rng=jax.random.key(1, impl="rbg"))


@pytest.fixture(scope="module")
def runs():
  """{dtype: (model, initial state, final state, per-step losses [STEPS])}: the
  same initial state and batches, f32 and bf16 compute."""
  data = fakes.fake_client("c0", num_ids=4, per_id=10, seed=0).train
  order = np.random.default_rng(0).permutation(len(data))[:STEPS * 8]
  images = jnp.asarray(np.stack(data.read_batch(order)).reshape(STEPS, 8, 32, 16, 3))
  labels = jnp.asarray(data.pids[order].reshape(STEPS, 8))
  out, state = {}, None
  for dtype in ("float32", "bfloat16"):
    # XLA's convolution (bf16 through im2col is tested in test_conv.py) and no
    # augmentation (uint8, before any model dtype): each would add seconds of
    # compilation.
    cfg = fakes.tiny_config(**{"model.dtype": dtype, "model.conv_impl": "xla",
                               "train.lr_backbone": LR, "train.lr_head": LR,
                               "train.pad": 0, "train.flip": False})
    model = build_model(cfg.model, 4)
    tx = local_lib.make_optimizer(cfg.train)
    state = client_state(model, tx, 4) if state is None else state
    step = jax.jit(local_lib.make_local_step(model, tx, cfg.train))
    final, losses = state, []
    for images_k, labels_k in zip(images, labels):
      final, metrics = step(final, images_k, labels_k, jnp.array(True))
      losses.append(metrics["loss"])
    losses = jnp.stack(losses)
    out[dtype] = (model, state, final, losses)
  return out


def test_bf16_losses_track_f32(runs):
  f32, bf16 = runs["float32"][3], runs["bfloat16"][3]
  assert f32.dtype == bf16.dtype == jnp.float32  # the loss is computed in f32
  assert bool(jnp.all(jnp.isfinite(bf16)))
  np.testing.assert_allclose(bf16, f32, rtol=LOSS_RTOL)
  assert float(f32[-1]) < float(f32[0])  # the run trains: the comparison means something


def test_bf16_keeps_params_optimizer_state_and_bn_statistics_in_f32(runs):
  model, _, final, _ = runs["bfloat16"]
  for tree in (final.params, final.batch_stats, final.opt_state):
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")
              and jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
  # bf16 init gives the f32 variable tree: checkpoints are interchangeable
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 16, 3)))
  assert shapes == jax.eval_shape(lambda: {"params": final.params,
                                           "batch_stats": final.batch_stats})


def test_bf16_backbone_computes_in_bf16_and_features_come_out_f32(runs):
  x = jnp.zeros((2, 32, 16, 3), jnp.float32)
  for dtype, want_bf16 in (("float32", False), ("bfloat16", True)):
    model, state, _, _ = runs[dtype]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    fn = lambda v, x, model=model: model.apply(v, x, train=False, method=type(model).embed)
    assert ("bf16" in str(jax.make_jaxpr(fn)(variables, x))) == want_bf16
    assert jax.eval_shape(fn, variables, x).dtype == jnp.float32
