"""Bad input to every command line: a non-zero exit, exactly one error line
on stderr (logging lines aside), no traceback, and the files already
written left as they were.

Each case is a row of `CASES`: (command, make(tmp) -> argv). The commands
run in this process (their `main`); one case runs `python -m
fedreid_jax.main` as a subprocess, to check the real exit and output."""
import json
import logging
import os
import re
import subprocess
import sys

import pytest

import fakes
from fedreid_jax import checkpoint, export, main, report, run_config
from fedreid_jax.data import __main__ as data_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "configs", "synthetic.py")
LOG_LINE = re.compile(r"^([IWEF]\d{4} |(INFO|WARNING|ERROR|DEBUG) )")


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return str(path)


def _trained_looking(folder, config_json=True, config_text=None):
  """A workdir as a run leaves it: a checkpoint step, its stored config
  fields, config.json, metrics.jsonl."""
  config = fakes.load_config("synthetic")
  (folder / "checkpoints" / "2").mkdir(parents=True)
  checkpoint.write_meaning(str(folder), 2, run_config.meaning(json.loads(config.to_json())))
  if config_json:
    _write(folder / "config.json", config_text or config.to_json(indent=2))
  _write(folder / "metrics.jsonl", json.dumps({"round": 1, "kind": "train"}) + "\n")
  return str(folder)


def _images(folder):
  from PIL import Image
  import numpy as np
  folder.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(folder / "a.png")
  return str(folder)


def _main_args(config, workdir, *overrides):
  return ["--config", config, "--workdir", workdir, *overrides]


# (id, command, make(tmp) -> argv, what the error line says)
CASES = [
    ("main-missing-config", "main",
     lambda t: _main_args(str(t / "nowhere.py"), str(t / "wd")), "does not exist"),
    ("main-no-workdir", "main", lambda t: ["--config", SYNTHETIC], "--workdir is required"),
    ("main-no-config", "main", lambda t: ["--workdir", str(t / "wd")], "--config is required"),
    ("main-config-is-a-folder", "main", lambda t: _main_args(str(t), str(t / "wd")),
     "is a folder"),
    ("main-config-lacks-sections", "main",
     lambda t: _main_args(_write(t / "partial.py", "import ml_collections\n\ndef get_config():\n"
                                 "  return ml_collections.ConfigDict({'seed': 0})\n"),
                          str(t / "wd")), "lacks config.cdw"),
    ("main-config-not-python", "main",
     lambda t: _main_args(_write(t / "config.yaml", "seed: 0\n"), str(t / "wd")),
     "is not a Python file"),
    ("main-config-json-corrupt", "main",
     lambda t: _main_args(_write(t / "config.json", '{"seed": 0,'), str(t / "wd")),
     "is not valid JSON"),
    ("main-config-json-not-object", "main",
     lambda t: _main_args(_write(t / "config.json", "[1, 2]"), str(t / "wd")),
     "not a config object"),
    ("main-more-clients-per-round-than-clients", "main",
     lambda t: _main_args(SYNTHETIC, str(t / "wd"), "--config.fed.clients_per_round=12"),
     "clients_per_round=12 exceeds the 9 clients"),
    ("main-unknown-algorithm", "main",
     lambda t: _main_args(SYNTHETIC, str(t / "wd"), "--config.fed.algorithm=no_such_algorithm"),
     "no_such_algorithm"),
    ("main-unknown-field", "main",
     lambda t: _main_args(SYNTHETIC, str(t / "wd"), "--config.fed.bogus=1"),
     "unknown config field config.fed.bogus"),
    ("main-bad-value", "main",
     lambda t: _main_args(SYNTHETIC, str(t / "wd"), "--config.fed.rounds=0"),
     "must be a positive integer"),
    ("main-workdir-is-a-file", "main",
     lambda t: _main_args(SYNTHETIC, _write(t / "wd", "x")), "is a file, not a folder"),
    ("main-checksums-is-a-file", "main",
     lambda t: _main_args(SYNTHETIC, os.path.dirname(_write(t / "wd" / "checksums", "x"))),
     "checksums' is a file, but a run writes a folder"),
    ("main-metrics-is-a-folder", "main",
     lambda t: (os.makedirs(t / "wd" / "metrics.jsonl"), _main_args(SYNTHETIC, str(t / "wd")))[1],
     "metrics.jsonl' is a folder"),
    ("data-empty-market-layout", "data",
     lambda t: ["prepare", "--dataset", "market1501", "--manual_dir",
                str(_empty_market(t)), "--data_dir", str(t / "tfds")],
     "no images found for the train_all, query, gallery split(s)"),
    ("data-missing-manual-dir", "data",
     lambda t: ["prepare", "--dataset", "viper", "--manual_dir", str(t / "nowhere"),
                "--data_dir", str(t / "tfds")], "does not exist"),
    ("data-unknown-dataset", "data",
     lambda t: ["prepare", "--dataset", "imagenet", "--manual_dir", str(t),
                "--data_dir", str(t / "tfds")], "known datasets"),
    ("report-missing-workdir", "report",
     lambda t: ["--workdir", str(t / "nowhere")], "is not a folder"),
    ("report-corrupt-run", "report", lambda t: ["--workdir", _corrupt_run(t)],
     "no runs to report"),
    ("export-no-query-flag", "export",
     lambda t: ["--model", str(t), "--gallery", _images(t / "g")],
     "the following arguments are required: --query"),
    ("export-top-not-a-number", "export",
     lambda t: ["--model", str(t), "--query", _images(t / "q"), "--gallery", _images(t / "g"),
                "--top", "many"], "--top: invalid int value"),
    ("data-no-manual-dir-flag", "data", lambda t: ["prepare", "--dataset", "viper"],
     "the following arguments are required: --manual_dir"),
    ("data-no-command", "data", lambda t: [], "required: command"),
    ("export-missing-model", "export",
     lambda t: ["--model", str(t / "nowhere"), "--query", _images(t / "q"),
                "--gallery", _images(t / "g")], "--model"),
    ("export-missing-query", "export",
     lambda t: ["--model", str(t), "--query", str(t / "nowhere"),
                "--gallery", _images(t / "g")], "--query"),
    ("export-gallery-is-a-file", "export",
     lambda t: ["--model", str(t), "--query", _images(t / "q"),
                "--gallery", str(t / "q" / "a.png")], "is a file"),
    ("export-top-zero", "export",
     lambda t: ["--model", str(t), "--query", _images(t / "q"), "--gallery", _images(t / "g"),
                "--top", "0"], "--top 0"),
    ("export-top-negative", "export",
     lambda t: ["--model", str(t), "--query", _images(t / "q"), "--gallery", _images(t / "g"),
                "--top", "-3"], "--top -3"),
    ("export-corrupt-model", "export",
     lambda t: ["--model", os.path.dirname(_write(t / "m" / "model.json", '{"format"')),
                "--query", _images(t / "q"), "--gallery", _images(t / "g")], "is damaged"),
    ("export-model-folder-without-model", "export",
     lambda t: ["--model", str(_mkdir(t / "m")), "--query", _images(t / "q"),
                "--gallery", _images(t / "g")], "no exported model"),
]


