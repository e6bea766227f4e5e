"""Local-training throughput of one federated round under each client strategy.

  python benchmarks/round_throughput.py                      # default config, CPU
  python benchmarks/round_throughput.py --strategies vmap:16,serial:16 --paper  # GPU: ResNet-50 256x128

For each strategy: compile time (first round, wall), steady-state images/s
(mean of the next `--rounds` rounds, useful images only), and padding waste
(processed / useful steps). Default: the synthetic benchmark and its config.
`--paper`: the paper's model and input size on random images with the paper's
nine client sizes divided by `--scale` (no dataset needed). Figures are
printed as a markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax
import numpy as np

from fedreid_jax import config_lib, train
from fedreid_jax.data import registry
from fedreid_jax.data.base import ClientData, split_from_arrays

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Training images per client in the paper's benchmark (its dataset table).
PAPER_SIZES = (32621, 16522, 12936, 7365, 3744, 1940, 632, 450, 248)


def load_config(name: str):
  """configs/<name>.py for a speed benchmark: random initial weights (the paper
  config's ImageNet weights file is not needed to measure speed)."""
  config = config_lib.load_config_file(str(ROOT / "configs" / f"{name}.py"))
  config.model.pretrained = ""
  return config


def random_clients(sizes, image_size, num_ids=64, seed=0) -> list[ClientData]:
  """Random uint8 images: throughput only (nothing to learn)."""
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(sizes):
    imgs = rng.integers(0, 256, (n, *image_size, 3), dtype=np.uint8)
    pids = np.arange(n) % min(num_ids, n)
    test = split_from_arrays(imgs[:8], np.arange(8), np.arange(8) % 2)
    out.append(ClientData(f"client{i}", split_from_arrays(imgs, pids, np.zeros(n)), test, test))
  return out


def measure(config, clients, rounds: int, trace_dir: str | None = None) -> dict:
  """Rounds 0..`rounds` of an experiment, read ahead as a run reads them; the
  first (compilation) apart -> images/s, round time, compile time, waste.
  `trace_dir`: one more round, untimed, under `jax.profiler.trace` there."""
  exp = train.Experiment(config, clients)
  exp.read_ahead(range(rounds + 1 + bool(trace_dir)))
  try:
    t0 = time.perf_counter()
    record = exp.train_round(0)
    jax.block_until_ready(exp.server.params)
    first = time.perf_counter() - t0
    times = []
    for r in range(1, rounds + 1):
      t0 = time.perf_counter()
      record = exp.train_round(r)
      jax.block_until_ready(exp.server.params)
      times.append(time.perf_counter() - t0)
    if trace_dir:
      with jax.profiler.trace(trace_dir):
        exp.train_round(rounds + 1)
        jax.block_until_ready(exp.server.params)
  finally:
    exp.inputs.close()
  images = record["train/steps"] * config.train.batch_size
  per_round = float(np.mean(times))
  return {"compile_s": first - per_round, "round_s": per_round, "images_per_s": images / per_round,
          "waste": record["train/padding_waste"], "steps": record["train/steps"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--strategies", default="serial:1,serial:8,sequential:8,vmap:8",
                      help="comma-separated strategy[:chunk_steps]")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--paper", action="store_true")
  parser.add_argument("--scale", type=int, default=16, help="--paper: divide client sizes by")
  args = parser.parse_args()
  if args.paper:
    config = load_config("fedreid_paper")
    clients = random_clients([max(n // args.scale, 32) for n in PAPER_SIZES],
                             tuple(config.data.image_size))
  else:
    config = load_config("synthetic")
    clients, _ = registry.load(config.data, config.seed)
  print(f"\n{platform.node()}: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"jax {jax.__version__}; model {config.model.backbone} w{config.model.width} "
        f"{tuple(config.data.image_size)}, batch {config.train.batch_size}, "
        f"{len(clients)} clients, {sum(len(c.train) for c in clients)} train images\n")
  print("| strategy | chunk K | compile (s) | round (s) | images/s | padding waste |")
  print("|---|---|---|---|---|---|")
  results = {}
  for name in args.strategies.split(","):
    strategy, _, chunk = name.partition(":")
    config.fed.strategy = strategy
    config.fed.chunk_steps = int(chunk or config.fed.chunk_steps)
    r = results[name] = measure(config, clients, args.rounds)
    print(f"| {strategy} | {config.fed.chunk_steps} | {r['compile_s']:.1f} | {r['round_s']:.2f} "
          f"| {r['images_per_s']:.0f} | {r['waste']:.2f} |", flush=True)
  base = next(iter(results))
  for name, r in results.items():
    print(f"{name}: {r['images_per_s'] / results[base]['images_per_s']:.2f}x {base}")


if __name__ == "__main__":
  main()
