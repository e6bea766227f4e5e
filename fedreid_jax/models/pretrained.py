"""ImageNet-pretrained ResNet weights (torchvision's layout) for the Flax backbone.

    variables = pretrained.load_backbone(config.model)
    # {"params": {"backbone": {...}}, "batch_stats": {"backbone": {...}}}

A weights file (`config.model.pretrained`) is either

- torchvision's: `resnet50-0676ba61.pth` (reading it needs torch), or the same
  keys in a `.safetensors` or `.npz` file; or
- converted (`python -m fedreid_jax.models.convert_weights`): an `.npz` in the
  Flax layout, keys `params/conv1/kernel`, ..., `batch_stats/bn1/mean`, plus
  `__backbone__` (the architecture's name); no torch needed to read it.

torchvision key <-> Flax variable of the `backbone` module (`torch_key` maps
the second column to the first):

| torchvision | Flax | shape |
|---|---|---|
| `conv1.weight` | `params/conv1/kernel` | `[O, I, kh, kw]` -> `[kh, kw, I, O]` |
| `bn1.weight`, `bn1.bias` | `params/bn1/scale`, `params/bn1/bias` | `[C]` |
| `bn1.running_mean`, `.running_var` | `batch_stats/bn1/mean`, `/var` | `[C]` |
| `layer2.0.conv2.weight` | `params/layer2_0/conv2/kernel` | as conv1 |
| `layer2.0.downsample.0` / `.1` | `layer2_0/downsample_conv` / `downsample_bn` | |
| `fc.*`, `*.num_batches_tracked` | dropped (ImageNet head, BN step counters) | |

The expected keys and shapes come from the configured backbone itself
(`backbone_shapes`), so every architecture in `resnet.ARCHITECTURES` maps
without a table per depth. A file that does not fit raises
`errors.WeightsFileError` naming the first mismatching key and the expected
shape, and which architecture the file looks like.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedreid_jax.errors import ConfigError, WeightsFileError
from fedreid_jax.models import resnet

FORMATS = (".pth", ".pt", ".safetensors", ".npz")
# torchvision's IMAGENET1K_V1 weights (the ResNets the FedReID paper started from).
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
DROPPED = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")
META_KEY = "__backbone__"
_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
           ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
           ("batch_stats", "var"): "running_var"}
_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")

FlaxKey = tuple  # (collection, *module path, leaf), e.g. ("params", "layer1_0", "conv1", "kernel")


def torch_key(key: FlaxKey) -> str:
  """`("params", "layer1_0", "downsample_conv", "kernel")` -> `"layer1.0.downsample.0.weight"`."""
  collection, *modules, leaf = key
  names = [_MODULES.get(m, m.replace("_", ".")) for m in modules]
  return ".".join(names + [_LEAVES[collection, leaf]])


def converted_key(key: FlaxKey) -> str:
  """`("params", "conv1", "kernel")` -> `"params/conv1/kernel"` (the converted `.npz` key)."""
  return "/".join(key)


def torch_shape(shape) -> tuple[int, ...]:
  """Flax shape -> torchvision's: conv kernel `[kh, kw, I, O]` -> `[O, I, kh, kw]`."""
  shape = tuple(shape)
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def to_flax_layout(array: np.ndarray) -> np.ndarray:
  """A torchvision array -> Flax layout, float32: `[O, I, kh, kw]` -> `[kh, kw, I, O]`."""
  array = np.asarray(array, np.float32)
  return np.ascontiguousarray(array.transpose(2, 3, 1, 0)) if array.ndim == 4 else array


def torchvision_order(name: str) -> tuple:
  """Sort key giving torchvision's state_dict order: conv1, bn1, layer1.0.conv1,
  layer1.0.bn1, ..., layer1.0.downsample.0, ...; weight, bias, running stats."""
  out = []
  for part in name.split("."):
    m = re.fullmatch(r"(conv|bn|layer)(\d+)", part)
    if m:
      out.append((int(m[2]) + (100 if m[1] == "layer" else 0), m[1] == "bn"))
    elif part.isdigit():
      out.append((int(part), False))
    elif part in _LEAF_ORDER:
      out.append((_LEAF_ORDER.index(part), False))
    else:  # downsample and anything unknown: after the block's own layers
      out.append((1000, False))
  return tuple(out)


