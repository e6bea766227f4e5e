"""The input pipeline: grain batches (shapes, drop-last, determinism), the
batch plan, and the device-side augmentation."""
from __future__ import annotations

import numpy as np
import pytest

import fixtures as F
from fedreid_jax.data import prepare, source
from fedreid_jax.data.images import resize_bicubic
from fedreid_jax.input import grain_loader as G, plan as plan_lib, train_input
from fedreid_jax.data.base import split_from_arrays


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
  kw = dict(image_size=(16, 8), batch_size=4)
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
  np.testing.assert_array_equal(b["image"][1], resize_bicubic(split.read_image(1), (24, 12)))
  np.testing.assert_array_equal(b["label"], split.pids[:3])


def test_device_augment_is_a_crop_of_the_padded_image_and_flips_both_ways():
  import jax
  from fedreid_jax.models import preprocess
  images = np.random.default_rng(5).integers(0, 256, (64, 16, 8, 3), dtype=np.uint8)
  out = np.asarray(preprocess.augment(jax.random.key(0), images, pad=3, flip=True))
  assert out.shape == images.shape and out.dtype == np.uint8
  flipped = 0
  for img, got in zip(images, out):
    padded = np.pad(img, ((3, 3), (3, 3), (0, 0)))
    crops = [padded[y:y + 16, x:x + 8] for y in range(7) for x in range(7)]
    plain = any(np.array_equal(got, c) for c in crops)
    mirrored = any(np.array_equal(got, c[:, ::-1]) for c in crops)
    assert plain or mirrored
    flipped += mirrored and not plain
  assert 10 < flipped < 54  # about half of 64
  np.testing.assert_array_equal(preprocess.augment(jax.random.key(0), images, 0, False), images)
  norm = np.asarray(preprocess.normalize(np.full((2, 2, 3), 200, np.uint8)))
  np.testing.assert_allclose(norm[0, 0], (200 / 255 - np.array([0.485, 0.456, 0.406]))
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-5)


def test_too_small_split():
  with pytest.raises(ValueError, match="smaller than batch_size"):
    G.make_loader(toy_split(n=3), image_size=(8, 4), batch_size=4)


def test_prepared_dataset_with_worker_processes(tmp_path):
  F.make_dukemtmc(tmp_path / "raw")
  prepare.prepare("dukemtmc", tmp_path / "raw", tmp_path / "tfds")
  train = source.load_prepared_client("dukemtmc", tmp_path / "tfds").train
  kw = dict(image_size=(32, 16), batch_size=4, seed=0)
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


def test_loader_follows_a_given_plan_and_plans_are_seeded():
  split = toy_split()
  rows = plan_lib.client_plan(len(split), 4, 2, seed=1, round_index=3, client_id=2)
  assert rows.shape == (10, 4)
  for epoch in (rows[:5], rows[5:]):  # each epoch: distinct images, 20 of 21 (drop last)
    assert len(np.unique(epoch)) == 20
  np.testing.assert_array_equal(rows, plan_lib.client_plan(len(split), 4, 2, 1, 3, 2))
  assert not np.array_equal(rows, plan_lib.client_plan(len(split), 4, 2, 1, 4, 2))
  batches = collect(G.make_loader(split, image_size=(12, 6), batch_size=4, plan=rows))
  assert len(batches) == 10
  for row, b in zip(rows, batches):
    np.testing.assert_array_equal(b["label"], split.pids[row])


def test_streams_of_prepared_data_equal_in_memory_batches(tmp_path):
  """Prepared (TFDS) data: the in-memory cache and the grain stream read the
  same pixels (same JPEG draft decode) in the same order."""
  F.make_dukemtmc(tmp_path / "raw")
  prepare.prepare("dukemtmc", tmp_path / "raw", tmp_path / "tfds")
  train = source.load_prepared_client("dukemtmc", tmp_path / "tfds").train
  kw = dict(image_size=(32, 16), batch_size=4, epochs=1, seed=7)
  memory = train_input.TrainInput([train], in_memory=True, **kw)
  stream = train_input.TrainInput([train], in_memory=False, loader_threads=2, **kw)
  a, b = list(memory.stream(0, 1)), list(stream.stream(0, 1))
  assert len(a) == len(b) == len(train) // 4
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  m = memory.measurement_batch([0], 1)
  assert m["image"].shape == (1, 4, 32, 16, 3)
