"""Reading and resizing images: the one place pixels are decoded and resized.

Every path to a model-size image (the in-memory training cache, the streamed
grain loader, the test sets) goes through `resize_bicubic` or
`decode_resized`, so the same index always gives the same pixels.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from fedreid_jax.errors import CorruptImage


def read_rgb(path: str | Path) -> np.ndarray:
  """Reads one image file as uint8 RGB `[H, W, 3]`; errors name the file."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # PIL raises several types for corrupt files.
    raise CorruptImage(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}; "
                       "replace or delete the file") from e


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB `[H, W, 3]`."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def resize_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 `[h, w, 3]` -> `[H, W, 3]` (PIL bicubic; no-op at the right size)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC),
                    np.uint8)


def decode_resized(data: bytes, size: tuple[int, int], draft: bool = True) -> np.ndarray:
  """Encoded bytes -> uint8 RGB `[H, W, 3]` at `size` (bicubic).

  With `draft`, a JPEG at least twice the target size is first decoded at a
  reduced scale by libjpeg (DCT scaling, as PIL's `thumbnail` does), then
  resized bicubically: several times faster at small sizes, and no change
  when upsampling (e.g. Market's 128x64 to 256x128).
  """
  h, w = size
  with Image.open(io.BytesIO(data)) as im:
    if draft and im.format == "JPEG":
      im.draft("RGB", (w, h))
    im = im.convert("RGB")
    if im.size != (w, h):
      im = im.resize((w, h), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)
