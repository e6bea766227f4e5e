"""Per-layer convolution timings: XLA's convolution vs im2col + matmul.

  python benchmarks/conv_choice.py                   # ~2 min on a 2-core EPYC, one thread
  python benchmarks/conv_choice.py --models resnet18:64x32 --threads 2

Collects every distinct convolution of the given re-ID backbones at the
given input sizes (batch 32, traced from the model itself), and times each
one, forward plus both gradients (input and kernel) as one compiled vjp,
with `lax.conv_general_dilated` ("xla") and with `models.conv.conv_patches`
("patches"). The last columns say which `model.conv_impl="auto"` picks
(`conv.choose` on CPU) and which was faster: this table is the evidence for
`conv.CPU_PATCHES_MAX_PIXELS`. Medians of `--reps` calls after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models",
                 default="resnet18:64x32,resnet50:64x32,resnet18:128x64,resnet50:128x64")
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--batch", type=int, default=32)
  return p.parse_args()


def conv_layers(backbone: str, size, batch: int) -> list[tuple]:
  """Distinct (lhs shape, rhs shape, strides, padding) of a backbone's convs, in order."""
  import jax
  import jax.numpy as jnp
  from fedreid_jax.models import resnet
  net = resnet.make_backbone(backbone, 64, 2, False, conv_impl="xla")
  x = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  jaxpr = jax.make_jaxpr(lambda v, x: net.apply(v, x, train=False))(variables, x)
  seen = []
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      key = (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
             tuple(eqn.params["window_strides"]), tuple(map(tuple, eqn.params["padding"])))
      if key not in seen:
        seen.append(key)
  return seen


def time_vjp_ms(impl: str, lhs_shape, rhs_shape, strides, padding, reps: int):
  """(median ms of forward + input and kernel gradients of one conv, output shape)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from fedreid_jax.models import conv

  def f(x, k):
    if impl == "xla":
      return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=conv.NHWC)
    return conv.conv_patches(x, k, strides, padding)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
  out_shape = jax.eval_shape(f, x, k).shape
  g = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

  @jax.jit
  def run(x, k, g):
    y, vjp = jax.vjp(f, x, k)
    return y, vjp(g)

  jax.block_until_ready(run(x, k, g))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run(x, k, g))
    times.append(1000 * (time.perf_counter() - t0))
  return sorted(times)[len(times) // 2], out_shape


def main():
  args = parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from torch_compare import pin_threads
  pin_threads(args.threads)
  import jax
  from fedreid_jax.models import conv
  print(f"jax {jax.__version__}, {args.threads} thread(s), batch {args.batch}; "
        f"auto on CPU: patches for 1x1 and when the output map has <= "
        f"{conv.CPU_PATCHES_MAX_PIXELS} pixels\n")
  print("| model | input map | kernel | stride | output map | xla ms | patches ms | faster "
        "| auto |")
  print("|---|---|---|---|---|---|---|---|---|")
  done = set()
  for model in args.models.split(","):
    backbone, hw = model.split(":")
    size = tuple(int(v) for v in hw.split("x"))
    for lhs, rhs, strides, padding in conv_layers(backbone, size, args.batch):
      if (lhs, rhs, strides, padding) in done:
        continue
      done.add((lhs, rhs, strides, padding))
      xla_ms, out = time_vjp_ms("xla", lhs, rhs, strides, padding, args.reps)
      patches_ms, _ = time_vjp_ms("patches", lhs, rhs, strides, padding, args.reps)
      auto = conv.choose("auto", lhs, rhs, strides, padding, "cpu")
      faster = "patches" if patches_ms < xla_ms else "xla"
      print(f"| {model} | {lhs[1]}x{lhs[2]}x{lhs[3]} | {rhs[0]}x{rhs[1]} {rhs[2]}->{rhs[3]} "
            f"| {strides[0]} | {out[1]}x{out[2]} | {xla_ms:.1f} | {patches_ms:.1f} "
            f"| {faster} | {auto} |", flush=True)


if __name__ == "__main__":
  main()
