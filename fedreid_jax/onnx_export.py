"""The exported feature extractor as an ONNX graph, for onnxruntime and other runtimes.

    python -m fedreid_jax.export --model runs/demo/export --onnx reid.onnx [--onnx-batch 32]

The graph's input `images` is uint8 `[N, H, W, 3]` (RGB) at the model's size:
resize to `model.json`'s `image_size` first (the graph does not resize). The
ImageNet normalisation, both passes f(img) + f(flip(img)) and the L2
normalisation are in the graph, so its output `features` (float32 `[N, E]`)
is what `export.load(DIR).features(images)` returns (the tests hold it to
1e-4; in float32 it is ~1e-7 apart).

Batch size: with `--onnx-batch 0` (the default) N is free; the graph is then
an ONNX `Loop` over the images one at a time, because jax2onnx 0.17.1 cannot
lower a `Pad` (the stem's max pool) with a symbolic batch dimension. With
`--onnx-batch B` the graph takes exactly B images in one batched pass (pad a
short last batch): about 4x faster in onnxruntime on CPU (ResNet-50,
256x128, 8 images, a busy 2-core VM: 2.3 s batched, 9.4 s looped; JAX
`features` 1.7 s). Either graph file is ~99 MB for ResNet-50.

The conversion is jax2onnx's (an optional dependency: `pip install -e ".[onnx]"`).
The model is traced with `conv_impl="patches"`: jax2onnx turns every
`nn.Conv` into an ONNX `Conv` whatever the lowering, and its patched
`nn.max_pool` (the `"xla"` lowering) takes only "SAME"/"VALID" padding,
while the stem's pool pads 1 on each side; the `"patches"` pool is strided
slices and `Max`. The backbone computes in float32 even when the model was
trained in bfloat16 (its features then differ from `features` by bfloat16's
rounding).
"""
from __future__ import annotations

import importlib.metadata
import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from fedreid_jax.errors import UserError
from fedreid_jax.models.preprocess import l2_normalize, normalize
from fedreid_jax.models.reid import build_model
from fedreid_jax.workdir import write_atomic

INPUT, OUTPUT = "images", "features"
OPSET = 23  # jax2onnx's default; onnxruntime >= 1.24 runs it


def _converter():
  """jax2onnx and onnx_ir, or a one-line UserError naming the install command."""
  try:
    import jax2onnx
    import onnx_ir
    from onnx_ir.passes import common
  except ImportError as e:
    raise UserError(f"--onnx needs jax2onnx, which is not installed ({e}); "
                    "pip install -e \".[onnx]\"") from None
  return jax2onnx, onnx_ir, common


def features_fn(model):
  """uint8 `[B, H, W, 3]` -> unit-norm `[B, E]` of an `export.ExportedModel`, as
  `model.features` computes it (one pass over the images and their flips)."""
  cfg = ml_collections.ConfigDict(model.meta["model"])
  cfg.conv_impl, cfg.dtype = "patches", "float32"
  net = build_model(cfg, num_classes=1)
  variables = model.variables

  def features(images):
    x = normalize(images)
    n = x.shape[0]
    f = net.apply(variables, jnp.concatenate([x, x[:, :, ::-1]]), train=False,
                  method=type(net).embed)
    return l2_normalize(f[:n] + f[n:])
  return features


def _subgraphs(graph):
  for node in graph.node:
    for attr in node.attribute:
      yield from ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _names_read(graph) -> set[str]:
  """Every value name a node of `graph` or of a nested subgraph reads, and its outputs."""
  names = {o.name for o in graph.output}
  for node in graph.node:
    names.update(node.input)
  for sub in _subgraphs(graph):
    names |= _names_read(sub)
  return names


def _drop_unused_initializers(graph) -> None:
  """Removes the initializers nothing reads, in `graph` and its subgraphs (jax2onnx
  leaves some in a `Loop` body, and onnxruntime warns about each), and the
  value_info shape notes (a few contradict onnxruntime's inference, which warns)."""
  used = _names_read(graph)
  keep = [init for init in graph.initializer if init.name in used]
  del graph.initializer[:]
  graph.initializer.extend(keep)
  del graph.value_info[:]
  for sub in _subgraphs(graph):
    _drop_unused_initializers(sub)


def to_onnx(model, path: str, batch: int = 0) -> str:
  """Writes `model` (an `export.ExportedModel`) to `path` as ONNX: input
  `images` uint8 `[N, H, W, 3]` (N free when `batch` is 0, else `batch`),
  output `features` float32 `[N, E]`. Metadata: `image_size`, `embed_dim`,
  `fedreid_jax_format`. Returns `path`."""
  jax2onnx, onnx_ir, common = _converter()
  h, w = model.image_size
  features = features_fn(model)
  if batch:
    fn, shape = features, (batch, h, w, 3)
  else:  # one image at a time: a symbolic batch through lax.pad fails in jax2onnx
    fn = lambda images: jax.lax.map(lambda image: features(image[None])[0], images)  # noqa: E731
    shape = jax.export.symbolic_shape(f"N,{h},{w},3")
  ir_model = jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct(shape, jnp.uint8)],
                              model_name="fedreid_features", opset=OPSET, return_mode="ir",
                              input_names=[INPUT], output_names=[OUTPUT])
  common.RemoveUnusedNodesPass()(ir_model)
  proto = onnx_ir.serde.serialize_model(ir_model)
  _drop_unused_initializers(proto.graph)
  info = {"image_size": json.dumps([h, w]),
          "embed_dim": str(int(model.meta["model"]["embed_dim"])),
          "fedreid_jax_format": str(model.meta["format"]),
          "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}"}
  del proto.metadata_props[:]
  for key, value in info.items():
    proto.metadata_props.add(key=key, value=value)
  write_atomic(os.fspath(path), proto.SerializeToString())
  return os.fspath(path)
