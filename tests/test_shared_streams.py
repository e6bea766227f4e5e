"""One loader for a round's clients read one after another (`TrainInput.streams`
with `in_order=True`, used by the `serial` strategy): the same batches as a
loader per client, a clear error when read out of order."""
from __future__ import annotations

import numpy as np
import pytest

import fakes
import fixtures as F
from fedreid_jax import train
from fedreid_jax.data import prepare, scenarios, source
from fedreid_jax.data.base import split_from_arrays
from fedreid_jax.input import grain_loader as G, train_input

KW = dict(image_size=(12, 6), batch_size=4, epochs=2, seed=3)


def toy_splits(sizes=(21, 9, 14)):
  rng = np.random.default_rng(0)
  return [split_from_arrays(rng.integers(0, 256, (n, 12, 6, 3), dtype=np.uint8),
                            np.arange(n) % 5, np.arange(n) % 2) for n in sizes]


def read_all(streams):
  """Every stream to its end, one after another: {position: [batches]}."""
  return {i: [{k: np.asarray(v) for k, v in b.items()} for b in s]
          for i, s in enumerate(streams) if s is not None}


def assert_same(a, b):
  assert a.keys() == b.keys()
  for i in a:
    assert len(a[i]) == len(b[i])
    for x, y in zip(a[i], b[i]):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])


def test_one_loader_for_the_round_reads_the_batches_of_a_loader_per_client():
  inputs = train_input.TrainInput(toy_splits(), in_memory=False, loader_threads=2, **KW)
  clients = [2, None, 0, 1]  # any order, with a lane another host reads
  shared = read_all(inputs.streams(clients, 5, in_order=True))
  assert_same(shared, read_all(inputs.streams(clients, 5)))
  memory = train_input.TrainInput(toy_splits(), in_memory=True, **KW)
  assert_same(shared, read_all(memory.streams(clients, 5, in_order=True)))
  assert [len(shared[i]) for i in (0, 2, 3)] == [inputs.num_steps(c) for c in (2, 0, 1)]


def test_reading_out_of_order_names_the_clients():
  inputs = train_input.TrainInput(toy_splits(), in_memory=False, loader_threads=2,
                                  names=["cam1", "cam2", "cam3"], **KW)
  first, second, _ = inputs.streams([0, 1, 2], 0, in_order=True)
  next(first)
  with pytest.raises(RuntimeError, match="round 1, cam2: .* at round 1, cam1"):
    next(second)
  inputs.close()
  with pytest.raises(RuntimeError, match="nothing"):  # close() stops the round's loader
    next(first)


def test_a_schedule_skips_clients_without_a_batch_and_keeps_every_other_batch():
  """A client smaller than one batch has no step: it is left out of the
  schedule, and the clients around it read what their own loaders read."""
  splits = toy_splits((21, 3, 14))
  inputs = train_input.TrainInput(splits, in_memory=False, loader_threads=2, **KW)
  assert inputs.num_steps(1) == 0
  inputs.schedule([(r, c) for r in (0, 1) for c in (0, 1, 2)])
  memory = train_input.TrainInput(splits, in_memory=True, **KW)
  for r in (0, 1):
    assert_same(read_all(inputs.streams([0, 1, 2], r, in_order=True)),
                read_all(memory.streams([0, 1, 2], r)))
  assert inputs._ahead.position == inputs._ahead.total  # one loader read both rounds


def test_an_unannounced_round_warns_and_gets_its_own_loader(caplog):
  inputs = train_input.TrainInput(toy_splits(), in_memory=False, loader_threads=2, **KW)
  inputs.schedule([(r, c) for r in (0, 1) for c in (0, 1, 2)])
  with caplog.at_level("WARNING"):
    got = read_all(inputs.streams([0, 1, 2], 1, in_order=True))  # round 0 skipped
  assert "round 2: the run's loader is at round 1" in caplog.text
  memory = train_input.TrainInput(toy_splits(), in_memory=True, **KW)
  assert_same(got, read_all(memory.streams([0, 1, 2], 1)))


def test_a_client_stopped_part_way_stops_the_round_loader():
  inputs = train_input.TrainInput(toy_splits(), in_memory=False, loader_threads=2, **KW)
  first, second, _ = inputs.streams([0, 1, 2], 0, in_order=True)
  next(first)
  first.close()  # e.g. the consumer raised: nothing after it is read any more
  with pytest.raises(RuntimeError, match="nothing \\(all read or stopped\\)"):
    next(second)


