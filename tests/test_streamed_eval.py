"""Streamed evaluation: the same features and metrics as in memory, read batch
by batch, each shared test set embedded once per model."""
import dataclasses

import jax
import numpy as np
import pytest

import fakes
from fedreid_jax import train
from fedreid_jax.evaluation import features as features_lib
from fedreid_jax.evaluation import streamed
from fedreid_jax.federated import rounds as rounds_lib


def experiment(stream: bool, clients=None):
  cfg = fakes.tiny_config(**{"eval.streamed": stream})
  return train.Experiment(cfg, clients or fakes.fake_clients())


@pytest.fixture(scope="module")
def pair():
  """The same trained state evaluated streamed and in memory."""
  a, b = experiment(True), experiment(False)
  a.train_round(0)
  b.server, b.clients = a.server, a.clients
  return a, b


def test_streamed_features_equal_in_memory_bit_for_bit(pair):
  a, b = pair
  variables = rounds_lib.global_variables(a.server)
  for ts, tm in zip(a.tests, b.tests):
    assert isinstance(ts, streamed.StreamedTestSet) and isinstance(tm, features_lib.TestSet)
    for split, images in ((ts.query, tm.query_images), (ts.gallery, tm.gallery_images)):
      got = streamed.split_features(a.embed_fn, variables, split, ts.size, 8, threads=2)
      want = features_lib.extract_features(a.embed_fn, variables, images, 8)
      assert got.shape == want.shape and bool(np.array_equal(got, want))


def test_streamed_metrics_and_examples_equal_in_memory(pair, tmp_path):
  a, b = pair
  got = a.evaluate(True, str(tmp_path / "streamed"))
  want = b.evaluate(True, str(tmp_path / "memory"))
  assert got == want and set(got) == {"global", "client"}
  for name in ("c0", "c1", "c2"):
    x = np.load(tmp_path / "streamed" / f"{name}.npz")
    y = np.load(tmp_path / "memory" / f"{name}.npz")
    assert sorted(x.files) == sorted(y.files)
    for key in x.files:
      assert np.array_equal(x[key], y[key]), (name, key)


def test_reads_batch_by_batch(pair, monkeypatch):
  a, _ = pair
  sizes = []
  real = streamed.read_resized

  def spy(split, rows, size):
    sizes.append(len(rows))
    return real(split, rows, size)

  monkeypatch.setattr(streamed, "read_resized", spy)
  test = a.tests[0]
  feats = streamed.split_features(a.embed_fn, rounds_lib.global_variables(a.server),
                                  test.gallery, test.size, 8, threads=2)
  assert feats.shape[0] == len(test.gallery) == sum(sizes) == 20
  assert sizes == [8, 8, 4]  # never more than one batch per read
  assert isinstance(feats, jax.Array)  # accumulated on the device


def test_clients_sharing_a_test_set_are_embedded_once_per_model():
  base = fakes.fake_clients()
  shared = [dataclasses.replace(c, query=base[0].query, gallery=base[0].gallery,
                                info={"test_set": "c0"}) for c in base]
  exp = experiment(True, shared)
  calls = []
  embed = exp.embed_fn
  exp.embed_fn = lambda v, x: calls.append(x.shape[0]) or embed(v, x)
  out = exp.evaluate(client_models=False)
  batches = -(-len(base[0].query) // 8) + -(-len(base[0].gallery) // 8)
  assert len(calls) == batches  # once, not three times
  assert out["global"]["c0"] == out["global"]["c1"] == out["global"]["c2"]
  calls.clear()
  exp.evaluate(client_models=True)  # each client's own model: its own embedding
  assert len(calls) == 4 * batches


def test_lazy_images_index_like_arrays(pair):
  a, b = pair
  ts, tm = a.tests[1], b.tests[1]
  assert ts.gallery_images.shape == tm.gallery_images.shape
  idx = np.array([[3, 0], [1, 1]])
  assert np.array_equal(ts.gallery_images[idx], tm.gallery_images[idx])
  assert np.array_equal(ts.query_images[2:5], tm.query_images[2:5])


def test_short_batches_padded_to_few_sizes():
  assert [features_lib.padded_size(n, 256) for n in (1, 22, 32, 33, 64, 65, 129, 250, 256)] == [
      32, 32, 32, 64, 64, 128, 256, 256, 256]
  assert {features_lib.padded_size(n, 256) for n in range(1, 257)} == {32, 64, 128, 256}
  assert features_lib.padded_size(5, 8) == 8 and features_lib.padded_size(1, 1) == 1


def test_short_batch_features_equal_full_batch_padding(pair):
  """A 3-image tail embedded at its bucket size (8 of batch 64) gives the
  features it gets padded to the full batch, within float rounding."""
  a, b = pair
  variables = rounds_lib.global_variables(a.server)
  images = b.tests[0].gallery_images[:3]
  got = features_lib.extract_features(a.embed_fn, variables, images, 64)
  padded = np.concatenate([images, np.zeros((61, *images.shape[1:]), images.dtype)])
  want = a.embed_fn(variables, padded)[:3]
  assert got.shape == (3, want.shape[1])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
