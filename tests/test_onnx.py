"""`python -m fedreid_jax.export --onnx`: the ONNX graph gives `export.load(DIR).features`."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from fedreid_jax import export
from fedreid_jax.models.reid import build_model

jax2onnx = pytest.importorskip("jax2onnx", reason="jax2onnx not installed (the onnx extra; "
                               "CI installs it with .[test])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (the onnx extra)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A random tiny model (32x16 images, width 4, 16-d features), BatchNorm
  statistics random too, saved as a run saves its export. The values are drawn
  with numpy on `eval_shape`'s shapes: compiling `init` takes ~20 s on CPU."""
  cfg = fakes.tiny_config()
  net = build_model(cfg.model, num_classes=1)
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, *cfg.data.image_size, 3)), train=False))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":  # He-normal: activations keep their scale through the layers
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 2.0, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.2, shape)
    return value.astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  params = {k: v for k, v in variables["params"].items() if k != "classifier"}
  folder = tmp_path_factory.mktemp("onnx") / "export"
  export.save(str(folder), cfg.model, cfg.data.image_size,
              {"params": params, "batch_stats": variables["batch_stats"]}, {"algorithm": "fedpav"})
  return folder


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 16, 3), dtype=np.uint8)


def _session(path):
  return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_graph_gives_the_exported_models_features_for_any_batch(model_dir, tmp_path, capsys):
  out = tmp_path / "reid.onnx"
  assert export.main(["--model", str(model_dir), "--onnx", str(out)]) == 0
  assert "uint8 [N, 32, 16, 3]" in capsys.readouterr().out
  sess = _session(out)
  (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
  assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 16, 3])
  assert outp.name == "features" and not isinstance(inp.shape[0], int)
  meta = sess.get_modelmeta().custom_metadata_map
  assert json.loads(meta["image_size"]) == [32, 16] and meta["embed_dim"] == "16"
  model = export.load(model_dir)
  for n, seed in ((1, 1), (5, 2)):
    images = _images(n, seed)
    got = sess.run(None, {"images": images})[0]
    assert got.shape == (n, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, model.features(images), atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_onnx_graph_with_a_fixed_batch(model_dir, tmp_path):
  out = tmp_path / "reid4.onnx"
  assert export.main(["--model", str(model_dir), "--onnx", str(out), "--onnx-batch", "4"]) == 0
  sess = _session(out)
  assert sess.get_inputs()[0].shape == [4, 32, 16, 3]
  images = _images(4, 3)
  got = sess.run(None, {"images": images})[0]
  np.testing.assert_allclose(got, export.load(model_dir).features(images), atol=1e-4)
  # a flipped image has the same features (f(img) + f(flip(img)) is in the graph)
  np.testing.assert_allclose(sess.run(None, {"images": images[:, :, ::-1].copy()})[0], got,
                             atol=1e-5)


@pytest.mark.parametrize("case", ["no-model", "other-format", "onnx-is-a-folder",
                                  "negative-batch"])
def test_onnx_export_refuses_bad_input_in_one_line(case, model_dir, tmp_path, capsys):
  model, out, extra = str(model_dir), str(tmp_path / "m.onnx"), []
  if case == "no-model":
    model, says = str(tmp_path / "nowhere"), "--model"
  elif case == "other-format":
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((model_dir / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "format": 99}))
    (other / "variables.msgpack").write_bytes((model_dir / "variables.msgpack").read_bytes())
    model, says = str(other), "has format 99; this version of fedreid_jax reads format 1"
  elif case == "onnx-is-a-folder":
    out, says = str(tmp_path), "is a folder"
  else:
    extra, says = ["--onnx-batch", "-1"], "--onnx-batch -1"
  assert export.main(["--model", model, "--onnx", out, *extra]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
  assert not (tmp_path / "m.onnx").exists()


def test_without_onnx_query_and_gallery_are_still_required(model_dir, capsys):
  with pytest.raises(SystemExit) as e:
    export.main(["--model", str(model_dir), "--gallery", str(model_dir)])
  assert e.value.code == 2
  assert "the following arguments are required: --query" in capsys.readouterr().err
