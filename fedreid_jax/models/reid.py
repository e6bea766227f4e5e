"""The re-ID network: backbone -> GAP -> embedding block -> per-client classifier.

Parameter tree top-level keys: `backbone`, `embedding` (shared in FedPav) and
`classifier` (private to each client). The classifier is padded to the largest
client id count; logits past a client's own count are masked by the loss.

With `dtype="bfloat16"` the backbone computes in bfloat16; the pooled
features are cast to float32, so the embedding block, the classifier, the
re-ID features and the loss are float32 (they are a sliver of the compute).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from fedreid_jax.models import resnet

kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * nn.initializers.normal(1.0)(key, shape, dtype)


class EmbeddingBlock(nn.Module):
  """Dense(->embed_dim) -> BatchNorm1d -> Dropout(0.5), no ReLU. `[B, D] -> [B, E]`."""
  embed_dim: int = 512
  dropout: float = 0.5
  bn_unbiased_var: bool = False  # resnet.BatchNorm.unbiased_var

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.embed_dim, kernel_init=kaiming_fan_out,
                 bias_init=nn.initializers.zeros, name="dense")(x)
    x = resnet.BatchNorm(use_running_average=not train, scale_init=_bn_scale_init,
                         unbiased_var=self.bn_unbiased_var, name="bn")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class ReIDModel(nn.Module):
  """`[B, H, W, 3]` normalised images -> (features `[B, E]`, logits `[B, num_classes]`)."""
  backbone: str = "resnet50"
  width: int = 64
  last_stride: int = 2
  small_stem: bool = False
  embed_dim: int = 512
  dropout: float = 0.5
  num_classes: int = 1  # the largest client's id count (padding)
  dtype: str = "float32"  # backbone compute dtype: float32 | bfloat16
  conv_impl: str = "auto"  # conv lowering: auto | xla | patches (models/conv.py)
  bn_unbiased_var: bool = False  # every BatchNorm: PyTorch's running variance update

  def setup(self):
    self.backbone_net = resnet.make_backbone(
        self.backbone, self.width, self.last_stride, self.small_stem,
        resnet.compute_dtype(self.dtype), self.conv_impl, self.bn_unbiased_var)
    self.embedding = EmbeddingBlock(self.embed_dim, self.dropout, self.bn_unbiased_var,
                                    name="embedding")
    self.classifier = nn.Dense(self.num_classes,
                               kernel_init=nn.initializers.normal(0.001),
                               bias_init=nn.initializers.zeros, name="classifier")

  def embed(self, x, train: bool = False):
    fmap = self.backbone_net(x, train)
    return self.embedding(jnp.mean(fmap.astype(jnp.float32), axis=(1, 2)), train)

  def __call__(self, x, train: bool = True):
    feats = self.embed(x, train)
    return feats, self.classifier(feats)


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> ReIDModel:
  """The re-ID model of `config.model` with a classifier of `num_classes` ids
  (`model.bn_unbiased_variance` may be absent: exports written before it)."""
  return ReIDModel(backbone=model_cfg.backbone, width=model_cfg.width,
                   last_stride=model_cfg.last_stride, small_stem=model_cfg.small_stem,
                   embed_dim=model_cfg.embed_dim, dropout=model_cfg.dropout,
                   num_classes=num_classes, dtype=model_cfg.dtype,
                   conv_impl=model_cfg.conv_impl,
                   bn_unbiased_var=bool(model_cfg.get("bn_unbiased_variance", False)))
