"""Device-side image preprocessing, shared by training and evaluation.

The host hands over uint8 images already at the model's size
(`fedreid_jax.input`); the training transform (`augment`) and the ImageNet
normalisation (`normalize`) run here, inside the compiled functions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# numpy, not jnp: importing the package must not start a backend (jax.distributed
# has to be initialised first on several hosts)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * np.float32(255.0)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * np.float32(255.0)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 `[..., H, W, 3]` -> ImageNet-normalised float32."""
  return (images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD


def l2_normalize(x: jax.Array) -> jax.Array:
  """Unit rows along the last axis (`[..., E]`); an all-zero row stays zero."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def augment(key: jax.Array, images: jax.Array, pad: int, flip: bool) -> jax.Array:
  """Zero-pad `pad`, random crop back, random horizontal flip; `[B, H, W, 3]` uint8."""
  b, h, w, _ = images.shape

  def one(k, img):
    k_crop, k_flip = jax.random.split(k)
    if pad:
      img = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)))
      dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
      img = lax.dynamic_slice(img, (dy, dx, 0), (h, w, 3))
    if flip:
      img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
    return img

  return jax.vmap(one)(jax.random.split(key, b), images)
