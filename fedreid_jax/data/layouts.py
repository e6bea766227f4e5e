"""Finding a dataset on disk and listing its images as `(path, pid, camid)` records.

Accepted layouts (the manual directory may be the dataset folder itself or a
folder holding it under one of `specs.DatasetSpec.folders`):

- `market`: Market-1501 style release folders, used by Market-1501
  (`Market-1501-v15.09.15/`), DukeMTMC-reID (`DukeMTMC-reID/`), CUHK03-NP
  (`cuhk03-np/detected/`, `cuhk03-np/labeled/`) and MSMT17 converted to this
  form: `bounding_box_train/`, `query/`, `bounding_box_test/`, file names
  `<pid>_c<cam>...` (`0002_c1s1_000451_03.jpg`, `0001_c2_f0046182.jpg`,
  `0001_c1_1.png`, `0000_c14_...jpg`).
- `msmt17`: MSMT17 as released (`MSMT17_V1/`): `train/<pid>/<img>`,
  `test/<pid>/<img>` (V2: `mask_train_v2/`, `mask_test_v2/`) and the lists
  `list_train.txt`, `list_val.txt` (together the training split),
  `list_query.txt`, `list_gallery.txt`, each line `<pid>/<name>.jpg <label>`;
  the label is the person id and the camera is the third `_` field of the name
  (`0000_000_01_0303morning_0015_0.jpg` -> camera 01, 1..15).
- `pytorch`: the reference code's preprocessed copy
  `<name>/pytorch/{train_all,query,gallery}/<pid>/<img>` (CUHK02: `train_all`
  only). Names are Market-style, or `cam_<c>_<pid>_<n>.<ext>` (0-based camera)
  for the small datasets; an unparsable name takes its person id from its
  folder and camera 0.
- the original releases of the small datasets (`small_layouts`).

Ids and cameras: `-1` is junk (kept in the test splits, dropped from training),
`0000` distractors are kept in the gallery. Cameras are parsed in full (MSMT17
has c1..c15) and stored 0-based; `first_digit_camera` reproduces the reference
quirk of cutting the camera number to its first digit (`first_digit_camids`
applies it to already parsed cameras). Files are listed in sorted order, so
listings are deterministic.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from fedreid_jax.data import small_layouts  # small datasets' originals
from fedreid_jax.data.base import JUNK_PID
# Record, Layout and the image listing live in image_records (shared with
# small_layouts); they are re-exported here for the modules that read them here.
from fedreid_jax.data.image_records import (IMAGE_SUFFIXES, Layout, Record,
                                            list_images, list_images_recursive,
                                            make_record)
from fedreid_jax.data.naming import parse_cam_first_name, parse_market_name
from fedreid_jax.data.specs import DatasetSpec
from fedreid_jax.errors import DatasetNotFound

SPLITS = ("train_all", "query", "gallery")
MARKET_FOLDERS = {"train_all": "bounding_box_train", "query": "query",
                  "gallery": "bounding_box_test"}


@dataclasses.dataclass(frozen=True)
class Listing:
  """What was found: `splits` (ready) or a `catalog` for `splits.split_small`."""
  dataset: str
  layout: str
  root: str
  splits: dict[str, list[Record]] | None = None
  catalog: list[Record] | None = None


class LayoutError(DatasetNotFound):
  """The manual directory holds no accepted layout of the dataset."""


def cut_camera(cam: int, first_digit_camera: bool) -> int:
  """1-based camera number -> 0-based id; the quirk keeps its first digit."""
  return (int(str(cam)[0]) if first_digit_camera else cam) - 1


def first_digit_camids(camids: np.ndarray) -> np.ndarray:
  """Applies the reference quirk to 0-based camera ids: `[N] -> [N]` int32."""
  return np.array([cut_camera(int(c) + 1, True) for c in np.asarray(camids)],
                  np.int32).reshape(-1)


def _market_record(path: Path, root: Path, first_digit: bool) -> Record:
  try:
    parsed = parse_market_name(path.name)
  except ValueError as e:
    raise ValueError(f"{e} (file {str(path)!r})") from None
  return make_record(path, root, parsed.pid, cut_camera(parsed.camid + 1, first_digit))


def drop_junk(records: Sequence[Record]) -> list[Record]:
  """Training records without junk (-1) images."""
  return [r for r in records if r.pid != JUNK_PID]


def market_folder_records(folder: Path, root: Path, first_digit: bool = False) -> list[Record]:
  """One Market-style split folder -> records (ids and cameras from the file
  names, sorted by name, junk kept); `name` is relative to `root`."""
  return [_market_record(p, root, first_digit) for p in list_images(folder)]


def list_market(root: Path, first_digit: bool = False) -> dict[str, list[Record]]:
  """`bounding_box_train/`, `query/`, `bounding_box_test/` -> records per split."""
  out = {split: market_folder_records(root / folder, root, first_digit)
         for split, folder in MARKET_FOLDERS.items()}
  out["train_all"] = drop_junk(out["train_all"])
  return out


def _read_list(path: Path) -> list[tuple[str, int]]:
  """An MSMT17 list file: lines `<rel path> <label>`."""
  items = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{str(path)!r} line {n}: expected '<path> <label>', got {line!r}")
    items.append((parts[0], int(parts[1])))
  return items


def msmt17_camera(name: str) -> int:
  """1-based camera of an MSMT17 release file name (third `_` field)."""
  fields = Path(name).name.split("_")
  if len(fields) < 3 or not fields[2].isdigit():
    raise ValueError(f"cannot parse the camera of MSMT17 file {name!r}: expected "
                     "'<pid>_<n>_<cam>_<time>_<frame>_<k>.jpg'")
  return int(fields[2])


def list_msmt17(root: Path, first_digit: bool = False) -> dict[str, list[Record]]:
  """MSMT17 as released: the four list files over `train/` and `test/`."""
  train_dir = root / ("train" if (root / "train").is_dir() else "mask_train_v2")
  test_dir = root / ("test" if (root / "test").is_dir() else "mask_test_v2")

  def records(list_name: str, folder: Path) -> list[Record]:
    out = []
    for rel, label in _read_list(root / list_name):
      path = folder / rel
      out.append(make_record(path, root, label,
                         cut_camera(msmt17_camera(rel), first_digit)))
    return out

  train = records("list_train.txt", train_dir) + records("list_val.txt", train_dir)
  return {"train_all": drop_junk(train),
          "query": records("list_query.txt", test_dir),
          "gallery": records("list_gallery.txt", test_dir)}


def parse_any_name(path: Path, first_digit: bool = False) -> tuple[int, int] | None:
  """(pid, 0-based camid) from a Market-style or `cam_<c>_<pid>_` name, else None."""
  name = path.name
  try:
    if name.startswith("cam_"):
      p = parse_cam_first_name(name)
      return p.pid, p.camid
    p = parse_market_name(name)
    return p.pid, cut_camera(p.camid + 1, first_digit)
  except ValueError:
    return None


def list_pytorch(root: Path, first_digit: bool = False) -> dict[str, list[Record]]:
  """The reference's `pytorch/{train_all,query,gallery}/<pid>/<img>` copy."""
  out, unparsed = {}, 0
  for split in SPLITS:
    folder = root / split
    if not folder.is_dir():
      continue
    records = []
    for path in list_images_recursive(folder):
      parsed = parse_any_name(path, first_digit)
      if parsed is None:
        unparsed += 1
        try:
          parsed = (int(path.parent.name), 0)
        except ValueError:
          raise ValueError(f"cannot parse person id of {str(path)!r} from its name "
                           "or its folder") from None
      records.append(make_record(path, root, *parsed))
    out[split] = records
  if unparsed:
    logging.warning("%s: %d file names were not Market-style nor cam_<c>_<pid>_...; "
                    "their ids come from their folders (camera 0)", root, unparsed)
  out["train_all"] = drop_junk(out.get("train_all", []))
  return out


