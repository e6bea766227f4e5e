"""Collectives in the compiled local-training chunk when the client axis is sharded.

  python benchmarks/sharded_hlo.py            # re-executes itself on 4 virtual CPU devices

XLA's SPMD partitioner all-gathers non-depthwise grouped convolutions
(openxla/xla issue 47945), and vmap over per-client weights turns every
convolution into a grouped one. This compiles one chunk (K local steps of 4
clients, the test-size ResNet) three ways over a 4-device `clients` mesh and
counts the collectives in the optimised HLO:

- `vmap + NamedSharding`: `jit(vmap(chunk))` with the client axis sharded,
  left to the partitioner;
- `sharded` (our strategy): `shard_map` over `lax.map` of the chunk, one
  client per device;
- `shard_map + vmap`: `shard_map` over `vmap(chunk)`, two clients per device
  on a 2-device mesh.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

FLAG = "--xla_force_host_platform_device_count=4"


def collectives(hlo: str) -> dict[str, int]:
  ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
  counts = collections.Counter()
  for line in hlo.splitlines():
    for op in ops:
      if re.search(rf"= [^ ]+ {op}(-start)?\(", line):
        counts[op] += 1
  return dict(counts)


def gathered_shapes(hlo: str, limit: int = 6) -> list[str]:
  """Result shapes of the first all-gathers (which arrays were gathered)."""
  shapes = re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo)
  return shapes[:limit]


def main():
  import jax
  import numpy as np
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tests"))
  import fakes
  from fedreid_jax.federated import local as local_lib
  from fedreid_jax.federated import params as params_lib
  from fedreid_jax.federated import state as state_lib
  from fedreid_jax.models.reid import build_model

  cfg = fakes.tiny_config()
  clients, k, b = 4, 2, cfg.train.batch_size
  h, w = cfg.data.image_size
  model = build_model(cfg.model, 8)
  tx = local_lib.make_optimizer(cfg.train)
  shared = params_lib.prefix_predicate(params_lib.FEATURE_EXTRACTOR)
  _, states = jax.jit(lambda key: state_lib.init_states(
      model, tx, shared, key, (h, w), np.full(clients, 8), np.full(clients, 16)))(
          jax.random.key(0))
  chunk = local_lib.make_client_chunk(local_lib.make_local_step(model, tx, cfg.train))
  images = np.zeros((clients, k, b, h, w, 3), np.uint8)
  labels = np.zeros((clients, k, b), np.int32)
  mask = np.ones((clients, k), bool)
  args = (states, images, labels, mask)
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{clients} clients, chunk of {k} steps, batch {b}, {h}x{w}, "
        f"{cfg.model.backbone} width {cfg.model.width}\n")
  mapped = lambda *a: lax.map(lambda x: chunk(*x), a)
  ways = {}
  mesh4 = jax.make_mesh((4,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
  sh4 = NamedSharding(mesh4, P("clients"))
  ways["vmap + NamedSharding (4 devices)"] = jax.jit(
      jax.vmap(chunk), in_shardings=sh4, out_shardings=sh4)
  ways["sharded: shard_map(lax.map) (4 devices)"] = jax.jit(
      jax.shard_map(mapped, mesh=mesh4, in_specs=P("clients"), out_specs=P("clients")))
  mesh2 = jax.make_mesh((2,), ("clients",), devices=jax.devices()[:2],
                        axis_types=(jax.sharding.AxisType.Auto,))
  ways["shard_map(vmap) (2 devices, 2 clients each)"] = jax.jit(
      jax.shard_map(jax.vmap(chunk), mesh=mesh2, in_specs=P("clients"),
                    out_specs=P("clients")))
  print("| compiled chunk | all-gather | all-reduce | other collectives | gathered (first) |")
  print("|---|---|---|---|---|")
  for name, fn in ways.items():
    hlo = fn.lower(*args).compile().as_text()
    c = collectives(hlo)
    other = {k: v for k, v in c.items() if k not in ("all-gather", "all-reduce")}
    print(f"| {name} | {c.get('all-gather', 0)} | {c.get('all-reduce', 0)} | "
          f"{other or '-'} | {', '.join(gathered_shapes(hlo)) or '-'} |", flush=True)


if __name__ == "__main__":
  if FLAG not in os.environ.get("XLA_FLAGS", ""):
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(),
               JAX_PLATFORMS="cpu")
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
  main()
