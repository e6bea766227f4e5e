"""The ten real datasets: names, where they come from, and their reference counts.

`EXPECTED` holds the paper's benchmark table (the nine clients) plus the two sets
the table does not list: CUHK03-NP `labeled` (counts of the CUHK03-NP release)
and CUHK02, the public set (1,816 ids, 7,264 images, 10 cameras: five camera
pairs P1..P5). `prepare` checks a built dataset against these numbers.

Names are matched loosely (`resolve_name`): case, `-`, `_` and spaces are
ignored and the reference code's folder names are aliases, so `Market`,
`DukeMTMC-reID`, `cuhk03-np-detected` and `prid` all work.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Expected:
  """Reference statistics of one dataset (the paper's benchmark table)."""
  cameras: int
  train_ids: int
  train_images: int
  query_ids: int = 0
  query_images: int = 0
  gallery_images: int = 0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset: its canonical name and how to find and check it.

  Attributes:
    name: canonical name (also the TFDS builder name and data folder).
    title: human name, as in the papers.
    url: where to request/download the original release.
    folders: folder names tried under `--manual_dir` (release names first,
      then the reference code's names).
    expected: the reference counts checked after building.
    small: a two-camera set without a standard split (our split applies) and
      the reference's 20%-validation `train` rule.
    public: the server's public set (train split only, never a client).
  """
  name: str
  title: str
  url: str
  folders: tuple[str, ...]
  expected: Expected
  small: bool = False
  public: bool = False


SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec(
        "msmt17", "MSMT17", "https://www.pkuvmc.com/dataset.html",
        ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17"),
        Expected(15, 1041, 32621, 3060, 11659, 82161)),
    DatasetSpec(
        "dukemtmc", "DukeMTMC-reID",
        "https://github.com/layumi/DukeMTMC-reID_evaluation",
        ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc"),
        Expected(8, 702, 16522, 702, 2228, 17661)),
    DatasetSpec(
        "market1501", "Market-1501",
        "https://zheng-lab.cecs.anu.edu.au/Project/project_reid.html",
        ("Market-1501-v15.09.15", "Market-1501", "Market", "market1501"),
        Expected(6, 751, 12936, 750, 3368, 19732)),
    DatasetSpec(
        "cuhk03_np_detected", "CUHK03-NP (detected)",
        "https://github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP",
        ("cuhk03-np/detected", "cuhk03-np-detected", "CUHK03-NP/detected",
         "cuhk03_np/detected", "detected"),
        Expected(2, 767, 7365, 700, 1400, 5332)),
    DatasetSpec(
        "cuhk03_np_labeled", "CUHK03-NP (labeled)",
        "https://github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP",
        ("cuhk03-np/labeled", "cuhk03-np-labeled", "CUHK03-NP/labeled",
         "cuhk03_np/labeled", "labeled"),
        Expected(2, 767, 7368, 700, 1400, 5328)),
    DatasetSpec(
        "prid2011", "PRID2011",
        "https://www.tugraz.at/institute/icg/research/team-bischof/lrs/downloads/PRID11/",
        ("prid_2011", "prid2011", "PRID2011", "prid"),
        Expected(2, 285, 3744, 100, 100, 649), small=True),
    DatasetSpec(
        "cuhk01", "CUHK01", "https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html",
        ("CUHK01/campus", "campus", "CUHK01", "cuhk01"),
        Expected(2, 485, 1940, 486, 972, 972), small=True),
    DatasetSpec(
        "viper", "VIPeR", "https://vision.soe.ucsc.edu/node/178",
        ("VIPeR", "VIPeR.v1.0", "viper"),
        Expected(2, 316, 632, 316, 316, 316), small=True),
    DatasetSpec(
        "3dpes", "3DPeS", "https://aimagelab.ing.unimore.it/imagelab/page.asp?IdPage=16",
        ("3DPeS", "3dpes"),
        Expected(2, 93, 450, 86, 246, 316), small=True),
    DatasetSpec(
        "ilids", "iLIDS-VID (i-LIDS MCTS persons)",
        "https://xiatian-zhu.github.io/downloads_qmul_iLIDS-VID_ReID_dataset.html",
        ("i-LIDS_Pedestrian", "ilids", "iLIDS", "i-LIDS-VID", "iLIDS-VID"),
        Expected(2, 59, 248, 60, 98, 130), small=True),
    DatasetSpec(
        "cuhk02", "CUHK02 (public set)",
        "https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html",
        ("cuhk02/Dataset", "CUHK02/Dataset", "Dataset", "cuhk02", "CUHK02"),
        Expected(10, 1816, 7264), small=True, public=True),
)}

# The nine clients in the paper's table order (most training images first), then the
# public set.
CLIENTS = ("msmt17", "dukemtmc", "market1501", "cuhk03_np_detected", "prid2011",
           "cuhk01", "viper", "3dpes", "ilids")
PUBLIC = "cuhk02"
ALL = tuple(SPECS)

_ALIASES = {
    "market": "market1501", "market150115": "market1501",
    "market1501v150915": "market1501",
    "duke": "dukemtmc", "dukemtmcreid": "dukemtmc",
    "msmt": "msmt17", "msmt17v1": "msmt17", "msmt17v2": "msmt17",
    "cuhk03": "cuhk03_np_detected", "cuhk03np": "cuhk03_np_detected",
    "cuhk03npdetected": "cuhk03_np_detected", "cuhk03detected": "cuhk03_np_detected",
    "cuhk03nplabeled": "cuhk03_np_labeled", "cuhk03labeled": "cuhk03_np_labeled",
    "prid": "prid2011", "prid2011": "prid2011",
    "threedpes": "3dpes", "pes3d": "3dpes",
    "ilidsvid": "ilids", "ilidsmcts": "ilids", "ilidspedestrian": "ilids",
}


def _normal(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_name(name: str) -> str:
  """Canonical dataset name for `name` (aliases and any spelling accepted).

  Raises:
    KeyError: unknown name; the message lists the known names.
  """
  key = _normal(name)
  for canonical in SPECS:
    if _normal(canonical) == key:
      return canonical
  if key in _ALIASES:
    return _ALIASES[key]
  raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(ALL)} "
                 "(or 'all')")


def get_spec(name: str) -> DatasetSpec:
  """The `DatasetSpec` of `name` (any accepted spelling)."""
  return SPECS[resolve_name(name)]
