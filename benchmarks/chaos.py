"""Chaos: a short run killed with SIGKILL at seeded random moments, resumed
each time, ends exactly as an uninterrupted run does.

    python benchmarks/chaos.py [--kills 10] [--seed 0] [--rounds 3] [--out DIR]

The run is tests/fakes.py's tiny config on its tiny fake clients (a checkpoint
and an evaluation every round, so checkpoints, checksums, metrics.jsonl and
export_best are all written each round), started through a small driver in a
subprocess, like the kill tests of tests/test_end_to_end.py. First one
uninterrupted run, timed. Then each attempt starts the driver on one workdir
and SIGKILLs it at the next moment of a seeded schedule: `kills` moments drawn
uniformly over the uninterrupted run's timeline after its first round line,
sorted, so the kills sweep the run. An attempt resuming after round r is
matched to that timeline by its first round line (round r+1's), and killed when
it reaches its moment (at once after that line when the moment is already
past). Kills land while later rounds train, during checkpoint writes and their
hashing, evaluations, best-model exports, and the run's end (results.json,
export/). Before the first round only the
experiment is built and compiled, which writes nothing a kill could damage
but `config.json` and `run_history.jsonl` (atomic). An attempt resuming a run
whose rounds are all trained is killed within the evaluation of the restored
state. (When the uninterrupted run compiled, its
times would not be those of a resume, which reuses the compilation cache: it
is run and timed once more.) An attempt that finishes before its kill ends
the schedule early. A last attempt runs to the end. Then
`metrics.jsonl` (records, `train/round_seconds` aside), `results.json`,
`export/` and `export_best/` must equal the uninterrupted run's, and no
temporary file may be left in the workdir. tests/test_chaos.py runs this with
fewer kills; the full 10 take a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = """
import sys
sys.path.insert(0, "tests")
import fakes
from fedreid_jax import main, train
cfg = fakes.tiny_config(**{"fed.rounds": int(sys.argv[2]), "eval.every_rounds": 1,
                           "eval.client_models": False})
