"""A FedPav round with ResNet-18 against the same round in PyTorch, on the CPU.

  python benchmarks/round_vs_torch.py               # ResNet-18, 1 thread, 2 timed rounds
  python benchmarks/round_vs_torch.py --threads 2 --rounds 3

The synthetic benchmark's nine clients (64x32, batch 32, one local epoch:
94 steps a round), a ResNet-18 re-ID model (torchvision layout, 512-d
embedding block, one classifier per client) with Nesterov SGD (lr 0.05 head,
0.005 backbone, as the paper). A round is, on both sides: each client takes
the global backbone + embedding, keeps its own classifier, trains on this
round's batches (ours: `train.Experiment.train_round`, the `serial`
strategy, `model.conv_impl=auto`; PyTorch: the usual eager loop, one
optimizer per client re-created each round as the reference does, batches
flipped on the fly), and the server averages backbone + embedding
(parameters and BatchNorm buffers) weighted by training images. Both sides
read the same batches (our plan's order) from memory; the reference's
DataLoader decoding is left out of both. One warm-up round each
(compilation), then rounds in turn (ours, PyTorch, ours, ...), so load from
other jobs falls on both alike. Ratio = PyTorch s / ours s (>= 1: ours is at
least as fast).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_compare import pin_threads, torch_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_round(backbone: str):
  """(experiment, round fn(r)) of the synthetic benchmark with `backbone`."""
  import jax
  from fedreid_jax import config_lib, train
  from fedreid_jax.data import registry
  cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "synthetic.py"))
  cfg.model.backbone, cfg.model.width, cfg.model.conv_impl = backbone, 64, "auto"
  cfg.model.embed_dim = 512
  cfg.train.lr_backbone, cfg.train.lr_head = 0.005, 0.05
  cfg.fed.strategy, cfg.fed.chunk_steps = "serial", 1
  clients, _ = registry.load(cfg.data, cfg.seed)
  exp = train.Experiment(cfg, clients)

  def run(r):
    exp.train_round(r)
    jax.block_until_ready(exp.server.params)
  return exp, run


def torch_round(exp, backbone: str):
  """PyTorch's round over `exp`'s clients and batches: fn(r)."""
  import numpy as np
  import torch
  torch.manual_seed(0)
  model = torch_model(backbone)
  sizes = [len(c.train) for c in exp.clients_data]
  heads = [torch.nn.Linear(512, c.num_train_ids) for c in exp.clients_data]
  shared = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
  batches = {}  # the same batches as ours, read once (our reader's pixels)

  def run(r):
    nonlocal shared
    states = []
    for c, head in enumerate(heads):
      key = (c, r % 2)
      if key not in batches:
        batches[key] = [(torch.from_numpy(np.ascontiguousarray(b["image"])).permute(0, 3, 1, 2),
                         torch.from_numpy(b["label"]).long()) for b in exp.inputs.stream(c, r)]
      model.load_state_dict(shared, strict=False)
      model.classifier = head
      backbone_params = list(model.backbone.parameters())
      rest = [p for n, p in model.named_parameters() if not n.startswith("backbone")]
      opt = torch.optim.SGD([{"params": backbone_params, "lr": 0.005},
                             {"params": rest, "lr": 0.05}],
                            momentum=0.9, nesterov=True, weight_decay=5e-4)
      model.train()
      for images, labels in batches[key]:
        x = (images.float() - mean) / std
        flip = torch.rand(x.shape[0]) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), torch.flip(x, dims=(3,)), x)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
      states.append({k: v.detach().clone() for k, v in model.state_dict().items()
                     if not k.startswith("classifier")})
    total = float(sum(sizes))
    shared = {k: (sum(s[k].double() * n for s, n in zip(states, sizes)) / total).to(v.dtype)
              for k, v in states[0].items()}
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backbone", default="resnet18")
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--rounds", type=int, default=2, help="timed rounds per side")
  args = p.parse_args()
  pin_threads(args.threads)
  import jax
  import torch
  torch.set_num_threads(args.threads)
  exp, ours = our_round(args.backbone)
  theirs = torch_round(exp, args.backbone)
  steps = sum(exp.inputs.num_steps(c) for c in range(len(exp.clients_data)))
  print(f"{args.backbone}, 9 synthetic clients, {steps} steps of 32 at 64x32 a round; "
        f"{args.threads} thread(s); jax {jax.__version__}, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}", flush=True)
  for fn in (ours, theirs):
    fn(0)  # warm-up: compilation, first reads
  times = {"ours": [], "torch": []}
  for r in range(1, args.rounds + 1):
    for name, fn in (("ours", ours), ("torch", theirs)):
      t0 = time.perf_counter()
      fn(r)
      times[name].append(time.perf_counter() - t0)
      print(f"round {r} {name}: {times[name][-1]:.1f} s", flush=True)
  ratios = [t / o for t, o in zip(times["torch"], times["ours"])]
  print(f"| {args.backbone} | {args.threads} | {min(times['ours']):.1f} | "
        f"{min(times['torch']):.1f} | {sorted(ratios)[len(ratios) // 2]:.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}) | {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
  main()
