"""Nine clients on one host against the same devices over two hosts, in one run.

  python benchmarks/host_scaling.py                # 1 process x 4 devices, 2 x 2 (virtual CPU)
  python benchmarks/host_scaling.py --per_host 2 --hosts 1,2 --scale 32

Each layout runs as its own processes (`--hosts N`: N processes of
`--per_host` virtual CPU devices, Gloo collectives on localhost), the
`devices` strategy, every client every round. Printed per layout: the steady
round time, compile (first round minus steady), the schedule (makespan /
longest client, idle device-steps: from the round's record), and the time
spent combining per-client figures across hosts (`hosts.sum_over_hosts`).
Clients: the paper's nine sizes divided by `--scale`, random images; the
test-size ResNet. Virtual devices share this machine's cores, so the round
times compare the layouts' overheads, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_SIZES = (32621, 16522, 12936, 7365, 3744, 1940, 632, 450, 248)

WORKER = """
import json, sys, time
sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
import fakes
from fedreid_jax import hosts
num_processes, process_id, port, scale, rounds = map(int, sys.argv[1:6])
cfg = fakes.tiny_config(**{"fed.strategy": "devices", "eval.client_models": False})
cfg.hosts.num_processes, cfg.hosts.process_id = num_processes, process_id
cfg.hosts.coordinator_address = f"localhost:{port}"
hosts.initialize(cfg)
import jax
from fedreid_jax import train
from round_throughput import random_clients
combine = [0.0]
plain_sum = hosts.sum_over_hosts
def timed_sum(values):
  t0 = time.perf_counter()
  try:
    return plain_sum(values)
  finally:
    combine[0] += time.perf_counter() - t0
hosts.sum_over_hosts = timed_sum
sizes = [max(n // scale, cfg.train.batch_size) for n in %s]
exp = train.Experiment(cfg, random_clients(sizes, tuple(cfg.data.image_size)))
t0 = time.perf_counter(); exp.train_round(0); jax.block_until_ready(exp.clients)
first = time.perf_counter() - t0
times, combined = [], []
for r in range(1, rounds + 1):
  combine[0] = 0.0
  t0 = time.perf_counter(); record = exp.train_round(r); jax.block_until_ready(exp.clients)
  times.append(time.perf_counter() - t0); combined.append(combine[0])
best = min(range(len(times)), key=times.__getitem__)
print("RESULT " + json.dumps({"process": process_id, "round": times[best],
      "compile": first - times[best], "combine": combined[best],
      "own": sorted(exp.own), "record": {k: v for k, v in record.items() if k.startswith("train/")}}))
""" % (PAPER_SIZES,)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_layout(num_hosts: int, per_host: int, scale: int, rounds: int) -> list[dict]:
  """Starts `num_hosts` processes of `per_host` virtual devices; their RESULT lines."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={per_host}")
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(num_hosts), str(p), str(port),
                             str(scale), str(rounds)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(num_hosts)]
  outs = [p.communicate(timeout=1800) for p in procs]
  results = []
  for p, (stdout, stderr) in zip(procs, outs):
    if p.returncode != 0:
      sys.exit(f"a process failed:\n{stderr[-3000:]}")
    results.append(json.loads(next(l for l in stdout.splitlines()
                                   if l.startswith("RESULT "))[7:]))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hosts", default="1,2", help="process counts to run")
  parser.add_argument("--devices", type=int, default=4, help="devices in all, per layout")
  parser.add_argument("--scale", type=int, default=32, help="divide the paper's sizes by")
  parser.add_argument("--rounds", type=int, default=3, help="steady rounds after the first")
  args = parser.parse_args()
  import jax
  print(f"jax {jax.__version__}; {args.devices} virtual CPU devices per layout; paper sizes "
        f"/ {args.scale}; test model\n")
  print("| hosts x devices | round (s) | compile (s) | combining figures (s) "
        "| makespan / longest | idle | clients per host |")
  print("|---|---|---|---|---|---|---|")
  for num_hosts in (int(h) for h in args.hosts.split(",")):
    results = run_layout(num_hosts, args.devices // num_hosts, args.scale, args.rounds)
    rec = results[0]["record"]
    slowest = max(results, key=lambda r: r["round"])
    print(f"| {num_hosts} x {args.devices // num_hosts} | {slowest['round']:.2f} "
          f"| {max(r['compile'] for r in results):.1f} "
          f"| {max(r['combine'] for r in results):.3f} | {rec['train/makespan_ratio']:.3f} "
          f"| {rec['train/device_idle']:.3f} | {[r['own'] for r in results]} |", flush=True)


if __name__ == "__main__":
  main()