def accepted_layouts(spec: DatasetSpec) -> list[Layout]:
  """Layouts accepted for a dataset, in detection order."""
  pytorch_req = ("train_all",) if spec.public else SPLITS
  pytorch = Layout("pytorch", pytorch_req, list_pytorch,
                   "the reference's preprocessed copy: pytorch/{"
                   + ",".join(pytorch_req) + "}/<pid>/<img>")
  market = Layout("market", tuple(MARKET_FOLDERS.values()), list_market,
                  "original release: bounding_box_train/, query/, bounding_box_test/")
  if spec.name == "msmt17":
    release = Layout("msmt17", ("list_train.txt", "list_val.txt", "list_query.txt",
                                "list_gallery.txt"), list_msmt17,
                     "MSMT17 as released: train/ (or mask_train_v2/), test/ (or "
                     "mask_test_v2/), list_train.txt, list_val.txt, "
                     "list_query.txt, list_gallery.txt")
    return [release, market, pytorch]
  if spec.small:
    return small_layouts.layouts(spec) + [pytorch]
  return [market, pytorch]


def candidate_roots(spec: DatasetSpec, manual_dir: Path) -> list[Path]:
  """Folders tried: the manual dir, its known sub-folders, and their `pytorch/`."""
  roots = [manual_dir] + [manual_dir / f for f in spec.folders]
  roots += [r / "pytorch" for r in roots]
  seen, out = set(), []
  for r in roots:
    if r not in seen:
      seen.add(r)
      out.append(r)
  return out


