"""Reader for the Market-1501 folder layout (and every dataset stored like it).

```
root/
  bounding_box_train/  0002_c1s1_000451_03.jpg ...   training split
  query/               0001_c1s1_001051_00.jpg ...   query split
  bounding_box_test/   0000_c1s1_000151_01.jpg ...   gallery split
```

File names are `<pid>_c<cam>s<seq>_<frame>_<n>.<ext>` (see
`naming.parse_market_name`); cameras are 1-based in names and 0-based here.

- Train: junk id -1 is dropped, the remaining ids are relabelled 0..C-1
  (`base.relabel`, sorted order).
- Query / gallery: original ids are kept. Gallery images with id -1 (junk,
  ignored by evaluation) and id 0 (Market's `0000` distractors, kept as
  negatives, as the official protocol does) are kept.

Files are sorted by name, so the order (and the relabelling) is deterministic.
Files that are not images (`.jpg`, `.jpeg`, `.png`, `.bmp`), such as the
`Thumbs.db` shipped inside Market-1501, are skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from fedreid_jax.data.base import JUNK_PID, ClientData, ReIDSplit, relabel
from fedreid_jax.data.images import read_rgb
from fedreid_jax.data.layouts import MARKET_FOLDERS, market_folder_records
from fedreid_jax.errors import DatasetNotFound

SPLIT_FOLDERS = {"train": MARKET_FOLDERS["train_all"], "query": MARKET_FOLDERS["query"],
                 "gallery": MARKET_FOLDERS["gallery"]}


def _check_layout(root: Path, name: str) -> None:
  expected = ", ".join(f"{f}/" for f in SPLIT_FOLDERS.values())
  if not root.is_dir():
    raise DatasetNotFound(
        f"dataset {name!r}: root folder {str(root)!r} does not exist; expected a "
        f"Market-1501 style folder containing {expected}")
  missing = [f for f in SPLIT_FOLDERS.values() if not (root / f).is_dir()]
  if missing:
    raise DatasetNotFound(
        f"dataset {name!r}: missing sub-folder(s) {', '.join(missing)} in "
        f"{str(root)!r} (tried {', '.join(str(root / m) for m in missing)}); "
        f"expected a Market-1501 style folder containing {expected}")


def _preload(paths: Sequence[Path], desc: str) -> np.ndarray | list[np.ndarray]:
  """Reads every file once: a `[N, H, W, 3]` uint8 array if sizes agree."""
  images = [read_rgb(p) for p in tqdm(paths, desc=desc, unit="img",
                                      leave=False, disable=True if not paths else None)]
  shapes = {im.shape for im in images}
  if len(shapes) == 1:
    return np.stack(images)
  if not images:
    return np.zeros((0, 1, 1, 3), np.uint8)
  return images


def _reader(paths: Sequence[Path], preload: bool, desc: str) -> Callable[[int], np.ndarray]:
  if preload:
    return _preload(paths, desc).__getitem__
  paths = tuple(paths)
  return lambda i: read_rgb(paths[i])


def load_market_split(folder: str | Path, *, train: bool, preload: bool = True,
                      first_digit_camera: bool = False, desc: str = "") -> ReIDSplit:
  """One split folder -> `ReIDSplit`.

  `train=True` drops junk (-1) images and relabels ids to 0..C-1; otherwise the
  original ids (including -1 and 0) are kept.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise DatasetNotFound(f"split folder {str(folder)!r} does not exist")
  records = market_folder_records(folder, folder, first_digit_camera)
  names = [r.name for r in records]
  pids = np.array([r.pid for r in records], np.int32).reshape(-1)
  camids = np.array([r.camid for r in records], np.int32).reshape(-1)
  if train:
    keep = pids != JUNK_PID
    names = [n for n, k in zip(names, keep) if k]
    pids, camids = relabel(pids[keep]), camids[keep]
  read = _reader([folder / n for n in names], preload, desc or folder.name)
  return ReIDSplit(read_image=read, pids=pids.astype(np.int32),
                   camids=camids.astype(np.int32), names=tuple(names))


def _count_junk(folder: Path) -> int:
  return sum(1 for r in market_folder_records(folder, folder) if r.pid == JUNK_PID)


def split_info(train: ReIDSplit, query: ReIDSplit, gallery: ReIDSplit) -> dict:
  """Counts per split: ids (junk/distractors excluded), images, cameras."""
  def real_ids(s: ReIDSplit) -> int:
    return int(np.unique(s.pids[s.pids > 0]).size) if len(s) else 0
  cams = np.unique(np.concatenate([train.camids, query.camids, gallery.camids]))
  return {
      "num_train_ids": int(np.unique(train.pids).size),
      "num_train_images": len(train),
      "num_query_ids": real_ids(query),
      "num_query_images": len(query),
      "num_gallery_ids": real_ids(gallery),
      "num_gallery_images": len(gallery),
      "num_gallery_junk": int(np.sum(gallery.pids == JUNK_PID)),
      "num_gallery_distractors": int(np.sum(gallery.pids == 0)),
      "num_cameras": int(cams.size),
      "cameras": [int(c) for c in cams],
  }


def load_market_folder(root: str | Path, name: str, *, preload: bool = True,
                       first_digit_camera: bool = False) -> ClientData:
  """Reads `root/{bounding_box_train,query,bounding_box_test}` into a `ClientData`.

  Args:
    root: the dataset folder.
    name: the dataset/client name (used in messages and `ClientData.name`).
    preload: read every image into memory once (a uint8 `[N, H, W, 3]` array
      per split when all images share a size); otherwise read lazily per index.
    first_digit_camera: reference quirk, camera number cut to its first digit.
  Returns:
    `ClientData` whose `info` holds the counts (see `split_info`) plus `root`
    and the number of junk training images dropped.
  Raises:
    FileNotFoundError: root or a split folder is missing (message names the
      dataset, the path tried and the folder names expected).
    OSError: an image cannot be read (message names the file).
  """
  root = Path(root)
  _check_layout(root, name)
  splits = {
      split: load_market_split(root / folder, train=split == "train",
                               preload=preload, first_digit_camera=first_digit_camera,
                               desc=f"{name} {split}")
      for split, folder in SPLIT_FOLDERS.items()
  }
  info = split_info(splits["train"], splits["query"], splits["gallery"])
  info["root"] = str(root)
  info["num_train_junk_dropped"] = _count_junk(root / SPLIT_FOLDERS["train"])
  return ClientData(name=name, train=splits["train"], query=splits["query"],
                    gallery=splits["gallery"], info=info)