def _corrupt_run(t):
  """A suite folder whose one run has a corrupt config.json and metrics.jsonl."""
  _write(t / "runs" / "a" / "config.json", "{")
  _write(t / "runs" / "a" / "metrics.jsonl", '{"round": 1, "ki')
  return str(t / "runs")


def _mkdir(path):
  path.mkdir(parents=True, exist_ok=True)
  return path


def _empty_market(t):
  root = t / "Market-1501-v15.09.15"
  for name in ("bounding_box_train", "bounding_box_test", "query"):
    (root / name).mkdir(parents=True)
  return root


def _snapshot(folder) -> dict:
  """{relative path: bytes} below `folder` (`.lock` aside: a launch rewrites its holder)."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in files + [d + "/" for d in dirs]:
      path = os.path.join(root, name.rstrip("/"))
      rel = os.path.relpath(path, folder) + ("/" if name.endswith("/") else "")
      if name != ".lock":
        out[rel] = b"" if name.endswith("/") else open(path, "rb").read()
  return out


@pytest.fixture
def restore_logging():
  """The CLIs configure the root logger: put it back after each case."""
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  yield
  root.handlers[:] = handlers
  root.setLevel(level)


def _run_main(argv):
  sys_argv = sys.argv
  sys.argv = ["python -m fedreid_jax.main", *argv]
  try:
    main.entry()
    return 0
  finally:
    sys.argv = sys_argv
    from absl import flags
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)  # absl defines a flag per override: the next call redefines it


COMMANDS = {"main": _run_main, "data": data_cli.main, "report": report.main,
            "export": export.main}


def _call(command, argv, capsys) -> tuple[int, list[str]]:
  """(exit status, stderr lines that are not logging lines) of one in-process call."""
  try:
    code = COMMANDS[command](argv)
  except SystemExit as e:  # sys.exit("error: ...") prints its message to stderr, status 1
    code = e.code
  err = capsys.readouterr().err
  lines = err.splitlines()
  if isinstance(code, str):
    lines.append(code)
    code = 1
  return code, [line for line in lines if line.strip() and not LOG_LINE.match(line)]


@pytest.mark.parametrize("case, command, make, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, command, make, says, tmp_path, capsys, restore_logging,
                               monkeypatch):
  monkeypatch.chdir(ROOT)
  from fedreid_jax import experiment
  monkeypatch.setattr(experiment, "registry", _NoDataAllowed())  # refused before: never trains
  argv = make(tmp_path)
  before = _snapshot(tmp_path)
  code, lines = _call(command, argv, capsys)
  assert code not in (0, None), case
  assert len(lines) == 1, lines
  assert lines[0].startswith("error: ") and says in lines[0], lines[0]
  assert "Traceback" not in lines[0]
  assert _snapshot(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize("config_json", [False, True], ids=["config-deleted", "config-corrupt"])
def test_damaged_workdir_is_one_line_before_any_data_is_read(config_json, tmp_path, capsys,
                                                             restore_logging, monkeypatch):
  """Through `python -m fedreid_jax.main`'s `main`: a workdir whose
  config.json was deleted still refuses another seed; a corrupt one says
  which file to delete."""
  monkeypatch.chdir(ROOT)
  from fedreid_jax import train
  monkeypatch.setattr(train, "registry", _NoData())  # the refusal comes before any data
  wd = _trained_looking(tmp_path / "wd", config_json=config_json, config_text="{")
  before = _snapshot(tmp_path)
  from fedreid_jax import experiment
  monkeypatch.setattr(experiment, "registry", _NoData())
  code, lines = _call("main", _main_args(SYNTHETIC, wd, "--config.seed=5"), capsys)
  assert code == 1 and len(lines) == 1, lines
  assert ("config.json' is damaged" if config_json else "seed: saved 0 vs now 5") in lines[0]
  assert _snapshot(tmp_path) == before


class _NoDataAllowed:
  """A data registry that fails the test: bad input must be refused before data."""

  def load(self, data, seed):
    raise AssertionError("bad input reached data loading (a run would have trained)")


class _NoData:
  """A data registry whose `load` answers with fake clients (no data generation)."""

  def load(self, data, seed):
    del data, seed
    return fakes.fake_clients(), None


def test_real_command_line_exits_with_one_line_and_no_backend_probe(tmp_path):
  """The real process: status 1, one line on stderr, no traceback, no
  "Unable to initialize backend 'tpu'" (JAX_PLATFORMS unset: JAX probes)."""
  wd = tmp_path / "wd"
  _write(wd / "checksums", "x")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-m", "fedreid_jax.main", "--config", SYNTHETIC,
                        "--workdir", str(wd)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert "Traceback" not in out.stderr and "Unable to initialize backend" not in out.stderr
  assert len([line for line in lines if not LOG_LINE.match(line)]) == 1, out.stderr
  assert lines[-1].startswith("error: ") and "checksums' is a file" in lines[-1]
  assert sorted(os.listdir(wd)) == ["checksums"]


def test_backend_probe_line_is_dropped_and_others_kept():
  main.quiet_backend_probe()
  main.quiet_backend_probe()  # once is enough; twice adds nothing
  probe = logging.getLogger("jax._src.xla_bridge")
  assert sum(isinstance(f, logging.Filter) for f in probe.filters) >= 1
  make = lambda msg: logging.LogRecord(probe.name, logging.INFO, __file__, 1, msg, (), None)
  assert not probe.filter(make("Unable to initialize backend 'tpu': no TPU found"))
  assert probe.filter(make("Unable to initialize backend 'cuda': a plugin is broken"))


def test_an_empty_build_of_an_earlier_version_blocks_no_later_prepare(tmp_path, monkeypatch):
  """An empty layout prepared before it was refused (an earlier version) is
  replaced by the next `prepare` of the real folder, without --overwrite."""
  import fixtures
  from fedreid_jax.data import prepare
  with monkeypatch.context() as m:
    m.setattr(prepare, "check_not_empty", lambda *args: None)  # as an earlier version did
    prepare.prepare("market1501", _empty_market(tmp_path / "empty"), tmp_path / "tfds")
  root, counts = fixtures.make_market1501(tmp_path / "raw")
  done = prepare.prepare("market1501", root, tmp_path / "tfds")
  assert done.counts["train_images"] == counts["train_images"] > 0
