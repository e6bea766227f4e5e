"""The GPU benchmarks run where no GPU is: they are prepared here and run only
when a session is lent one, so a break (the paper config gaining a weights
file, a changed loader signature) must show in CI, not on the GPU's clock."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_round_smoke_reads_prepared_tfds_through_the_pipeline(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "benchmarks/gpu_round.py", "--smoke", "--dtypes", "float32",
       "--input", "tfds,memory", "--trace", str(tmp_path / "trace"),
       "--data_dir", str(tmp_path / "fixture")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  # the prepared fixture is TFDS array_record, cut into the nine clients
  assert list((tmp_path / "fixture" / "tfds" / "market1501").glob("*/*.array_record*"))
  rows = re.findall(r"^\| float32 \| resnet_tiny \| 32x16 \| tfds \((\d+):(\d+)\) \| (\d+) "
                    r"\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", out.stdout, re.M)
  assert rows, out.stdout[-2000:]
  threads, workers, delivered, round_ips, plain_ips, _, _ = rows[-1]
  assert (threads, workers) in {("2", "0"), ("4", "0"), ("2", "1")}  # the smoke's settings
  # the worker-process setting ran (it is the one most likely to break on another machine)
  assert re.search(r"input of 2 rounds alone, 2 threads, 1 workers, one loader: "
                   r"[1-9]\d* images/s", out.stdout)
  for scope in ("round", "client"):
    assert re.search(rf"a loader per {scope}: [1-9]\d* images/s", out.stdout)
  assert int(delivered) > 0 and int(round_ips) > 0 and int(plain_ips) > 0
  # the same files decoded once into host memory: a row of its own, no input-alone figure
  memory = re.findall(r"^\| float32 \| resnet_tiny \| 32x16 \| memory \(decoded once\) \| - "
                      r"\| (\d+) \| (\d+) \| [\d.]+ \| - \|", out.stdout, re.M)
  assert memory and int(memory[-1][0]) > 0, out.stdout[-2000:]
  # --trace: one more round traced; on CPU the summary says there is no device plane
  assert "traced round (float32, tfds):" in out.stdout
  assert "no accelerator plane" in out.stdout
  assert list((tmp_path / "trace").glob("**/*.xplane.pb"))


def test_device_trace_sums_busy_time_gaps_and_modules():
  """`benchmarks/device_trace.py` on a made-up accelerator trace (no GPU here)."""
  import sys
  from types import SimpleNamespace as NS
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import device_trace
  ms = 1e6
  ev = lambda name, s, e: NS(name=name, start_ns=s * ms, end_ns=e * ms)
  gpu = NS(name="/device:GPU:0", lines=[
      NS(name="Stream #13(compute)", events=[ev("k", 0, 4), ev("k", 3, 6), ev("k", 10, 12)]),
      NS(name="Stream #14(copy)", events=[ev("c", 11.5, 12.5), ev("c", 12.6, 20)]),
      NS(name="XLA Modules", events=[ev("jit_chunk", 0, 12), ev("jit_take", 12.6, 20)])])
  host = NS(name="/host:CPU", lines=[NS(name="Stream #1", events=[ev("x", -50, 100)])])
  t = device_trace.device_time([host, gpu])
  # kernels cover [0, 6] + [10, 12.5] + [12.6, 20] = 15.9 ms of a 20 ms span;
  # one idle gap >= 1 ms (6 -> 10), the 0.1 ms one is not counted
  assert abs(t["span_ms"] - 20) < 1e-9 and abs(t["busy"] - 15.9 / 20) < 1e-9
  assert t["gaps"] == 1 and abs(t["gap_ms"] - 4) < 1e-9
  assert t["modules"] == pytest.approx({"jit_chunk": 12.0, "jit_take": 7.4})
  assert device_trace.device_time([host]) is None  # a CPU trace: nothing to summarise
