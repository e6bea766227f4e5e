"""Tiny in-memory federated re-ID data for engine tests."""
from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import numpy as np

from fedreid_jax.data.base import ClientData, split_from_arrays


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
  """`python -m fedreid_jax.main *args` from the repository root on the CPU,
  output captured (not a terminal)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fedreid_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def fake_client(name: str, num_ids: int, per_id: int, seed: int, size=(32, 16)) -> ClientData:
  """Ids with a distinct colour each (learnable), 2 cameras, test ids disjoint."""
  rng = np.random.default_rng(seed)

  def make(ids, offset):
    pids = np.repeat(ids, per_id)
    cams = np.tile(np.arange(per_id) % 2, len(ids))
    base = rng.integers(0, 256, (len(ids), 1, 1, 3))
    imgs = np.repeat(base, per_id, 0) + rng.integers(-20, 20, (len(pids), *size, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8), pids + offset, cams

  tr_img, tr_pid, tr_cam = make(np.arange(num_ids), 0)
  te_img, te_pid, te_cam = make(np.arange(num_ids), 100)
  q = te_cam == 0
  return ClientData(name, split_from_arrays(tr_img, tr_pid, tr_cam),
                    split_from_arrays(te_img[q], te_pid[q], te_cam[q]),
                    split_from_arrays(te_img[~q], te_pid[~q], te_cam[~q]))


def fake_clients(sizes=((4, 10), (3, 6), (2, 8))):
  return [fake_client(f"c{i}", n, p, seed=i) for i, (n, p) in enumerate(sizes)]


def load_config(name: str) -> ml_collections.ConfigDict:
  import pathlib
  from fedreid_jax.config_lib import load_config_file
  return load_config_file(str(pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py"))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The synthetic config shrunk for tests; `overrides` like `{"fed.strategy": "vmap"}`."""
  c = load_config("synthetic")
  c.data.image_size = (32, 16)
  c.model.width = 4
  c.model.embed_dim = 16
  c.train.batch_size = 8  # batch 4 makes BatchNorm chaotic
  c.train.pad = 2
  c.cdw.batch_size = 8
  c.kd.batch_size = 8
  c.fed.rounds = 2
  c.fed.strategy = "serial"  # the CPU default; lockstep tests set their own
  c.fed.chunk_steps = 1
  c.eval.every_rounds = 1
  c.eval.batch_size = 8
  c.baselines = ()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def fake_torchvision_weights(path, model_cfg, seed: int = 0) -> dict:
  """A random checkpoint in torchvision's layout (ImageNet `fc` head and
  `num_batches_tracked` included) for `model_cfg`'s backbone, saved as `.npz`
  or `.safetensors` by `path`'s suffix; returns `{torch key: array}`."""
  from fedreid_jax.models import pretrained, resnet
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in pretrained.backbone_shapes(model_cfg).items():
    name, leaf = pretrained.torch_key(key), key[-1]
    shape = pretrained.torch_shape(shape)
    if leaf == "var":
      value = rng.uniform(0.5, 2.0, shape)
    elif leaf == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.05 if leaf == "kernel" else 0.1, shape)
    state[name] = value.astype(np.float32)
    if leaf == "var":
      state[name.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
  dim = resnet.feature_dim(model_cfg.backbone, model_cfg.width)
  state["fc.weight"] = rng.normal(0.0, 0.01, (1000, dim)).astype(np.float32)
  state["fc.bias"] = np.zeros(1000, np.float32)
  if str(path).endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(state, str(path))
  else:
    np.savez(path, **state)
  return state
