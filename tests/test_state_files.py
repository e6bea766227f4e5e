"""Damaged small state files of a workdir: each is recovered from, or refused
in one line, and nothing already computed is lost."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import checkpoint, config_lib, errors, main, run_config, train, workdir
from fedreid_jax.metric_writer import MetricWriter
from fedreid_jax.round_outputs import best_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n: int) -> str:
  return "".join(json.dumps({"round": r, "kind": "train", "train/loss": float(r)}) + "\n"
                 for r in range(1, n + 1))


def _snapshot(folder) -> dict:
  """{relative path: bytes} of every file below `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def test_metrics_last_line_cut_short_is_dropped_with_one_warning(tmp_path, caplog):
  log = tmp_path / "metrics.jsonl"
  log.write_text(_records(3) + '{"round": 4, "kind": "tr')  # killed mid-append
  with caplog.at_level(logging.WARNING):
    writer = MetricWriter(str(tmp_path), resume_round=3)
  writer.write(4, "train", {"train/loss": 4.0})
  writer.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and str(log) in warnings[0] and "cut short" in warnings[0]
  records = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["round"] for r in records] == [1, 2, 3, 4]  # the rounds before: all kept


def test_metrics_complete_last_line_without_newline_is_kept(tmp_path):
  log = tmp_path / "metrics.jsonl"
  log.write_text(_records(2).rstrip("\n"))
  writer = MetricWriter(str(tmp_path), resume_round=2)
  writer.write(3, "train", {"train/loss": 3.0})
  writer.close()
  assert [json.loads(line)["round"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_metrics_damaged_inside_is_one_line_and_left_as_it_is(tmp_path):
  log = tmp_path / "metrics.jsonl"
  text = _records(1) + "garbage\n" + _records(2)
  log.write_text(text)
  with pytest.raises(errors.ConfigError, match=r"metrics.jsonl' line 2 is not a JSON record"):
    MetricWriter(str(tmp_path), resume_round=2)
  assert log.read_text() == text


def _state(seed: int):
  k = jax.random.key(seed)
  return {"w": jax.random.normal(k, (64, 32)), "n": jnp.arange(5) + seed, "rng": k}


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
  """A workdir holding checkpoints of steps 1 and 2 (with checksums and the
  config fields a resume must match)."""
  folder = tmp_path_factory.mktemp("ckpts")
  meaning = run_config.meaning(json.loads(fakes.tiny_config().to_json()))
  with checkpoint.Checkpoints(str(folder), keep=3, meaning=meaning) as ckpts:
    ckpts.save(1, _state(1))
    ckpts.save(2, _state(2))
  return folder


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _restore(folder):
  manager = checkpoint.make_manager(str(folder))
  try:
    return checkpoint.restore_latest(manager, _state(0))
  finally:
    manager.close()


def test_corrupt_checksums_file_is_checked_by_restoring_then_hashed_again(saved_steps, tmp_path,
                                                                           caplog):
  folder = _copy(saved_steps, tmp_path / "wd")
  bad = folder / "checksums" / "2.json"
  bad.write_text('{"state/d/0.0": "ab')  # cut short
  with caplog.at_level(logging.WARNING):
    step, state = _restore(folder)
  assert step == 2 and np.array_equal(state["n"], np.arange(5) + 2)  # nothing lost
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and str(bad) in warnings[0] and "unreadable" in warnings[0]
  assert set(json.loads(bad.read_text())) == set(checkpoint.file_digests(
      str(folder / "checkpoints" / "2")))  # hashed again: the next restore verifies it
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert _restore(folder)[0] == 2
  assert not caplog.records


def test_corrupt_checksums_of_a_damaged_step_falls_back_to_the_previous(saved_steps, tmp_path,
                                                                         caplog):
  folder = _copy(saved_steps, tmp_path / "wd")
  (folder / "checksums" / "2.json").write_bytes(b"\xff\xfe not json")
  for path in (folder / "checkpoints" / "2").rglob("*"):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])  # truncated array files
  with caplog.at_level(logging.WARNING):
    step, state = _restore(folder)
  assert step == 1 and np.array_equal(state["n"], np.arange(5) + 1)
  assert "checkpoint of round 2" in caplog.text and "is damaged" in caplog.text


def test_checkpoints_store_the_fields_a_resume_must_match(saved_steps):
  want = run_config.meaning(json.loads(fakes.tiny_config().to_json()))
  assert checkpoint.saved_meaning(str(saved_steps)) == want
  assert want["seed"] == 0 and "fed.algorithm" in want


def _fake_checkpoint(folder, config=None, config_json=True):
  """A workdir that looks trained: a checkpoint step (never restored: every
  test here is refused before), its stored fields, and config.json."""
  config = config or fakes.tiny_config()
  (folder / "checkpoints" / "2").mkdir(parents=True)
  now = json.loads(config.to_json())
  checkpoint.write_meaning(str(folder), 2, run_config.meaning(now))
  if config_json:
    (folder / "config.json").write_text(config.to_json(indent=2))
  (folder / "metrics.jsonl").write_text(_records(2))
  return folder


def test_deleted_config_json_still_refuses_another_config(tmp_path):
  folder = _fake_checkpoint(tmp_path / "wd", config_json=False)
  before = _snapshot(folder)
  seeded = fakes.tiny_config()
  seeded.seed = 5
  with pytest.raises(errors.CheckpointMismatch,
                     match="seed: saved 0 vs now 5.*rerun with the saved values"):
    train.run(seeded, str(folder), fakes.fake_clients())
  assert _snapshot(folder) == before  # its .lock removed too


def test_refusal_advice_with_config_json_works_as_written(tmp_path):
  folder = _fake_checkpoint(tmp_path / "wd")
  seeded = fakes.tiny_config()
  seeded.seed = 5
  with pytest.raises(errors.CheckpointMismatch) as err:
    train.run(seeded, str(folder), fakes.fake_clients())
  advised = str(err.value).split("rerun with --config ")[1]
  assert advised == str(folder / "config.json")
  loaded = config_lib.load_config_file(advised)  # what `--config <advised>` loads
  assert loaded == fakes.tiny_config()
  run_config.check_meaning(json.loads((folder / "config.json").read_text()),
                           json.loads(loaded.to_json()), str(folder))  # accepted


def test_json_config_round_trips_the_python_config(tmp_path):
  config = fakes.load_config("synthetic")
  path = tmp_path / "config.json"
  path.write_text(config.to_json(indent=2))
  loaded = config_lib.load_config_file(str(path))
  assert loaded == config and loaded.to_dict() == config.to_dict()
  assert isinstance(loaded.data.image_size, tuple) and isinstance(loaded.baselines, tuple)
  parsed = main.ConfigFileParser("config").parse(str(path))  # how --config reads it
  assert parsed.to_dict() == config.to_dict() and parsed.is_locked
  assert main.unknown_override(["--config", str(path), "--config.fed.rounds=3"]) is None
  assert "unknown config field config.fed.bogus" in main.unknown_override(
      ["--config", str(path), "--config.fed.bogus=3"])


def test_corrupt_config_json_is_one_line_and_nothing_changes(tmp_path):
  folder = _fake_checkpoint(tmp_path / "wd")
  (folder / "config.json").write_text('{"seed": 0, "data": {')
  before = _snapshot(folder)
  with pytest.raises(errors.ConfigError, match=r"config.json' is damaged \(line 1: .*delete it "
                                               "and rerun"):
    train.run(fakes.tiny_config(), str(folder), fakes.fake_clients())
  assert _snapshot(folder) == before  # its .lock removed too


def test_corrupt_config_json_before_any_checkpoint_binds_nothing(tmp_path):
  folder = tmp_path / "wd"
  folder.mkdir()
  (folder / "config.json").write_text("{")  # a launch that never got to a checkpoint
  cfg = fakes.tiny_config(**{"train.batch_size": 40})
  with pytest.raises(errors.ConfigError, match="fewer training images"):  # not config.json
    train.run(cfg, str(folder), fakes.fake_clients())
  assert sorted(os.listdir(folder)) == ["config.json"]


def test_checksums_path_that_is_a_file_is_refused_before_training(tmp_path):
  folder = tmp_path / "wd"
  folder.mkdir()
  (folder / "checksums").write_text("not a folder")
  with pytest.raises(errors.ConfigError, match="checksums' is a file, but a run writes a folder"):
    train.run(fakes.tiny_config(), str(folder), fakes.fake_clients())
  assert sorted(os.listdir(folder)) == ["checksums"]


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
  folder = _fake_checkpoint(tmp_path / "wd")
  (folder / "config.json.tmp").write_text("{half")
  (folder / "export").mkdir()
  (folder / "export" / "variables.msgpack.tmp").write_bytes(b"\x00")
  (folder / ".tmp-results.json").write_text("{")
  orbax_own = folder / "checkpoints" / "3.orbax-checkpoint-tmp-1"
  orbax_own.mkdir()
  (orbax_own / "x.tmp").write_text("Orbax cleans its own")
  seeded = fakes.tiny_config()
  seeded.seed = 5  # refused, after the clean-up
  with pytest.raises(errors.CheckpointMismatch):
    train.run(seeded, str(folder), fakes.fake_clients())
  left = _snapshot(folder)
  assert not [p for p in left if workdir.is_temporary(os.path.basename(p))
              and not p.startswith("checkpoints")]
  assert (orbax_own / "x.tmp").exists()


def test_refused_first_launch_leaves_no_workdir_behind(tmp_path):
  cfg = fakes.tiny_config(**{"train.batch_size": 40})  # larger than the fake clients
  target = tmp_path / "new" / "run"
  with pytest.raises(errors.ConfigError, match="fewer training images"):
    train.run(cfg, str(target), fakes.fake_clients())
  assert not (tmp_path / "new").exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(errors.ConfigError, match="fewer training images"):
    train.run(cfg, str(existing), fakes.fake_clients())
  assert os.listdir(existing) == ["notes.txt"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  path.write_text("old")
  workdir.write_atomic(str(path), "new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]

  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    workdir.write_atomic(str(path), "newer")
  assert path.read_text() == "new"
  assert os.listdir(tmp_path) == ["results.json"]  # its temporary removed
  monkeypatch.undo()
  monkeypatch.setattr(os, "fsync", fail)  # the disk fills while writing
  with pytest.raises(OSError):
    workdir.write_atomic(str(path), b"x" * 100)
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_unreadable_best_export_is_replaced(tmp_path, caplog):
  meta = tmp_path / "model.json"
  meta.write_text('{"score": 0.')
  with caplog.at_level(logging.WARNING):
    assert best_score(str(meta)) == -1.0
  assert str(meta) in caplog.text
  meta.write_text('{"score": 0.5}')
  assert best_score(str(meta)) == 0.5


def test_run_history_line_cut_short_is_dropped_and_the_next_entry_intact(tmp_path, caplog):
  history = tmp_path / "run_history.jsonl"
  history.write_text(json.dumps({"after_round": 0, "started": True}) + '\n{"time": "20')
  saved = json.loads(fakes.tiny_config().to_json())
  now = json.loads(fakes.tiny_config(**{"fed.rounds": 5}).to_json())
  with caplog.at_level(logging.WARNING):
    run_config.record_changes(str(tmp_path), saved, now, after_round=2)
  assert str(history) in caplog.text
  entries = [json.loads(line) for line in history.read_text().splitlines()]
  assert entries[0]["started"] and entries[1]["changes"] == {"fed.rounds": [2, 5]}


def test_run_history_records_a_resume_without_config_json_as_a_resume(tmp_path):
  now = json.loads(fakes.tiny_config().to_json())
  run_config.record_changes(str(tmp_path), None, now, after_round=0)
  run_config.record_changes(str(tmp_path), None, now, after_round=3)  # config.json deleted
  entries = [json.loads(line) for line in (tmp_path / "run_history.jsonl").read_text().splitlines()]
  assert entries[0]["started"] and entries[0]["after_round"] == 0
  assert entries[1]["resumed"] and entries[1]["config_json_missing"]
  assert entries[1]["after_round"] == 3 and "started" not in entries[1]


GENERATE = """
import sys
sys.path.insert(0, "tests")
from fedreid_jax.data import synthetic as S
import dataclasses
S.ensure_synthetic(sys.argv[1], image_size=(16, 8), domains=[dataclasses.replace(
    S.DOMAINS[2], train_ids=400, test_ids=10)], public=dataclasses.replace(S.PUBLIC, train_ids=4))
"""


def test_a_killed_generation_leaves_no_temporary_at_the_next_start(tmp_path):
  """kill -9 during synthetic data generation: its `.tmp-*` folder is removed
  at the next start (its owner lock is free), a live generation's is not."""
  import signal
  import subprocess
  import sys
  import time
  from fedreid_jax.data import synthetic
  base = tmp_path / "synthetic"
  proc = subprocess.Popen([sys.executable, "-c", GENERATE, str(tmp_path)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline, tmp = time.time() + 120, []
  while time.time() < deadline and proc.poll() is None:
    tmp = list(base.glob(".*.tmp-*")) if base.is_dir() else []
    if tmp and sum(1 for _ in tmp[0].rglob("*.png")) >= 20:
      break
    time.sleep(0.05)
  assert proc.poll() is None and tmp, "the generation ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  killed = tmp[0]
  tag = killed.name[1:].split(".tmp-")[0]
  live = base / f".{tag}.tmp-live"  # another process generating now: its lock is held
  live.mkdir()
  owner = synthetic._claim(live)
  try:
    synthetic._remove_stale_temporaries(base, tag)
    assert not killed.exists() and live.is_dir()
  finally:
    os.close(owner)
  synthetic._remove_stale_temporaries(base, tag)  # its owner gone too: removed
  assert not live.exists()
