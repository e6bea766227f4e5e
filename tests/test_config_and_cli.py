"""Bad input fails fast with one-line errors; checkpoints resume and refuse
another config's state."""
import json
import os

import pytest

import fakes
from fedreid_jax import checkpoint, config_lib, experiment, train
from fedreid_jax.data import registry

cli = fakes.cli


@pytest.mark.parametrize("field, value, expected", [
    ("fed.algorithm", "no_such_algorithm", "is not a registered algorithm; choose one of local, fedpav, fedpav_kd, fedpav_cdw, fedpav_kd_cdw, fedavg, centralised, "),
    ("data.name", "imagenet", "choose one of ['synthetic', 'fedreid']"),
    ("fed.strategy", "pmap", "choose one of ['serial', 'vmap', 'sequential', 'sharded', 'devices']"),
    ("train.batch_size", 0, "must be a positive integer"),
    ("fed.rounds", -3, "must be a positive integer"),
    ("eval.protocol", "cuhk", "choose one of ['standard', 'fedreid']"),
    ("model.conv_impl", "winograd", "choose one of ['auto', 'xla', 'patches']"),
    ("model.dtype", "float16", "choose one of ['float32', 'bfloat16']"),
    ("train.random_erasing", 1.5, "must be a probability in [0, 1]"),
])
def test_invalid_values_are_named(field, value, expected):
  cfg = fakes.tiny_config()
  section, key = field.split(".")
  cfg[section][key] = value
  with pytest.raises(config_lib.ConfigError, match="config." + field) as err:
    config_lib.validate(cfg)
  assert expected in str(err.value)


def test_cli_unknown_field_and_bad_value_are_one_line(tmp_path):
  out = cli("--config", "configs/synthetic.py", "--workdir", str(tmp_path),
            "--config.fed.bogus=1")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith("error: unknown config field config.fed.bogus")
  assert "'rounds'" in out.stderr
  out = cli("--config", "configs/synthetic.py", "--workdir", str(tmp_path),
            "--config.fed.rounds=0")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.fed.rounds=0 must be a positive integer")
  assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(config_lib.ConfigError, match="not writable"):
    config_lib.check_workdir(str(blocker / "sub"))


def test_resume_continues_and_other_config_is_refused(tmp_path, monkeypatch):
  cfg = fakes.tiny_config()
  cfg.fed.rounds = 1
  cfg.eval.client_models = False
  clients = fakes.fake_clients()
  workdir = str(tmp_path / "run")
  train.run(cfg, workdir, clients)
  cfg.fed.rounds = 2
  train.run(cfg, workdir, clients)  # resumes after round 1, trains round 2 only
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rounds = [json.loads(line)["round"] for line in f if '"train"' in line]
  assert rounds == [1, 2]
  other = fakes.tiny_config()
  other.model.width = 8  # other shapes: refused from the saved config, before building
  with pytest.raises(checkpoint.CheckpointMismatch, match="model.width: saved 4 vs now 8"):
    train.run(other, workdir, clients)
  seeded = fakes.tiny_config(**{"fed.rounds": 2})
  seeded.seed = 5  # same shapes, another run: caught from config.json
  with pytest.raises(checkpoint.CheckpointMismatch, match="seed: saved 0 vs now 5"):
    train.run(seeded, workdir, clients)

  def never(*args):
    raise AssertionError("data loaded (generated) before the refusal")
  monkeypatch.setattr(registry, "load", never)  # the suite's entry: refused before its data
  with pytest.raises(checkpoint.CheckpointMismatch, match="seed: saved 0 vs now 5"):
    experiment.run(seeded, workdir)
  with open(os.path.join(workdir, "run_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert history[0]["started"] and history[1]["after_round"] == 1
  assert history[1]["changes"] == {"fed.rounds": [1, 2]}
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # nothing lost
  assert os.path.exists(os.path.join(workdir, "export", "model.json"))
  os.remove(os.path.join(workdir, "config.json"))  # nothing states the config any more:
  for name in os.listdir(os.path.join(workdir, "checksums")):  # the checkpoint's shapes do
    if name.endswith(".meaning.json"):
      os.remove(os.path.join(workdir, "checksums", name))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"another model .* e\.g\. .*backbone"):
    train.run(other, workdir, clients)


def test_conv_impl_and_dtype_do_not_block_a_resume(tmp_path):
  from fedreid_jax import run_config
  saved = fakes.tiny_config().to_dict()
  now = fakes.tiny_config(**{"model.conv_impl": "xla", "model.dtype": "bfloat16"}).to_dict()
  run_config.check_meaning(saved, now, str(tmp_path))  # same state, computed otherwise: accepted
  del saved["model"]["conv_impl"], saved["model"]["dtype"]  # a checkpoint from before them
  run_config.check_meaning(saved, now, str(tmp_path))
  assert set(run_config.changes(saved, now)) == {"model.conv_impl", "model.dtype"}


def test_scenarios_from_config():
  from fedreid_jax.data import registry
  cfg = fakes.tiny_config()
  clients = fakes.fake_clients()
  cfg.data.scenario = "by_identity"
  cfg.data.scenario_clients = 2
  with pytest.raises(ValueError, match="splits one dataset"):
    registry.apply_scenario(clients, cfg.data, seed=0)
  split = registry.apply_scenario(clients[:1], cfg.data, seed=0)
  assert len(split) == 2
  assert sum(len(c.train) for c in split) == len(clients[0].train)
  cfg.data.scenario = "by_camera"
  assert len(registry.apply_scenario(clients[:1], cfg.data, seed=0)) == 2  # fake data: 2 cameras


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch):
  from fedreid_jax import errors, main
  monkeypatch.delenv("FEDREID_TRACEBACK", raising=False)

  def bad_input():
    raise errors.DatasetNotPrepared("dataset 'viper' is not prepared; run: ...")

  with pytest.raises(SystemExit, match="^error: dataset 'viper' is not prepared"):
    main.run_or_exit(bad_input)

  def bug():
    raise ValueError("an internal shape bug")

  with pytest.raises(ValueError, match="internal shape bug"):
    main.run_or_exit(bug)
  assert main.run_or_exit(lambda: 3) == 3


