"""Building the TFDS copies: `prepare` one dataset or `prepare_all`.

Safety rules: an existing build is never replaced without `overwrite=True`
(`AlreadyPreparedError`); with it, the old build is moved aside and put back
if the new build fails. A missing or wrong manual directory raises
`layouts.LayoutError` (naming the dataset, the paths tried and the folders
expected) before anything is written; an undecodable image stops the build
with `builders.CorruptImageError` naming the file, unless `skip_corrupt`
(the skipped files are counted and listed in the metadata).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from fedreid_jax.data import builders, layouts, specs

DEFAULT_DATA_DIR = "data/tfds"


class AlreadyPreparedError(FileExistsError):
  """The dataset is already built in `data_dir` and `overwrite` was not given."""


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Outcome of one build."""
  name: str
  path: str
  layout: str
  source: str
  counts: dict
  mismatches: list
  skipped: list


def prepare_command(name: str, data_dir: str | Path = DEFAULT_DATA_DIR,
                    manual_dir: str | None = None) -> str:
  """The shell command that builds `name` (for error messages and docs)."""
  spec = specs.get_spec(name)
  manual = manual_dir or f"/path/to/{spec.folders[0]}"
  return (f"python -m fedreid_jax.data prepare --dataset {spec.name} "
          f"--manual_dir {manual} --data_dir {data_dir}")


def _corrupt_cause(err: BaseException) -> builders.CorruptImageError | None:
  seen = err
  while seen is not None:
    if isinstance(seen, builders.CorruptImageError):
      return seen
    seen = seen.__cause__ or seen.__context__
  return None


def _remove_incomplete(data_path: Path) -> None:
  for p in data_path.parent.glob(f"*incomplete*{data_path.name}*"):
    shutil.rmtree(p, ignore_errors=True)


def check_not_empty(spec: specs.DatasetSpec, listing: layouts.Listing,
                    records: dict[str, list]) -> None:
  """Raises LayoutError (before anything is written) when a split the
  dataset must have holds no image: a layout whose folders are empty."""
  needed = [s for s, recs in records.items()
            if not recs and not (spec.public and s in ("query", "gallery"))]
  if needed:
    raise layouts.LayoutError(
        f"{spec.name}: no images found for the {', '.join(needed)} split(s) in the "
        f"{listing.layout} layout at {listing.root!r}; put the dataset's images there "
        "(extract the release archive again) and rerun")


def built_empty(name: str, data_dir: str | Path) -> bool:
  """Whether the build of `name` in `data_dir` holds no training image (an
  empty layout prepared by an earlier version): it is replaced, not kept."""
  try:
    counts = builders.built_counts(builders.get_builder(name, data_dir))
  except Exception:  # unreadable metadata: not ours to judge; kept as built
    return False
  if counts.get("train_images", 0):
    return False
  logging.info("%s: the build at %s holds no image; it is replaced", name,
               builders.build_path(name, data_dir))
  return True


def prepare(name: str, manual_dir: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR, *,
            overwrite: bool = False, skip_corrupt: bool = False,
            split_seed: int = 0) -> Prepared:
  """Builds dataset `name` from `manual_dir` into `data_dir` and checks its counts.

  Returns:
    `Prepared` with the counts found, the mismatches against the paper's
    table (`specs.EXPECTED`) and the skipped images (the caller reports them).
  Raises:
    KeyError: unknown dataset name (lists the known ones).
    AlreadyPreparedError: already built and `overwrite` is False.
    layouts.LayoutError: no accepted layout under `manual_dir`, or one whose
      folders hold no image.
    builders.CorruptImageError: an image cannot be decoded (not `skip_corrupt`).
  """
  spec = specs.get_spec(name)
  data_dir = Path(data_dir)
  data_path = builders.build_path(spec.name, data_dir)
  if builders.is_built(spec.name, data_dir) and not overwrite and not built_empty(spec.name,
                                                                                data_dir):
    raise AlreadyPreparedError(
        f"{spec.name} is already prepared at {str(data_path)!r}; pass --overwrite "
        "to rebuild it (the existing build is kept until the new one succeeds)")
  plan = builders.plan_records(spec, manual_dir, split_seed)
  check_not_empty(spec, plan[0], plan[1])
  backup = data_path.parent / f".{data_path.name}.previous"
  if data_path.exists():
    shutil.rmtree(backup, ignore_errors=True)
    data_path.rename(backup)
    logging.info("%s: moved the previous build aside to %s", spec.name, backup)
  builder = builders.get_builder(spec.name, data_dir, skip_corrupt=skip_corrupt,
                                 split_seed=split_seed, plan=plan)
  try:
    with tempfile.TemporaryDirectory(prefix="fedreid_dl_") as tmp:
      builder.download_and_prepare(
          download_dir=tmp,
          download_config=tfds.download.DownloadConfig(manual_dir=plan[0].root))
  except BaseException as e:
    _remove_incomplete(data_path)
    shutil.rmtree(data_path, ignore_errors=True)
    if data_path.parent.is_dir() and not any(data_path.parent.iterdir()):
      data_path.parent.rmdir()
    if backup.exists():
      backup.rename(data_path)
      logging.info("%s: build failed; previous build restored", spec.name)
    corrupt = _corrupt_cause(e)
    if corrupt is not None:
      raise builders.CorruptImageError(f"{spec.name}: {corrupt}") from e
    raise
  shutil.rmtree(backup, ignore_errors=True)
  built = builders.get_builder(spec.name, data_dir)
  counts = builders.built_counts(built)
  mismatches = builders.check_counts(spec.name, counts)  # reported by the caller
  meta = built.info.metadata
  skipped = list(meta.get("skipped", []))
  return Prepared(spec.name, str(data_path), meta.get("layout", ""), meta.get("source", ""),
                  counts, mismatches, skipped)


def prepare_all(manual_dir: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR, *,
                names: tuple[str, ...] = specs.ALL, **kwargs
                ) -> tuple[list[Prepared], dict[str, str], dict[str, str]]:
  """Prepares every dataset found under `manual_dir` (one folder per dataset).

  Returns:
    (the builds done, `{name: error}` for the datasets that failed (missing,
    corrupt image), `{name: message}` for those already prepared and kept
    because `overwrite` was not given).
  """
  done, failed, kept = [], {}, {}
  for name in names:
    try:
      done.append(prepare(name, manual_dir, data_dir, **kwargs))
    except AlreadyPreparedError as e:  # reported by the caller, once
      kept[specs.resolve_name(name)] = str(e)
    except (layouts.LayoutError, builders.CorruptImageError, ValueError) as e:
      failed[specs.resolve_name(name)] = str(e)
  return done, failed, kept


def summary_table(done: list[Prepared]) -> str:
  """A fixed-width table of the counts found, one line per dataset."""
  head = (f"{'dataset':20s} {'layout':9s} {'train ids/imgs':>15s} {'query ids/imgs':>15s} "
          f"{'gallery':>8s} {'cams':>4s} {'skipped':>7s}  check")
  lines = [head, "-" * len(head)]
  for p in done:
    c = p.counts
    lines.append(
        f"{p.name:20s} {p.layout:9s} {c['train_ids']:>6d}/{c['train_images']:<8d} "
        f"{c['query_ids']:>6d}/{c['query_images']:<8d} {c['gallery_images']:>8d} "
        f"{c['cameras']:>4d} {len(p.skipped):>7d}  "
        f"{'ok' if not p.mismatches else str(len(p.mismatches)) + ' mismatch(es)'}")
  return "\n".join(lines)
