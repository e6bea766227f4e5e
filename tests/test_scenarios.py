"""Federated scenarios: by camera, by identity (and by dataset = a list of clients)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import fixtures as F
from fedreid_jax.data import prepare, source
from fedreid_jax.data import scenarios
from fedreid_jax.data.base import ClientData, split_from_arrays


def toy_client(num_ids=7, cams=3, per=4) -> ClientData:
  """Images whose first pixel encodes the record index, ids 10, 20, ..."""
  n = num_ids * per
  images = np.zeros((n, 4, 2, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  pids = np.repeat(np.arange(1, num_ids + 1) * 10, per)
  camids = np.arange(n) % cams
  train = split_from_arrays(images, pids, camids, [f"img{i}" for i in range(n)])
  test = split_from_arrays(images[:3], [1, 2, -1], [0, 1, 0])
  return ClientData("toy", train, test, test, {"num_train_ids": num_ids})


def test_by_camera():
  c = toy_client()
  parts = scenarios.by_camera(c)
  assert [p.name for p in parts] == ["toy_c1", "toy_c2", "toy_c3"]
  assert sum(len(p.train) for p in parts) == len(c.train)
  for cam, p in enumerate(parts):
    assert set(p.train.camids) == {cam}
    np.testing.assert_array_equal(np.unique(p.train.pids), np.arange(p.num_train_ids))
    for i in range(len(p.train)):  # same images as the parent's
      k = int(p.train.read_image(i)[0, 0, 0])
      assert c.train.camids[k] == cam and p.train.names[i] == f"img{k}"
    assert p.query is c.query and p.gallery is c.gallery
    assert p.info["test_set"] == "toy" and p.info["camera"] == cam
  assert len(scenarios.distinct_test_sets(parts + [c])) == 1


def test_by_identity_seeded_disjoint():
  c = toy_client(num_ids=7)
  parts = scenarios.by_identity(c, 3, seed=0)
  assert [p.name for p in parts] == ["toy_part1", "toy_part2", "toy_part3"]
  ids = [set(c.train.pids[[int(p.train.read_image(i)[0, 0, 0]) for i in range(len(p.train))]])
         for p in parts]
  assert set().union(*ids) == set(c.train.pids) and sum(map(len, ids)) == 7
  assert sorted(map(len, ids)) == [2, 2, 3]
  for p in parts:
    np.testing.assert_array_equal(np.unique(p.train.pids), np.arange(p.num_train_ids))
  same = scenarios.by_identity(c, 3, seed=0)
  other = scenarios.by_identity(c, 3, seed=1)
  assert [p.train.names for p in same] == [p.train.names for p in parts]
  assert [p.train.names for p in other] != [p.train.names for p in parts]
  with pytest.raises(ValueError, match="fewer than"):
    scenarios.by_identity(c, 8)


def test_scenarios_on_prepared_dataset(tmp_path):
  F.make_market1501(tmp_path / "raw")
  F.make_cuhk03_np(tmp_path / "raw")
  data = tmp_path / "tfds"
  prepare.prepare("market1501", tmp_path / "raw", data)
  prepare.prepare("cuhk03_np_detected", tmp_path / "raw", data)
  clients = source.load_clients(["market1501", "cuhk03_np_detected"], data)  # by dataset
  assert [c.name for c in clients] == ["market1501", "cuhk03_np_detected"]
  cams = scenarios.by_camera(clients[0])
  assert len(cams) == len(np.unique(clients[0].train.camids))
  img = cams[0].train.read_image(0)
  assert img.dtype == np.uint8 and img.ndim == 3
  halves = scenarios.by_identity(clients[1], 2, seed=0)
  assert sum(h.num_train_ids for h in halves) == clients[1].num_train_ids
  restored = pickle.loads(pickle.dumps(halves[0].train))  # picklable for grain workers
  np.testing.assert_array_equal(restored.read_image(1), halves[0].train.read_image(1))
