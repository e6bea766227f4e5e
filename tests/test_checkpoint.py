"""Checkpoints written in the background: the saved state is the state at
`save` even when the next round donates it, checksums describe finished
writes only, a write's error surfaces in the loop, stops wait for the write."""
import errno
import json
import os
import re
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import checkpoint, errors, train
from fedreid_jax.stop_signals import StopOnSignal

FULL_DISK = ("RESOURCE_EXHAUSTED: Error writing \"a/0.0\": Failed to write 1893403 bytes to file 7: "
             "No space left on device [os_error_code='28']")  # tensorstore's form, seen on a tmpfs


def _state(seed: int):
  k = jax.random.key(seed)
  return {"w": jax.random.normal(k, (64, 32)), "n": jnp.arange(5) + seed, "rng": k}


def _equal(a, b) -> bool:
  a, b = checkpoint._unkey(a), checkpoint._unkey(b)
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "train/round_seconds"}
            for line in f]


def test_a_round_run_while_the_write_is_in_flight_leaves_the_checkpoint_intact(tmp_path,
                                                                               monkeypatch):
  """The next round donates (scatter) and replaces the state just saved, while
  Orbax's thread is held before the commit. On CPU, JAX then copies instead
  of donating (the write's host copy is a view of the same buffers); either
  way the checkpoint holds the state at `save`."""
  release = threading.Event()
  monkeypatch.setattr(checkpoint.Checkpoints, "_on_written", lambda self: release.wait(60))
  exp = train.Experiment(fakes.tiny_config(), fakes.fake_clients())
  exp.train_round(0)
  before = jax.device_get(checkpoint._unkey((exp.server, exp.clients)))
  with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
    ckpts.save(1, (exp.server, exp.clients))
    exp.train_round(1)
    assert ckpts.in_flight == 1 and not (tmp_path / "checkpoints" / "1").exists()
    release.set()
    step, restored = ckpts.restore_latest((exp.server, exp.clients))
  assert step == 1 and _equal(restored, before)
  assert not _equal(restored, (exp.server, exp.clients))  # round 2 did change the state


def test_checksums_are_written_only_once_the_write_has_finished(tmp_path, monkeypatch):
  release = threading.Event()
  monkeypatch.setattr(checkpoint.Checkpoints, "_on_written", lambda self: release.wait(60))
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  checksums = tmp_path / "checksums"
  ckpts.save(1, _state(1))  # returns while Orbax's thread is held before the commit
  assert ckpts.in_flight == 1 and not (checksums / "1.json").exists()
  assert not (tmp_path / "checkpoints" / "1").exists()  # still a temporary folder
  release.set()
  ckpts.finish()
  assert ckpts.in_flight is None and ckpts.saved == 1
  assert json.loads((checksums / "1.json").read_text()) == checkpoint.file_digests(
      str(tmp_path / "checkpoints" / "1"))
  for step in (2, 3):
    ckpts.save(step, _state(step))  # finishes and hashes the previous step first
    assert (checksums / f"{step - 1}.json").exists() and not (checksums / f"{step}.json").exists()
  ckpts.close()  # finishes step 3; keep=2 removed step 1
  assert ckpts.manager.all_steps() == [2, 3] and (checksums / "3.json").exists()
  assert all(checkpoint.verify(ckpts.manager, s) is None for s in (2, 3))
  with checkpoint.Checkpoints(str(tmp_path)) as again:
    step, state = again.restore_latest(_state(0))
  assert step == 3 and _equal(state, _state(3))


def test_one_host_hashes_each_write_once_in_a_background_thread(tmp_path, monkeypatch):
  """The files are hashed as soon as the write has finished, off the training
  thread and before the next `save` or `finish` asks; those only write the
  checksum file."""
  hashed = []
  real = checkpoint.file_digests

  def recording(folder):
    hashed.append((os.path.basename(folder), threading.current_thread().name))
    return real(folder)
  monkeypatch.setattr(checkpoint, "file_digests", recording)
  with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
    ckpts.save(1, _state(1))
    ckpts._hash._thread.join(120)  # training goes on meanwhile; nobody waited yet
    assert hashed == [("1", "checkpoint-1-hash")]
    assert not (tmp_path / "checksums" / "1.json").exists()  # recorded by the next finish
    ckpts.save(2, _state(2))
  assert hashed == [("1", "checkpoint-1-hash"), ("2", "checkpoint-2-hash")]
  for step in (1, 2):
    assert json.loads((tmp_path / "checksums" / f"{step}.json").read_text()) == real(
        str(tmp_path / "checkpoints" / str(step)))
    assert checkpoint.verify(ckpts.manager, step) is None


