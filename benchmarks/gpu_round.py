"""The paper's round on a GPU against the hardware's speed for the same model.

  python benchmarks/gpu_round.py                  # GPU: a few minutes on an H200 (not run yet)
  python benchmarks/gpu_round.py --smoke          # CPU, toy sizes: ~1-2 min, checks it runs

Three figures per compute dtype, in one process:

- input: images/s a round's input alone delivers (grain loader over the
  prepared TFDS files: read, JPEG decode, bicubic resize to 256x128, batch;
  every client of two rounds, one loader for both as a serial run reads),
  for each `--loaders` setting (threads:workers); the fastest feeds the
  rounds, and is also timed with a loader per round and per client.
- round: images/s of steady-state federated rounds (`train.Experiment`) in
  the paper's setting: ResNet-50, 256x128, batch 32, the `serial` strategy
  with chunks of `--chunk` steps, nine clients sized as the paper's divided
  by `--scale`, input pipeline, broadcast, aggregation and scatter included.
  With `--input tfds` (the default) the clients are Market-style JPEGs
  prepared as TFDS array_record and streamed as in a user's run
  (`prepared_clients.py`); `memory` decodes the same files once into host
  memory (the first round pays that, counted with compilation); `random`
  uses in-memory random arrays. A comma list runs each.
- plain step: images/s of the same model's local step (the same optimizer
  and device-side augmentation) as one jitted function looping over
  `--chunk` steps of a device-resident batch: no federation, no host input.
  This is what the hardware gives for this model and batch.

round / plain is the fraction of the hardware's speed a round reaches;
input / round says whether the host keeps up (below 1: the round waits for
input). Results go to benchmarks/RESULTS.md. Needs tensorflow-datasets,
grain and array_record (`benchmarks/gpu_wheels.sh` downloads them as
wheels for a machine without network).
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
import device_trace  # noqa: E402  (benchmarks/ is not a package)
import prepared_clients  # noqa: E402
import round_throughput  # noqa: E402

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
  p.add_argument("--input", default="tfds",
                 help="comma list of tfds (prepared JPEGs streamed through the real "
                 "pipeline), memory (the same files decoded once into host memory, "
                 "data.in_memory=True), random (in-memory random arrays)")
  p.add_argument("--plain_only", action="store_true",
                 help="only the plain step per dtype (e.g. to compare XLA_FLAGS settings)")
  p.add_argument("--data_dir", default="/tmp/gpu_round_fixture",
                 help="--input tfds: where the prepared fixture is built (reused if there)")
  p.add_argument("--loaders", default="8:0,16:0",
                 help="--input tfds: threads:workers settings timed alone; the fastest "
                 "feeds the rounds")
  p.add_argument("--trace", default="", help="folder: trace one more round of the first "
                 "dtype and input with jax.profiler and print where its device time went")
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


def fastest_loader(clients, size: tuple[int, int], batch: int, settings: str
                   ) -> tuple[tuple[int, int], float]:
  """Times two rounds' input alone (`round_input_images_per_s`: every client,
  one loader for both rounds, as a run reads) for each `threads:workers`
  setting -> ((threads, workers) of the fastest, its images/s); then the
  fastest with a loader per round and per client, for comparison. A setting
  that fails is reported and skipped."""
  rates = {}
  for setting in settings.split(","):
    threads, workers = (int(v) for v in setting.split(":"))
    try:
      rates[threads, workers] = prepared_clients.round_input_images_per_s(
          clients, size, batch, threads, workers)
    except Exception as e:  # e.g. worker processes not allowed: the others still count
      print(f"input pipeline, {threads} threads, {workers} workers: failed "
            f"({type(e).__name__}: {e})", flush=True)
      continue
    print(f"input of 2 rounds alone, {threads} threads, {workers} workers, one loader: "
          f"{rates[threads, workers]:.0f} images/s", flush=True)
  if not rates:
    raise RuntimeError(f"every loader setting failed: {settings}")
  best = max(rates, key=rates.get)
  for scope in ("round", "client"):
    try:
      rate = prepared_clients.round_input_images_per_s(clients, size, batch, *best, scope=scope)
    except Exception as e:  # a comparison only: the rounds still run
      print(f"a loader per {scope}: failed ({type(e).__name__}: {e})", flush=True)
      continue
    print(f"input of 2 rounds alone, {best[0]} threads, {best[1]} workers, a loader per "
          f"{scope}: {rate:.0f} images/s", flush=True)
  return best, rates[best]


def round_row(dtype, cfg, input_name, how, delivered, r, plain) -> str:
  """One markdown row of the results table."""
  size = cfg.data.image_size
  ratio = f"{delivered / r['images_per_s']:.2f}" if delivered == delivered else "-"
  alone = f"{delivered:.0f}" if delivered == delivered else "-"
  return (f"| {dtype} | {cfg.model.backbone} | {size[0]}x{size[1]} | {input_name} ({how}) "
          f"| {alone} | {r['images_per_s']:.0f} | {plain:.0f} | {r['images_per_s'] / plain:.2f} "
          f"| {ratio} | {r['compile_s']:.1f} |")


def main():
  args = parse_args()
  if args.smoke:
    args.scale, args.chunk, args.rounds, args.plain_calls = 512, 2, 1, 2
    args.loaders = "2:0,4:0,2:1"
  inputs = args.input.split(",")
  if unknown := set(inputs) - {"tfds", "memory", "random"}:
    raise SystemExit(f"--input: unknown {sorted(unknown)}; use tfds, memory or random")
  sizes = [max(n // args.scale, 32) for n in round_throughput.PAPER_SIZES]
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}, {os.cpu_count()} CPU cores; paper clients / {args.scale} "
        f"({sum(sizes)} images), batch 32, serial K={args.chunk}, input {args.input}"
        + (" [smoke: toy sizes]" if args.smoke else "") + "\n", flush=True)
  base = paper_config("float32", args.chunk, args.smoke)
  size, batch = tuple(base.data.image_size), base.train.batch_size
  clients = {}
  if not args.plain_only:
    if {"tfds", "memory"} & set(inputs):
      clients["tfds"] = clients["memory"] = prepared_clients.prepared_clients(
          sizes, args.data_dir)
    if "random" in inputs:
      clients["random"] = round_throughput.random_clients(sizes, size)
  loader, delivered = None, float("nan")
  if "tfds" in inputs:  # once, before the dtypes: every streamed round reads the same way
    loader, delivered = fastest_loader(clients["tfds"], size, batch, args.loaders)
  rows = []
  for dtype in args.dtypes.split(","):
    cfg = paper_config(dtype, args.chunk, args.smoke)
    plain = plain_step_images_per_s(cfg, args.chunk, args.plain_calls)
    print(f"{dtype} plain step: {plain:.0f} images/s", flush=True)
    for name in ([] if args.plain_only else inputs):
      cfg = paper_config(dtype, args.chunk, args.smoke)
      cfg.data.in_memory = cfg.data.in_memory or name == "memory"
      if name == "tfds":
        cfg.data.loader_threads, cfg.data.loader_workers = loader
      trace = args.trace if args.trace and not rows else None
      r = round_throughput.measure(cfg, clients[name], args.rounds, trace)
      if trace:
        print(f"\ntraced round ({dtype}, {name}):\n{device_trace.summarize(trace)}\n", flush=True)
      how = "%d:%d" % loader if name == "tfds" else "decoded once" if name == "memory" else (
          "arrays")
      rows.append(round_row(dtype, cfg, name, how, delivered if name == "tfds" else float("nan"),
                            r, plain))
      print(rows[-1], flush=True)
  if rows:
    print("\n| dtype | model | image | input (threads:workers) | input alone images/s "
          "| round images/s | plain step images/s | round / plain | input / round "
          "| compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
  main()
