"""Original release layouts of the small datasets and of CUHK02.

These sets ship no query/gallery split: the listers here return a *catalog*
(every image with its person id, camera and a group tag) and
`splits.split_small` draws the documented split. Assumed folder structures
(what the public archives unpack to; the reference code used the same files
through the DGD `format_*.py` scripts, Xiao et al. CVPR 2016):

- VIPeR (`VIPeR/`): `cam_a/*.bmp` and `cam_b/*.bmp`, one image per person per
  camera, names `<pid>_<angle>.bmp` (`000_45.bmp`); a person's two views share
  the numeric prefix (falls back to pairing in sorted order, as DGD does, when
  a camera's names have no numeric prefix). 632 persons.
- CUHK01 (`CUHK01/campus/`): `<pid:4><n:3>.png` (`0001001.png`), four images
  per person; n=1,2 are camera A, n=3,4 camera B. 971 persons.
- PRID2011 (`prid_2011/`): `single_shot/cam_{a,b}/person_<pid:4>.png` and
  `multi_shot/cam_{a,b}/person_<pid:4>/<frame:4>.png`. Persons 1..200 appear in
  both cameras; cam_a's 201..385 and cam_b's 201..749 are different people
  (cam_b-only persons get id `pid + 1000` here to keep them distinct).
- 3DPeS (`3DPeS/RGB/`): `<pid>_<view>_<...>.bmp`; the first two `_` fields are
  the person and the view (sequence). 193 persons, 1012 images, 8 cameras
  whose ids are not in the names: a person's views are split into two
  pseudo-cameras by the split (as DGD did).
- iLIDS (`i-LIDS_Pedestrian/Persons/`): `<pid:4><n:3>.jpg`, 119 persons, 476
  images (the i-LIDS MCTS re-id set that the reference's `ilids` client and
  the paper's table counts are made of); images are split into two
  pseudo-cameras by the split. Also accepted: the iLIDS-VID release
  (`i-LIDS-VID/images/cam{1,2}/person<pid:3>/cam<c>_person<pid:3>.png`, 300
  persons, two real cameras; its counts differ from the table's).
- CUHK02 (`cuhk02/Dataset/`): `P1..P5/cam{1,2}/<pid>_<n>.png`; person ids are
  unique per camera pair, cameras are numbered 0..9 (pair p: 2p, 2p+1).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from fedreid_jax.data.image_records import (Layout, Record, list_images,
                                            list_images_recursive)
from fedreid_jax.data.specs import DatasetSpec

PRID_SHARED = 200      # persons 1..200 are seen by both PRID2011 cameras
PRID_CAM_B_OFFSET = 1000


def _rec(path: Path, root: Path, pid: int, camid: int, group: str = "") -> Record:
  return Record(str(path), path.relative_to(root).as_posix(), int(pid), int(camid), group)


def _prefix_ids(paths: list[Path]) -> list[int] | None:
  ids = []
  for p in paths:
    m = re.match(r"^(\d+)_", p.name)
    if not m:
      return None
    ids.append(int(m.group(1)))
  return ids


def list_viper(root: Path, _first_digit: bool = False) -> list[Record]:
  """`cam_a/`, `cam_b/` -> records (cameras 0, 1)."""
  out = []
  for cam, folder in enumerate(("cam_a", "cam_b")):
    paths = list_images(root / folder)
    ids = _prefix_ids(paths)
    if ids is None:
      logging.warning("viper: %s names have no '<pid>_' prefix; pairing views "
                      "by sorted order", folder)
      ids = list(range(len(paths)))
    out += [_rec(p, root, pid, cam) for p, pid in zip(paths, ids)]
  return out


def list_cuhk01(root: Path, _first_digit: bool = False) -> list[Record]:
  """`<pid:4><n:3>.png` -> records (n in 1,2: camera 0; 3,4: camera 1)."""
  out = []
  for p in list_images(root):
    m = re.match(r"^(\d{4})(\d{3})\.", p.name)
    if not m:
      raise ValueError(f"cannot parse CUHK01 file {str(p)!r}: expected "
                       "'<pid:4><n:3>.png' such as '0001001.png'")
    out.append(_rec(p, root, int(m.group(1)), (int(m.group(2)) - 1) // 2))
  return out


def _person_id(name: str) -> int:
  m = re.match(r"^person_?(\d+)", name)
  if not m:
    raise ValueError(f"cannot parse PRID2011/iLIDS-VID person from {name!r}: "
                     "expected 'person_0001'")
  return int(m.group(1))


def list_prid2011(root: Path, _first_digit: bool = False) -> list[Record]:
  """Single- and multi-shot images of both cameras (groups `single`, `multi`)."""
  out = []
  for cam, folder in enumerate(("cam_a", "cam_b")):
    for p in list_images(root / "single_shot" / folder):
      pid = _person_id(p.stem)
      if cam == 1 and pid > PRID_SHARED:
        pid += PRID_CAM_B_OFFSET
      out.append(_rec(p, root, pid, cam, "single"))
    multi = root / "multi_shot" / folder
    for person in sorted(d for d in multi.iterdir() if d.is_dir()):
      pid = _person_id(person.name)
      if cam == 1 and pid > PRID_SHARED:
        pid += PRID_CAM_B_OFFSET
      out += [_rec(p, root, pid, cam, "multi") for p in list_images(person)]
  return out


def list_3dpes(root: Path, _first_digit: bool = False) -> list[Record]:
  """`RGB/<pid>_<view>_....bmp` -> records (group = view; camera set by split)."""
  out = []
  for p in list_images(root / "RGB"):
    fields = p.stem.split("_")
    if len(fields) < 2 or not fields[0].isdigit():
      raise ValueError(f"cannot parse 3DPeS file {str(p)!r}: expected "
                       "'<pid>_<view>_....bmp'")
    out.append(_rec(p, root, int(fields[0]), 0, fields[1]))
  return out


def list_ilids(root: Path, _first_digit: bool = False) -> list[Record]:
  """`Persons/<pid:4><n:3>.jpg` -> records (camera set by split)."""
  out = []
  for p in list_images(root / "Persons"):
    if not p.name[:4].isdigit():
      raise ValueError(f"cannot parse i-LIDS file {str(p)!r}: expected "
                       "'<pid:4><n:3>.jpg' such as '0001001.jpg'")
    out.append(_rec(p, root, int(p.name[:4]), 0))
  return out


def list_ilids_vid(root: Path, _first_digit: bool = False) -> list[Record]:
  """`images/cam{1,2}/person<pid>/*.png` -> records (cameras 0, 1)."""
  out = []
  for cam in (0, 1):
    for p in list_images_recursive(root / "images" / f"cam{cam + 1}"):
      out.append(_rec(p, root, _person_id(p.parent.name), cam))
  return out


def list_cuhk02(root: Path, _first_digit: bool = False) -> list[Record]:
  """`P<k>/cam{1,2}/<pid>_<n>.png` -> records with ids unique across pairs."""
  pairs = sorted(d.name for d in root.iterdir() if d.is_dir() and re.fullmatch(r"P\d+", d.name))
  raw = []
  for k, pair in enumerate(pairs):
    for c, folder in enumerate(("cam1", "cam2")):
      for p in list_images(root / pair / folder):
        raw.append((p, (pair, p.name.split("_")[0]), 2 * k + c, pair))
  ids = {key: i for i, key in enumerate(sorted({key for _, key, _, _ in raw}))}
  return [_rec(p, root, ids[key], cam, pair) for p, key, cam, pair in raw]


def layouts(spec: DatasetSpec) -> list[Layout]:
  """The original-release layouts of a small dataset (detection order)."""
  table = {
      "viper": [Layout("original", ("cam_a", "cam_b"), list_viper,
                       "VIPeR release: cam_a/*.bmp, cam_b/*.bmp")],
      "cuhk01": [Layout("original", ("[0-9][0-9][0-9][0-9][0-9][0-9][0-9].png",),
                        list_cuhk01, "CUHK01 release: campus/<pid:4><n:3>.png")],
      "prid2011": [Layout("original", ("single_shot/cam_a", "single_shot/cam_b",
                                       "multi_shot/cam_a", "multi_shot/cam_b"),
                          list_prid2011, "PRID2011 release: single_shot/cam_{a,b}/"
                          "person_XXXX.png and multi_shot/cam_{a,b}/person_XXXX/")],
      "3dpes": [Layout("original", ("RGB",), list_3dpes,
                       "3DPeS release: RGB/<pid>_<view>_....bmp")],
      "ilids": [Layout("original", ("Persons",), list_ilids,
                       "i-LIDS release: Persons/<pid:4><n:3>.jpg"),
                Layout("ilidsvid", ("images/cam1", "images/cam2"), list_ilids_vid,
                       "iLIDS-VID release: images/cam1/, images/cam2/")],
      "cuhk02": [Layout("original", ("P1/cam1", "P1/cam2"), list_cuhk02,
                        "CUHK02 release: Dataset/P1..P5/cam1, cam2")],
  }
  return table[spec.name]