def test_a_write_that_cannot_be_hashed_is_kept_without_checksums(tmp_path, monkeypatch,
                                                                  caplog):
  """A hashing failure (a file gone between the write and the hash) is not a
  failed write: the step counts as saved, unhashed, and restores."""
  def vanished(folder):
    raise FileNotFoundError(os.path.join(folder, "gone"))
  monkeypatch.setattr(checkpoint, "file_digests", vanished)
  with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
    ckpts.save(1, _state(1))
    ckpts.finish()
    assert ckpts.saved == 1 and ckpts.in_flight is None
  assert "could not be hashed (FileNotFoundError" in caplog.text
  assert not (tmp_path / "checksums" / "1.json").exists()
  monkeypatch.undo()
  with checkpoint.Checkpoints(str(tmp_path)) as again:
    step, state = again.restore_latest(_state(0))
  assert step == 1 and _equal(state, _state(1))


def test_a_write_error_in_orbax_thread_is_raised_by_the_next_save(tmp_path, monkeypatch):
  def full(self):
    raise ValueError(FULL_DISK)
  monkeypatch.setattr(checkpoint.Checkpoints, "_on_written", full)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  ckpts.save(1, _state(1))
  with pytest.raises(OSError) as e:
    ckpts.save(2, _state(2))
  assert e.value.filename == str(tmp_path / "checkpoints" / "1") and "os_error_code" in str(
      e.value.__cause__)
  assert ckpts.in_flight is None and ckpts.saved == 0
  ckpts.close()  # the error is not raised twice
  assert not (tmp_path / "checksums" / "1.json").exists()
  assert ckpts.manager.all_steps() == []


def test_a_run_ending_on_its_own_error_reports_it_not_the_failing_write(tmp_path,
                                                                          monkeypatch, caplog):
  """An error that ends the run (here a RuntimeError) stays the error raised
  when the write in flight then fails too; that failure is logged."""
  def full(self):
    raise ValueError(FULL_DISK)
  monkeypatch.setattr(checkpoint.Checkpoints, "_on_written", full)
  with pytest.raises(RuntimeError, match="the run's own error"):
    with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
      ckpts.save(1, _state(1))
      raise RuntimeError("the run's own error")
  assert "the checkpoint write of round 1 failed too (OSError" in caplog.text
  assert not (tmp_path / "checksums" / "1.json").exists()


def _resumed_after(caplog) -> int:
  """The round the run just logged resuming after (0: it started afresh)."""
  found = re.findall(r"resumed from .* after round (\d+)", caplog.text)
  return int(found[-1]) if found else 0


def _console_of_the_cli(workdir, monkeypatch):
  """Logging set up as the CLI sets it (console handler, library errors to
  `<workdir>/errors.log`, uncaught exceptions of other threads logged), undone
  by `monkeypatch`."""
  import logging
  import sys
  import threading
  from fedreid_jax import main
  root = logging.getLogger()
  monkeypatch.setattr(root, "handlers", list(root.handlers))
  monkeypatch.setattr(root, "level", root.level)
  for hook in ("excepthook", "unraisablehook"):
    monkeypatch.setattr(sys, hook, getattr(sys, hook))
  monkeypatch.setattr(threading, "excepthook", threading.excepthook)
  main.log_above_progress_bars()
  main.library_errors_to_file(workdir)


def test_a_full_disk_during_a_background_write_is_one_line_and_the_run_resumes(
    tmp_path, monkeypatch, capfd, caplog):
  """Orbax logs the failed write with tracebacks from its threads: they go to
  errors.log, not the console; the round the message names is the one the
  rerun resumes from."""
  cfg = fakes.tiny_config(**{"fed.rounds": 3, "eval.client_models": False})
  cfg.checkpoint_every = 1
  clients = fakes.fake_clients()
  writes = []

  def second_write_fails(self):
    writes.append(1)
    if len(writes) == 2:
      raise ValueError(FULL_DISK)
  monkeypatch.setattr(checkpoint.Checkpoints, "_on_written", second_write_fails)
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as logs:
    _console_of_the_cli(workdir, logs)
    with pytest.raises(errors.DiskFull) as e:
      train.run(cfg, workdir, clients)
    console = capfd.readouterr().err
  assert str(e.value) == (f"no space left on device while writing {workdir}/checkpoints/2; "
                          "free space and rerun the same command: it resumes from round 1")
  assert "Traceback" not in console and "orbax" not in console, console[-3000:]
  assert "Traceback" in (tmp_path / "run" / "errors.log").read_text()
  assert not (tmp_path / "run" / "checksums" / "2.json").exists()
  monkeypatch.undo()
  caplog.clear()
  with caplog.at_level("INFO"):
    train.run(cfg, workdir, clients)  # round 2's unfinished write (a temporary folder) is redone
  assert _resumed_after(caplog) == 1
  assert [r["round"] for r in _records(workdir) if r["kind"] == "train"] == [1, 2, 3]
  with checkpoint.Checkpoints(workdir) as ckpts:
    assert ckpts.manager.all_steps() == [2, 3]
    assert all(checkpoint.verify(ckpts.manager, s) is None for s in (2, 3))


