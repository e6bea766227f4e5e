"""What every layout lister shares: an image `Record`, a `Layout` and image listing.

`layouts` (the big datasets, the reference's copy, detection) and
`small_layouts` (the small datasets' original releases) both build on this
module; neither imports the other's helpers, so the two files form no circle.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass(frozen=True)
class Record:
  """One image: absolute `path`, `name` relative to the dataset root, ids.

  `group` is a layout-specific tag used by the small datasets' split rules
  (PRID2011 `single`/`multi` shot, 3DPeS view id, CUHK02 camera pair).
  """
  path: str
  name: str
  pid: int
  camid: int
  group: str = ""


@dataclasses.dataclass(frozen=True)
class Layout:
  """A layout: the entries a root must hold, and how to list it."""
  name: str
  required: tuple[str, ...]
  lister: Callable  # (root: Path, first_digit_camera: bool) -> Listing | dict | list
  description: str


def make_record(path: Path, root: Path, pid: int, camid: int, group: str = "") -> Record:
  """A `Record` of `path`, its `name` relative to `root`."""
  return Record(str(path), path.relative_to(root).as_posix(), int(pid), int(camid), group)


def list_images(folder: Path) -> list[Path]:
  """Image files directly in `folder`, sorted by name (e.g. `Thumbs.db` skipped)."""
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_images_recursive(folder: Path) -> list[Path]:
  """Image files anywhere below `folder`, sorted by relative path."""
  return sorted(p for p in folder.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
