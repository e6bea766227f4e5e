"""A grain input pipeline over a `ReIDSplit`: read, decode, resize, batch.

    loader = make_loader(client.train, image_size=(256, 128), batch_size=32,
                         seed=0, worker_count=2, augment=True)
    for batch in loader:  # {"image": uint8 [B, H, W, 3], "label": [B], "camid": [B]}
      ...

- Images are read with the split's `read_image` (for prepared datasets:
  `tfds.data_source` records decoded with PIL), bicubic-resized to
  `image_size`, and batched to fixed shapes; the last partial batch is
  dropped.
- Order and augmentation are a function of `seed` only: a precomputed
  batch plan (`epoch_plan`, a seeded permutation per epoch) and one random
  stream per (batch, slot); grain's `mp_prefetch` hands whole batches to
  workers and returns them in plan order, so results do not depend on
  `worker_count` or threads.
- `augment=True` adds the SPEC.md section 2 training transform on the host:
  zero-pad 10, random crop back to `image_size`, random horizontal flip.
  `normalize=True` then emits float32 ImageNet-normalised images, and
  `erase_prob > 0` adds random erasing (off by default). The engine may
  instead do these on the device; then keep both off and ship uint8.
- Worker processes (`worker_count > 0`) need a picklable split: prepared
  datasets and in-memory arrays are; absl flags are marked parsed here
  because grain's workers read them. Close the iterator (`it.close()`) when
  done early, so the workers stop at once. On the 2-core development machine
  threads alone (`worker_count=0`) deliver more than worker processes (see
  `benchmarks/input_pipeline.py`); processes pay off with more cores.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterable, Iterator

import grain
import numpy as np
from PIL import Image

from fedreid_jax.datasets.base import ReIDSplit
from fedreid_jax.datasets.scenarios import Take

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PAD = 10


def resize_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 `[h, w, 3]` -> `[H, W, 3]` (PIL bicubic; no-op at the right size)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC),
                    np.uint8)


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = PAD) -> np.ndarray:
  """Zero-pad `pad`, random crop back to the input size, random h-flip.

  Same result as cropping `np.pad(image, pad)` at a random offset, without
  building the padded copy.
  """
  h, w = image.shape[:2]
  y, x = rng.integers(0, 2 * pad + 1, size=2) - pad  # shift of the crop window
  flip = rng.random() < 0.5
  out = np.zeros_like(image)
  dst = out[:, ::-1] if flip else out  # write flipped: the result stays contiguous
  nh, nw = h - abs(y), w - abs(x)
  if nh > 0 and nw > 0:
    dst[max(0, -y):max(0, -y) + nh, max(0, -x):max(0, -x) + nw] = \
        image[max(0, y):max(0, y) + nh, max(0, x):max(0, x) + nw]
  return out


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 `[H, W, 3]` -> float32 ImageNet-normalised."""
  return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float,
                 area=(0.02, 0.4), aspect: float = 0.3) -> np.ndarray:
  """Random erasing (Zhong et al.): a random box set to 0 with probability `prob`."""
  if rng.random() >= prob:
    return image
  h, w = image.shape[:2]
  for _ in range(100):
    target = rng.uniform(*area) * h * w
    ratio = rng.uniform(aspect, 1 / aspect)
    eh, ew = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if 0 < eh < h and 0 < ew < w:
      y, x = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
      image = image.copy()
      image[y:y + eh, x:x + ew] = 0
      return image
  return image


def epoch_plan(num_examples: int, batch_size: int, seed: int, num_epochs: int = 1,
               shuffle: bool = True) -> np.ndarray:
  """`[num_epochs * (N // B), B]` indices: each epoch a fresh seeded permutation
  (or the identity), last partial batch dropped."""
  per_epoch = num_examples // batch_size
  rows = []
  for epoch in range(num_epochs):
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples))
    rows.append(order[:per_epoch * batch_size].reshape(per_epoch, batch_size))
  return np.concatenate(rows, 0).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class BatchReader:
  """Batch index + plan row -> `{image [B, H, W, 3], label [B], camid [B]}`.

  The random stream of the image at (batch b, slot k) is
  `default_rng([seed, b, k])`: independent of threads and worker processes.
  """
  split: ReIDSplit
  size: tuple[int, int]
  seed: int = 0
  augment: bool = False
  normalize: bool = False
  erase_prob: float = 0.0
  draft: bool = True

  def resized(self, row: np.ndarray) -> list[np.ndarray]:
    """The row's images at `size`: one batched read when the split's reader
    offers `read_resized` (prepared datasets), else image by image."""
    read, idx = self.split.read_image, np.asarray(row, np.int64)
    while isinstance(read, Take):
      read, idx = read.read_image, read.indices[idx]
    if hasattr(read, "read_resized"):
      return read.read_resized(idx, self.size, self.draft)
    return [resize_bicubic(read(int(i)), self.size) for i in idx]

  def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.augment:
      image = pad_crop_flip(image, rng)
    if self.normalize:
      image = normalize(image)
    if self.augment and self.erase_prob > 0:
      image = random_erase(image, rng, self.erase_prob)
    return image

  def __call__(self, batch: int, row: np.ndarray) -> dict[str, np.ndarray]:
    images = [self.transform(im, np.random.default_rng([self.seed, batch, k]))
              for k, im in enumerate(self.resized(row))]
    return {"image": np.stack(images),
            "label": np.asarray(self.split.pids[row], np.int32),
            "camid": np.asarray(self.split.camids[row], np.int32)}


def _mark_absl_flags_parsed() -> None:
  from absl import flags  # grain's worker processes read absl flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(split: ReIDSplit, *, image_size: tuple[int, int], batch_size: int,
                seed: int = 0, shuffle: bool = True, num_epochs: int = 1,
                worker_count: int = 0, num_threads: int = 4, prefetch: int = 4,
                augment: bool = False, normalize: bool = False,
                erase_prob: float = 0.0, jpeg_draft: bool = True) -> grain.IterDataset:
  """A grain dataset of fixed-shape batches over `split` (drop last), in order.

  Args:
    image_size: `(H, W)` of the emitted images.
    num_epochs: passes over the split, each with its own seeded order.
    worker_count: grain worker processes (0: threads of this process only).
    num_threads / prefetch: reading threads and batches read ahead (per process).
    augment / normalize / erase_prob: host-side transform (see the module
      docstring); `normalize` also applies without `augment` (test images).
    jpeg_draft: let libjpeg decode large JPEGs at a reduced scale before the
      bicubic resize (`source.decode_resized`; prepared datasets only).
  Returns:
    An iterable `grain.IterDataset`; `len(epoch_plan(...))` batches per pass.
  Raises:
    ValueError: the split holds fewer images than one batch.
  """
  if len(split) < batch_size:
    raise ValueError(f"split of {len(split)} images is smaller than batch_size={batch_size}")
  plan = epoch_plan(len(split), batch_size, seed, num_epochs, shuffle)
  reader = BatchReader(split, tuple(image_size), seed, augment, normalize, erase_prob,
                       jpeg_draft)
  ds = grain.MapDataset.source(plan).map_with_index(reader)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  if worker_count:
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=prefetch))
  return it


def prefetch_to_device(batches: Iterable[dict], size: int = 2, sharding=None) -> Iterator[dict]:
  """Moves batches to the device `size` ahead in a background thread."""
  import jax  # only needed here
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def producer():
    try:
      for b in batches:
        q.put(jax.device_put(b, sharding) if sharding is not None else jax.device_put(b))
    except BaseException as e:  # surfaced in the consumer
      q.put(e)
    q.put(done)

  threading.Thread(target=producer, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
