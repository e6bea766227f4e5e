"""The paper's round on a GPU against the hardware's speed for the same model.

  python benchmarks/gpu_round.py                  # GPU: ~5 min on an H200 (untested yet)
  python benchmarks/gpu_round.py --smoke          # CPU, toy sizes: ~1-2 min, checks it runs

Two figures per compute dtype, in one process:

- round: images/s of steady-state federated rounds (`train.Experiment`) in
  the paper's setting: ResNet-50, 256x128, batch 32, the `serial` strategy
  with chunks of `--chunk` steps, nine random-image clients sized as the
  paper's divided by `--scale` (round_throughput.py's `--paper` data),
  input pipeline, broadcast, aggregation and scatter included.
- plain step: images/s of the same model's local step (the same optimizer
  and device-side augmentation) as one jitted function looping over
  `--chunk` steps of a device-resident batch: no federation, no host input.
  This is what the hardware gives for this model and batch.

round / plain is the fraction of the hardware's speed a round reaches; the
gap is host input, dispatch and the per-round stages. Results go to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import round_throughput  # noqa: E402  (benchmarks/ is not a package)

from fedreid_jax.federated import local as local_lib  # noqa: E402
from fedreid_jax.federated import state as state_lib  # noqa: E402
from fedreid_jax.models.reid import build_model  # noqa: E402

NUM_CLASSES = 751


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dtypes", default="bfloat16,float32", help="model.dtype values to run")
  p.add_argument("--scale", type=int, default=16, help="divide the paper's client sizes by")
  p.add_argument("--chunk", type=int, default=16,
                 help="serial strategy chunk / plain steps per call")
  p.add_argument("--rounds", type=int, default=2, help="timed rounds after the first")
  p.add_argument("--plain_calls", type=int, default=10, help="timed plain-step calls")
  p.add_argument("--smoke", action="store_true", help="toy sizes (CPU): checks the script runs")
  return p.parse_args()


def paper_config(dtype: str, chunk: int, smoke: bool):
  """configs/fedreid_paper.py with the compute dtype; `smoke`: a width-4 tiny ResNet at 32x16."""
  cfg = round_throughput.load_config("fedreid_paper")
  cfg.model.dtype = dtype
  cfg.fed.strategy, cfg.fed.chunk_steps = "serial", chunk
  if smoke:
    cfg.model.backbone, cfg.model.width, cfg.model.embed_dim = "resnet_tiny", 4, 16
    cfg.data.image_size, cfg.train.pad = (32, 16), 2
  return cfg


def plain_step_images_per_s(cfg, chunk: int, calls: int) -> float:
  """images/s of `chunk` local steps per jitted call on one device-resident batch."""
  size, batch = tuple(cfg.data.image_size), cfg.train.batch_size
  model = build_model(cfg.model, NUM_CLASSES)
  tx = local_lib.make_optimizer(cfg.train)
  state = state_lib.single_client(model, tx, jax.random.key(0), size, NUM_CLASSES, batch)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
  step = local_lib.make_local_step(model, tx, cfg.train)

  @jax.jit
  def run(state):
    def body(s, _):
      s, m = step(s, images, labels, jnp.array(True))
      return s, m["loss"]
    return jax.lax.scan(body, state, None, length=chunk)

  state, _ = jax.block_until_ready(run(state))  # compile
  t0 = time.perf_counter()
  for _ in range(calls):
    state, losses = run(state)
  jax.block_until_ready(losses)
  return calls * chunk * batch / (time.perf_counter() - t0)


def main():
  args = parse_args()
  if args.smoke:
    args.scale, args.chunk, args.rounds, args.plain_calls = 512, 2, 1, 2
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}; paper clients / {args.scale}, batch 32, serial K={args.chunk}"
        + (" [smoke: toy sizes]" if args.smoke else "") + "\n")
  print("| dtype | model | input | round images/s | plain step images/s | round / plain "
        "| compile (s) |")
  print("|---|---|---|---|---|---|---|")
  for dtype in args.dtypes.split(","):
    cfg = paper_config(dtype, args.chunk, args.smoke)
    size = tuple(cfg.data.image_size)
    clients = round_throughput.random_clients(
        [max(n // args.scale, cfg.train.batch_size) for n in round_throughput.PAPER_SIZES], size)
    r = round_throughput.measure(cfg, clients, args.rounds)
    plain = plain_step_images_per_s(cfg, args.chunk, args.plain_calls)
    print(f"| {dtype} | {cfg.model.backbone} | {size[0]}x{size[1]} | {r['images_per_s']:.0f} "
          f"| {plain:.0f} | {r['images_per_s'] / plain:.2f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
