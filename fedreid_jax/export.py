"""The trained feature extractor without training state: save, load, use.

    from fedreid_jax import export
    model = export.load("runs/demo/export")            # written at the end of a run
    names, feats = model.embed_folder("my_images/")     # L2-normalised [N, 512]
    order = export.rank(feats[:1], feats)               # [1, N] gallery order, best first

A saved model is a folder: `model.json` (model config, image size, what it
was trained as) and `variables.msgpack` (backbone + embedding block params
and BatchNorm statistics; no classifier, no optimizer state). Features are
computed exactly as evaluation computes them: bicubic resize to the model's
size, f(img) + f(flip(img)), L2-normalised.

    python -m fedreid_jax.export --model runs/demo/export --query q/ --gallery g/ [--top 5]

prints, for each query image, the `--top` gallery images by cosine similarity.

    python -m fedreid_jax.export --model runs/demo/export --onnx reid.onnx [--onnx-batch 32]

writes the same feature extractor as an ONNX graph (`fedreid_jax.onnx_export`;
needs the `onnx` extra).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from fedreid_jax.data.images import read_rgb, resize_bicubic
from fedreid_jax.data.layouts import list_images
from fedreid_jax.errors import UserError
from fedreid_jax.evaluation import features as features_lib

from fedreid_jax.models.reid import build_model
from fedreid_jax.workdir import write_atomic

FORMAT = 1


def save(folder: str, model_cfg, image_size, variables, info: dict | None = None) -> str:
  """Writes `variables` ({"params", "batch_stats"} of backbone + embedding) to
  `folder`, each file atomically (`model.json` last)."""
  os.makedirs(folder, exist_ok=True)
  cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  meta = {"format": FORMAT, "model": cfg, "image_size": list(image_size), **(info or {})}
  host = jax.tree.map(np.asarray, variables)
  write_atomic(os.path.join(folder, "variables.msgpack"), serialization.msgpack_serialize(host))
  write_atomic(os.path.join(folder, "model.json"), json.dumps(meta, indent=2))
  return folder


@dataclasses.dataclass
class ExportedModel:
  """A loaded feature extractor: `features(images)` and `embed_folder(folder)`."""
  meta: dict
  variables: dict
  batch_size: int = 128

  def __post_init__(self):
    self.image_size = tuple(self.meta["image_size"])
    self.model = build_model(ml_collections.ConfigDict(self.meta["model"]), num_classes=1)
    self._embed = features_lib.make_embed_fn(self.model)

  def features(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[N, H, W, 3]` at the model's size -> unit-norm features `[N, E]`."""
    return np.asarray(features_lib.extract_features(self._embed, self.variables,
                                                    np.asarray(images, np.uint8),
                                                    self.batch_size))

  def embed_folder(self, folder: str | Path) -> tuple[list[str], np.ndarray]:
    """Every image file in `folder` (sorted), resized: (file names, features `[N, E]`)."""
    paths = list_images(Path(folder))
    if not paths:
      raise UserError(f"no images (.jpg, .jpeg, .png, .bmp) in {str(folder)!r}")
    images = np.stack([resize_bicubic(read_rgb(p), self.image_size) for p in paths])
    return [p.name for p in paths], self.features(images)


def load(folder: str | Path, batch_size: int = 128) -> ExportedModel:
  """Reads a folder written by `save`."""
  folder = Path(folder)
  if not (folder / "model.json").exists():
    raise UserError(f"{str(folder)!r} holds no exported model (no model.json); a run writes "
                    "one to <workdir>/export at its end")
  try:
    meta = json.loads((folder / "model.json").read_text())
    variables = serialization.msgpack_restore((folder / "variables.msgpack").read_bytes())
  except (OSError, ValueError) as e:  # ValueError: not JSON / not msgpack
    raise UserError(f"the exported model in {str(folder)!r} is damaged ({type(e).__name__}: "
                    f"{e}); export it again (a run writes <workdir>/export at its end)") from None
  found = meta.get("format") if isinstance(meta, dict) else None
  if found != FORMAT:
    raise UserError(f"the exported model in {str(folder)!r} has format {found!r}; this "
                    f"version of fedreid_jax reads format {FORMAT}: export it again with "
                    "this version (a run writes <workdir>/export at its end)")
  return ExportedModel(meta, jax.tree.map(jnp.asarray, variables), batch_size)