def test_a_stop_signal_waits_for_the_write_then_the_run_resumes(tmp_path, monkeypatch):
  cfg = fakes.tiny_config(**{"fed.rounds": 3, "eval.client_models": False})
  cfg.checkpoint_every = 5  # the stop saves round 2 anyway
  clients = fakes.fake_clients()
  real = train.Experiment.round_fn

  def signalled(self, state, round_index, on_steps=None):
    if round_index == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
    return real(self, state, round_index, on_steps)
  monkeypatch.setattr(train.Experiment, "round_fn", signalled)
  workdir = tmp_path / "run"
  with pytest.raises(errors.Interrupted, match="after round 2 of 3; saved a checkpoint of round 2"):
    train.run(cfg, str(workdir), clients)
  digests = json.loads((workdir / "checksums" / "2.json").read_text())
  assert digests == checkpoint.file_digests(str(workdir / "checkpoints" / "2"))
  monkeypatch.undo()
  train.run(cfg, str(workdir), clients)
  assert [r["round"] for r in _records(workdir) if r["kind"] == "train"] == [1, 2, 3]


def test_a_second_signal_names_the_write_in_flight_which_the_exit_finishes():
  class Ckpts:
    saved, in_flight = 2, 4
  stop = StopOnSignal(Ckpts())
  stop._handle(signal.SIGTERM, None)
  with pytest.raises(errors.Interrupted, match="latest checkpoint holds 4 rounds"):
    stop._handle(signal.SIGTERM, None)
  Ckpts.in_flight = None
  with pytest.raises(errors.Interrupted, match="latest checkpoint holds 2 rounds"):
    stop._handle(signal.SIGTERM, None)


def test_a_damaged_step_is_deleted_on_fallback_and_saved_afresh(tmp_path, caplog):
  with checkpoint.Checkpoints(str(tmp_path)) as ckpts:
    ckpts.save(1, _state(1))
    ckpts.save(2, _state(2))
  biggest = max((p for p in (tmp_path / "checkpoints" / "2").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  with checkpoint.Checkpoints(str(tmp_path)) as ckpts, caplog.at_level("WARNING"):
    step, _ = ckpts.restore_latest(_state(0))
    assert step == 1 and "round 2" in caplog.text and "is damaged" in caplog.text
    assert ckpts.manager.all_steps() == [1]
    ckpts.save(2, _state(22))  # Orbax would skip a step it still listed
  caplog.clear()
  with checkpoint.Checkpoints(str(tmp_path)) as ckpts, caplog.at_level("WARNING"):
    step, state = ckpts.restore_latest(_state(0))
  assert step == 2 and _equal(state, _state(22)) and "damaged" not in caplog.text


def test_a_full_disk_after_the_write_finished_names_that_round(tmp_path, monkeypatch, caplog):
  """The disk fills between the end of round 1's write and its checksum file
  (a 0-byte `checksums/1.json.tmp` was left): the step is on disk, so the
  message says round 1 (it said 0) and the rerun resumes from round 1; no
  temporary is left."""
  import fedreid_jax.workdir as workdir_lib
  cfg = fakes.tiny_config(**{"fed.rounds": 3, "eval.client_models": False})
  cfg.checkpoint_every = 1
  clients = fakes.fake_clients()
  real = workdir_lib.write_atomic

  def full_at_checksums_of_1(path, data):
    if path.endswith(os.path.join("checksums", "1.json")):
      with open(path + ".tmp", "w"):  # created, then nothing fits
        raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp")
    return real(path, data)
  monkeypatch.setattr(checkpoint, "write_atomic", full_at_checksums_of_1)
  workdir = tmp_path / "run"
  with pytest.raises(errors.DiskFull, match="it resumes from round 1$"):
    train.run(cfg, str(workdir), clients)
  monkeypatch.undo()
  caplog.clear()
  with caplog.at_level("INFO"):
    train.run(cfg, str(workdir), clients)
  assert _resumed_after(caplog) == 1
  assert not [p for p in workdir.rglob("*.tmp")]
  assert [r["round"] for r in _records(workdir) if r["kind"] == "train"] == [1, 2, 3]


def test_checksums_of_pruned_steps_are_removed(tmp_path):
  """Orbax keeps the last `keep` steps; their checksums and stored config
  fields go with them, when pruned and (older leftovers) at the next start."""
  with checkpoint.Checkpoints(str(tmp_path), keep=2, meaning={"seed": 0}) as ckpts:
    for step in (1, 2, 3, 4):
      ckpts.save(step, _state(step))
  names = lambda: sorted(p.name for p in (tmp_path / "checksums").iterdir())
  assert names() == ["3.json", "3.meaning.json", "4.json", "4.meaning.json"]
  for leftover in ("1.json", "2.meaning.json"):  # left by an earlier version
    (tmp_path / "checksums" / leftover).write_text("{}")
  (tmp_path / "checksums" / "notes.txt").write_text("not ours")
  with checkpoint.Checkpoints(str(tmp_path), keep=2) as ckpts:
    step, _ = ckpts.restore_latest(_state(0))
  assert step == 4 and names() == ["3.json", "3.meaning.json", "4.json", "4.meaning.json",
                                   "notes.txt"]
