"""Synthetic benchmark: structure of every default domain (planning only, no
pixels), and generation/caching/loading on small specs at a tiny image size."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedreid_jax.data import synthetic as S
from fedreid_jax.data.base import ClientData, split_from_arrays
from fedreid_jax.data.naming import parse_market_name

SIZE = (16, 8)
SMALL = [dataclasses.replace(S.DOMAINS[2], train_ids=4, test_ids=3, junk=1, distractors=2),
         dataclasses.replace(S.DOMAINS[6], train_ids=3, test_ids=3)]
EXTRA = dataclasses.replace(S.DOMAINS[8], train_ids=2, test_ids=2)
PUB = dataclasses.replace(S.PUBLIC, train_ids=4)


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("spec", S.DOMAINS + (S.PUBLIC,), ids=lambda s: s.name)
def test_plan_structure(spec):
  jobs = S.plan_domain(spec, seed=0)
  by = lambda split: [j for j in jobs if j.split == split]
  train, query, gallery = by("train"), by("query"), by("gallery")
  train_ids = {j.pid for j in train}
  test_ids = {j.pid for j in query + gallery if j.pid > 0}
  assert len(train_ids) == spec.train_ids and len(test_ids) == spec.test_ids
  assert not train_ids & test_ids and 0 not in train_ids and -1 not in train_ids
  assert {j.camid for j in jobs} == set(range(spec.num_cameras))
  assert sum(j.pid == -1 for j in gallery) == spec.junk
  assert sum(j.pid == 0 for j in gallery) == spec.distractors
  assert {j.pid for j in query} == test_ids  # every test id is queried
  for q in query:
    assert any(g.pid == q.pid and g.camid != q.camid for g in gallery), q
  names = [j.name for j in jobs]
  assert len(set(names)) == len(names)
  for j in jobs:
    assert parse_market_name(j.name) == (j.pid, j.camid) and j.name.endswith(".png")
  lo, hi = spec.images_per_id
  for pid in train_ids:
    n = sum(j.pid == pid for j in train)
    assert lo <= n <= hi and len({j.camid for j in train if j.pid == pid}) >= min(2, n)


def test_default_benchmark_shape():
  sizes = {s.name: len([j for j in S.plan_domain(s, 0) if j.split == "train"]) for s in S.DOMAINS}
  total = sum(sizes.values())
  assert 2500 <= total <= 3500
  assert 0.3 <= sizes["syn_msmt17"] / total <= 0.5
  assert [s.num_cameras for s in S.DOMAINS] == [15, 8, 6, 2, 2, 2, 2, 2, 2]
  assert sum(n < 100 for n in sizes.values()) >= 3  # several tiny clients
  assert list(sizes.values())[:3] == sorted(list(sizes.values())[:3], reverse=True)
  public = len(S.plan_domain(S.PUBLIC, 0))  # CUHK02 is 22% of MSMT17's training images
  assert 0.18 <= public / sizes["syn_msmt17"] <= 0.26


def test_generation_is_deterministic_and_seeded(tmp_path):
  a = S.ensure_synthetic(tmp_path / "a", seed=0, image_size=SIZE, domains=SMALL, public=PUB)
  b = S.ensure_synthetic(tmp_path / "b", seed=0, image_size=SIZE, domains=SMALL, public=PUB)
  c = S.ensure_synthetic(tmp_path / "a", seed=1, image_size=SIZE, domains=SMALL, public=PUB)
  assert a.name == S.version_tag(0, SIZE) == f"v{S.GENERATOR_VERSION}_seed0_16x8"
  assert c.name == S.version_tag(1, SIZE) and c != a and a.is_dir() and c.is_dir()
  fa, fb, fc = _files(a), _files(b), _files(c)
  assert fa == fb and len(fa) > 50
  assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
  common = set(fa) & set(fc)
  assert sum(fa[k] != fc[k] for k in common) > 0.9 * len(common) or not common
  assert fa != fc
  # Threads change nothing; a subset renders the same images as the full set.
  d = S.generate_domain(SMALL[1], 0, SIZE, tmp_path / "one", workers=1)
  assert d == json.loads((a / "manifest.json").read_text())["domains"][SMALL[1].name]["counts"]
  one = _files(tmp_path / "one")
  assert one == {k.split("/", 1)[1]: v for k, v in fa.items() if k.startswith(SMALL[1].name + "/")}


def test_load_benchmark(tmp_path):
  clients, public = S.load_synthetic_benchmark(tmp_path, image_size=SIZE, domains=SMALL, public=PUB)
  assert [c.name for c in clients] == [s.name for s in SMALL]
  manifest = json.loads((tmp_path / "synthetic" / S.version_tag(0, SIZE) / "manifest.json").read_text())
  for c, spec in zip(clients, SMALL):
    counts = manifest["domains"][spec.name]["counts"]
    assert c.num_train_ids == spec.train_ids == counts["train_ids"]
    np.testing.assert_array_equal(np.unique(c.train.pids), np.arange(spec.train_ids))
    assert len(c.query) == counts["query_images"] and len(c.gallery) == counts["gallery_images"]
    assert c.info["num_cameras"] == spec.num_cameras and c.info["mimics"] == spec.mimics
    img = c.train.read_image(0)
    assert img.dtype == np.uint8 and img.shape == (*SIZE, 3)
    if spec.junk:
      assert {0, -1} <= set(c.gallery.pids.tolist())
  assert len(public) == 16 and set(public.pids.tolist()) == set(range(4))
  assert public.read_image(3).shape == (*SIZE, 3)


def test_half_written_folder_is_replaced(tmp_path):
  folder = tmp_path / "synthetic" / S.version_tag(0, SIZE)
  (folder / SMALL[1].name / "bounding_box_train").mkdir(parents=True)
  stale = folder / SMALL[1].name / "bounding_box_train" / "0001_c1s1_000000_00.png"
  stale.write_bytes(b"half written")
  out = S.ensure_synthetic(tmp_path, image_size=SIZE, domains=SMALL[1:], public=PUB)
  assert out == folder and (folder / "manifest.json").is_file()
  assert not stale.exists() or stale.read_bytes() != b"half written"
  (folder / "manifest.json").write_text("{not json")  # corrupt manifest: regenerated too
  S.ensure_synthetic(tmp_path, image_size=SIZE, domains=SMALL[1:], public=PUB)
  assert json.loads((folder / "manifest.json").read_text())["seed"] == 0
  assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_missing_files_and_new_domains_trigger_rebuild(tmp_path):
  folder = S.ensure_synthetic(tmp_path, image_size=SIZE, domains=SMALL[:1], public=PUB)
  before = _files(folder)
  mtime = (folder / "manifest.json").stat().st_mtime_ns
  assert S.ensure_synthetic(tmp_path, image_size=SIZE, domains=SMALL[:1], public=PUB) == folder
  assert (folder / "manifest.json").stat().st_mtime_ns == mtime  # cached: untouched
  S.ensure_synthetic(tmp_path, image_size=SIZE, domains=SMALL[:1] + [EXTRA], public=PUB)
  after = _files(folder)
  assert {k: v for k, v in after.items() if k in before} == before
  assert any(k.startswith(EXTRA.name + "/") for k in after)
  victim = next((folder / EXTRA.name / "query").iterdir())
  victim.unlink()
  S.ensure_synthetic(tmp_path, image_size=SIZE, domains=[EXTRA], public=PUB)
  assert victim.exists() and _files(folder) == after


def test_domain_names_resolve():
  assert [d.name for d in S.resolve_domains(None)] == list(S.DOMAIN_NAMES)
  assert S.resolve_domains(["syn_viper"])[0] is S.DOMAINS[6]
  with pytest.raises(KeyError, match="syn_market"):
    S.resolve_domains(["market"])
  with pytest.raises(ValueError):
    S.resolve_domains(["syn_viper", "syn_viper"])


def test_pixel_rank1_proxy():
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (3, 4, 2, 3), dtype=np.uint8)
  q = split_from_arrays(imgs, [1, 2, 3], [0, 0, 0])
  g = split_from_arrays(np.concatenate([imgs, imgs[:1]]), [1, 2, 3, -1], [1, 1, 0, 1])
  # id 3's only gallery image is on the query camera: ignored, so it misses.
  assert S.pixel_rank1(ClientData("t", q, q, g)) == pytest.approx(2 / 3)
