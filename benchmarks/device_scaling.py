"""Nine clients over 1, 2, 4 devices: strategies side by side in one run.

  python benchmarks/device_scaling.py                 # virtual CPU devices (re-executes itself)
  python benchmarks/device_scaling.py --paper --scale 16 --devices 1,2,4,8   # real GPUs

For each strategy and device count: round time, images/s, compile time
(first round minus a steady one), the schedule's makespan against the
longest client, idle device time (fraction of device-steps idle up to the
makespan), padding waste (step slots / real steps), and peak device memory
where the backend reports it (`device.memory_stats()` is None on CPU). The
longest client alone (one `serial` client) is timed too: the round's
critical path.

Clients: the paper's nine training-set sizes divided by `--scale` (random
images, nothing to learn). Default model: the test-size ResNet (width 4,
32x16, batch 8), so a round has the paper's shape (127 steps for the
longest client, 1 for the shortest) in seconds on a CPU. Virtual CPU devices
share the machine's cores, so wall-clock speed-ups do not show on a CPU: the
schedule figures (makespan, idle, waste) are what such a run demonstrates.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

PAPER_SIZES = (32621, 16522, 12936, 7365, 3744, 1940, 632, 450, 248)


def peak_memory_gib(devices) -> str:
  """Largest `peak_bytes_in_use` over `devices`, or n/a when not reported."""
  stats = [d.memory_stats() for d in devices]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return f"{max(peaks) / 2**30:.2f}" if peaks and None not in peaks else "n/a"


def lockstep_schedule(num_steps, num_devices: int, chunk: int) -> dict:
  """The `sharded` strategy's schedule: every client padded to the longest
  (in chunks), the selected clients split evenly over the devices."""
  n = max(d for d in range(1, num_devices + 1) if len(num_steps) % d == 0)
  padded = -(-max(num_steps) // chunk) * chunk
  makespan = len(num_steps) // n * padded
  return {"devices": n, "makespan": makespan, "makespan_ratio": makespan / max(num_steps),
          "idle": 0.0, "padding_waste": len(num_steps) * padded / sum(num_steps)}


def timed_rounds(config, clients, rounds: int):
  """(experiment, compile s, steady round s, last record)."""
  import jax
  from fedreid_jax import train
  exp = train.Experiment(config, clients)
  t0 = time.perf_counter()
  exp.train_round(0)
  jax.block_until_ready(exp.clients)
  first = time.perf_counter() - t0
  times, record = [], None
  for r in range(1, rounds + 1):
    t0 = time.perf_counter()
    record = exp.train_round(r)
    jax.block_until_ready(exp.clients)
    times.append(time.perf_counter() - t0)
  steady = min(times)
  return exp, first - steady, steady, record


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4", help="device counts to run")
  parser.add_argument("--strategies", default="serial:1,devices:1,sharded:4",
                      help="strategy:chunk_steps list (serial runs on one device)")
  parser.add_argument("--scale", type=int, default=32, help="divide the paper's sizes by")
  parser.add_argument("--rounds", type=int, default=2, help="steady rounds after the first")
  parser.add_argument("--paper", action="store_true", help="ResNet-50, 256x128, batch 32")
  return parser.parse_args()


def main(args):
  counts = [int(n) for n in args.devices.split(",")]
  import jax
  import fakes
  from round_throughput import load_config, random_clients
  from fedreid_jax.federated import device_queues

  if args.paper:
    config = load_config("fedreid_paper")
  else:
    config = fakes.tiny_config()
  config.eval.client_models = False
  batch = config.train.batch_size
  sizes = [max(n // args.scale, batch) for n in PAPER_SIZES]
  clients = random_clients(sizes, tuple(config.data.image_size))
  steps = [n // batch for n in sizes]
  print(f"\n{platform.node()}: {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, Python {platform.python_version()}; "
        f"{config.model.backbone} w{config.model.width} {tuple(config.data.image_size)}, "
        f"batch {batch}; 9 clients of {sizes} images = {steps} steps\n")

  config.fed.strategy, config.fed.chunk_steps, config.fed.num_devices = "serial", 1, 1
  _, _, alone, _ = timed_rounds(config, clients[:1], args.rounds)
  print(f"longest client alone (serial, 1 device): {alone:.2f} s per round "
        f"({steps[0]} steps)\n", flush=True)
  print("| strategy | devices | round (s) | x longest alone | images/s | compile (s) "
        "| makespan / longest (schedule) | idle (schedule) | padding waste | peak GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for item in args.strategies.split(","):
    strategy, _, chunk = item.partition(":")
    for n in ([1] if strategy == "serial" else counts):
      config.fed.strategy, config.fed.chunk_steps = strategy, int(chunk or 1)
      config.fed.num_devices = n
      exp, compile_s, round_s, rec = timed_rounds(config, clients, args.rounds)
      if strategy == "devices":
        sched = device_queues.schedule_report(steps, device_queues.longest_first(steps, n))
      elif strategy == "sharded":
        sched = lockstep_schedule(steps, n, config.fed.chunk_steps)
      else:
        sched = device_queues.schedule_report(steps, [list(range(len(steps)))])
      used = sched["devices"]
      images = rec["train/steps"] * batch
      print(f"| {strategy}:{config.fed.chunk_steps} | {used} of {n} | {round_s:.2f} "
            f"| {round_s / alone:.2f} | {images / round_s:.0f} | {compile_s:.1f} "
            f"| {sched['makespan_ratio']:.3f} | {sched['idle']:.3f} "
            f"| {rec['train/padding_waste']:.2f} | {peak_memory_gib(jax.devices()[:n])} |",
            flush=True)
      del exp


def reexec_with_virtual_devices(count: int) -> None:
  """On a CPU-only machine, reruns this script with `count` virtual CPU devices."""
  import jax
  if jax.default_backend() != "cpu" or jax.device_count() >= count:
    return
  flag = f"--xla_force_host_platform_device_count={count}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
  sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))


if __name__ == "__main__":
  arguments = parse_args()
  reexec_with_virtual_devices(max(int(n) for n in arguments.devices.split(",")))
  main(arguments)