def test_one_loader_with_a_worker_process_over_prepared_clients(tmp_path):
  """Prepared (TFDS) clients cut from one dataset, one worker process (the
  schedule's reader is pickled to it): two rounds of both clients through one
  loader give each client's batches, in order, as a loader per client does."""
  F.make_dukemtmc(tmp_path / "raw")
  prepare.prepare("dukemtmc", tmp_path / "raw", tmp_path / "tfds")
  train = source.load_prepared_client("dukemtmc", tmp_path / "tfds").train
  half = len(train) // 2
  parts = [scenarios.relabelled(train, range(0, half)),
           scenarios.relabelled(train, range(half, len(train)))]
  kw = dict(image_size=(32, 16), batch_size=4, epochs=1, seed=5, in_memory=False,
            loader_threads=2)
  ahead = train_input.TrainInput(parts, loader_workers=1, **kw)
  ahead.schedule([(r, c) for r in (0, 1) for c in (0, 1)])
  apart = train_input.TrainInput(parts, **kw)
  for r in (0, 1):
    assert_same(read_all(ahead.streams([0, 1], r, in_order=True)),
                read_all(apart.streams([0, 1], r)))
  assert ahead._ahead.position == ahead._ahead.total  # one loader read both rounds


def test_a_loader_over_an_empty_plan_is_empty():
  a = toy_splits((8,))[0]
  assert read_all([G.make_loader(a, image_size=(12, 6), batch_size=4,
                                 plan=np.zeros((0, 4), int))]) == {0: []}


def test_a_serial_round_opens_one_loader_and_lockstep_one_per_client(monkeypatch):
  opened = []
  make = G.make_steps_loader
  monkeypatch.setattr(G, "make_steps_loader", lambda read, steps, **kw:
                      opened.append(len(steps)) or make(read, steps, **kw))
  for strategy in ("serial", "vmap"):
    opened.clear()
    cfg = fakes.tiny_config(**{"data.in_memory": False, "fed.strategy": strategy})
    exp = train.Experiment(cfg, fakes.fake_clients())
    exp.train_round(0)
    steps = [exp.inputs.num_steps(c) for c in exp.selected(0)]
    assert opened == ([sum(steps)] if strategy == "serial" else steps), strategy


def test_a_run_announced_ahead_reads_every_round_through_one_loader(monkeypatch):
  """`Experiment.read_ahead`: one loader for rounds 0-2, the same records as
  a loader per round; an unannounced round falls back to its own loader."""
  opened = []
  make = G.make_steps_loader
  monkeypatch.setattr(G, "make_steps_loader", lambda read, steps, **kw:
                      opened.append(len(steps)) or make(read, steps, **kw))
  cfg = fakes.tiny_config(**{"data.in_memory": False})
  ahead, per_round = (train.Experiment(cfg, fakes.fake_clients()) for _ in range(2))
  ahead.read_ahead(range(3))
  per_round_steps = sum(ahead.inputs.num_steps(c) for c in ahead.selected(0))
  assert opened == []  # lazy: nothing is read before the first batch
  records = [(ahead.train_round(r), per_round.train_round(r)) for r in range(3)]
  assert opened[0] == sum(sum(ahead.inputs.num_steps(c) for c in ahead.selected(r))
                          for r in range(3))
  assert opened[1:] == [per_round_steps] * 3  # the other experiment: one loader per round
  for a, b in records:
    assert a == b
  opened.clear()
  ahead.train_round(5)  # not announced: a loader of its own
  assert opened == [per_round_steps]
  ahead.inputs.close()


def test_a_schedule_read_out_of_order_names_round_and_client():
  inputs = train_input.TrainInput(toy_splits(), in_memory=False, loader_threads=2,
                                  names=["cam1", "cam2", "cam3"], **KW)
  inputs.schedule([(0, 0), (0, 1), (1, 0), (1, 1)])
  first, second = inputs.streams([0, 1], 0, in_order=True)
  assert inputs._ahead is not None  # round 0 was announced: the schedule's loader
  with pytest.raises(RuntimeError, match="round 1, cam2: .* at round 1, cam1"):
    next(second)
  inputs.close()