def _exists(root: Path, entry: str) -> bool:
  """`root/entry` exists; `entry` may be a glob pattern."""
  if any(ch in entry for ch in "*?["):
    return root.is_dir() and next(root.glob(entry), None) is not None
  return (root / entry).exists()


def detect(spec: DatasetSpec, manual_dir: str | Path) -> tuple[Layout, Path]:
  """The first (layout, root) whose required entries all exist.

  Raises:
    LayoutError: naming the dataset, the path and folders tried, and the
      layouts expected.
  """
  manual_dir = Path(manual_dir).expanduser()
  layouts = accepted_layouts(spec)
  if not manual_dir.is_dir():
    raise LayoutError(
        f"{spec.name}: manual directory {str(manual_dir)!r} does not exist; "
        f"expected the {spec.title} folder, in one of these layouts: "
        + "; ".join(f"[{l.name}] {l.description}" for l in layouts))
  roots = candidate_roots(spec, manual_dir)
  for root in roots:
    for layout in layouts:
      if all(_exists(root, entry) for entry in layout.required):
        return layout, root
  tried = ", ".join(repr(str(r)) for r in roots if r.exists()) or repr(str(manual_dir))
  partial = [f"{str(root)!r} has {', '.join(present)} but not {', '.join(missing)}"
             for root in roots if root.is_dir() for layout in layouts
             for present, missing in [_split_entries(root, layout)] if present and missing]
  raise LayoutError(
      f"{spec.name}: no {spec.title} layout found in {str(manual_dir)!r} (looked in "
      f"{tried} and sub-folders {', '.join(spec.folders)}); expected one of: "
      + "; ".join(f"[{l.name}] {l.description} (looked for "
                  f"{', '.join(l.required)})" for l in layouts)
      + (f". Incomplete: {'; '.join(partial)}" if partial else ""))


def _split_entries(root: Path, layout: Layout) -> tuple[list[str], list[str]]:
  """(present, missing) required entries of `layout` under `root`."""
  present = [e for e in layout.required if _exists(root, e)]
  return present, [e for e in layout.required if e not in present]


def list_dataset(spec: DatasetSpec, manual_dir: str | Path,
                 first_digit_camera: bool = False) -> Listing:
  """Detects the layout under `manual_dir` and lists every image of the dataset."""
  layout, root = detect(spec, manual_dir)
  listed = layout.lister(root, first_digit_camera)
  logging.info("%s: %s layout at %s", spec.name, layout.name, root)
  if isinstance(listed, dict):
    return Listing(spec.name, layout.name, str(root), splits=listed)
  return Listing(spec.name, layout.name, str(root), catalog=list(listed))