def test_zero_intervals_and_broken_config_files_are_one_line(tmp_path):
  cfg = fakes.tiny_config()
  for field in ("checkpoint_every", "log_every"):
    bad = fakes.tiny_config()
    bad[field] = 0
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}=0 must be a positive"):
      config_lib.validate(bad)
  broken = tmp_path / "broken.py"
  broken.write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  with pytest.raises(config_lib.ConfigError, match="broken.py' line 3"):
    config_lib.load_config_file(str(broken))
  failing = tmp_path / "failing.py"
  failing.write_text("def get_config():\n  return undefined_name\n")
  with pytest.raises(config_lib.ConfigError, match="line 2 failed: NameError"):
    config_lib.load_config_file(str(failing))
  from fedreid_jax import main
  assert main.unknown_override(["--config", str(broken)]).startswith("error: config file")
  assert "does not exist" in main.unknown_override(["--config=nowhere.py"])
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(config_lib.ConfigError, match="is a file, not a folder"):
    config_lib.check_workdir(str(a_file))
  del cfg


def test_workdir_lock_refuses_a_second_run_and_is_reentrant(tmp_path):
  import multiprocessing
  from fedreid_jax import errors
  from fedreid_jax.workdir import workdir_lock
  with workdir_lock(str(tmp_path)):
    with workdir_lock(str(tmp_path)):  # the same process may re-enter
      pass
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
      message = pool.apply(_try_lock, (str(tmp_path),))
    assert message.startswith(f"workdir {str(tmp_path)!r} is in use by process {os.getpid()}")
  with ctx.Pool(1) as pool:  # released: taken by the next run
    assert pool.apply(_try_lock, (str(tmp_path),)) == "locked"
  assert issubclass(errors.WorkdirBusy, errors.UserError)


def _try_lock(path):
  from fedreid_jax import errors
  from fedreid_jax.workdir import workdir_lock
  try:
    with workdir_lock(path):
      return "locked"
  except errors.WorkdirBusy as e:
    return str(e)


