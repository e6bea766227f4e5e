"""Market-1501 folder reader on a hand-built tiny tree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedreid_jax.data.market_folder import load_market_folder, load_market_split, read_rgb

TREE = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.png",
                           "0007_c12s3_000100_00.png", "-1_c1s1_000001_00.jpg",
                           "0010_c6s2_000300_02.png"],
    "query": ["0003_c1s1_001051_00.png", "0003_c2s1_001052_00.png"],
    "bounding_box_test": ["0003_c3s1_001100_01.png", "0000_c1s1_000151_01.png",
                          "-1_c2s1_000020_00.png", "0004_c15s1_000010_00.png"],
}


def _image(seed: int, size=(8, 4)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def build_tree(root: Path, sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
  """Writes TREE under root (PNG lossless; JPEG written too); returns name -> pixels."""
  written = {}
  for k, (folder, names) in enumerate(TREE.items()):
    (root / folder).mkdir(parents=True)
    for i, name in enumerate(names):
      img = _image(10 * k + i, (sizes or {}).get(name, (8, 4)))
      Image.fromarray(img).save(root / folder / name)
      written[name] = img
  (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
  return written


def test_train_split_drops_junk_and_relabels(tmp_path):
  build_tree(tmp_path)
  c = load_market_folder(tmp_path, "tiny")
  # Sorted names: -1 (dropped), 0002 c1, 0002 c2, 0007 c12, 0010 c6.
  assert c.train.names == ("0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.png",
                           "0007_c12s3_000100_00.png", "0010_c6s2_000300_02.png")
  np.testing.assert_array_equal(c.train.pids, [0, 0, 1, 2])
  np.testing.assert_array_equal(c.train.camids, [0, 1, 11, 5])  # 0-based, c12 -> 11
  assert c.num_train_ids == 3
  assert c.train.pids.dtype == np.int32 and c.train.camids.dtype == np.int32


def test_test_splits_keep_original_ids_junk_and_distractors(tmp_path):
  build_tree(tmp_path)
  c = load_market_folder(tmp_path, "tiny")
  np.testing.assert_array_equal(c.query.pids, [3, 3])
  np.testing.assert_array_equal(c.query.camids, [0, 1])
  # Sorted: "-1_..." < "0000_..." < "0003_..." < "0004_...".
  np.testing.assert_array_equal(c.gallery.pids, [-1, 0, 3, 4])
  np.testing.assert_array_equal(c.gallery.camids, [1, 0, 2, 14])
  info = c.info
  assert info["num_train_ids"] == 3 and info["num_train_images"] == 4
  assert info["num_train_junk_dropped"] == 1
  assert info["num_query_ids"] == 1 and info["num_query_images"] == 2
  assert info["num_gallery_images"] == 4 and info["num_gallery_ids"] == 2
  assert info["num_gallery_junk"] == 1 and info["num_gallery_distractors"] == 1
  assert info["num_cameras"] == 6 and info["cameras"] == [0, 1, 2, 5, 11, 14]


def test_first_digit_camera_quirk(tmp_path):
  build_tree(tmp_path)
  c = load_market_folder(tmp_path, "tiny", first_digit_camera=True)
  np.testing.assert_array_equal(c.train.camids, [0, 1, 0, 5])  # c12 -> camera 1
  np.testing.assert_array_equal(c.gallery.camids, [1, 0, 2, 0])  # c15 -> camera 1


def test_preload_and_lazy_read_the_same_pixels(tmp_path):
  written = build_tree(tmp_path)
  eager = load_market_folder(tmp_path, "tiny", preload=True)
  lazy = load_market_folder(tmp_path, "tiny", preload=False)
  for split in ("train", "query", "gallery"):
    a, b = getattr(eager, split), getattr(lazy, split)
    assert a.names == b.names
    for i, name in enumerate(a.names):
      x, y = a.read_image(i), b.read_image(i)
      assert x.dtype == np.uint8 and x.shape == (8, 4, 3)
      np.testing.assert_array_equal(x, y)
      if name.endswith(".png"):  # lossless
        np.testing.assert_array_equal(x, written[name])


def test_mixed_sizes_preload_as_list(tmp_path):
  build_tree(tmp_path, sizes={"0003_c1s1_001051_00.png": (10, 6)})
  c = load_market_folder(tmp_path, "tiny")
  assert c.query.read_image(0).shape == (10, 6, 3)
  assert c.query.read_image(1).shape == (8, 4, 3)
  assert len(c.query.read_batch([0, 1])) == 2


def test_missing_root_error_names_dataset_path_and_folders(tmp_path):
  root = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as e:
    load_market_folder(root, "market1501")
  msg = str(e.value)
  assert "market1501" in msg and str(root) in msg
  for folder in ("bounding_box_train", "query", "bounding_box_test"):
    assert folder in msg


def test_missing_subfolder_error(tmp_path):
  build_tree(tmp_path)
  for f in (tmp_path / "query").iterdir():
    f.unlink()
  (tmp_path / "query").rmdir()
  with pytest.raises(FileNotFoundError) as e:
    load_market_folder(tmp_path, "duke")
  msg = str(e.value)
  assert "duke" in msg and str(tmp_path / "query") in msg and "bounding_box_test" in msg


def test_corrupt_image_error_names_the_file(tmp_path):
  build_tree(tmp_path)
  bad = tmp_path / "query" / "0003_c1s1_001051_00.png"
  bad.write_bytes(b"\x89PNG garbage")
  with pytest.raises(OSError, match="0003_c1s1_001051_00.png"):
    load_market_folder(tmp_path, "tiny")
  lazy = load_market_folder(tmp_path, "tiny", preload=False)  # fails only when read
  with pytest.raises(OSError, match=str(bad)):
    lazy.query.read_image(0)
  with pytest.raises(OSError, match="cannot read image"):
    read_rgb(bad)


def test_unparseable_name_error_names_the_file(tmp_path):
  build_tree(tmp_path)
  Image.fromarray(_image(0)).save(tmp_path / "query" / "readme.png")
  with pytest.raises(ValueError, match="readme.png"):
    load_market_folder(tmp_path, "tiny")


def test_empty_split_folder(tmp_path):
  (tmp_path / "split").mkdir()
  s = load_market_split(tmp_path / "split", train=True)
  assert len(s) == 0 and s.pids.shape == (0,) and s.camids.dtype == np.int32
