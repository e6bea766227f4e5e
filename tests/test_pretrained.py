"""ImageNet-pretrained backbones from torchvision-layout files: the key
mapping per depth, numerical equivalence with a plain-torch ResNet,
BatchNorm's running variance, the converter, and the errors a wrong or
missing file gives. Tests marked `torch` skip (reason printed) without it."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import ml_collections

import fakes
from fedreid_jax import config_lib, experiment, train
from fedreid_jax.errors import ConfigError, WeightsFileError
from fedreid_jax.federated import rounds
from fedreid_jax.models import convert_weights, pretrained, resnet

NO_TORCH = ("torch is not installed (`pip install torch==2.13.0` installs its CPU build): "
            "the torch equivalence checks are skipped")
# Parameters without the ImageNet fc head, and (key count incl. BN statistics):
# torchvision's resnet18/34/50/101 have 11,689,512 / 21,797,672 / 25,557,032 /
# 44,549,160 parameters, fc 513,000 (512-d) or 2,049,000 (2048-d).
DEPTHS = {"resnet18": (11_176_512, 100), "resnet34": (21_284_672, 180),
          "resnet50": (23_508_032, 265), "resnet101": (42_500_160, 520)}


def needs_torch():
  return pytest.importorskip("torch", reason=NO_TORCH)


def model_cfg(backbone="resnet50", last_stride=2, pretrained_path="", width=64):
  return ml_collections.ConfigDict(dict(backbone=backbone, width=width, last_stride=last_stride,
                                        small_stem=False, pretrained=pretrained_path))


def zeros_checkpoint(backbone: str) -> dict:
  """{torch key: zeros} of `backbone`, plus the fc head (lazily allocated)."""
  shapes = pretrained.backbone_shapes(model_cfg(backbone))
  state = {pretrained.torch_key(k): np.zeros(pretrained.torch_shape(s), np.float32)
           for k, s in shapes.items()}
  return {**state, "fc.weight": np.zeros((1000, 8), np.float32)}


@pytest.mark.parametrize("backbone", sorted(DEPTHS))
def test_key_mapping_and_shapes_per_depth(backbone):
  shapes = pretrained.backbone_shapes(model_cfg(backbone))
  params, count = DEPTHS[backbone]
  assert sum(int(np.prod(s)) for k, s in shapes.items() if k[0] == "params") == params
  assert len(shapes) == count
  names = {pretrained.torch_key(k): pretrained.torch_shape(s) for k, s in shapes.items()}
  assert list(names)[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                             "bn1.running_var", "layer1.0.conv1.weight"]
  assert names["conv1.weight"] == (64, 3, 7, 7)
  assert shapes["params", "conv1", "kernel"] == (7, 7, 3, 64)  # HWIO
  assert shapes["batch_stats", "layer4_0", "downsample_bn", "var"] == names[
      "layer4.0.downsample.1.running_var"]
  if backbone in ("resnet18", "resnet34"):  # BasicBlock: no downsample in layer1
    assert "layer1.0.downsample.0.weight" not in names
    assert names["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert names["layer1.0.conv1.weight"] == (64, 64, 3, 3)
  else:  # Bottleneck v1.5: the stride sits in conv2 (3x3)
    assert names["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert names["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert names["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
  assert pretrained.guess_backbone(zeros_checkpoint(backbone)) == backbone


@pytest.mark.parametrize("backbone", sorted(DEPTHS))
def test_mapping_covers_torchvisions_state_dict(backbone):
  needs_torch()
  import torch_resnet
  state = torch_resnet.ResNet(backbone).state_dict()
  kept = {k: tuple(v.shape) for k, v in state.items() if not pretrained.DROPPED.search(k)}
  shapes = pretrained.backbone_shapes(model_cfg(backbone))
  assert {pretrained.torch_key(k): pretrained.torch_shape(s) for k, s in shapes.items()} == kept
  assert list(kept) == [pretrained.torch_key(k) for k in shapes]  # torchvision's order


@pytest.mark.parametrize("backbone, last_stride", [
    ("resnet18", 2), ("resnet18", 1), ("resnet50", 2), ("resnet50", 1)])
def test_converted_backbone_computes_what_torch_computes(tmp_path, backbone, last_stride):
  """Random torchvision-layout weights and BatchNorm statistics, exported from
  plain torch, loaded here: the pooled features of two 128x64 images agree in
  eval mode to 1e-4 of the largest feature. Observed (2-core EPYC): max error
  / scale 2.9e-6 (ResNet-18, stride 2), 1.6e-6 (18, 1), 2.6e-5 (50, 2), 1.7e-5
  (50, 1); torch's own float32 result is 2.1e-6 / 1.4e-6 / 3.0e-5 / 1.7e-5
  from its float64 result, so the difference is float32 rounding."""
  torch = needs_torch()
  import torch_resnet
  net = torch_resnet.randomized(backbone, last_stride)
  images = torch.randn(2, 3, 128, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = net.features(images).numpy()
  path = tmp_path / "weights.pth"
  torch.save(net.state_dict(), path)
  variables = pretrained.load_backbone(model_cfg(backbone, last_stride, str(path)))
  net_jax = resnet.make_backbone(backbone, 64, last_stride, False, conv_impl="auto")
  fmap = jax.jit(lambda v, x: net_jax.apply(v, x, train=False))(
      {k: v["backbone"] for k, v in variables.items()},
      jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  assert fmap.shape[1:3] == ((4, 2) if last_stride == 2 else (8, 4))
  got = np.asarray(jnp.mean(fmap, axis=(1, 2)))
  assert got.shape == want.shape == (2, resnet.feature_dim(backbone, 64))
  scale = np.abs(want).max()
  assert 0.1 < scale < 100 and np.abs(want[0] - want[1]).max() > 0.1 * scale
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_formats_and_converter_give_the_same_variables(tmp_path, capsys):
  cfg = model_cfg("resnet18")
  state = fakes.fake_torchvision_weights(tmp_path / "r18.safetensors", cfg)
  np.savez(tmp_path / "r18.npz", **{f"module.{k}": v for k, v in state.items()})  # DataParallel
  out = tmp_path / "converted" / "r18.npz"
  assert convert_weights.main(["--input", str(tmp_path / "r18.safetensors"),
                               "--output", str(out)]) == 0
  line = capsys.readouterr().out
  assert line.startswith(f"wrote {out}: resnet18 backbone, 100 arrays (11,176,512 parameters")
  loaded = [pretrained.load_backbone(model_cfg("resnet18", pretrained_path=str(p)))
            for p in (tmp_path / "r18.safetensors", tmp_path / "r18.npz", out)]
  for other in loaded[1:]:
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded[0], other))
  bb = loaded[0]
  np.testing.assert_array_equal(bb["params"]["backbone"]["layer2_0"]["downsample_conv"]["kernel"],
                                state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb["params"]["backbone"]["bn1"]["scale"], state["bn1.weight"])
  np.testing.assert_array_equal(bb["batch_stats"]["backbone"]["layer4_1"]["bn2"]["var"],
                                state["layer4.1.bn2.running_var"])
  assert set(bb) == {"params", "batch_stats"} and set(bb["params"]) == {"backbone"}


def test_pth_through_the_converter(tmp_path, capsys):
  torch = needs_torch()
  import torch_resnet
  net = torch_resnet.randomized("resnet18")
  torch.save(net.state_dict(), tmp_path / "resnet18-f37072fd.pth")
  assert convert_weights.main(["--input", str(tmp_path / "resnet18-f37072fd.pth"),
                               "--output", str(tmp_path / "r18.npz")]) == 0
  got = pretrained.load_backbone(model_cfg("resnet18", pretrained_path=str(tmp_path / "r18.npz")))
  np.testing.assert_array_equal(got["params"]["backbone"]["conv1"]["kernel"],
                                net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got["batch_stats"]["backbone"]["bn1"]["mean"],
                                net.bn1.running_mean.numpy())


@pytest.mark.parametrize("file_depth, config, message", [
    ("resnet50", "resnet18", "key 'layer1.0.conv1.weight' has shape (64, 64, 1, 1), "
     "expected (64, 64, 3, 3); the file looks like resnet50. Either set "
     "model.backbone='resnet50'"),
    ("resnet18", "resnet34", "has no key 'layer1.2.conv1.weight' (expected shape "
     "(64, 64, 3, 3)); the file looks like resnet18"),
    ("resnet101", "resnet50", "key 'layer3.6.conv1.weight' is not in the model (255 such "
     "keys); the file looks like resnet101"),
])
def test_a_file_of_another_depth_names_the_first_mismatching_key(file_depth, config, message):
  with pytest.raises(WeightsFileError) as err:
    pretrained.convert(zeros_checkpoint(file_depth), "w.pth", model_cfg(config))
  assert message in str(err.value)
  assert f"model.backbone='{config}' (width 64" in str(err.value)
  assert "download https://download.pytorch.org/models/" in str(err.value)


def test_other_width_converted_file_and_unreadable_file_errors(tmp_path, monkeypatch):
  with pytest.raises(WeightsFileError, match=r"key 'conv1.weight' has shape \(64, 3, 7, 7\), "
                     r"expected \(32, 3, 7, 7\)"):
    pretrained.convert(zeros_checkpoint("resnet18"), "w.pth", model_cfg("resnet18", width=32))
  flat = pretrained.convert(zeros_checkpoint("resnet18"), "w.pth", model_cfg("resnet18"))
  pretrained.save_converted(str(tmp_path / "r18.npz"), flat, "resnet18")
  cfg = model_cfg("resnet34", pretrained_path=str(tmp_path / "r18.npz"))
  with pytest.raises(WeightsFileError, match=r"has no key 'params/layer1_2/conv1/kernel' "
                     r"\(expected shape \(3, 3, 64, 64\)\); the file looks like resnet18"):
    pretrained.load_backbone(cfg)
  (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(WeightsFileError, match="cannot read .*cut.npz.* download it again"):
    pretrained.read_weights(str(tmp_path / "cut.npz"))
  (tmp_path / "w.pth").write_bytes(b"")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if not installed
  with pytest.raises(WeightsFileError, match=r"needs PyTorch: `pip install torch`.*"
                     r"convert_weights --input .*w\.pth"):
    pretrained.read_weights(str(tmp_path / "w.pth"))


def test_missing_or_unknown_file_fails_before_data_loading(tmp_path, capsys):
  paper = fakes.load_config("fedreid_paper")
  assert paper.model.pretrained == "weights/resnet50_torchvision.npz"
  assert paper.model.bn_unbiased_variance
  paper.model.pretrained = str(tmp_path / "weights" / "resnet50_torchvision.npz")
  paper.data.root = str(tmp_path / "no_data")  # loading data would fail differently
  for run in (train.run, experiment.run):
    with pytest.raises(ConfigError) as err:
      run(paper, str(tmp_path / "run"))
    msg = str(err.value)
    assert msg.startswith(f"model.pretrained='{paper.model.pretrained}' does not exist; "
                          "download https://download.pytorch.org/models/resnet50-0676ba61.pth")
    assert (f"python -m fedreid_jax.models.convert_weights --input resnet50-0676ba61.pth "
            f"--output {paper.model.pretrained}") in msg
  paper.model.pretrained = "resnet50.h5"
  with pytest.raises(ConfigError, match="unknown weights format; use one of"):
    config_lib.validate(paper)
  assert convert_weights.main(["--input", str(tmp_path / "nope.pth"), "--output",
                               str(tmp_path / "x.npz")]) == 1
  assert capsys.readouterr().err.strip() == f"error: weights file '{tmp_path}/nope.pth' does not exist"
  assert fakes.load_config("synthetic").model.pretrained == ""


def test_experiment_starts_server_and_every_client_from_the_loaded_backbone(tmp_path):
  cfg = fakes.tiny_config()
  state = fakes.fake_torchvision_weights(tmp_path / "tiny.npz", cfg.model)
  scratch = train.Experiment(cfg, fakes.fake_clients())
  cfg.model.pretrained = str(tmp_path / "tiny.npz")
  config_lib.validate(cfg)
  exp = train.Experiment(cfg, fakes.fake_clients())
  want = np.asarray(state["layer2.0.conv1.weight"]).transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(exp.server.params["backbone"]["layer2_0"]["conv1"]["kernel"], want)
  stacked = exp.clients.params["backbone"]["layer2_0"]["conv1"]["kernel"]
  assert stacked.shape == (3, *want.shape)
  np.testing.assert_array_equal(stacked, np.broadcast_to(want, stacked.shape))
  np.testing.assert_array_equal(exp.clients.batch_stats["backbone"]["bn1"]["var"],
                                np.broadcast_to(state["bn1.running_var"], (3, 4)))
  for tree in ("params", "batch_stats"):  # the embedding block and classifiers keep their init
    for part in ("embedding", "classifier"):
      a, b = getattr(exp.clients, tree).get(part), getattr(scratch.clients, tree).get(part)
      assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert jax.tree.all(jax.tree.map(lambda x: not np.any(x), exp.clients.opt_state))
  selected = exp.stages.broadcast(exp.server, exp.clients, jnp.arange(3))
  np.testing.assert_array_equal(selected.params["backbone"]["layer2_0"]["conv1"]["kernel"], stacked)
  variables = rounds.global_variables(exp.server)
  assert variables["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 4)


def _bn_step(unbiased: bool, x, stats):
  """One train-mode step of resnet.BatchNorm on NHWC `x`: (output, new batch_stats)."""
  bn = resnet.BatchNorm(use_running_average=False, unbiased_var=unbiased)
  params = {"scale": jnp.full((x.shape[-1],), 1.5), "bias": jnp.full((x.shape[-1],), 0.2)}
  y, new = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
  return np.asarray(y), jax.tree.map(np.asarray, new["batch_stats"])


def test_bn_running_variance_biased_by_default_unbiased_as_option():
  """n = 4 x 3 x 2 = 24 values per channel: PyTorch's running variance moves
  towards var * 24 / 23; Flax's (the default, bit-identical to nn.BatchNorm)
  towards var; the normalised output is the same either way."""
  x = jax.random.normal(jax.random.key(0), (4, 3, 2, 5)) * 2.0 + 1.0
  stats = {"mean": jnp.linspace(-1, 1, 5), "var": jnp.linspace(0.5, 2, 5)}
  flat = np.asarray(x, np.float64).reshape(-1, 5)
  y_flax, flax_stats = _bn_step(False, x, stats)
  y_torch, torch_stats = _bn_step(True, x, stats)
  np.testing.assert_allclose(flax_stats["var"], 0.9 * stats["var"] + 0.1 * flat.var(0), rtol=1e-6)
  np.testing.assert_allclose(torch_stats["var"], 0.9 * stats["var"] + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-6)
  np.testing.assert_array_equal(torch_stats["mean"], flax_stats["mean"])
  np.testing.assert_array_equal(y_torch, y_flax)
  reference = __import__("flax").linen.BatchNorm(use_running_average=False, momentum=0.9,
                                                 epsilon=1e-5)
  y_ref, ref = reference.apply({"params": {"scale": jnp.full((5,), 1.5),
                                           "bias": jnp.full((5,), 0.2)},
                                "batch_stats": stats}, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y_flax, y_ref)
  np.testing.assert_array_equal(flax_stats["var"], ref["batch_stats"]["var"])


def test_bn_unbiased_option_matches_torch_batchnorm_in_train_mode():
  """ResNet-18 in train mode on 4 images of 64x32 (layer4's map is 2x1, so
  n = 8 and n / (n - 1) = 1.14): after one forward, every BatchNorm's running
  mean and variance equal PyTorch's with the option on, and not without it."""
  torch = needs_torch()
  import torch_resnet
  net = torch_resnet.randomized("resnet18")
  images = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(2))
  state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
  flat = pretrained.convert(state, "w", model_cfg("resnet18"))
  variables = {k: v["backbone"] for k, v in pretrained.to_variables(flat).items()}
  net.train()
  with torch.no_grad():
    net.features(images)
  want = pretrained.convert({k: v.numpy() for k, v in net.state_dict().items()}, "w",
                            model_cfg("resnet18"))
  x = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
  for unbiased in (True, False):
    net_jax = resnet.make_backbone("resnet18", 64, 2, False, bn_unbiased_var=unbiased)
    _, new = jax.jit(lambda v, x: net_jax.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    got = {("batch_stats", *k): np.asarray(v) for k, v in
           __import__("flax").traverse_util.flatten_dict(new["batch_stats"]).items()}
    var = ("batch_stats", "layer4_1", "bn2", "var")
    if unbiased:
      for key, value in got.items():
        np.testing.assert_allclose(value, want[key], rtol=1e-4, atol=1e-5, err_msg=str(key))
    else:
      assert not np.allclose(got[var], want[var], rtol=1e-3)


def test_bn_option_reaches_every_batchnorm_of_the_model():
  """`model.bn_unbiased_variance` through build_model: with the same variables
  and batch, each running variance is the biased update plus (new - 0.9 old) /
  (n - 1): n = 8 for the embedding block (batch 8), 8 x 16 x 8 for the stem."""
  from fedreid_jax.models.reid import build_model
  cfg = fakes.tiny_config()
  x = jax.random.normal(jax.random.key(0), (8, 32, 16, 3))
  shapes = jax.eval_shape(lambda: build_model(cfg.model, 3).init(jax.random.key(1), x,
                                                                  train=False))
  rng = np.random.default_rng(0)  # positive values: valid BatchNorm variances too
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)
  out = {}
  for unbiased in (False, True):
    cfg.model.bn_unbiased_variance = unbiased
    model = build_model(cfg.model, 3)
    out[unbiased] = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}))(
            variables, x)[1]["batch_stats"]
  for path, n in ((("embedding", "bn"), 8), (("backbone", "bn1"), 8 * 16 * 8)):
    old = variables["batch_stats"][path[0]][path[1]]["var"]
    biased, unbiased = (np.asarray(out[u][path[0]][path[1]]["var"]) for u in (False, True))
    np.testing.assert_allclose(unbiased, biased + (biased - 0.9 * old) / (n - 1), rtol=1e-6)
  cfg.model = ml_collections.ConfigDict({**cfg.model.to_dict(), "bn_unbiased_variance": "yes"})
  with pytest.raises(ConfigError, match="model.bn_unbiased_variance='yes' is not valid"):
    config_lib.validate(cfg)
