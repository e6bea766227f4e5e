"""Tiny fake copies of every accepted layout, for tests and benchmarks.

Each `make_*` writes a small tree that follows the dataset's real folder
layout and file naming exactly (tiny solid-colour images, `size`), including
junk (`-1`) and distractor (`0000`) files, `Thumbs.db` clutter, MSMT17's
two-digit cameras and list files, and returns `(dataset folder, counts)`;
`counts` are what `prepare` must find (`splits.count_summary` keys). Image
colours depend on (pid, camera, n), so a test can tell images apart.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fedreid_jax.data.naming import format_market_name
from fedreid_jax.data.small_layouts import PRID_SHARED

SIZE = (8, 4)  # (H, W)


def write_image(path: Path, key: int, size: tuple[int, int] = SIZE) -> None:
  """A solid-colour RGB image whose colour encodes `key`; format by suffix."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(key)
  colour = rng.integers(0, 256, 3, dtype=np.uint8)
  img = np.broadcast_to(colour, (*size, 3)).copy()
  fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]
  Image.fromarray(img).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _key(*parts) -> int:
  """A stable (process-independent) integer for `parts`."""
  return zlib.crc32(repr(parts).encode())


def _counts(train, query, gallery, cams) -> dict[str, int]:
  ids = lambda recs: len({p for p, *_ in recs if p != -1})
  return {"train_ids": ids(train), "train_images": len(train), "query_ids": ids(query),
          "query_images": len(query), "gallery_ids": ids(gallery),
          "gallery_images": len(gallery), "cameras": len(cams)}


def market_records(num_train: int = 4, num_test: int = 3, cams: int = 6, seed: int = 0):
  """(train, query, gallery) lists of (pid, camid) in a Market-like protocol,
  plus junk (-1) and distractor (0) gallery images."""
  rng = np.random.default_rng(seed)
  train_ids = sorted(rng.choice(np.arange(2, 1500, 2), num_train, replace=False))
  test_ids = sorted(rng.choice(np.arange(1, 1500, 2), num_test, replace=False))
  train = [(int(p), (k + j) % cams) for k, p in enumerate(train_ids) for j in range(3)]
  query = [(int(p), k % cams) for k, p in enumerate(test_ids)]
  gallery = [(int(p), (k + j) % cams) for k, p in enumerate(test_ids) for j in range(3)]
  gallery += [(-1, 0), (-1, cams - 1), (0, 1), (0, 2)]
  return train, query, gallery


def _write_market(root: Path, train, query, gallery, name_fn, ext: str) -> None:
  for folder, recs in (("bounding_box_train", train), ("query", query),
                       ("bounding_box_test", gallery)):
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "Thumbs.db").write_bytes(b"\x00clutter")
    for n, (pid, cam) in enumerate(recs):
      write_image(root / folder / name_fn(pid, cam, n, ext), _key(folder, pid, cam, n))


def make_market1501(base: Path, cams: int = 6, **kw) -> tuple[Path, dict]:
  """`Market-1501-v15.09.15/` with `0002_c1s1_000451_03.jpg` names."""
  train, query, gallery = market_records(cams=cams, **kw)
  root = Path(base) / "Market-1501-v15.09.15"
  name = lambda p, c, n, ext: (format_market_name(p, c, 100 + n, n % 7, ext) if p >= 0
                               else f"-1_c{c + 1}s1_{100 + n:06d}_00.{ext}")
  _write_market(root, train, query, gallery, name, "jpg")
  return root, _counts(train, query, gallery, range(cams))


def make_dukemtmc(base: Path, **kw) -> tuple[Path, dict]:
  """`DukeMTMC-reID/` with `0001_c2_f0046182.jpg` names (8 cameras)."""
  train, query, gallery = market_records(cams=8, num_train=6, **kw)
  gallery = [(p, c) for p, c in gallery if p != -1]  # Duke ships no junk files
  root = Path(base) / "DukeMTMC-reID"
  _write_market(root, train, query, gallery,
                lambda p, c, n, ext: f"{p:04d}_c{c + 1}_f{46182 + n:07d}.{ext}", "jpg")
  return root, _counts(train, query, gallery, range(8))


def make_cuhk03_np(base: Path, **kw) -> tuple[Path, dict, dict]:
  """`cuhk03-np/{detected,labeled}/` with `0001_c1_1.png` names (2 cameras);
  returns (folder, detected counts, labeled counts)."""
  root = Path(base) / "cuhk03-np"
  out = []
  for variant, extra in (("detected", 0), ("labeled", 1)):
    train, query, gallery = market_records(cams=2, **kw)
    gallery = [(p, c) for p, c in gallery if p > 0]
    gallery += gallery[:extra]  # the two variants differ slightly, as the real ones
    _write_market(root / variant, train, query, gallery,
                  lambda p, c, n, ext: f"{p:04d}_c{c + 1}_{n + 1}.{ext}", "png")
    out.append(_counts(train, query, gallery, range(2)))
  return root, out[0], out[1]


