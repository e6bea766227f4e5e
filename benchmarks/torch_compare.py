"""Our local SGD step and test-time features against PyTorch's, on the CPU.

  python benchmarks/torch_compare.py              # ~15 min on a 2-core EPYC, one thread
  python benchmarks/torch_compare.py --cases resnet18:64x32 --impls xla,auto --reps 5

Side by side in one process, on the same cores: the process is pinned to
`--threads` cores (`sched_setaffinity`), PyTorch gets `torch.set_num_threads`,
and XLA's Eigen thread pool is switched off for one thread. Per case (a
ResNet-18/50 re-ID model, an input size, batch 32):

- train: one local step. Ours is `federated.local.make_local_step` jitted as
  the `serial` strategy runs it (device-side pad-and-crop + flip,
  normalisation, forward, backward, Nesterov SGD with two learning rates);
  PyTorch's is the usual eager step on an already-augmented batch (a
  DataLoader would augment it on other cores), so ours does slightly more.
- features: f(img) + f(flip(img)), L2-normalised, eval mode (our
  `evaluation.features.make_embed_fn` vs `torch.inference_mode`).

PyTorch's model is written here in plain torch with torchvision's layout
(BasicBlock / Bottleneck v1.5, the 512-d embedding block Dense -> BN1d ->
Dropout, the classifier), so no torchvision is needed; `pip install
torch==2.13.0` (CPU build). Times are medians of `--reps` calls after two
warm-up calls (compilation excluded), taken in interleaved rounds (one call
of each side per round), so that load from other jobs falls on both sides
alike. Ratio = torch ms / ours ms: >= 1 means we are at least as fast; the
range after it is the lowest and highest per-round ratio. Our side runs once
per `--impls` conv lowering (`model.conv_impl`) and per `--dtypes` compute
dtype (`model.dtype`).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

CASES = "resnet18:64x32,resnet18:128x64,resnet50:64x32,resnet50:128x64"
NUM_CLASSES = 751  # Market-1501's training ids
BATCH = 32


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default=CASES, help="comma-separated backbone:HxW")
  p.add_argument("--impls", default="xla,auto", help="our conv lowerings (model.conv_impl)")
  p.add_argument("--dtypes", default="float32", help="our compute dtypes (model.dtype)")
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--reps", type=int, default=5, help="timed calls per measurement (max)")
  p.add_argument("--budget_s", type=float, default=20.0,
                 help="stop timing a measurement after this many seconds (>= 2 calls)")
  return p.parse_args()


def pin_threads(threads: int) -> None:
  """Same cores for both frameworks; call before importing jax or torch."""
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def time_interleaved(fns: list, reps: int, budget_s: float) -> list[list[float]]:
  """Wall ms of each `fn()` (which blocks until done): two warm-up calls each,
  then rounds of one call of each fn in turn, until `reps` rounds or (after
  at least two) `budget_s` seconds. Returns one list of times per fn."""
  for fn in fns:
    fn()
    fn()
  times, start = [[] for _ in fns], time.perf_counter()
  while len(times[0]) < reps and (len(times[0]) < 2 or time.perf_counter() - start < budget_s):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(1000 * (time.perf_counter() - t0))
  return times


def median(values: list[float]) -> float:
  return sorted(values)[len(values) // 2]


def ratio_cell(torch_ms: list[float], ours_ms: list[float]) -> str:
  """`median ratio (lowest-highest per-round ratio)`, ratio = torch / ours."""
  per_round = sorted(t / o for t, o in zip(torch_ms, ours_ms))
  return f"{median(torch_ms) / median(ours_ms):.2f} ({per_round[0]:.2f}-{per_round[-1]:.2f})"


# ---------------------------------------------------------------- PyTorch side


def torch_model(backbone: str):
  """torchvision-layout ResNet re-ID model in plain torch: backbone -> GAP ->
  Linear(D, 512) -> BN1d -> Dropout(0.5) -> Linear(512, NUM_CLASSES)."""
  import torch
  from torch import nn

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.down = None
      if stride != 1 or cin != planes:
        self.down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                  nn.BatchNorm2d(planes))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.down is None else self.down(x)))

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
      super().__init__()
      out = planes * 4
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out)
      self.down = None
      if stride != 1 or cin != out:
        self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False),
                                  nn.BatchNorm2d(out))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (x if self.down is None else self.down(x)))

  block, stages = {"resnet18": (BasicBlock, (2, 2, 2, 2)),
                   "resnet50": (Bottleneck, (3, 4, 6, 3))}[backbone]

  class ReID(nn.Module):
    def __init__(self):
      super().__init__()
      layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                     nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)], 64
      for s, n in enumerate(stages):
        for i in range(n):
          planes = 64 * 2**s
          layers.append(block(cin, planes, 2 if (i == 0 and s > 0) else 1))
          cin = planes * block.expansion
      self.backbone = nn.Sequential(*layers)
      self.embedding = nn.Sequential(nn.Linear(cin, 512), nn.BatchNorm1d(512), nn.Dropout(0.5))
      self.classifier = nn.Linear(512, NUM_CLASSES)

    def embed(self, x):
      return self.embedding(self.backbone(x).mean((2, 3)))

    def forward(self, x):
      return self.classifier(self.embed(x))

  return ReID()


def torch_case(backbone: str, size) -> dict:
  """{"train": fn, "features": fn}: PyTorch's calls (each blocks until done)."""
  import torch
  torch.manual_seed(0)
  model = torch_model(backbone)
  head = [p for n, p in model.named_parameters() if not n.startswith("backbone")]
  opt = torch.optim.SGD([{"params": model.backbone.parameters(), "lr": 0.005},
                         {"params": head, "lr": 0.05}],
                        momentum=0.9, nesterov=True, weight_decay=5e-4)
  x = torch.randn(BATCH, 3, *size)
  y = torch.randint(0, NUM_CLASSES, (BATCH,))

  def step():
    model.train()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

  def features():
    model.eval()
    with torch.inference_mode():
      f = model.embed(x) + model.embed(torch.flip(x, dims=(3,)))
      torch.nn.functional.normalize(f, dim=1)

  return {"train": step, "features": features}