cfg.checkpoint_every = 1
cfg.log_every = 1
main.log_above_progress_bars()
main.run_or_exit(lambda: train.run(cfg, sys.argv[1], fakes.fake_clients()))
"""
STARTED = "clients:"  # logged once the imports are done, before the experiment is built
FIRST_ROUND = re.compile(r"round \d+/\d+ loss")  # a round's log line


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if not env.get("JAX_COMPILATION_CACHE_DIR"):  # resumes reuse the first run's programs
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "fedreid_chaos_xla")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def attempt(workdir: str, rounds: int, kill_after: float | None, after_round: bool = True
            ) -> dict:
  """Runs the driver; with `kill_after`, SIGKILLs it that many seconds after
  its first round's log line (`after_round`) or its `clients:` line. Returns
  {"rc", "seconds", "started" and "round" (seconds to those lines), "killed",
  "stderr"}."""
  begin = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-c", DRIVER, workdir, str(rounds)], cwd=ROOT,
                          env=_env(), stderr=subprocess.PIPE, text=True)
  lines, started, first_round = [], threading.Event(), threading.Event()
  seen = {}

  def read():
    for line in proc.stderr:
      lines.append(line)
      if STARTED in line and not started.is_set():
        seen["started"] = time.perf_counter() - begin
        started.set()
      if FIRST_ROUND.search(line):
        seen.setdefault("round_lines", []).append(time.perf_counter() - begin)
        seen.setdefault("round", seen["round_lines"][0])
        first_round.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  killed = False
  if kill_after is not None:
    while not (first_round if after_round else started).wait(0.05) and proc.poll() is None:
      pass
    deadline = time.perf_counter() + kill_after
    while proc.poll() is None and time.perf_counter() < deadline:
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      killed = True
  rc = proc.wait(timeout=900)
  reader.join(60)
  return {"rc": rc, "seconds": time.perf_counter() - begin, "started": seen.get("started"),
          "round": seen.get("round"), "round_lines": seen.get("round_lines", []),
          "killed": killed, "stderr": "".join(lines)}


def _cache_entries() -> int:
  """Files in the XLA compilation cache the attempts share."""
  folder = _env()["JAX_COMPILATION_CACHE_DIR"]
  return sum(len(files) for _, _, files in os.walk(folder)) if os.path.isdir(folder) else 0


def resume_round(workdir: str) -> int:
  from fedreid_jax import checkpoint
  return checkpoint.resume_round(workdir) if os.path.isdir(workdir) else 0


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [{k: v for k, v in json.loads(line).items() if k != "train/round_seconds"}
            for line in f]


def outputs(workdir: str) -> dict:
  """What must not depend on the kills: log records, results, exported models."""
  out = {"metrics.jsonl": records(workdir)}
  for name in ("results.json", "export/model.json", "export/variables.msgpack",
               "export_best/model.json", "export_best/variables.msgpack"):
    with open(os.path.join(workdir, name), "rb") as f:
      out[name] = f.read()
  return out


def temporaries(workdir: str) -> list[str]:
  """Temporary files left in the workdir (Orbax's own folder aside)."""
  from fedreid_jax.workdir import is_temporary
  return [os.path.relpath(os.path.join(root, n), workdir)
          for root, dirs, files in os.walk(workdir)
          for n in files if is_temporary(n) and "checkpoints" not in root]


def chaos(root: str, kills: int = 10, seed: int = 0, rounds: int = 3, log=print) -> dict:
  """The uninterrupted run, then `kills` seeded SIGKILLs of one run resumed each
  time, then its end; returns {"kills": made, "attempts": [...], "straight":
  seconds, "chaos": seconds, "same": bool, "differs": [names], "left": [temporaries]}."""
  straight, chaotic = os.path.join(root, "straight"), os.path.join(root, "chaos")
  cached = _cache_entries()
  first = attempt(straight, rounds, None)
  if first["rc"] != 0:
    raise RuntimeError("the uninterrupted run failed:\n" + first["stderr"][-3000:])
  if _cache_entries() != cached:  # it compiled: its times are not those of a resume
    log(f"uninterrupted run with compilation: {first['seconds']:.1f} s; timing it again")
    first = attempt(os.path.join(root, "straight_again"), rounds, None)
    if first["rc"] != 0:
      raise RuntimeError("the uninterrupted run failed:\n" + first["stderr"][-3000:])
  fixed = first["round"] - first["started"]  # build, compile (cached), restore, round 1
  log(f"uninterrupted run: {first['seconds']:.1f} s ({first['started']:.1f} s of imports, "
      f"{fixed:.1f} s to its first round)")
  # the uninterrupted run's timeline after its first round line: round r's line at
  # `lines[r - 1]`, its end at `rest`
  lines = [t - first["round"] for t in first["round_lines"]]
  rest = first["seconds"] - first["round"]
  rng = random.Random(seed)
  schedule = sorted(rng.random() for _ in range(kills))  # moments sweeping the run, in order
  begin, attempts, made = time.perf_counter(), [], 0
  for i, share in enumerate(schedule):
    done = resume_round(chaotic)
    if done < rounds:  # its first round line is round done+1's: the same moment of the
      # uninterrupted run is `share * rest` after that run's first round line
      kill_after = max(0.0, share * rest - lines[done])
    else:  # all trained (killed at the end): within the evaluation of the restored state
      kill_after = share * fixed
    a = attempt(chaotic, rounds, kill_after, after_round=done < rounds)
    attempts.append({k: a[k] for k in ("rc", "seconds", "killed")}
                    | {"kill_after": kill_after, "resumed_from": done})
    made += a["killed"]
    log(f"attempt {i + 1} (from round {done}): kill {kill_after:.2f} s after its "
        f"{'first round' if done < rounds else 'imports'} (moment {share:.2f}): "
        f"{'killed' if a['killed'] else 'finished first'} (rc {a['rc']}, {a['seconds']:.1f} s)")
    if not a["killed"]:
      if a["rc"] != 0:
        raise RuntimeError(f"attempt {i + 1} failed:\n" + a["stderr"][-3000:])
      break
  last = attempt(chaotic, rounds, None)
  if last["rc"] != 0:
    raise RuntimeError("the last resume failed:\n" + last["stderr"][-3000:])
  seconds = time.perf_counter() - begin
  want, have = outputs(straight), outputs(chaotic)
  differs = [k for k in want if want[k] != have[k]]
  left = temporaries(chaotic)
  log(f"{made} kills, {len(attempts) + 1} starts in {seconds:.1f} s; "
      f"{'same as the uninterrupted run' if not differs else 'DIFFERENT: ' + ', '.join(differs)}"
      f"{'; temporaries left: ' + ', '.join(left) if left else ''}")
  return {"kills": made, "attempts": attempts, "straight": first["seconds"], "chaos": seconds,
          "same": not differs, "differs": differs, "left": left}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=None, help="folder for the two workdirs (default: a new "
                 "temporary folder)")
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  root = args.out or tempfile.mkdtemp(prefix="fedreid_chaos_")
  result = chaos(root, args.kills, args.seed, args.rounds)
  return 0 if result["same"] and not result["left"] else 1


if __name__ == "__main__":
  sys.exit(main())
