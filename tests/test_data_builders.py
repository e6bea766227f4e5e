"""TFDS builders, prepare (CLI and library), loading, and the error messages."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fixtures as F
from fedreid_jax.data import __main__ as cli, builders, layouts, prepare, source, specs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Every dataset's fixture tree under one folder, all prepared once."""
  raw = tmp_path_factory.mktemp("raw")
  data = tmp_path_factory.mktemp("tfds")
  expected = {}
  for name, maker in (("market1501", F.make_market1501), ("dukemtmc", F.make_dukemtmc),
                      ("msmt17", F.make_msmt17_release), ("viper", F.make_viper),
                      ("cuhk01", F.make_cuhk01), ("prid2011", F.make_prid2011),
                      ("3dpes", F.make_3dpes), ("ilids", F.make_ilids),
                      ("cuhk02", F.make_cuhk02)):
    expected[name] = maker(raw)[1]
  _, expected["cuhk03_np_detected"], expected["cuhk03_np_labeled"] = F.make_cuhk03_np(raw)
  done, failed, kept = prepare.prepare_all(raw, data)
  assert not failed and not kept, (failed, kept)
  return raw, data, expected, {p.name: p for p in done}


def test_prepare_all_counts(built):
  _, data, expected, done = built
  assert set(done) == set(specs.ALL)
  for name, want in expected.items():
    for key, value in want.items():
      if key != "total_images":
        assert done[name].counts[key] == value, (name, key)
    assert builders.is_built(name, data)


def test_count_mismatch_is_a_clear_warning(built):
  _, _, _, done = built
  msgs = done["market1501"].mismatches
  assert "market1501: train images expected 12936 (the paper's table), found 12" in msgs
  assert not any(m.startswith("market1501: cameras") for m in msgs)  # 6 == 6
  assert all("expected" in m and "found" in m for m in msgs)


def test_records_and_metadata(built):
  raw, data, _, _ = built
  builder = builders.get_builder("viper", data)
  ds = builder.as_data_source("query")
  rec = ds[0]
  assert set(rec) == {"image", "pid", "camid", "filename"}
  assert rec["image"].dtype == np.uint8 and rec["image"].shape == (*F.SIZE, 3)
  meta = json.loads((builders.build_path("viper", data) / "metadata.json").read_text())
  assert meta["layout"] == "original" and meta["split"]["seed"] == 0
  assert meta["labels"]["query"]["filename"][0] == rec["filename"].decode()
  assert set(meta["split"]["test_ids"]) == set(meta["labels"]["query"]["pid"])


def test_load_prepared_client(built):
  raw, data, expected, _ = built
  c = source.load_prepared_client("Market", data)
  assert c.name == "market1501" and c.num_train_ids == expected["market1501"]["train_ids"]
  np.testing.assert_array_equal(np.unique(c.train.pids), np.arange(c.num_train_ids))
  assert (c.gallery.pids == -1).sum() == 2 and (c.gallery.pids == 0).sum() == 2
  img = c.gallery.read_image(3)
  assert img.dtype == np.uint8 and img.shape == (*F.SIZE, 3)
  original = layouts.list_market(raw / "Market-1501-v15.09.15")["gallery"]
  byname = {r.name: r for r in original}
  r = byname[c.gallery.names[3]]
  assert (r.pid, r.camid) == (c.gallery.pids[3], c.gallery.camids[3])
  from PIL import Image
  np.testing.assert_allclose(img, np.asarray(Image.open(r.path).convert("RGB")), atol=0)


def test_png_pixels_roundtrip_exactly(built):
  raw, data, _, _ = built
  c = source.load_prepared_client("cuhk03_np_detected", data)
  name = c.train.names[0]
  from PIL import Image
  want = np.asarray(Image.open(raw / "cuhk03-np" / "detected" / name).convert("RGB"))
  np.testing.assert_array_equal(c.train.read_image(0), want)
  bmp = source.load_prepared_client("viper", data)
  assert bmp.train.read_image(0).shape == (*F.SIZE, 3)  # BMP stored as PNG


def test_train_split_option_and_camera_quirk(built):
  _, data, _, _ = built
  full = source.load_prepared_client("msmt17", data)
  small = source.load_prepared_client("msmt17", data, train_split="train", seed=0)
  assert len(small.train) == len(full.train) - full.num_train_ids
  assert small.num_train_ids == full.num_train_ids
  stored = builders.get_builder("msmt17", data).info.metadata["reference_train_split"]
  assert set(stored["val_filenames"]) == set(full.train.names) - set(small.train.names)
  other = source.load_prepared_client("msmt17", data, train_split="train", seed=1)
  assert len(other.train) == len(small.train) and other.train.names != small.train.names
  assert full.info["cameras"] == 15 and full.gallery.camids.max() >= 9
  quirk = source.load_prepared_client("msmt17", data, first_digit_camera=True)
  assert quirk.gallery.camids.max() <= 8
  with pytest.raises(ValueError, match="train_split"):
    source.load_prepared_client("msmt17", data, train_split="val")


def test_public_set(built):
  _, data, expected, _ = built
  pub = source.load_public(data)
  assert len(pub) == expected["cuhk02"]["train_images"]
  assert set(np.unique(pub.camids)) == set(range(10))
  c = source.load_prepared_client("cuhk02", data)
  assert len(c.query) == 0 and len(c.gallery) == 0