def backbone_shapes(model_cfg) -> dict[FlaxKey, tuple[int, ...]]:
  """`{(collection, *path): shape}` of `model_cfg`'s backbone variables, in
  torchvision's order. Traced with `jax.eval_shape`: nothing is allocated."""
  net = resnet.make_backbone(model_cfg.backbone, model_cfg.width, model_cfg.last_stride,
                             model_cfg.small_stem)
  tree = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                         train=False))
  flat = {(collection, *path): tuple(leaf.shape)
          for collection in ("params", "batch_stats")
          for path, leaf in traverse_util.flatten_dict(tree[collection]).items()}
  return dict(sorted(flat.items(), key=lambda kv: torchvision_order(torch_key(kv[0]))))


def describe(model_cfg) -> str:
  """`model.backbone='resnet50' (width 64, small_stem False)`: what the file must fit."""
  return (f"model.backbone={model_cfg.backbone!r} (width {model_cfg.width}, "
          f"small_stem {model_cfg.small_stem})")


def _read_pth(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise WeightsFileError(
        f"reading {path!r} needs PyTorch: `pip install torch` (the CPU build is enough), or "
        "convert it where torch is installed: python -m fedreid_jax.models.convert_weights "
        f"--input {path} --output weights/<name>.npz") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise WeightsFileError(f"{path!r} holds a {type(obj).__name__}, not a state_dict")
  return {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file
  except ImportError:
    raise WeightsFileError(f"reading {path!r} needs `pip install safetensors`") from None
  return load_file(path)


def _read_npz(path: str) -> dict:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


READERS = {".pth": _read_pth, ".pt": _read_pth, ".safetensors": _read_safetensors,
           ".npz": _read_npz}


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A weights file (FORMATS) -> `{key: array}` as stored (a DataParallel
  `module.` prefix removed). Raises WeightsFileError."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in READERS:
    raise WeightsFileError(f"{path!r}: unknown weights format {ext!r}; use one of {list(FORMATS)}")
  if not os.path.isfile(path):
    raise WeightsFileError(f"weights file {path!r} does not exist")
  try:
    weights = READERS[ext](path)
  except WeightsFileError:
    raise
  except Exception as e:  # truncated download, wrong file renamed, ...
    raise WeightsFileError(f"cannot read {path!r} as {ext}: {type(e).__name__}: {e}; "
                           "download it again") from e
  if weights and all(k.startswith("module.") for k in weights):
    weights = {k[len("module."):]: v for k, v in weights.items()}
  return weights


def is_converted(weights: dict) -> bool:
  """Whether `weights` is in the converted Flax layout (keys `params/...`)."""
  return any(k.startswith(("params/", "batch_stats/")) for k in weights)


def guess_backbone(weights: dict) -> str | None:
  """The ARCHITECTURES name whose stage sizes and block type the keys show, or None."""
  if META_KEY in weights:
    return str(weights[META_KEY])
  sizes = {}
  for key in weights:
    m = re.match(r"layer(\d+)[._](\d+)[./]", key) or re.match(r"\w+/layer(\d+)_(\d+)/", key)
    if m:
      sizes[int(m[1])] = max(sizes.get(int(m[1]), 0), int(m[2]) + 1)
  stages = [sizes.get(s, 0) for s in range(1, max(sizes, default=0) + 1)]
  bottleneck = any(re.search(r"conv3[./]", k) for k in weights)
  for name, (arch_stages, block) in resnet.ARCHITECTURES.items():
    if list(arch_stages) == stages and (block is resnet.Bottleneck) == bottleneck:
      return name
  return None


def check_fits(weights: dict, expected: dict[str, tuple], path: str, model_cfg,
               ignore=DROPPED) -> None:
  """Raises WeightsFileError naming the first key of `expected` (in order) that
  `weights` lacks or holds in another shape, else the first key it holds that
  is neither expected nor matched by `ignore`."""
  problem = None
  for key, shape in expected.items():
    if key not in weights:
      problem = f"has no key {key!r} (expected shape {shape})"
    elif tuple(weights[key].shape) != shape:
      problem = f"key {key!r} has shape {tuple(weights[key].shape)}, expected {shape}"
    if problem:
      break
  if problem is None:
    extra = sorted((k for k in weights if k not in expected and not ignore.search(k)),
                   key=lambda k: torchvision_order(k.replace("/", ".")))
    if not extra:
      return
    problem = f"key {extra[0]!r} is not in the model ({len(extra)} such keys)"
  guess = guess_backbone(weights)
  fix = f"set model.backbone={guess!r}" if guess else "check that it is a ResNet's weights"
  other = (f", or for {model_cfg.backbone}: {missing_hint(model_cfg.backbone)}"
           if model_cfg.backbone in TORCHVISION_URLS else "")
  raise WeightsFileError(
      f"weights file {path!r} does not fit {describe(model_cfg)}: {problem}; the file looks "
      f"like {guess or f'none of {sorted(resnet.ARCHITECTURES)}'}. Either {fix} (torchvision's "
      f"weights need model.width=64 and model.small_stem=False){other}")


def convert(weights: dict, path: str, model_cfg) -> dict[FlaxKey, np.ndarray]:
  """File contents (torchvision or converted) -> `{(collection, *path): float32
  array}` in Flax layout, checked against `model_cfg`'s backbone."""
  shapes = backbone_shapes(model_cfg)
  if is_converted(weights):
    names = {key: converted_key(key) for key in shapes}
    check_fits(weights, {names[k]: s for k, s in shapes.items()}, path, model_cfg,
               ignore=re.compile("^__"))
    return {key: np.asarray(weights[names[key]], np.float32) for key in shapes}
  names = {key: torch_key(key) for key in shapes}
  check_fits(weights, {names[k]: torch_shape(s) for k, s in shapes.items()}, path, model_cfg)
  return {key: to_flax_layout(weights[names[key]]) for key in shapes}


def to_variables(flat: dict[FlaxKey, np.ndarray], module: str = "backbone") -> dict:
  """`{(collection, *path): array}` -> `{"params": {module: ...}, "batch_stats": {module: ...}}`."""
  out = {}
  for collection in ("params", "batch_stats"):
    sub = {tuple(k[1:]): v for k, v in flat.items() if k[0] == collection}
    out[collection] = {module: traverse_util.unflatten_dict(sub)}
  return out


def load_backbone(model_cfg) -> dict:
  """`model_cfg.pretrained`'s weights as backbone variables (`to_variables`)."""
  check_file(model_cfg)
  path = model_cfg.pretrained
  return to_variables(convert(read_weights(path), path, model_cfg))


def save_converted(path: str, flat: dict[FlaxKey, np.ndarray], backbone: str) -> int:
  """Writes the converted `.npz` (keys `converted_key`, plus META_KEY); returns
  the number of arrays. Written to a temporary file first, then renamed."""
  if not path.endswith(".npz"):
    raise WeightsFileError(f"output {path!r} must end in .npz")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path[:-len(".npz")] + ".partial.npz"
  np.savez(tmp, **{converted_key(k): v for k, v in flat.items()},
           **{META_KEY: np.array(backbone)})
  os.replace(tmp, path)
  return len(flat)


def missing_hint(backbone: str | None, output: str | None = None) -> str:
  """Where torchvision's weights for `backbone` are and the command converting
  them to `output` (a `.npz`; default `weights/<backbone>_torchvision.npz`)."""
  backbone = backbone if backbone in TORCHVISION_URLS else "resnet50"
  url = TORCHVISION_URLS[backbone]
  if not (output or "").endswith(".npz"):
    output = f"weights/{backbone}_torchvision.npz"
  return (f"download {url} and convert it: python -m fedreid_jax.models.convert_weights "
          f"--input {url.rsplit('/', 1)[1]} --output {output}")


def missing_message(path: str, backbone: str | None) -> str:
  """The one line for a `model.pretrained` file that does not exist."""
  return (f"model.pretrained={path!r} does not exist; {missing_hint(backbone, path)} (docs/data.md, "
          "'Pretrained backbones'), or set model.pretrained='' to start from random weights")


def check_file(model_cfg) -> None:
  """Raises ConfigError unless `model_cfg.pretrained` names an existing file of
  a known format (cheap: the contents are checked when the model is built)."""
  path = model_cfg.pretrained
  if not isinstance(path, str):
    raise ConfigError(f"config.model.pretrained={path!r} must be a file path or ''")
  if os.path.splitext(path)[1].lower() not in READERS:
    raise ConfigError(f"config.model.pretrained={path!r}: unknown weights format; use one of "
                      f"{list(FORMATS)}")
  if not os.path.isfile(path):
    raise ConfigError(missing_message(path, model_cfg.backbone))