def test_rejected_first_launch_does_not_lock_the_workdir(tmp_path):
  cfg = fakes.tiny_config(**{"train.batch_size": 40})  # larger than the fake clients
  workdir = str(tmp_path / "run")
  with pytest.raises(config_lib.ConfigError, match="fewer training images"):
    train.run(cfg, workdir, fakes.fake_clients())
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_resume_trims_log_records_after_the_checkpoint(tmp_path):
  from fedreid_jax.metric_writer import MetricWriter
  log = tmp_path / "metrics.jsonl"
  log.write_text("".join(json.dumps({"round": r, "kind": "train", "train/loss": r}) + "\n"
                         for r in (1, 2, 3, 4)))
  writer = MetricWriter(str(tmp_path), resume_round=2)  # checkpoint of round 2
  writer.write(3, "train", {"train/loss": 30.0})
  writer.close()
  records = [json.loads(line) for line in log.read_text().splitlines()]
  assert [(r["round"], r["train/loss"]) for r in records] == [(1, 1), (2, 2), (3, 30.0)]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  import shutil
  cfg = fakes.tiny_config(**{"fed.rounds": 2, "eval.client_models": False})
  cfg.checkpoint_every = 1
  clients = fakes.fake_clients()
  train.run(cfg, str(tmp_path / "run"), clients)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    first = [json.loads(line) for line in f if '"train"' in line]
  for damage in ("flip", "truncate", "delete"):
    workdir = tmp_path / damage
    shutil.copytree(tmp_path / "run", workdir)
    files = sorted((p for p in (workdir / "checkpoints" / "2").rglob("*") if p.is_file()),
                   key=lambda p: -p.stat().st_size)
    biggest = files[0]  # an array data file
    if damage == "flip":
      data = bytearray(biggest.read_bytes())
      data[len(data) // 2] ^= 0xFF
      biggest.write_bytes(bytes(data))
    elif damage == "truncate":
      biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
      biggest.unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
      train.run(cfg, str(workdir), clients)  # resumes from round 1, retrains round 2
    assert "checkpoint of round 2" in caplog.text and "is damaged" in caplog.text, damage
    with open(workdir / "metrics.jsonl") as f:
      again = [json.loads(line) for line in f if '"train"' in line]
    assert [r["round"] for r in again] == [1, 2]
    # round 2 redone from the intact round-1 checkpoint: the same round again
    assert again[1]["train/loss"] == pytest.approx(first[1]["train/loss"], rel=1e-6)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "train/round_seconds"}
            for line in f]


def test_interrupted_and_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path):
  cfg = fakes.tiny_config(**{"fed.rounds": 3, "eval.every_rounds": 2, "eval.client_models": False})
  cfg.checkpoint_every = 1
  clients = fakes.fake_clients()
  train.run(cfg, str(tmp_path / "straight"), clients)
  short = fakes.tiny_config(**{"fed.rounds": 2, "eval.every_rounds": 2,
                               "eval.client_models": False})
  short.checkpoint_every = 1
  train.run(short, str(tmp_path / "resumed"), clients)
  with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # a record past the checkpoint
    f.write(json.dumps({"round": 3, "kind": "train", "train/loss": 99.0}) + "\n")
  train.run(cfg, str(tmp_path / "resumed"), clients)
  assert _records(tmp_path / "resumed") == _records(tmp_path / "straight")


def test_full_disk_is_one_line_saying_where_the_run_resumes(tmp_path, monkeypatch, caplog):
  import errno
  from fedreid_jax import errors
  from fedreid_jax.metric_writer import MetricWriter
  cfg = fakes.tiny_config(**{"fed.rounds": 3, "eval.client_models": False})
  cfg.checkpoint_every = 1
  real_write = MetricWriter.write

  def write(self, round_index, kind, scalars):
    if round_index == 2:
      raise OSError(errno.ENOSPC, "No space left on device", self.path)
    real_write(self, round_index, kind, scalars)

  monkeypatch.setattr(MetricWriter, "write", write)
  with pytest.raises(errors.DiskFull) as e:
    train.run(cfg, str(tmp_path / "run"), fakes.fake_clients())
  assert str(e.value) == (f"no space left on device while writing {tmp_path / 'run' / 'metrics.jsonl'}; "
                          "free space and rerun the same command: it resumes from round 1")
  best = json.loads((tmp_path / "run" / "export_best" / "model.json").read_text())
  assert best["round"] == 1 and best["metric"] == "rank1" and 0 <= best["score"] <= 1
  monkeypatch.undo()  # the rerun resumes from the round the message named
  assert checkpoint.resume_round(str(tmp_path / "run")) == 1
  caplog.clear()
  with caplog.at_level("INFO"):
    train.run(cfg, str(tmp_path / "run"), fakes.fake_clients())
  assert f"resumed from {tmp_path / 'run'} after round 1" in caplog.text