def test_not_prepared_error_prints_command(tmp_path):
  with pytest.raises(source.NotPreparedError) as e:
    source.load_prepared_client("dukemtmc", tmp_path / "tfds")
  assert ("python -m fedreid_jax.data prepare --dataset dukemtmc --manual_dir "
          "/path/to/DukeMTMC-reID --data_dir " + str(tmp_path / "tfds")) in str(e.value)
  with pytest.raises(source.NotPreparedError, match="viper"):
    source.load_clients(["market1501", "viper"], tmp_path / "tfds")


def test_rebuild_refused_without_overwrite(built, tmp_path):
  raw, _, _, _ = built
  data = tmp_path / "tfds"
  prepare.prepare("viper", raw, data)
  before = source.load_prepared_client("viper", data).info["split_policy"]["test_ids"]
  with pytest.raises(prepare.AlreadyPreparedError, match="--overwrite"):
    prepare.prepare("viper", raw, data)
  assert builders.is_built("viper", data)
  again = prepare.prepare("viper", raw, data, overwrite=True, split_seed=3)
  after = source.load_prepared_client("viper", data).info["split_policy"]
  assert after["seed"] == 3 and after["test_ids"] != before and again.counts


def test_corrupt_image_stops_or_is_skipped(tmp_path):
  root, _ = F.make_viper(tmp_path / "raw")
  bad = root / "cam_b" / "999_0.bmp"
  bad.write_bytes(b"not an image")
  data = tmp_path / "tfds"
  with pytest.raises(builders.CorruptImageError) as e:
    prepare.prepare("viper", root, data)
  assert str(bad) in str(e.value) and "--skip_corrupt" in str(e.value)
  assert not builders.is_built("viper", data) and not (data / "viper").exists()
  done = prepare.prepare("viper", root, data, skip_corrupt=True)
  assert done.skipped == ["cam_b/999_0.bmp"]


def test_failed_overwrite_keeps_previous_build(tmp_path):
  root, _ = F.make_viper(tmp_path / "raw")
  data = tmp_path / "tfds"
  prepare.prepare("viper", root, data)
  (root / "cam_a" / "000_0.bmp").write_bytes(b"broken")
  with pytest.raises(builders.CorruptImageError):
    prepare.prepare("viper", root, data, overwrite=True)
  assert len(source.load_prepared_client("viper", data).train) > 0


def test_cli(tmp_path, capsys):
  F.make_viper(tmp_path / "raw")
  data = str(tmp_path / "tfds")
  assert cli.main(["prepare", "--dataset", "viper", "--manual_dir",
                   str(tmp_path / "raw"), "--data_dir", data]) == 0
  out = capsys.readouterr()
  assert "viper" in out.out and "warning: viper: train ids expected 316" in out.out
  assert cli.main(["prepare", "--dataset", "viper", "--manual_dir",
                   str(tmp_path / "raw"), "--data_dir", data]) == 1
  assert "--overwrite" in capsys.readouterr().err
  assert cli.main(["prepare", "--dataset", "market1501", "--manual_dir",
                   str(tmp_path / "raw"), "--data_dir", data]) == 1
  err = capsys.readouterr().err
  assert "market1501" in err and str(tmp_path / "raw") in err and "bounding_box_test" in err
  assert cli.main(["prepare", "--dataset", "nope", "--manual_dir", "x"]) == 1
  assert "known datasets" in capsys.readouterr().err
  assert cli.main(["prepare", "--dataset", "all", "--manual_dir", str(tmp_path / "raw"),
                   "--data_dir", data]) == 1  # viper already built, the rest missing
  out = capsys.readouterr()
  assert "error: msmt17:" in out.err and "kept: viper is already prepared" in out.out
  F.make_cuhk01(tmp_path / "raw")
  assert cli.main(["prepare", "--dataset", "viper,CUHK01", "--manual_dir",
                   str(tmp_path / "raw"), "--data_dir", data]) == 0
  out = capsys.readouterr().out
  assert "kept: viper" in out and "cuhk01" in out


@pytest.mark.slow
def test_paper_config_trains_a_round_on_prepared_data(built, tmp_path):
  """configs/fedreid_paper.py on prepared (fixture) datasets: TFDS data source ->
  grain -> serial strategy -> evaluation; only the model and sizes shrunk."""
  import fakes
  from fedreid_jax import train
  _, data, _, _ = built
  cfg = fakes.load_config("fedreid_paper")
  cfg.data.root = str(data)
  cfg.data.clients = ("market1501", "dukemtmc")
  cfg.data.image_size = (32, 16)
  cfg.model.backbone, cfg.model.width, cfg.model.embed_dim = "resnet_tiny", 4, 16
  cfg.model.pretrained = ""  # no ImageNet weights for the tiny backbone
  cfg.train.batch_size, cfg.train.pad = 4, 2
  cfg.fed.rounds, cfg.fed.chunk_steps = 1, 2
  cfg.eval.batch_size = 8
  assert cfg.fed.strategy == "serial" and not cfg.data.in_memory
  results = train.run(cfg, str(tmp_path / "run"))
  assert set(results["global"]) == {"market1501", "dukemtmc"}
  for per_client in results.values():
    for metrics in per_client.values():
      assert all(0.0 <= v <= 1.0 for v in metrics.values())
  record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
  assert record["train/steps"] == 12 // 4 + 18 // 4  # market 12, duke 18 training images
