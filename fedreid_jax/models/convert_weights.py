"""Converts torchvision ResNet weights to the Flax layout, once, so that later
runs need no PyTorch.

    python -m fedreid_jax.models.convert_weights --input resnet50-0676ba61.pth \\
        --output weights/resnet50_torchvision.npz

`--input`: torchvision's `.pth` (needs `pip install torch`), or the same keys
as `.safetensors` / `.npz`. `--output`: an `.npz` with the backbone's
variables in Flax layout (`params/conv1/kernel` `[kh, kw, I, O]`, ...,
`batch_stats/bn1/mean`; the ImageNet `fc` head dropped); point
`config.model.pretrained` at it. `--backbone` defaults to the architecture
the file's keys show (resnet18/34/50/101). The weights are checked against
that backbone (width 64, torchvision's 7x7 stem) before anything is written.
"""
from __future__ import annotations

import argparse
import sys

import ml_collections

from fedreid_jax.errors import UserError, WeightsFileError
from fedreid_jax.models import pretrained, resnet


def torchvision_config(backbone: str) -> ml_collections.ConfigDict:
  """The `config.model` fields the backbone's shapes depend on, as torchvision builds it."""
  return ml_collections.ConfigDict({"backbone": backbone, "width": 64, "last_stride": 2,
                                    "small_stem": False})


def convert_file(source: str, output: str, backbone: str | None = None) -> str:
  """Reads `source`, checks and converts it, writes `output`; returns the line to print."""
  weights = pretrained.read_weights(source)
  backbone = backbone or pretrained.guess_backbone(weights)
  if backbone is None:
    raise WeightsFileError(f"{source!r} holds no torchvision ResNet keys that match one of "
                           f"{sorted(resnet.ARCHITECTURES)}; pass --backbone to see which key "
                           "does not fit")
  model_cfg = torchvision_config(backbone)
  flat = pretrained.convert(weights, source, model_cfg)
  count = pretrained.save_converted(output, flat, backbone)
  params = sum(v.size for k, v in flat.items() if k[0] == "params")
  return (f"wrote {output}: {backbone} backbone, {count} arrays ({params:,} parameters plus "
          f"BatchNorm statistics; fc head dropped) from {source}. Use it with "
          f"--config.model.pretrained={output}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m fedreid_jax.models.convert_weights",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="torchvision weights: .pth, .safetensors or .npz")
  p.add_argument("--output", required=True, help="the converted .npz to write")
  p.add_argument("--backbone", choices=sorted(resnet.ARCHITECTURES), default=None,
                 help="default: the architecture the file's keys show")
  args = p.parse_args(argv)
  try:
    print(convert_file(args.input, args.output, args.backbone))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
