"""Slow end-to-end checks (run in CI too): the default config for 2 rounds
through the CLI, the paper config compiling a round, the sharded strategy."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_config_two_rounds_via_cli(tmp_path):
  workdir = tmp_path / "run"
  out = fakes.cli("--config", "configs/synthetic.py", "--workdir", str(workdir),
                  "--config.fed.rounds=2", "--config.eval.every_rounds=1",
                  f"--config.data.root={tmp_path / 'data'}", timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  # output to a file: no progress-bar refreshes, one log line a round
  assert "local steps" not in out.stderr and "\r" not in out.stderr
  assert out.stderr.count("round 2/2 loss") == 2 and "padding x1.00" in out.stderr
  for run_dir in (workdir, workdir / "baseline_local"):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["fed"]["rounds"] == 2
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["kind"] == "train"] == [1, 2]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2
    values = [v for r in records for k, v in r.items() if k not in ("round", "kind")]
    assert values and all(math.isfinite(v) for v in values)
    assert (run_dir / "convergence.png").stat().st_size > 0
    assert any((run_dir / "tensorboard").iterdir())
  rank1 = [v for k, v in evals[-1].items() if k.endswith("/rank1")]
  assert len(rank1) == 9 and all(0.0 <= v <= 1.0 for v in rank1)
  table = (workdir / "results.md").read_text()
  assert "syn_ilids" in table and "Local training R-1" in table and "FedPav R-1" in table
  report = (workdir / "report" / "report.md").read_text()  # the suite's paper report
  assert "Best-3" in report or "best-3" in report
  assert "FedPav local" in report and "Local training" in report
  assert len(list((workdir / "retrieval").glob("*.npz"))) == 9
  assert (workdir / "report" / "retrieval_syn_market.png").stat().st_size > 10_000


@pytest.mark.slow
def test_paper_config_compiles_a_round(tmp_path):
  """ResNet-50 from a (random) torchvision checkpoint, the paper's optimiser and
  head; tiny fake inputs and clients."""
  from fedreid_jax import train
  paper = fakes.load_config("fedreid_paper")
  paper.model.pretrained = str(tmp_path / "resnet50.npz")
  state = fakes.fake_torchvision_weights(paper.model.pretrained, paper.model)
  assert paper.model.backbone == "resnet50" and tuple(paper.data.image_size) == (256, 128)
  assert paper.train.batch_size == 32 and paper.fed.rounds == 300
  assert (paper.train.lr_backbone, paper.train.lr_head) == (0.005, 0.05)
  paper.data.image_size = (32, 16)  # the real size needs a GPU; the model is the paper's
  paper.train.batch_size = 8
  paper.fed.chunk_steps = 2
  paper.train.pad = 2
  clients = fakes.fake_clients(((2, 8), (2, 4)))
  exp = train.Experiment(paper, clients)
  assert exp.model.backbone == "resnet50"
  np.testing.assert_array_equal(exp.clients.params["backbone"]["layer4_2"]["conv3"]["kernel"][1],
                                state["layer4.2.conv3.weight"].transpose(2, 3, 1, 0))
  record = exp.train_round(0)
  assert np.isfinite(record["train/loss"]) and record["train/steps"] == 3


SHARDED = """
import sys, jax, numpy as np
sys.path.insert(0, "tests")
import fakes
from fedreid_jax import train
from fedreid_jax.federated.params import take_client
from fedreid_jax.federated.tracing import TRACE_COUNTS
assert jax.device_count() == 4
out = {}
for strategy in ("sharded", "sequential"):
  cfg = fakes.tiny_config(**{"fed.strategy": strategy, "fed.chunk_steps": 4})
  exp = train.Experiment(cfg, fakes.fake_clients(((4, 10), (3, 6), (2, 8), (2, 12))))
  exp.train_round(0)
  out[strategy] = exp
worst = 0.0
for c in range(4):  # every client, not only the aggregate
  for a, b in zip(jax.tree.leaves(take_client(out["sharded"].clients, c).params),
                  jax.tree.leaves(take_client(out["sequential"].clients, c).params)):
    worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-6)))
