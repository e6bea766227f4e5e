"""Layouts, parsing and our split, on fixture trees that follow each dataset's
real folder layout and file naming (`fedreid_jax.data.fixtures`)."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import fixtures as F
from fedreid_jax.data import builders, layouts, specs, splits
from fedreid_jax.data.small_layouts import PRID_CAM_B_OFFSET, PRID_SHARED


def plan(name, manual_dir, seed=0):
  listing, recs, info = builders.plan_records(specs.get_spec(name), manual_dir, seed)
  return listing, recs, info


def counts(recs):
  return splits.count_summary({s: ([r.pid for r in v], [r.camid for r in v])
                               for s, v in recs.items()})


def assert_counts(found, expected):
  for key, value in expected.items():
    if key != "total_images":
      assert found[key] == value, (key, found, expected)


@pytest.mark.parametrize("name,maker,layout", [
    ("market1501", F.make_market1501, "market"),
    ("dukemtmc", F.make_dukemtmc, "market"),
    ("msmt17", F.make_msmt17_release, "msmt17"),
    ("msmt17", F.make_msmt17_market, "market"),
    ("viper", F.make_viper, "original"),
    ("cuhk01", F.make_cuhk01, "original"),
    ("prid2011", F.make_prid2011, "original"),
    ("3dpes", F.make_3dpes, "original"),
    ("ilids", F.make_ilids, "original"),
    ("ilids", F.make_ilids_vid, "ilidsvid"),
    ("cuhk02", F.make_cuhk02, "original"),
])
def test_original_layouts_counts(tmp_path, name, maker, layout):
  _, expected = maker(tmp_path)[:2]
  listing, recs, _ = plan(name, tmp_path)  # the parent folder: found by name
  assert listing.layout == layout
  found = counts(recs)
  assert_counts(found, expected)
  if "total_images" in expected:
    assert found["train_images"] + found["query_images"] + found["gallery_images"] == \
        expected["total_images"]


def test_market_parsing_junk_distractors_and_clutter(tmp_path):
  root, _ = F.make_market1501(tmp_path)
  recs = layouts.list_market(root)
  gallery = np.array([r.pid for r in recs["gallery"]])
  assert (gallery == -1).sum() == 2 and (gallery == 0).sum() == 2  # kept in the gallery
  assert all(r.pid != -1 for r in recs["train_all"])
  assert not any(r.name.endswith("Thumbs.db") for v in recs.values() for r in v)
  r = recs["train_all"][0]
  assert r.name.startswith("bounding_box_train/") and r.path.endswith(r.name.split("/")[1])
  assert {r.camid for v in recs.values() for r in v} == set(range(6))  # 0-based


def test_cuhk03_np_detected_and_labeled(tmp_path):
  _, det, lab = F.make_cuhk03_np(tmp_path)
  base = tmp_path / "cuhk03-np"
  for name, expected in (("cuhk03_np_detected", det), ("cuhk03_np_labeled", lab)):
    listing, recs, _ = plan(name, base)
    assert listing.root.endswith(name.split("_")[-1])
    assert_counts(counts(recs), expected)
  assert det["gallery_images"] != lab["gallery_images"]


def test_msmt17_release_lists_and_two_digit_cameras(tmp_path):
  root, expected = F.make_msmt17_release(tmp_path)
  recs = layouts.list_msmt17(root)
  cams = {r.camid for v in recs.values() for r in v}
  assert cams == set(range(15))  # c01..c15, in full
  val = (root / "list_val.txt").read_text().split()
  assert val and any(r.name.endswith(val[0].split("/")[1]) for r in recs["train_all"])
  assert recs["gallery"][0].path.startswith(str(root / "test"))
  quirk = layouts.list_msmt17(root, first_digit=True)
  quirk_cams = [r.camid for r in quirk["query"] + quirk["gallery"]]
  full_cams = [r.camid for r in recs["query"] + recs["gallery"]]
  for full, cut in zip(full_cams, quirk_cams):
    assert cut == (0 if full >= 9 else full)  # c10..c15 -> camera 1
  np.testing.assert_array_equal(layouts.first_digit_camids(np.array(full_cams)), quirk_cams)


def test_msmt17_v2_release(tmp_path):
  _, expected = F.make_msmt17_release(tmp_path, version=2)
  listing, recs, _ = plan("msmt17", tmp_path)
  assert listing.layout == "msmt17"
  assert_counts(counts(recs), expected)


def test_pytorch_layout_market_and_small(tmp_path):
  train, query, gallery = F.market_records()
  F.make_pytorch_layout(tmp_path, "Market", {"train_all": train, "query": query,
                                             "gallery": gallery}, cam_first=False)
  listing, recs, _ = plan("market1501", tmp_path)
  assert listing.layout == "pytorch"
  assert counts(recs)["gallery_images"] == len(gallery)
  assert sorted(r.pid for r in recs["gallery"]) == sorted(p for p, _ in gallery)
  small = {"train_all": [(7, 0), (7, 1), (9, 1)], "query": [(3, 0)], "gallery": [(3, 1), (4, 1)]}
  root = F.make_pytorch_layout(tmp_path, "prid", small, cam_first=True)
  listing, recs, _ = plan("prid2011", root / "pytorch")  # the pytorch folder itself
  assert listing.layout == "pytorch"
  assert [(r.pid, r.camid) for r in recs["train_all"]] == small["train_all"]
  assert [(r.pid, r.camid) for r in recs["gallery"]] == small["gallery"]


def test_missing_manual_dir_error_names_dataset_path_and_folders(tmp_path):
  with pytest.raises(layouts.LayoutError) as e:
    plan("market1501", tmp_path / "nope")
  msg = str(e.value)
  assert "market1501" in msg and str(tmp_path / "nope") in msg
  assert "bounding_box_train" in msg and "pytorch" in msg
  (tmp_path / "empty").mkdir()
  with pytest.raises(layouts.LayoutError) as e:
    plan("msmt17", tmp_path / "empty")
  msg = str(e.value)
  assert "msmt17" in msg and str(tmp_path / "empty") in msg
  assert "list_train.txt" in msg and "MSMT17_V1" in msg
  root, _ = F.make_market1501(tmp_path / "partial")
  shutil.rmtree(root / "query")
  with pytest.raises(layouts.LayoutError, match="has bounding_box_train, bounding_box_test "
                     "but not query"):
    plan("market1501", root)


def test_resolve_name_aliases():
  assert specs.resolve_name("Market") == "market1501"
  assert specs.resolve_name("DukeMTMC-reID") == "dukemtmc"
  assert specs.resolve_name("cuhk03-np-detected") == "cuhk03_np_detected"
  assert specs.resolve_name("prid") == "prid2011"
  assert specs.resolve_name("iLIDS-VID") == "ilids"
  with pytest.raises(KeyError, match="known datasets"):
    specs.resolve_name("imagenet")


def test_prid_split_rules(tmp_path):
  F.make_prid2011(tmp_path)
  _, recs, info = plan("prid2011", tmp_path)
  assert all(r.group == "single" for r in recs["query"] + recs["gallery"])
  assert all(r.group == "multi" for r in recs["train_all"])
  assert {r.camid for r in recs["query"]} == {0} and {r.camid for r in recs["gallery"]} == {1}
  per = {}
  for r in recs["train_all"]:
    per[(r.pid, r.camid)] = per.get((r.pid, r.camid), 0) + 1
  assert max(per.values()) == splits.PRID_MAX_FRAMES  # 12-frame persons capped
  test = set(info["test_ids"])
  assert {r.pid for r in recs["query"]} == {p for p in test if p <= PRID_SHARED}
  assert not test & {r.pid for r in recs["train_all"]}
  assert {r.pid for r in recs["gallery"] if r.pid > PRID_CAM_B_OFFSET}  # distractors


def test_small_split_is_seeded_and_disjoint(tmp_path):
  F.make_3dpes(tmp_path)
  _, a, info_a = plan("3dpes", tmp_path, seed=0)
  _, b, _ = plan("3dpes", tmp_path, seed=0)
  _, c, info_c = plan("3dpes", tmp_path, seed=1)
  assert [r.name for r in a["train_all"]] == [r.name for r in b["train_all"]]
  assert info_a["test_ids"] != info_c["test_ids"]
  train_ids = {r.pid for r in a["train_all"]}
  assert not train_ids & {r.pid for r in a["query"] + a["gallery"]}
  assert {r.camid for v in a.values() for r in v} == {0, 1}
  views = {}
  for r in a["query"] + a["gallery"]:
    views.setdefault((r.pid, r.group), set()).add(r.camid)
  assert all(len(c) == 1 for c in views.values())  # a view stays in one pseudo-camera


def test_split_search_reproduces_table_counts(tmp_path):
  """At real scale the split is the first draw matching the table's counts."""
  F.make_ilids(tmp_path, num_ids=30)
  listing = layouts.list_dataset(specs.get_spec("ilids"), tmp_path)
  rule = splits.make_rule("ilids", "original", listing.catalog)
  target = splits.draw_counts(rule.draw(np.random.default_rng([0, 37])))
  spec = dataclasses.replace(specs.get_spec("ilids"), expected=specs.Expected(
      2, *target[:2], *target[2:]))
  recs, info = splits.split_small(spec, "original", listing.catalog, seed=0)
  assert info["matches_table"] and 0 < info["attempt"] <= 37
  found = counts(recs)
  assert tuple(found[k] for k in splits.COUNT_KEYS) == target


def test_reference_train_split():
  pids = np.repeat(np.arange(10), 5)
  pids = np.concatenate([pids, [10]])  # an id with a single image
  train, val = splits.reference_train_split(pids, small=False, seed=0)
  assert len(val) == 10 and set(pids[val]) == set(range(10))
  assert set(pids[train]) == set(range(11))
  train_s, val_s = splits.reference_train_split(pids, small=True, seed=0)
  assert len(val_s) == int(len(pids) * 0.2) and set(pids[train_s]) == set(range(11))
  again, _ = splits.reference_train_split(pids, small=True, seed=0)
  other, _ = splits.reference_train_split(pids, small=True, seed=1)
  np.testing.assert_array_equal(train_s, again)
  assert not np.array_equal(train_s, other)
