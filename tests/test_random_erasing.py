"""Device-side random erasing (`train.random_erasing`): one rectangle set to the
mean colour, drawn as the reference draws it, and nothing at all when off."""
import jax
import numpy as np
import pytest

import fakes
from fedreid_jax import train
from fedreid_jax.models import preprocess

H, W = 64, 32


def erased_boxes(out: np.ndarray) -> list:
  """Per image, (top, left, height, width) of its zero pixels' bounding box, or None;
  asserts the zeros fill that box exactly (one rectangle, all channels)."""
  boxes = []
  for img in out:
    zero = np.all(img == 0, axis=-1)
    assert np.array_equal(zero, np.any(img == 0, axis=-1))  # every channel or none
    if not zero.any():
      boxes.append(None)
      continue
    rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
    top, left = rows[0], cols[0]
    h, w = rows[-1] - top + 1, cols[-1] - left + 1
    assert zero.sum() == h * w  # a filled rectangle
    boxes.append((top, left, h, w))
  return boxes


def reference_draws(rng, n: int, area=(0.02, 0.4), min_aspect=0.3, attempts=100) -> list:
  """The reference's loop, in numpy: up to `attempts` sizes, the first that fits."""
  out = []
  for _ in range(n):
    for _ in range(attempts):
      target = rng.uniform(*area) * H * W
      aspect = rng.uniform(min_aspect, 1 / min_aspect)
      h, w = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
      if h < H and w < W:
        out.append((h, w))
        break
  return out


@pytest.fixture(scope="module")
def ones():
  return np.ones((2000, H, W, 3), np.float32)


def test_always_erases_one_rectangle_inside_the_image(ones):
  out = np.asarray(preprocess.random_erase(jax.random.key(0), ones, 1.0))
  boxes = erased_boxes(out)
  assert all(b is not None for b in boxes)
  for top, left, h, w in boxes:
    assert h < H and w < W and top + h <= H and left + w <= W
    assert 0.3 * 0.7 <= h / w <= 1 / (0.3 * 0.7)  # the drawn ratio, up to rounding of short sides
    assert 0.015 * H * W <= h * w <= 0.42 * H * W
  # placed uniformly with the far edges reachable (the reference's inclusive randint)
  assert min(b[0] for b in boxes) == 0 and max(b[0] + b[2] for b in boxes) == H
  assert min(b[1] for b in boxes) == 0 and max(b[1] + b[3] for b in boxes) == W


def test_sizes_follow_the_reference_loop(ones):
  """The vectorised first-that-fits draw has the reference loop's size
  distribution (a numpy reimplementation of the loop, 2,000 draws each)."""
  ours = [(b[2], b[3]) for b in erased_boxes(np.asarray(
      preprocess.random_erase(jax.random.key(1), ones, 1.0)))]
  ref = reference_draws(np.random.default_rng(0), 2000)
  for stat in (lambda s: s[0] * s[1] / (H * W), lambda s: s[0] / s[1], lambda s: s[0],
               lambda s: s[1]):
    a, b = np.array([stat(s) for s in ours]), np.array([stat(s) for s in ref])
    se = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)


def test_probability_and_determinism(ones):
  out = np.asarray(preprocess.random_erase(jax.random.key(2), ones, 0.5))
  erased = np.mean([b is not None for b in erased_boxes(out)])
  assert 0.45 < erased < 0.55
  again = np.asarray(preprocess.random_erase(jax.random.key(2), ones, 0.5))
  other = np.asarray(preprocess.random_erase(jax.random.key(3), ones, 0.5))
  assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_off_is_the_plain_transform_bit_for_bit():
  cfg = fakes.tiny_config()
  images = np.random.default_rng(0).integers(0, 256, (8, H, W, 3), np.uint8)
  key = jax.random.key(4)
  plain = preprocess.normalize(preprocess.augment(key, images, cfg.train.pad, cfg.train.flip))
  assert cfg.train.random_erasing == 0.0
  assert np.array_equal(preprocess.train_inputs(key, images, cfg.train), plain)
  cfg.train.random_erasing = 1.0
  erased = np.asarray(preprocess.train_inputs(key, images, cfg.train))
  changed = np.any(erased != np.asarray(plain), axis=-1)
  assert changed.any(axis=(1, 2)).all()  # every image erased
  assert np.all(erased[changed] == 0)  # only by zeros (the mean colour)


def test_a_round_trains_with_erasing():
  records = {}
  for p in (0.0, 1.0):
    exp = train.Experiment(fakes.tiny_config(**{"train.random_erasing": p}), fakes.fake_clients())
    records[p] = exp.train_round(0)["train/loss"]
  assert np.isfinite(records[1.0]) and records[1.0] != records[0.0]
