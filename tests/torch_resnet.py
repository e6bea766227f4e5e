"""torchvision's ResNet layout in plain torch (no torchvision here), for the
pretrained-weights tests: same module names, so `state_dict()` has the keys
of torchvision's checkpoints (conv1.weight, bn1.running_var,
layer1.0.downsample.0.weight, ..., fc.weight), BasicBlock for ResNet-18/34,
Bottleneck v1.5 (stride in the 3x3 conv) for ResNet-50/101.
`last_stride=1` keeps layer4 at layer3's resolution (the re-ID variant).
"""
from __future__ import annotations

import torch
from torch import nn

LAYERS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
          "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3])}


def _bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, x, relu=True):
  y = bn(conv(x))
  return torch.relu(y) if relu else y


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(cin, planes, stride)

  def forward(self, x):
    y = _bn_act(self.conv2, self.bn2, _bn_act(self.conv1, self.bn1, x), relu=False)
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = _downsample(cin, planes * 4, stride)

  def forward(self, x):
    y = _bn_act(self.conv2, self.bn2, _bn_act(self.conv1, self.bn1, x))
    y = _bn_act(self.conv3, self.bn3, y, relu=False)
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
  """`[B, 3, H, W]` -> pooled features `[B, 512 * expansion]` (`features`) or
  ImageNet logits (`forward`)."""

  def __init__(self, name: str, last_stride: int = 2):
    super().__init__()
    kind, sizes = LAYERS[name]
    block = BasicBlock if kind == "basic" else Bottleneck
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for stage, count in enumerate(sizes):
      stride = 1 if stage == 0 else (last_stride if stage == 3 else 2)
      blocks = []
      for i in range(count):
        blocks.append(block(cin, 64 * 2**stage, stride if i == 0 else 1))
        cin = 64 * 2**stage * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, 1000)

  def features(self, x):
    x = self.maxpool(_bn_act(self.conv1, self.bn1, x))
    for stage in range(1, 5):
      x = getattr(self, f"layer{stage}")(x)
    return x.mean(dim=(2, 3))

  def forward(self, x):
    return self.fc(self.features(x))


def randomized(name: str, last_stride: int = 2, seed: int = 0) -> ResNet:
  """A ResNet in eval mode in a pretrained-like state: random convs, random
  BatchNorm scale and bias, running statistics measured on 8 random images
  (so features depend on the input) and then perturbed (so using the wrong
  statistics shows)."""
  torch.manual_seed(seed)
  net = ResNet(name, last_stride)
  norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in norms:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.1)
      bn.momentum = None  # cumulative average: the statistics of the calibration batch
      bn.reset_running_stats()
    net.train()
    net.features(torch.randn(8, 3, 128, 64))
    for bn in norms:
      bn.momentum = 0.1
      bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
      bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4))
  return net.eval()
