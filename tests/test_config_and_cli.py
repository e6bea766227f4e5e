"""Bad input fails fast with one-line errors; checkpoints resume and refuse
another config's state."""
import json
import os
import subprocess
import sys

import pytest

import fakes
from fedreid_jax import checkpoint, config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fedreid_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("field, value, expected", [
    ("fed.algorithm", "fedprox", "choose one of ['fedpav', 'local', 'fedavg']"),
    ("data.name", "imagenet", "choose one of ['synthetic', 'fedreid']"),
    ("fed.strategy", "pmap", "choose one of ['serial', 'vmap', 'sequential', 'sharded']"),
    ("train.batch_size", 0, "must be a positive integer"),
    ("fed.rounds", -3, "must be a positive integer"),
    ("eval.protocol", "cuhk", "choose one of ['standard', 'fedreid']"),
    ("model.conv_impl", "winograd", "choose one of ['auto', 'xla', 'patches']"),
    ("model.dtype", "float16", "choose one of ['float32', 'bfloat16']"),
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


def test_resume_continues_and_other_config_is_refused(tmp_path):
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
  other.model.width = 8
  with pytest.raises(checkpoint.CheckpointMismatch, match="model"):
    train.run(other, workdir, clients)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # nothing lost


def test_conv_impl_and_dtype_do_not_block_a_resume(tmp_path):
  saved = fakes.tiny_config().to_dict()
  now = fakes.tiny_config(**{"model.conv_impl": "xla", "model.dtype": "bfloat16"}).to_dict()
  checkpoint.check_compatible(saved, now, str(tmp_path))  # same state shapes: accepted
  del saved["model"]["conv_impl"], saved["model"]["dtype"]  # a checkpoint from before them
  checkpoint.check_compatible(saved, now, str(tmp_path))
  now["model"]["width"] = 8
  with pytest.raises(checkpoint.CheckpointMismatch, match="model"):
    checkpoint.check_compatible(saved, now, str(tmp_path))


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