def _msmt_name(pid: int, cam: int, n: int) -> str:
  return f"{pid:04d}_{n:03d}_{cam + 1:02d}_0303morning_{15 + n:04d}_{n % 2}.jpg"


def make_msmt17_release(base: Path, version: int = 1) -> tuple[Path, dict]:
  """`MSMT17_V1/` as released: `train/`, `test/`, `list_{train,val,query,gallery}.txt`,
  15 cameras (two-digit c10..c15 included), test ids numbered from 0."""
  root = Path(base) / f"MSMT17_V{version}"
  train_dir, test_dir = ("train", "test") if version == 1 else ("mask_train_v2", "mask_test_v2")
  train = [(p, (p * 3 + j) % 15) for p in range(5) for j in range(3)]
  query = [(p, (p + 9) % 15) for p in range(4)]
  gallery = [(p, (p + 9 + j) % 15) for p in range(4) for j in range(1, 4)]
  lines = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [],
           "list_gallery.txt": []}
  for folder, recs, lists in ((train_dir, train, ("list_train.txt", "list_val.txt")),
                              (test_dir, query, ("list_query.txt",)),
                              (test_dir, gallery, ("list_gallery.txt",))):
    for n, (pid, cam) in enumerate(recs):
      n += 100 if lists[0] == "list_gallery.txt" else 0
      rel = f"{pid:04d}/{_msmt_name(pid, cam, n)}"
      write_image(root / folder / rel, _key(folder, rel))
      target = lists[-1] if (len(lists) == 2 and n % 4 == 3) else lists[0]
      lines[target].append(f"{rel} {pid}")
  for name, ls in lines.items():
    (root / name).write_text("\n".join(ls) + "\n")
  return root, _counts(train, query, gallery, range(15))


def make_msmt17_market(base: Path) -> tuple[Path, dict]:
  """MSMT17 converted to Market-style folders (`0003_c14_0303morning_0015_0.jpg`)."""
  train, query, gallery = market_records(cams=15, num_train=5)
  gallery = [(p, c) for p, c in gallery if p > 0]
  root = Path(base) / "MSMT17"
  _write_market(root, train, query, gallery,
                lambda p, c, n, ext: f"{p:04d}_c{c + 1}_0303morning_{15 + n:04d}_0.{ext}", "jpg")
  return root, _counts(train, query, gallery, {c for _, c in train + query + gallery})


def make_viper(base: Path, num_ids: int = 10) -> tuple[Path, dict]:
  """`VIPeR/cam_{a,b}/<pid:03d>_<angle>.bmp`, one image per person per camera."""
  root = Path(base) / "VIPeR"
  for k in range(num_ids):
    pid = 3 * k + (k % 2)
    write_image(root / "cam_a" / f"{pid:03d}_{45 * (k % 4)}.bmp", 2 * k)
    write_image(root / "cam_b" / f"{pid:03d}_{90 + 45 * (k % 3)}.bmp", 2 * k + 1)
  n_test = num_ids - num_ids // 2
  return root, {"train_ids": num_ids // 2, "train_images": 2 * (num_ids // 2),
                "query_ids": n_test, "query_images": n_test, "gallery_images": n_test,
                "cameras": 2}


def make_cuhk01(base: Path, num_ids: int = 9) -> tuple[Path, dict]:
  """`CUHK01/campus/<pid:4><n:3>.png`, 4 images per person (n 1-2 cam A, 3-4 cam B)."""
  root = Path(base) / "CUHK01" / "campus"
  for pid in range(1, num_ids + 1):
    for n in range(1, 5):
      write_image(root / f"{pid:04d}{n:03d}.png", pid * 10 + n)
  n_test = num_ids - num_ids // 2
  return root.parent, {"train_ids": num_ids // 2, "train_images": 4 * (num_ids // 2),
                       "query_ids": n_test, "query_images": 2 * n_test,
                       "gallery_images": 2 * n_test, "cameras": 2}