def rank(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """`[Q, E]`, `[G, E]` unit-norm features -> `[Q, G]` gallery indices, most similar first."""
  return np.argsort(-(np.asarray(query) @ np.asarray(gallery).T), axis=1, kind="stable")


def check_arguments(args: argparse.Namespace) -> None:
  """Raises UserError (one line) for a missing `--model`/`--query`/`--gallery`
  folder, a file given for one, a `--top` below 1; with `--onnx`, a negative
  `--onnx-batch` or an output whose folder does not exist or that is a folder."""
  if getattr(args, "onnx", None) is not None:
    parent = os.path.dirname(os.path.abspath(args.onnx))
    if os.path.isdir(args.onnx):
      raise UserError(f"--onnx {args.onnx!r} is a folder; pass a file name (model.onnx)")
    if not os.path.isdir(parent):
      raise UserError(f"--onnx {args.onnx!r}: its folder {parent!r} does not exist")
    if args.onnx_batch < 0:
      raise UserError(f"--onnx-batch {args.onnx_batch}: pass 0 (any batch size) or more")
  for flag in ("model", "query", "gallery"):
    path = getattr(args, flag)
    if path is None:  # --onnx: no query or gallery
      continue
    if not os.path.exists(path):
      raise UserError(f"--{flag} {path!r} does not exist; pass a folder")
    if not os.path.isdir(path):
      raise UserError(f"--{flag} {path!r} is a file; pass the folder that holds it")
  if args.top < 1:
    raise UserError(f"--top {args.top} lists no gallery image; pass 1 or more")


class OneLineParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (`error: ...`, status 2)."""

  def error(self, message):
    self.exit(2, f"error: {message}; see {self.prog} --help\n")


def main(argv=None) -> int:
  p = OneLineParser(prog="python -m fedreid_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="an exported model folder (<workdir>/export)")
  p.add_argument("--query", help="folder of query images (required unless --onnx)")
  p.add_argument("--gallery", help="folder of gallery images (required unless --onnx)")
  p.add_argument("--top", type=int, default=5, help="gallery images listed per query (>= 1)")
  p.add_argument("--onnx", metavar="FILE", help="write the model as an ONNX graph to FILE "
                 "(uint8 [N, H, W, 3] at the model's size -> unit-norm features) and stop")
  p.add_argument("--onnx-batch", type=int, default=0, metavar="B",
                 help="the ONNX graph's batch size: 0 (default) any N, one image at a time; "
                 "B a fixed batch of B, one batched pass (faster)")
  args = p.parse_args(argv)
  if args.onnx is None:
    missing = [f"--{flag}" for flag in ("query", "gallery") if getattr(args, flag) is None]
    if missing:
      p.error(f"the following arguments are required: {', '.join(missing)}")
  try:
    check_arguments(args)
    model = load(args.model)
    if args.onnx is not None:
      from fedreid_jax import onnx_export  # jax2onnx: an optional dependency
      onnx_export.to_onnx(model, args.onnx, args.onnx_batch)
      print(f"wrote {args.onnx}: input {onnx_export.INPUT!r} uint8 "
            f"[{args.onnx_batch or 'N'}, {model.image_size[0]}, {model.image_size[1]}, 3], "
            f"output {onnx_export.OUTPUT!r} float32 [{args.onnx_batch or 'N'}, "
            f"{model.meta['model']['embed_dim']}]")
      return 0
    q_names, q = model.embed_folder(args.query)
    g_names, g = model.embed_folder(args.gallery)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  sims = q @ g.T
  for i, order in enumerate(rank(q, g)):
    best = ", ".join(f"{g_names[j]} ({sims[i, j]:.3f})" for j in order[:args.top])
    print(f"{q_names[i]}: {best}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
