"""ResNet backbones (torchvision v1.5 layout) in Flax linen.

The stride of a bottleneck sits in its 3x3 conv (v1.5), as in torchvision, so
its ImageNet weights map onto these modules one to one. `last_stride=1` keeps
the last stage at the resolution of the one before (a common re-ID trick).
Input `[B, H, W, 3]` float, output feature map `[B, H/32, W/32, C]` (H/16 with
last stride 1), in the compute `dtype`.

Mixed precision the flax examples/imagenet way: the ResNet creates its conv
and norm partials once, with the compute `dtype` (float32 or bfloat16) and
the conv lowering (`conv.IMPLS`), and passes them into the blocks.
Parameters and BatchNorm statistics stay float32 (`param_dtype`); flax
computes the batch statistics in at least float32.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.linen.dtypes import canonicalize_dtype
import jax.numpy as jnp

from fedreid_jax.models import batchnorm
from fedreid_jax.models import conv as conv_lib
from fedreid_jax.models import pool as pool_lib

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ModuleDef = Callable[..., nn.Module]


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` with PyTorch's settings: momentum 0.1 (Flax momentum = 1 -
  0.1), eps 1e-5, and with `unbiased_var` PyTorch's running-variance update.

  PyTorch normalises a training batch by its biased variance but moves the
  running variance towards the unbiased one (x n / (n - 1), n = values per
  channel in the batch); Flax uses the biased one for both. With
  `unbiased_var=False` this is exactly `nn.BatchNorm`. Same variables either
  way (`scale`, `bias`; `batch_stats`: `mean`, `var`). Channels last; no
  cross-device `axis_name` or `mask` with `unbiased_var`.

  With `closed_form_grad` a training call (no mask, axis_name or other axis)
  goes through `batchnorm.train_norm`: the same variables and running
  averages, output and gradient equal up to float rounding, computed in
  fewer passes (ResNets set it where `conv.cpu_rewrites(conv_impl)`).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_var: bool = False
  closed_form_grad: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_avg = nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    correct = self.unbiased_var and not use_avg and not self.is_initializing()
    if correct and (mask is not None or self.axis_name is not None or self.axis != -1):
      raise ValueError("BatchNorm(unbiased_var=True) takes no mask, axis_name or axis other than -1")
    old = self.get_variable("batch_stats", "var") if correct else None
    closed_form = (self.closed_form_grad and not use_avg and not self.is_initializing()
                   and mask is None and self.axis_name is None and self.axis == -1
                   and self.use_scale and self.use_bias)
    y = (self._train_closed_form(x) if closed_form
         else super().__call__(x, use_running_average, mask=mask))
    if correct:  # new = m old + (1 - m) v  ->  m old + (1 - m) v n / (n - 1)
      n = x.size // x.shape[-1]
      new = self.get_variable("batch_stats", "var")
      self.put_variable("batch_stats", "var", new + (new - self.momentum * old) / max(n - 1, 1))
    return y

  def _train_closed_form(self, x):
    """`nn.BatchNorm`'s training call (variables, output, running averages)
    through `batchnorm.train_norm`. `[..., C] -> [..., C]`."""
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    dtype = canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    y, mean, var = batchnorm.train_norm(x, scale, bias, self.epsilon, dtype)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def compute_dtype(name: str):
  """`"float32"` | `"bfloat16"` -> the jnp dtype convs and norms compute in."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {list(DTYPES)}")
  return DTYPES[name]


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). `[B, H, W, C] -> [B, H/s, W/s, filters]`."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = self.conv(self.filters, (1, 1), self.strides, name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 (ResNet-50/101).
  `[B, H, W, C] -> [B, H/s, W/s, 4 filters]`."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = self.filters * self.expansion
    y = nn.relu(self.norm(name="bn1")(self.conv(self.filters, (1, 1), name="conv1")(x)))
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.norm(name="bn3")(self.conv(out, (1, 1), name="conv3")(y))
    if x.shape[-1] != out or self.strides != 1:
      x = self.conv(out, (1, 1), self.strides, name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision-style ResNet without the final fc; returns the feature map."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  last_stride: int = 2
  small_stem: bool = False  # 3x3 stride-1 stem, no max-pool (tiny CPU inputs)
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  # conv.IMPLS; also the stem's max pool and BatchNorm.closed_form_grad
  # (conv.cpu_rewrites: "patches", or "auto" on CPU)
  conv_impl: str = "auto"
  bn_unbiased_var: bool = False  # BatchNorm.unbiased_var: PyTorch's running variance

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                             conv_general_dilated=conv_lib.conv_fn(self.conv_impl))
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype,
                             unbiased_var=self.bn_unbiased_var,
                             closed_form_grad=conv_lib.cpu_rewrites(self.conv_impl))
    if self.small_stem:
      x = conv(self.width, (3, 3), padding=1, name="conv1")(x)
    else:
      x = conv(self.width, (7, 7), 2, padding=3, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    if not self.small_stem:
      x = pool_lib.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), self.conv_impl)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        stride = 1
        if i == 0 and stage > 0:
          stride = self.last_stride if stage == len(self.stage_sizes) - 1 else 2
        x = self.block(self.width * 2**stage, conv, norm, stride,
                       name=f"layer{stage + 1}_{i}")(x)
    return x


ARCHITECTURES = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], Bottleneck),
    "resnet101": ([3, 4, 23, 3], Bottleneck),
    "resnet_tiny": ([1, 1, 1, 1], BasicBlock),  # CPU-sized
}


def make_backbone(name: str, width: int, last_stride: int, small_stem: bool,
                  dtype: Any = jnp.float32, conv_impl: str = "auto",
                  bn_unbiased_var: bool = False) -> ResNet:
  """The ResNet `name` (ARCHITECTURES), as the module named `backbone`."""
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(ARCHITECTURES)}")
  stages, block = ARCHITECTURES[name]
  return ResNet(stages, block, width, last_stride, small_stem, dtype, conv_impl,
                bn_unbiased_var, name="backbone")


def feature_dim(name: str, width: int) -> int:
  stages, block = ARCHITECTURES[name]
  return width * 2**(len(stages) - 1) * block.expansion
