"""The grain input pipeline: shapes, drop-last, determinism, augmentation."""
from __future__ import annotations

import numpy as np
import pytest

from fedreid_jax.data import fixtures as F, grain_loader as G, prepare, source
from fedreid_jax.datasets.base import split_from_arrays


def toy_split(n=21, h=12, w=6):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  return split_from_arrays(images, np.arange(n) % 5, np.arange(n) % 2)


def collect(loader):
  it = iter(loader)
  out = [{k: np.asarray(v) for k, v in b.items()} for b in it]
  it.close()  # stops grain's worker processes now, not at exit
  return out


def test_shapes_and_drop_last():
  batches = collect(G.make_loader(toy_split(), image_size=(16, 8), batch_size=4, seed=0,
                                  num_epochs=2))
  assert len(batches) == 2 * (21 // 4)
  for b in batches:
    assert b["image"].shape == (4, 16, 8, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  epoch = np.concatenate([b["label"] for b in batches[:5]])
  assert len(epoch) == 20


def test_deterministic_per_seed_and_order_free_of_threads():
  split = toy_split()
  kw = dict(image_size=(16, 8), batch_size=4, augment=True)
  a = collect(G.make_loader(split, seed=3, num_threads=1, **kw))
  b = collect(G.make_loader(split, seed=3, num_threads=8, **kw))
  c = collect(G.make_loader(split, seed=4, **kw))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_unshuffled_resize_matches_bicubic():
  split = toy_split()
  b = collect(G.make_loader(split, image_size=(24, 12), batch_size=3, shuffle=False))[0]
  np.testing.assert_array_equal(b["image"][1], G.resize_bicubic(split.read_image(1), (24, 12)))
  np.testing.assert_array_equal(b["label"], split.pids[:3])


def test_augment_and_normalize():
  rng = np.random.default_rng(0)
  img = np.full((16, 8, 3), 200, np.uint8)
  out = G.pad_crop_flip(img, rng)
  assert out.shape == img.shape and out.min() in (0, 200)
  ramp = np.broadcast_to(np.arange(8, dtype=np.uint8)[None, :, None], (16, 8, 3))
  flips = {int(G.pad_crop_flip(ramp, np.random.default_rng(s), pad=0)[0, 0, 0])
           for s in range(20)}
  assert flips == {0, 7}  # unflipped and flipped
  ref_img = np.random.default_rng(5).integers(0, 256, (16, 8, 3), dtype=np.uint8)
  for seed in range(30):  # equals cropping the zero-padded image
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    y, x = r2.integers(0, 21, size=2)
    want = np.pad(ref_img, ((10, 10), (10, 10), (0, 0)))[y:y + 16, x:x + 8]
    want = want[:, ::-1] if r2.random() < 0.5 else want
    np.testing.assert_array_equal(G.pad_crop_flip(ref_img, r1), want)
  norm = G.normalize(img)
  assert norm.dtype == np.float32
  np.testing.assert_allclose(norm[0, 0], (200 / 255 - G.IMAGENET_MEAN) / G.IMAGENET_STD,
                             rtol=1e-6)
  erased = G.random_erase(norm, np.random.default_rng(1), prob=1.0)
  assert (erased == 0).any() and not (norm == 0).any()
  b = collect(G.make_loader(toy_split(), image_size=(16, 8), batch_size=4, augment=True,
                            normalize=True, erase_prob=0.5))[0]
  assert b["image"].dtype == np.float32 and b["image"].shape == (4, 16, 8, 3)


def test_too_small_split():
  with pytest.raises(ValueError, match="smaller than batch_size"):
    G.make_loader(toy_split(n=3), image_size=(8, 4), batch_size=4)


def test_prepared_dataset_with_worker_processes(tmp_path):
  F.make_dukemtmc(tmp_path / "raw")
  prepare.prepare("dukemtmc", tmp_path / "raw", tmp_path / "tfds")
  train = source.load_prepared_client("dukemtmc", tmp_path / "tfds").train
  kw = dict(image_size=(32, 16), batch_size=4, seed=0, augment=True)
  local = collect(G.make_loader(train, **kw))
  workers = collect(G.make_loader(train, worker_count=2, **kw))
  assert len(local) == len(train) // 4 == len(workers)
  for x, y in zip(local, workers):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_prefetch_to_device():
  import jax
  batches = list(G.prefetch_to_device(
      G.make_loader(toy_split(), image_size=(8, 4), batch_size=4), size=2))
  assert len(batches) == 5 and isinstance(batches[0]["image"], jax.Array)
