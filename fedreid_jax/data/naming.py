"""Person/camera ids from re-ID file names (Market-1501 convention and kin)."""
from __future__ import annotations

import re
from typing import NamedTuple

# 0002_c1s1_000451_03.jpg ; -1_c3s2_001_00.jpg ; 0001_c12_...(MSMT17 market-style)
_MARKET = re.compile(r"^(-?\d+)_c(\d+)")
# cam_<c>_<pid>_<n>.<ext>  (the reference's small-dataset naming)
_CAM_FIRST = re.compile(r"^cam_(\d+)_(-?\d+)_")


class ParsedName(NamedTuple):
  pid: int
  camid: int  # 0-based


def parse_market_name(name: str, first_digit_camera: bool = False) -> ParsedName:
  """`0002_c1s1_000451_03.jpg` -> (2, 0). Cameras are 1-based in names.

  `first_digit_camera=True` reproduces the reference quirk of keeping only the
  first digit of the camera number (MSMT17's c10..c15 become camera 1).
  """
  m = _MARKET.match(name)
  if not m:
    raise ValueError(
        f"cannot parse person/camera id from file name {name!r}: expected "
        "Market-1501 naming '<pid>_c<cam>...' such as '0002_c1s1_000451_03.jpg'")
  cam = m.group(2)[0] if first_digit_camera else m.group(2)
  return ParsedName(int(m.group(1)), int(cam) - 1)


def parse_cam_first_name(name: str) -> ParsedName:
  """`cam_1_0042_3.png` -> (42, 1). Cameras are already 0-based in these names."""
  m = _CAM_FIRST.match(name)
  if not m:
    raise ValueError(f"cannot parse {name!r}: expected 'cam_<c>_<pid>_<n>.<ext>'")
  return ParsedName(int(m.group(2)), int(m.group(1)))


def format_market_name(pid: int, camid: int, frame: int, n: int, ext: str = "jpg") -> str:
  """Inverse of `parse_market_name` (camid 0-based): `(2, 0, 451, 3) -> 0002_c1s1_000451_03.jpg`."""
  return f"{pid:04d}_c{camid + 1}s1_{frame:06d}_{n:02d}.{ext}"
