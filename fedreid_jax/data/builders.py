"""TFDS builders (array_record, no TensorFlow needed), one per dataset.

Each builder reads the user's manual directory in any accepted layout
(`layouts`), applies our split where the dataset has none (`splits`), and
writes records `{image, pid, camid, filename}`:

- `image`: the file's encoded bytes (JPEG/PNG kept as they are; BMP or non-RGB
  files re-encoded as PNG), decoded lazily when read;
- `pid`: original person id (training ids are relabelled when loaded; junk
  `-1` never appears in `train_all`, it stays in the gallery, like Market's
  `0000` distractors);
- `camid`: 0-based camera, parsed in full;
- `filename`: the file's path relative to the dataset root.

Splits: `train_all`, `query`, `gallery` (CUHK02: `train_all` only). Records are
written in listing order (`disable_shuffling`), and the metadata
(`metadata.json` beside the records) stores the layout, the source path, the
split policy and draw, skipped files, the reference's smaller `train` split
(validation file names, seed `split_seed`), and per split the labels
`{pid, camid, filename}` in record order, so loading needs no pass over the
images. `EXPECTED` counts are checked after building by `prepare`.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterator, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fedreid_jax.data import layouts, specs, splits
from fedreid_jax.data.layouts import Record

BUILD_VERSION = "1.0.0"


class CorruptImageError(OSError):
  """An image file cannot be decoded; the message names the file."""


def encode_image(path: str) -> bytes:
  """Encoded bytes of an image file, checked by a full decode.

  JPEG and RGB PNG bytes are stored unchanged; anything else (BMP, grey,
  palette, RGBA) is converted to RGB and re-encoded as PNG.

  Raises:
    CorruptImageError: the file is unreadable or not a decodable image.
  """
  try:
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
      im.load()
      if im.format in ("JPEG", "PNG") and im.mode == "RGB":
        return raw
      buf = io.BytesIO()
      im.convert("RGB").save(buf, format="PNG")
      return buf.getvalue()
  except Exception as e:  # PIL raises many types for corrupt files.
    raise CorruptImageError(
        f"cannot decode image {path!r} ({type(e).__name__}: {e}); fix or remove "
        "the file, or pass --skip_corrupt to skip unreadable images") from e


def plan_records(spec: specs.DatasetSpec, manual_dir: str | Path, seed: int = 0
                 ) -> tuple[layouts.Listing, dict[str, list[Record]], dict]:
  """(listing, records per split, split metadata) of a dataset on disk."""
  listing = layouts.list_dataset(spec, manual_dir)
  if listing.splits is not None:
    info = {"policy": f"as given by the {listing.layout} layout", "seed": seed}
    if spec.public:
      listing.splits.update(query=[], gallery=[])
    return listing, listing.splits, info
  recs, info = splits.split_small(spec, listing.layout, listing.catalog, seed)
  return listing, recs, info


class ReIDBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: subclasses only name their dataset (`DATASET`)."""

  VERSION = tfds.core.Version(BUILD_VERSION)
  RELEASE_NOTES = {BUILD_VERSION: "Original releases and the reference layout; our split."}
  DATASET = ""

  def __init__(self, *, skip_corrupt: bool = False, split_seed: int = 0,
               plan: tuple | None = None, **kwargs):
    self.skip_corrupt = skip_corrupt
    self.split_seed = split_seed
    self._plan = plan
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=no-self-argument
    """This file. (TFDS's own lookup needs the `importlib_resources` backport
    for builders inside a package; the path is only used to find checksums.)"""
    return epath.Path(__file__)

  @property
  def spec(self) -> specs.DatasetSpec:
    return specs.SPECS[self.DATASET]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.spec.title} person re-identification images for "
                    "fedreid_jax (records: image, pid, camid, filename).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "pid": np.int32,
            "camid": np.int32,
            "filename": tfds.features.Text(),
        }),
        homepage=self.spec.url,
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    plan = self._plan or plan_records(self.spec, dl_manager.manual_dir, self.split_seed)
    listing, records, split_info = plan
    meta = self.info.metadata
    meta.update(dataset=self.spec.name, layout=listing.layout, source=listing.root,
                split=split_info, skipped=[], labels={})
    return {name: self._generate_examples(name, recs)
            for name, recs in records.items() if recs}

  def _generate_examples(self, split: str, records: Sequence[Record]) -> Iterator:
    labels = {"pid": [], "camid": [], "filename": []}
    self.info.metadata["labels"][split] = labels
    for key, r in enumerate(records):
      try:
        image = encode_image(r.path)
      except CorruptImageError as e:
        if not self.skip_corrupt:
          raise
        logging.warning("%s: skipping %s", self.spec.name, e)
        self.info.metadata["skipped"].append(r.name)
        continue
      labels["pid"].append(r.pid)
      labels["camid"].append(r.camid)
      labels["filename"].append(r.name)
      yield key, {"image": image, "pid": r.pid, "camid": r.camid, "filename": r.name}
    if split == "train_all":  # runs once every record is written
      _, val = splits.reference_train_split(np.asarray(labels["pid"], np.int64),
                                            small=self.spec.small, seed=self.split_seed)
      self.info.metadata["reference_train_split"] = {
          "seed": self.split_seed, "val_filenames": [labels["filename"][i] for i in val]}