# ---------------------------------------------------------------- our side


def our_case(backbone: str, size, impl: str, dtype: str) -> dict:
  """{"train": fn, "features": fn}: fedreid_jax's calls with `model.conv_impl=impl`."""
  import jax
  import numpy as np
  from fedreid_jax import config_lib
  from fedreid_jax.evaluation import features as features_lib
  from fedreid_jax.federated import local as local_lib
  from fedreid_jax.federated import state as state_lib
  from fedreid_jax.models.reid import build_model

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load_config_file(os.path.join(root, "configs", "fedreid_paper.py"))
  cfg.model.backbone, cfg.model.conv_impl, cfg.model.dtype = backbone, impl, dtype
  cfg.train.pad = size[0] // 16
  model = build_model(cfg.model, NUM_CLASSES)
  tx = local_lib.make_optimizer(cfg.train)
  state = state_lib.single_client(model, tx, jax.random.key(0), size, NUM_CLASSES, BATCH)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (BATCH, *size, 3), dtype=np.uint8))
  labels = jax.device_put(rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32))
  step = jax.jit(local_lib.make_local_step(model, tx, cfg.train), donate_argnums=0)
  mask = jax.numpy.array(True)
  holder = [state]

  def train():
    holder[0], metrics = step(holder[0], images, labels, mask)
    jax.block_until_ready(metrics)

  embed = features_lib.make_embed_fn(model)
  # the current state: the train step donates (deletes) the one it was given
  features = lambda: jax.block_until_ready(embed(
      {"params": holder[0].params, "batch_stats": holder[0].batch_stats}, images))
  return {"train": train, "features": features}


def main():
  args = parse_args()
  pin_threads(args.threads)
  import jax
  import torch
  torch.set_num_threads(args.threads)
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor())
  print(f"{cpu}, {args.threads} thread(s), batch {BATCH}; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}, python {sys.version.split()[0]}")
  ours = [(impl, dtype) for dtype in args.dtypes.split(",") for impl in args.impls.split(",")]
  names = [f"ours {impl}" + ("" if dtype == "float32" else f" {dtype}") for impl, dtype in ours]
  print("\n| model | input | what | torch ms | " + " | ".join(f"{n} ms" for n in names)
        + " | " + " | ".join(f"ratio {n}" for n in names) + " |")
  print("|---" * (4 + 2 * len(names)) + "|")
  for case in args.cases.split(","):
    backbone, hw = case.split(":")
    size = tuple(int(v) for v in hw.split("x"))
    sides = [torch_case(backbone, size)] + [our_case(backbone, size, impl, dtype)
                                            for impl, dtype in ours]
    for what in ("train", "features"):
      t, *o = time_interleaved([side[what] for side in sides], args.reps, args.budget_s)
      print(f"| {backbone} | {hw} | {what} | {median(t):.0f} | "
            + " | ".join(f"{median(m):.0f}" for m in o) + " | "
            + " | ".join(ratio_cell(t, m) for m in o) + " |", flush=True)
    print(f"(load average after {case}: {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
  main()