print("relative difference", worst)
assert worst < 1e-4, worst
before = dict(TRACE_COUNTS)  # compiles once: later rounds trace nothing new
assert before["sharded/chunk"] == 1, before
out["sharded"].train_round(1)
assert dict(TRACE_COUNTS) == before, (before, dict(TRACE_COUNTS))
"""


@pytest.mark.slow
def test_sharded_strategy_matches_sequential_on_four_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]


INTERRUPTIBLE = """
import sys
sys.path.insert(0, "tests")
import fakes
from fedreid_jax import main, train
cfg = fakes.tiny_config(**{"fed.rounds": int(sys.argv[2]), "eval.every_rounds": 100})
cfg.checkpoint_every = 100
cfg.log_every = 1
main.log_above_progress_bars()
main.run_or_exit(lambda: train.run(cfg, sys.argv[1], fakes.fake_clients()))
"""


def _run_until(script, workdir, rounds, marker, env):
  """Starts `script` and returns the process once `marker` is in its stderr."""
  import time
  proc = subprocess.Popen([sys.executable, "-c", script, workdir, str(rounds)], cwd=ROOT,
                          env=env, stderr=subprocess.PIPE, text=True)
  seen, deadline = "", time.time() + 600
  while marker not in seen and time.time() < deadline and proc.poll() is None:
    seen += proc.stderr.readline()
  return proc


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume(tmp_path):
  """kill -9 mid-run loses only the rounds since the last checkpoint (their log
  records are dropped on resume); SIGTERM finishes the round, saves it and
  exits with one line; the final resume logs every round exactly once."""
  import json
  import signal
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = INTERRUPTIBLE.replace("cfg.checkpoint_every = 100", "cfg.checkpoint_every = 2")
  # written in the background: round 2's checkpoint is certain once logged (at round 4's save)
  proc = _run_until(script, workdir, 200, "checkpoint of round 2:", env)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  saved = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert saved >= 2 and saved % 2 == 0
  proc = _run_until(script, workdir, 200, f"round {saved + 1}/200", env)
  proc.send_signal(signal.SIGTERM)
  rest = proc.communicate(timeout=300)[1]
  assert proc.returncode == 1
  last = rest.strip().splitlines()[-1]
  assert last.startswith("error: stopped by SIGTERM after round ") and "rerun the same" in last
  done = int(last.split("after round ")[1].split(" ")[0])
  assert saved < done < 200 and os.path.isdir(os.path.join(workdir, "checkpoints", str(done)))
  out = subprocess.run([sys.executable, "-c", script, workdir, str(done + 1)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from {workdir} after round {done}" in out.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rounds = [json.loads(line)["round"] for line in f if '"train"' in line]
  assert rounds == list(range(1, done + 2))


ON_FOUR_DEVICES = """
import sys, jax
sys.path.insert(0, "tests")
import fakes
from fedreid_jax import train
assert jax.device_count() == 4
cfg = fakes.tiny_config(**{"fed.strategy": "sharded", "fed.chunk_steps": 2,
                           "fed.rounds": int(sys.argv[2]), "eval.client_models": False})
train.run(cfg, sys.argv[1], fakes.fake_clients(((4, 10), (3, 6), (2, 8), (2, 12))))
"""


@pytest.mark.slow
def test_checkpoints_move_between_device_counts(tmp_path):
  """Saved with the client axis sharded over 4 devices, resumed on 1, and back."""
  import json
  from fedreid_jax import train
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  for rounds in ("1", None, "3"):
    if rounds is None:  # this process: one device, serial strategy
      cfg = fakes.tiny_config(**{"fed.rounds": 2, "eval.client_models": False})
      train.run(cfg, workdir, fakes.fake_clients(((4, 10), (3, 6), (2, 8), (2, 12))))
      continue
    out = subprocess.run([sys.executable, "-c", ON_FOUR_DEVICES, workdir, rounds], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rounds_logged = [json.loads(line)["round"] for line in f if '"train"' in line]
  assert rounds_logged == [1, 2, 3]
  with open(os.path.join(workdir, "run_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert history[1]["changes"]["fed.strategy"] == ["sharded", "serial"]
  assert history[2]["changes"]["fed.strategy"] == ["serial", "sharded"]


KILLED_MID_SAVE = INTERRUPTIBLE.replace("main.log_above_progress_bars()", """
import os
from fedreid_jax import checkpoint
real = checkpoint.file_digests
def dies_while_hashing_round_4(folder):
  if folder.rstrip("/").endswith("/4"):
    os._exit(9)  # killed after Orbax finalised round 4 (in the hashing thread, while
  return real(folder)  # round 5 trains), before its checksums exist
checkpoint.file_digests = dies_while_hashing_round_4
main.log_above_progress_bars()""").replace("cfg.checkpoint_every = 100", "cfg.checkpoint_every = 2")


@pytest.mark.slow
def test_killed_mid_save_resumes_and_logs_like_an_uninterrupted_run(tmp_path):
  import json
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
  out = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, killed, "6"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 9, out.stderr[-2000:]
  assert not os.path.exists(os.path.join(killed, "checksums", "4.json"))
  script = INTERRUPTIBLE.replace("cfg.checkpoint_every = 100", "cfg.checkpoint_every = 2")
  logs = {}
  for workdir in (killed, straight):
    out = subprocess.run([sys.executable, "-c", script, workdir, "6"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    logs[workdir] = out.stderr
  # round 4's checkpoint was finalised by Orbax but never hashed: it is used
  assert f"resumed from {killed} after round 4" in logs[killed]

  def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(line).items() if k != "train/round_seconds"}
              for line in f]
  assert records(killed) == records(straight)
