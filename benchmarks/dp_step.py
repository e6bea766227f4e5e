"""An image-level DP-SGD step against the plain local step, same model, same
client state, interleaved side by side (docs/privacy.md; benchmarks/RESULTS.md).

  python benchmarks/dp_step.py [--repeats 20] [--backbone resnet_tiny] [--width 16]

The plain step: `local.make_local_step` on a batch of `train.batch_size` (B)
images with batch statistics and dropout. The DP step:
`dp_sgd.make_dp_local_step` on the padded Poisson batch of the same expected
size, `poisson_input.capacity(B)` slots (B present, the rest padding): vmapped
per-image gradients with frozen statistics, each clipped, noise on the sum.
Both jitted once (compile time printed apart); then the two alternate
`--repeats` times (so a load change on a shared machine hits both) and the
median of each and their ratio are printed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedreid_jax import config_lib  # noqa: E402
from fedreid_jax.federated import local as local_lib  # noqa: E402
from fedreid_jax.federated import state as state_lib  # noqa: E402
from fedreid_jax.models.reid import build_model  # noqa: E402
from fedreid_jax.privacy import dp_sgd, poisson_input  # noqa: E402

NUM_CLASSES = 100


def timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--backbone", default=None, help="default: configs/synthetic.py's")
  p.add_argument("--width", type=int, default=None)
  args = p.parse_args(argv)
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "synthetic.py"))
  if args.backbone:
    cfg.model.backbone = args.backbone
  if args.width:
    cfg.model.width = args.width
  size, batch = tuple(cfg.data.image_size), cfg.train.batch_size
  slots = poisson_input.capacity(batch)
  model = build_model(cfg.model, NUM_CLASSES)
  tx = local_lib.make_optimizer(cfg.train)
  state = state_lib.single_client(model, tx, jax.random.key(0), size, NUM_CLASSES)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (slots, *size, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, slots).astype(np.int32)
  dp_labels = np.where(np.arange(slots) < batch, labels, poisson_input.PAD).astype(np.int32)
  plain = jax.jit(local_lib.make_local_step(model, tx, cfg.train))
  private = jax.jit(dp_sgd.make_dp_local_step(model, tx, cfg.train, 1.0, 1.0, 1))
  go = jnp.array(True)
  runs = {"plain": lambda: plain(state, images[:batch], labels[:batch], go),
          "dp": lambda: private(state, images, dp_labels, go)}
  compile_s = {k: timed(f) for k, f in runs.items()}
  times = {k: [] for k in runs}
  for _ in range(args.repeats):
    for k, f in runs.items():
      times[k].append(timed(f))
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"model {cfg.model.backbone} width {cfg.model.width}, images {size}, batch {batch} "
        f"(DP: {slots} padded slots, {batch} present), {args.repeats} interleaved repeats")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")
  for k in runs:
    print(f"{k:6s} step: median {1e3 * med[k]:8.1f} ms  (min {1e3 * min(times[k]):.1f}, "
          f"first call incl. compile {compile_s[k]:.1f} s)")
  print(f"ratio dp / plain: {med['dp'] / med['plain']:.2f}x")


if __name__ == "__main__":
  main()