def _builder(cls_name: str, dataset: str) -> type[ReIDBuilder]:
  spec = specs.SPECS[dataset]
  instructions = (
      f"Download {spec.title} from {spec.url}, extract it, and pass its folder "
      f"(or a folder holding one of {', '.join(spec.folders)}) as --manual_dir.")
  return type(cls_name, (ReIDBuilder,), {
      "DATASET": dataset, "name": dataset, "__module__": __name__,
      "MANUAL_DOWNLOAD_INSTRUCTIONS": instructions,
      "__doc__": f"{spec.title}: TFDS builder (array_record)."})


Msmt17 = _builder("Msmt17", "msmt17")
DukeMTMC = _builder("DukeMTMC", "dukemtmc")
Market1501 = _builder("Market1501", "market1501")
Cuhk03NpDetected = _builder("Cuhk03NpDetected", "cuhk03_np_detected")
Cuhk03NpLabeled = _builder("Cuhk03NpLabeled", "cuhk03_np_labeled")
Prid2011 = _builder("Prid2011", "prid2011")
Cuhk01 = _builder("Cuhk01", "cuhk01")
Viper = _builder("Viper", "viper")
ThreeDPeS = _builder("ThreeDPeS", "3dpes")
Ilids = _builder("Ilids", "ilids")
Cuhk02 = _builder("Cuhk02", "cuhk02")

BUILDERS: dict[str, type[ReIDBuilder]] = {
    b.DATASET: b for b in (Msmt17, DukeMTMC, Market1501, Cuhk03NpDetected,
                           Cuhk03NpLabeled, Prid2011, Cuhk01, Viper, ThreeDPeS,
                           Ilids, Cuhk02)}


def get_builder(name: str, data_dir: str | Path, **kwargs) -> ReIDBuilder:
  """The builder of dataset `name` (any accepted spelling) over `data_dir`."""
  return BUILDERS[specs.resolve_name(name)](data_dir=str(data_dir), **kwargs)


def build_path(name: str, data_dir: str | Path) -> Path:
  """Where dataset `name` is (or would be) built: `<data_dir>/<name>/<version>`."""
  return Path(data_dir) / specs.resolve_name(name) / BUILD_VERSION


def is_built(name: str, data_dir: str | Path) -> bool:
  """Whether a finished build of `name` exists in `data_dir`."""
  return (build_path(name, data_dir) / "dataset_info.json").is_file()


def labels_of(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
  """Stored labels of a built split: `{pid, camid: [N] int32, filename: [N] str}`."""
  raw = builder.info.metadata.get("labels", {}).get(split)
  if raw is None:
    return {"pid": np.zeros(0, np.int32), "camid": np.zeros(0, np.int32),
            "filename": np.zeros(0, str)}
  return {"pid": np.asarray(raw["pid"], np.int32).reshape(-1),
          "camid": np.asarray(raw["camid"], np.int32).reshape(-1),
          "filename": np.asarray(raw["filename"], str).reshape(-1)}


def built_counts(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
  """Ids, images per split and cameras of a built dataset (from its metadata)."""
  labels = {s: labels_of(builder, s) for s in layouts.SPLITS}
  return splits.count_summary({s: (v["pid"], v["camid"]) for s, v in labels.items()})


def check_counts(name: str, counts: dict[str, int]) -> list[str]:
  """Mismatches against the paper's table (`specs.EXPECTED`): one sentence each (empty:
  all match)."""
  spec = specs.get_spec(name)
  expected = {"cameras": spec.expected.cameras, "train_ids": spec.expected.train_ids,
              "train_images": spec.expected.train_images}
  if not spec.public:
    expected.update(query_ids=spec.expected.query_ids,
                    query_images=spec.expected.query_images,
                    gallery_images=spec.expected.gallery_images)
  return [f"{spec.name}: {key.replace('_', ' ')} expected {want} (the paper's table), "
          f"found {counts.get(key, 0)}"
          for key, want in expected.items() if counts.get(key, 0) != want]
