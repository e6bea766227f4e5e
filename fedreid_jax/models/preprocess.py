"""Device-side image preprocessing, shared by training and evaluation.

The host hands over uint8 images already at the model's size
(`fedreid_jax.input`); the training transform (`train_inputs`: `augment`,
`normalize`, `random_erase`) and the ImageNet normalisation run here, inside
the compiled functions.
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


def random_erase(key: jax.Array, x: jax.Array, probability: float,
                 area: tuple[float, float] = (0.02, 0.4), min_aspect: float = 0.3,
                 attempts: int = 100) -> jax.Array:
  """Random erasing (Zhong et al. 2017) of normalised images `[B, H, W, C]`.

  With `probability`, one rectangle of each image is set to 0 (the ImageNet
  mean colour once normalised, as the reference fills it): its area a
  fraction of the image drawn uniformly from `area`, its aspect ratio
  (height / width) uniformly from [min_aspect, 1 / min_aspect]. Of
  `attempts` drawn sizes the first that fits strictly inside the image is
  placed uniformly; when none fits the image is kept (all drawn at once).
  """
  b, h, w, _ = x.shape
  k_do, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
  target = jax.random.uniform(k_area, (b, attempts), minval=area[0], maxval=area[1]) * (h * w)
  aspect = jax.random.uniform(k_aspect, (b, attempts), minval=min_aspect,
                              maxval=1.0 / min_aspect)
  heights = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  widths = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (heights < h) & (widths < w)
  first = jnp.argmax(fits, axis=1)[:, None]  # the first size that fits
  eh = jnp.take_along_axis(heights, first, 1)[:, 0]
  ew = jnp.take_along_axis(widths, first, 1)[:, 0]
  erase = jax.random.bernoulli(k_do, probability, (b,)) & fits.any(axis=1)
  top = jnp.floor(jax.random.uniform(k_top, (b,)) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b,)) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  per_image = lambda v: v[:, None, None]
  inside = ((rows >= per_image(top)) & (rows < per_image(top + eh))
            & (cols >= per_image(left)) & (cols < per_image(left + ew)) & per_image(erase))
  return jnp.where(inside[..., None], jnp.zeros((), x.dtype), x)


def train_inputs(key: jax.Array, images: jax.Array, train_cfg) -> jax.Array:
  """The training transform: uint8 `[B, H, W, 3]` -> normalised float32 `[B, H, W, 3]`
  (pad-and-crop, flip, normalise, then random erasing with probability
  `train_cfg.random_erasing`; 0 draws nothing)."""
  x = normalize(augment(key, images, train_cfg.pad, train_cfg.flip))
  p = float(train_cfg.get("random_erasing", 0.0))
  return random_erase(jax.random.fold_in(key, 0xE5), x, p) if p > 0 else x