def make_prid2011(base: Path, a_only: int = 4, b_only: int = 6) -> tuple[Path, dict]:
  """`prid_2011/{single,multi}_shot/cam_{a,b}/person_XXXX[.png|/NNNN.png]`;
  persons 1..200 in both cameras, then `a_only` and `b_only` extra persons."""
  root = Path(base) / "prid_2011"
  frames = lambda pid, cam: 12 if pid % 50 == 0 else 1 + (pid + cam) % 3
  persons = {0: range(1, PRID_SHARED + a_only + 1), 1: range(1, PRID_SHARED + b_only + 1)}
  for cam, letter in enumerate("ab"):
    for pid in persons[cam]:
      write_image(root / "single_shot" / f"cam_{letter}" / f"person_{pid:04d}.png", pid * 7 + cam)
      for f in range(1, frames(pid, cam) + 1):
        write_image(root / "multi_shot" / f"cam_{letter}" / f"person_{pid:04d}" / f"{f:04d}.png",
                    pid * 1000 + cam * 100 + f)
  (root / "readme.txt").write_text("PRID 2011 fixture\n")
  # Train images depend on which shared persons are drawn; checked in tests.
  return root, {"train_ids": PRID_SHARED // 2 + a_only, "query_ids": PRID_SHARED // 2,
                "query_images": PRID_SHARED // 2,
                "gallery_images": PRID_SHARED // 2 + b_only, "cameras": 2}


def make_3dpes(base: Path, num_ids: int = 12) -> tuple[Path, dict]:
  """`3DPeS/RGB/<pid:03d>_<view>_<frame>.bmp`: 1-3 views of 1-3 images."""
  root = Path(base) / "3DPeS" / "RGB"
  total = 0
  for pid in range(1, num_ids + 1):
    for view in range(1, 1 + (pid % 3) + (1 if pid % 4 else 0)):
      for f in range(1 + (pid + view) % 3):
        write_image(root / f"{pid:03d}_{view}_{1000 + f:05d}.bmp", pid * 100 + view * 10 + f)
        total += 1
  return root.parent, {"train_ids": num_ids - min(100, num_ids // 2),
                       "total_images": total, "cameras": 2}


def make_ilids(base: Path, num_ids: int = 9) -> tuple[Path, dict]:
  """`i-LIDS_Pedestrian/Persons/<pid:4><n:3>.jpg`, 2-5 images per person."""
  root = Path(base) / "i-LIDS_Pedestrian" / "Persons"
  total = 0
  for pid in range(1, num_ids + 1):
    for n in range(1, 3 + pid % 4):
      write_image(root / f"{pid:04d}{n:03d}.jpg", pid * 10 + n)
      total += 1
  return root.parent, {"train_ids": num_ids // 2, "query_ids": num_ids - num_ids // 2,
                       "total_images": total, "cameras": 2}


def make_ilids_vid(base: Path, num_ids: int = 8) -> tuple[Path, dict]:
  """`i-LIDS-VID/images/cam{1,2}/personNNN/camC_personNNN.png`."""
  root = Path(base) / "i-LIDS-VID"
  for pid in range(1, num_ids + 1):
    for cam in (1, 2):
      write_image(root / "images" / f"cam{cam}" / f"person{pid:03d}" /
                  f"cam{cam}_person{pid:03d}.png", pid * 10 + cam)
  n_test = num_ids - num_ids // 2
  return root, {"train_ids": num_ids // 2, "train_images": 2 * (num_ids // 2),
                "query_ids": n_test, "query_images": n_test, "gallery_images": n_test,
                "cameras": 2}


def make_cuhk02(base: Path, ids_per_pair: int = 3) -> tuple[Path, dict]:
  """`cuhk02/Dataset/P1..P5/cam{1,2}/<pid>_<n>.png` (ids repeat across pairs)."""
  root = Path(base) / "cuhk02" / "Dataset"
  for k in range(1, 6):
    for pid in range(1, ids_per_pair + 1):
      for cam in (1, 2):
        for n in (1, 2):
          write_image(root / f"P{k}" / f"cam{cam}" / f"{pid:03d}_{cam}{n}.png",
                      k * 1000 + pid * 10 + cam * 2 + n)
  return root.parent, {"train_ids": 5 * ids_per_pair, "train_images": 20 * ids_per_pair,
                       "cameras": 10}


def make_pytorch_layout(base: Path, name: str, splits: dict[str, list[tuple[int, int]]],
                        cam_first: bool) -> Path:
  """The reference's `<name>/pytorch/{split}/<pid>/<img>` from `(pid, camid)` lists;
  names `cam_<c>_<pid:05d>_<n:05d>.png` (`cam_first`) or Market-style."""
  root = Path(base) / name
  for split, recs in splits.items():
    for n, (pid, cam) in enumerate(recs):
      fname = (f"cam_{cam}_{pid:05d}_{n:05d}.png" if cam_first
               else (format_market_name(pid, cam, n, 0) if pid >= 0
                     else f"-1_c{cam + 1}s1_{n:06d}_00.jpg"))
      folder = str(pid) if cam_first else (f"{pid:04d}" if pid >= 0 else "-1")
      write_image(root / "pytorch" / split / folder / fname, _key(split, n))
  return root
