"""ResNet backbones (torchvision v1.5 layout) in Flax linen.

The stride of a bottleneck sits in its 3x3 conv (v1.5), as in torchvision, so
its ImageNet weights map onto these modules one to one. `last_stride=1` keeps
the last stage at the resolution of the one before (a common re-ID trick).
Input `[B, H, W, 3]` float, output feature map `[B, H/32, W/32, C]` (H/16 with
last stride 1).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn

# PyTorch BatchNorm: momentum 0.1 (Flax momentum = 1 - 0.1), eps 1e-5.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). `[B, H, W, C] -> [B, H/s, W/s, filters]`."""
  filters: int
  strides: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init)
    norm = functools.partial(BatchNorm, use_running_average=not train)
    y = conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), padding=1, name="conv2")(y)
    y = norm(name="bn2")(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), self.strides, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 (ResNet-50/101)."""
  filters: int
  strides: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init)
    norm = functools.partial(BatchNorm, use_running_average=not train)
    out = self.filters * self.expansion
    y = nn.relu(norm(name="bn1")(conv(self.filters, (1, 1), name="conv1")(x)))
    y = conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(out, (1, 1), name="conv3")(y))
    if x.shape[-1] != out or self.strides != 1:
      x = conv(out, (1, 1), self.strides, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision-style ResNet without the final fc; returns the feature map."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  last_stride: int = 2
  small_stem: bool = False  # 3x3 stride-1 stem, no max-pool (tiny CPU inputs)

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.small_stem:
      x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False,
                  kernel_init=conv_init, name="conv1")(x)
    else:
      x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False,
                  kernel_init=conv_init, name="conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        stride = 1
        if i == 0 and stage > 0:
          stride = self.last_stride if stage == len(self.stage_sizes) - 1 else 2
        x = self.block(self.width * 2**stage, stride,
                       name=f"layer{stage + 1}_{i}")(x, train)
    return x


ARCHITECTURES = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], Bottleneck),
    "resnet101": ([3, 4, 23, 3], Bottleneck),
    "resnet_tiny": ([1, 1, 1, 1], BasicBlock),  # CPU-sized
}


def make_backbone(name: str, width: int, last_stride: int, small_stem: bool) -> ResNet:
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(ARCHITECTURES)}")
  stages, block = ARCHITECTURES[name]
  return ResNet(stages, block, width, last_stride, small_stem, name="backbone")


def feature_dim(name: str, width: int) -> int:
  stages, block = ARCHITECTURES[name]
  return width * 2**(len(stages) - 1) * block.expansion
