"""The embedded synthetic federated re-ID benchmark: nine domains + a public set.

Procedurally rendered pedestrians (`synthetic_render`) with real re-ID
structure: identities differ by clothing colours and pattern, body shape,
hair/skin and accessories; cameras differ by scene, illumination, colour cast,
preferred viewpoint (front, back or side: moves or hides the bag, shows the
backpack or only its straps), scale/position, blur, noise and occluders; each
domain has its own palette, contrast and lighting, and mirrors the relative
training size and camera count of one real dataset (the paper's table),
scaled down ~25x (the tiny ones less, to keep a few dozen images). Train and
test ids are disjoint. Multi-camera domains take up to `query_per_id`
queries per test id, one per camera and never from all of its cameras, so
every query has a gallery match on another camera; two-camera domains use
the reference's rule (camera-0 views are queries, camera-1 views the
gallery). The big domains add junk (-1) and `0000` distractor gallery images.

Default benchmark (seed 0; id and camera counts are fixed, image counts vary
a few percent with the seed):

| domain | mimics | cams | train ids | train imgs | query ids | query | gallery (junk, 0000) |
|---|---|---|---|---|---|---|---|
| syn_msmt17 | MSMT17 | 15 | 104 | 1233 | 100 | 250 | 1018 (20, 40) |
| syn_duke | DukeMTMC-reID | 8 | 70 | 602 | 60 | 108 | 476 (12, 20) |
| syn_market | Market-1501 | 6 | 75 | 533 | 60 | 145 | 301 (12, 24) |
| syn_cuhk03 | CUHK03-NP | 2 | 77 | 304 | 60 | 125 | 113 |
| syn_prid | PRID2011 | 2 | 28 | 178 | 20 | 61 | 126 (0, 60) |
| syn_cuhk01 | CUHK01 | 2 | 48 | 149 | 40 | 65 | 63 |
| syn_viper | VIPeR | 2 | 32 | 64 | 32 | 32 | 32 |
| syn_3dpes | 3DPeS | 2 | 10 | 45 | 16 | 37 | 37 |
| syn_ilids | iLIDS-VID | 2 | 7 | 28 | 12 | 22 | 26 |
| syn_public | CUHK02 (public set) | 6 | 100 | 400 | - | - | - |

Training total 3136 images (syn_msmt17 39%). The tiny domains' test sets are
a little larger than their training sets so that their rank-1 is less noisy.
Difficulty (seed 0, `pixel_rank1`: raw-pixel cosine nearest neighbour):
16/19/45/37/26/51/28/57/45% in table order, while a hand-made colour-strip
feature reaches 42-87%: camera and viewpoint change the pixels a lot,
identity stays learnable.

Images are 64x32 by default (`image_size=(h, w)`), rendered at 2x and
downsampled with Lanczos, stored as lossless PNG in Market-1501 naming under
`<data_root>/synthetic/v<version>_seed<seed>_<h>x<w>/<domain>/{bounding_box_train,query,bounding_box_test}/`
with a `manifest.json` written last; a folder is generated in a temporary
sibling and renamed into place, and a folder without a valid manifest is
removed and regenerated. Everything is a pure function of (generator
version, seed, image size, domain spec): each domain, camera, identity and
image has its own random stream, so a subset of domains renders the same
images as the full benchmark. Generating the default benchmark takes ~30 s
of CPU (~4.5 ms per image, 6573 images).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fedreid_jax.data.base import JUNK_PID, ClientData, ReIDSplit
from fedreid_jax.data.layouts import list_images
from fedreid_jax.data.market_folder import SPLIT_FOLDERS, load_market_folder, load_market_split
from fedreid_jax.data.naming import format_market_name
from fedreid_jax.data.synthetic_render import (Camera, DomainStyle, Identity, render_image,
                                                   sample_camera, sample_identity)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
MANIFEST = "manifest.json"
_CAMERAS, _IDENTITIES, _LAYOUT, _IMAGES = range(4)  # random stream ids


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  """One synthetic domain (a client dataset, or the public set if `test_ids == 0`).

  Attributes:
    images_per_id: inclusive range of images per identity (train and test).
    cams_per_id: inclusive range of cameras an identity appears in (>= 2).
    query_per_id: at most this many queries per test id, one per camera, never
      from all of the id's cameras.
    query_camera: if set (two-camera datasets), all of a test id's views on
      this camera are queries and all other views the gallery (the reference's
      rule: camera-0 views query, camera-1 views gallery); `query_per_id` is
      then unused and distractors/junk avoid this camera.
    junk / distractors: gallery images with id -1 (bad detections) and id 0
      (people never queried).
  """
  name: str
  mimics: str
  num_cameras: int
  train_ids: int
  test_ids: int
  images_per_id: tuple[int, int]
  cams_per_id: tuple[int, int] = (2, 2)
  query_per_id: int = 1
  junk: int = 0
  distractors: int = 0
  style: DomainStyle = DomainStyle()
  query_camera: int | None = None


def _d(name, mimics, cams, train, test, ipi, cpi, q=1, junk=0, distr=0, **style):
  return DomainSpec(name, mimics, cams, train, test, ipi, cpi, q, junk, distr, DomainStyle(**style),
                    query_camera=0 if cams == 2 and test else None)


DOMAINS: tuple[DomainSpec, ...] = (
    _d("syn_msmt17", "MSMT17", 15, 104, 100, (8, 16), (2, 6), 3, 20, 40, hue_center=0.6,
       hue_focus=0.3, saturation=0.8, brightness=0.7, neutral_prob=0.45, cast=0.12,
       light=(0.45, 1.3), blur=0.7, jitter=0.06, view_bias=0.55, occlusion=0.15, indoor=0.4),
    _d("syn_duke", "DukeMTMC-reID", 8, 70, 60, (6, 12), (2, 5), 2, 12, 20, hue_center=0.62,
       hue_focus=0.25, saturation=0.8, brightness=0.75, neutral_prob=0.4, contrast=1.05,
       cast=0.08, light=(0.6, 1.2), blur=0.4, noise=0.02, occlusion=0.12, indoor=0.1, bg_hue=0.25),
    _d("syn_market", "Market-1501", 6, 75, 60, (5, 9), (2, 6), 3, 12, 24, hue_center=0.0,
       hue_focus=0.1, saturation=1.1, neutral_prob=0.25, contrast=1.1, light=(0.7, 1.35),
       blur=0.9, jitter=0.06, occlusion=0.08, indoor=0.1),
    _d("syn_cuhk03", "CUHK03-NP", 2, 77, 60, (3, 5), (2, 2), hue_center=0.55, hue_focus=0.15,
       saturation=0.9, brightness=0.85, neutral_prob=0.35, contrast=0.95, light=(0.55, 1.2),
       blur=0.8, jitter=0.1, view_bias=0.7, indoor=0.8, bg_hue=0.12),
    _d("syn_prid", "PRID2011", 2, 28, 20, (5, 8), (2, 2), 1, 0, 60, hue_center=0.3,
       saturation=0.9, brightness=0.9, contrast=0.9, cast=0.25, light=(0.5, 1.4), blur=1.0,
       noise=0.05, view_bias=0.85, occlusion=0.05, indoor=0.0, bg_hue=0.3),
    _d("syn_cuhk01", "CUHK01", 2, 48, 40, (2, 4), (2, 2), hue_center=0.08, hue_focus=0.15,
       saturation=0.9, brightness=0.9, neutral_prob=0.35, light=(0.6, 1.2), blur=0.5,
       noise=0.02, jitter=0.04, view_bias=0.85, occlusion=0.05, indoor=0.3),
    _d("syn_viper", "VIPeR", 2, 32, 32, (2, 2), (2, 2), hue_center=0.0, hue_focus=0.1,
       brightness=0.9, cast=0.2, light=(0.5, 1.4), blur=0.8, noise=0.04, view_bias=0.9,
       occlusion=0.05, indoor=0.0, bg_hue=0.15),
    _d("syn_3dpes", "3DPeS", 2, 10, 16, (4, 5), (2, 2), hue_center=0.12, hue_focus=0.1,
       contrast=1.2, cast=0.15, view_bias=0.8, light=(0.8, 1.4), blur=0.3, noise=0.015, jitter=0.04,
       occlusion=0.05, indoor=0.0, bg_hue=0.3),
    _d("syn_ilids", "iLIDS-VID", 2, 9, 12, (4, 4), (2, 2), hue_center=0.65, saturation=0.8,
       brightness=0.8, neutral_prob=0.4, contrast=0.85, cast=0.25, light=(0.4, 1.1), blur=1.0,
       noise=0.05, jitter=0.06, view_bias=0.7, occlusion=0.4, indoor=1.0),
)
# CUHK02's 7,264 images are 22% of MSMT17's 32,621 training images; 68 ids x 4
# images are 22% of syn_msmt17's 1,233.
PUBLIC = _d("syn_public", "CUHK02", 6, 68, 0, (4, 4), (2, 2), hue_focus=0.1, indoor=0.3)
DOMAIN_NAMES = tuple(d.name for d in DOMAINS)


class Job(NamedTuple):
  """One image to render: its split, ids, identity index (-1: none) and file name."""
  split: str
  pid: int
  camid: int
  ident: int
  junk: bool
  name: str


def version_tag(seed: int, image_size: tuple[int, int]) -> str:
  return f"v{GENERATOR_VERSION}_seed{seed}_{image_size[0]}x{image_size[1]}"


def _rng(seed: int, name: str, *keys: int) -> np.random.Generator:
  """An independent random stream per (seed, domain, purpose, index...)."""
  return np.random.default_rng([seed, zlib.crc32(name.encode()), *keys])


def resolve_domains(domains: Sequence[str | DomainSpec] | None) -> list[DomainSpec]:
  """Names or specs -> specs (default: all of `DOMAINS`, in order)."""
  if domains is None:
    return list(DOMAINS)
  by_name = {d.name: d for d in DOMAINS}
  out = []
  for d in domains:
    if isinstance(d, DomainSpec):
      out.append(d)
    elif d in by_name:
      out.append(by_name[d])
    else:
      raise KeyError(f"unknown synthetic domain {d!r}; known: {', '.join(by_name)} "
                     "(or pass a DomainSpec)")
  names = [d.name for d in out]
  if len(set(names)) != len(names) or PUBLIC.name in names:
    raise ValueError(f"duplicate or reserved synthetic domain names: {names}")
  return out


def _id_cameras(rng: np.random.Generator, spec: DomainSpec) -> np.ndarray:
  """Cameras of one identity's images `[n]` (sorted; >= 2 distinct when n >= 2)."""
  n = int(rng.integers(spec.images_per_id[0], spec.images_per_id[1] + 1))
  hi = min(spec.cams_per_id[1], spec.num_cameras, n)
  k = int(rng.integers(min(spec.cams_per_id[0], hi), hi + 1))
  cams = rng.choice(spec.num_cameras, k, replace=False)
  return np.sort(np.concatenate([cams, rng.choice(cams, n - k)]))


def _query_or_gallery(rng: np.random.Generator, spec: DomainSpec, cams: np.ndarray) -> list[str]:
  """Splits one test id's images `[n]` (by camera) into query/gallery.

  Every query camera differs from at least one gallery camera of the id.
  """
  if spec.query_camera is not None:
    return ["query" if c == spec.query_camera else "gallery" for c in cams]
  distinct = np.unique(cams)
  qcams = rng.choice(distinct, min(spec.query_per_id, distinct.size - 1), replace=False)
  first = {int(np.flatnonzero(cams == c)[0]) for c in qcams}
  return ["query" if j in first else "gallery" for j in range(len(cams))]


def plan_domain(spec: DomainSpec, seed: int) -> list[Job]:
  """Every image of a domain: identities, cameras, split and file name (no pixels).

  Identity indices: train ids, then test ids, then one per distractor and junk
  image. Person ids are a random permutation of 1..(train+test) ids.
  """
  rng = _rng(seed, spec.name, _LAYOUT)
  num_ids = spec.train_ids + spec.test_ids
  pids = rng.permutation(np.arange(1, num_ids + 1))
  raw: list[tuple[str, int, int, int, bool]] = []
  for i in range(num_ids):
    cams = _id_cameras(rng, spec)
    if i < spec.train_ids:
      raw += [("train", int(pids[i]), int(c), i, False) for c in cams]
      continue
    raw += [(split, int(pids[i]), int(c), i, False)
            for split, c in zip(_query_or_gallery(rng, spec, cams), cams)]
  extra = num_ids
  gallery_cams = [c for c in range(spec.num_cameras) if c != spec.query_camera]
  for pid, count in ((0, spec.distractors), (JUNK_PID, spec.junk)):
    for _ in range(count):
      raw.append(("gallery", pid, int(rng.choice(gallery_cams)), extra, pid == JUNK_PID))
      extra += 1
  seen: dict[tuple[int, int], int] = {}
  jobs = []
  for frame, (split, pid, cam, ident, junk) in enumerate(raw):
    n = seen.get((pid, cam), 0)
    seen[(pid, cam)] = n + 1
    jobs.append(Job(split, pid, cam, ident, junk, format_market_name(pid, cam, frame, n % 100, "png")))
  return jobs


def _camera_views(rng: np.random.Generator) -> list[int]:
  """Main viewpoints cycled over cameras: a side view and front or back first.

  So even a two-camera domain sees a ~90 degree viewpoint change (VIPeR-like).
  """
  first = int(rng.integers(2))  # 0 front, 1 back
  pair = [first, 2] if rng.random() < 0.5 else [2, first]
  return pair + [1 - first]


def domain_world(spec: DomainSpec, seed: int, image_size: tuple[int, int]
                 ) -> tuple[list[Camera], list[Identity]]:
  """The domain's cameras and identities (train, test, distractor, junk)."""
  canvas = (2 * image_size[0], 2 * image_size[1])
  views = _camera_views(_rng(seed, spec.name, _CAMERAS))
  cams = [sample_camera(_rng(seed, spec.name, _CAMERAS, c), spec.style, canvas,
                        main_view=views[c % 3])
          for c in range(spec.num_cameras)]
  n = spec.train_ids + spec.test_ids + spec.distractors + spec.junk
  rng = _rng(seed, spec.name, _IDENTITIES)
  return cams, [sample_identity(rng, spec.style) for _ in range(n)]


def render_job(job: Job, index: int, spec: DomainSpec, seed: int, world,
               image_size: tuple[int, int]) -> np.ndarray:
  """The pixels of the domain's `index`-th image, uint8 `[h, w, 3]`."""
  cams, idents = world
  rng = _rng(seed, spec.name, _IMAGES, index)
  return render_image(idents[job.ident], cams[job.camid], rng, image_size, junk=job.junk)


def _counts(jobs: Sequence[Job], spec: DomainSpec) -> dict:
  def ids(split):
    return len({j.pid for j in jobs if j.split == split and j.pid > 0})
  def imgs(split, pid=None):
    return sum(1 for j in jobs if j.split == split and (pid is None or j.pid == pid))
  return {"cameras": spec.num_cameras, "train_ids": ids("train"), "train_images": imgs("train"),
          "query_ids": ids("query"), "query_images": imgs("query"),
          "gallery_ids": ids("gallery"), "gallery_images": imgs("gallery"),
          "gallery_junk": imgs("gallery", JUNK_PID), "gallery_distractors": imgs("gallery", 0)}


def _split_dirs(spec: DomainSpec) -> dict[str, str]:
  return SPLIT_FOLDERS if spec.test_ids else {"train": SPLIT_FOLDERS["train"]}


def generate_domain(spec: DomainSpec, seed: int, image_size: tuple[int, int], out: Path,
                    progress: tqdm | None = None, workers: int | None = None) -> dict:
  """Renders one domain into `out/<split folder>/` as PNG; returns its counts.

  Images are independent (own random stream, own file), so `workers` threads
  (default: CPU count) render them in any order with identical results; numpy
  and PIL release the GIL for most of the work.
  """
  jobs = plan_domain(spec, seed)
  world = domain_world(spec, seed, image_size)
  dirs = _split_dirs(spec)
  for d in dirs.values():
    (out / d).mkdir(parents=True, exist_ok=True)

  def work(chunk: range) -> int:
    for index in chunk:
      img = render_job(jobs[index], index, spec, seed, world, image_size)
      Image.fromarray(img).save(out / dirs[jobs[index].split] / jobs[index].name, format="PNG")
    return len(chunk)

  chunks = [range(i, min(i + 32, len(jobs))) for i in range(0, len(jobs), 32)]
  with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    for done in pool.map(work, chunks):
      if progress is not None:
        progress.update(done)
  return _counts(jobs, spec)


def _spec_json(spec: DomainSpec) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(spec)))


def _domain_ok(folder: Path, entry: dict | None, spec: DomainSpec) -> bool:
  """A manifest entry matches the spec and the files on disk match its counts."""
  try:
    if entry["spec"] != _spec_json(spec):
      return False
    c = entry["counts"]
    want = {"train": c["train_images"], "query": c["query_images"], "gallery": c["gallery_images"]}
  except (KeyError, TypeError):
    return False
  for split, sub in _split_dirs(spec).items():
    d = folder / spec.name / sub
    if not d.is_dir() or len(list_images(d)) != want[split]:
      return False
  return True


def read_manifest(folder: Path, seed: int, image_size: tuple[int, int]) -> dict | None:
  """The folder's manifest if it exists, parses and matches version/seed/size."""
  try:
    m = json.loads((folder / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(m, dict) or not isinstance(m.get("domains"), dict) or (
      m.get("generator_version"), m.get("seed"), m.get("image_size")) != (
          GENERATOR_VERSION, seed, list(image_size)):
    return None
  return m


OWNER = ".owner.lock"  # in a temporary folder: flock-ed by the process generating into it


def _claim(tmp: Path) -> int:
  """Marks `tmp` as being written by this process: an exclusive flock on
  `tmp/OWNER`, held until the returned descriptor is closed (the kernel
  releases it when the process dies, kill -9 included)."""
  fd = os.open(tmp / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else holds it
  os.write(fd, f"{os.getpid()}\n".encode())
  return fd


def _remove_stale_temporaries(base: Path, tag: str, max_age_s: float = 6 * 3600) -> None:
  """Deletes the temporary folders of killed generations: one whose owner lock
  (`OWNER`) nobody holds any more at once, one without it (an older version's,
  or one being created or installed this instant) once older than
  `max_age_s`. A folder another live process is writing is never touched."""
  now = time.time()
  for p in base.glob(f".{tag}.*-*"):
    try:
      if not p.is_dir():
        continue
      if not (p / OWNER).exists():
        if now - p.stat().st_mtime > max_age_s:
          shutil.rmtree(p, ignore_errors=True)
        continue
      fd = os.open(p / OWNER, os.O_RDONLY)
    except OSError:  # gone meanwhile (installed or removed by its owner)
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its owner is alive and generating
      os.close(fd)
      continue
    try:  # ours now: its owner died
      log.info("removing %s, left by a generation that was stopped", p)
      shutil.rmtree(p, ignore_errors=True)
    finally:
      os.close(fd)


def _install(tmp: Path, folder: Path) -> None:
  """Moves a finished temporary folder into place (replacing an older one)."""
  if folder.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, old / "x")
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
  else:
    try:
      os.replace(tmp, folder)
    except OSError:  # another process installed it meanwhile; keep theirs
      if not folder.is_dir():
        raise


def ensure_synthetic(data_root: str | Path, seed: int = 0, image_size: tuple[int, int] = (64, 32),
                     domains: Sequence[str | DomainSpec] | None = None, *,
                     public: DomainSpec = PUBLIC) -> Path:
  """Generates the benchmark if needed; returns `<data_root>/synthetic/<version_tag>`.

  `domains`: names or specs (default `DOMAINS`). The folder also always holds
  the public set (`public`, stored as `<public.name>/bounding_box_train/`).
  A folder whose manifest is missing or invalid (e.g. a half-written one) is
  removed and regenerated; one that lacks some requested domains, or whose
  files disagree with its manifest, is rebuilt in a temporary sibling (valid
  domains copied, the rest rendered) and swapped in.
  """
  image_size = (int(image_size[0]), int(image_size[1]))
  if image_size[0] < 8 or image_size[1] < 4:
    raise ValueError(f"synthetic image_size must be at least (8, 4), got {image_size}")
  specs = resolve_domains(domains) + [public]
  base = Path(data_root) / "synthetic"
  folder = base / version_tag(seed, image_size)
  if base.is_dir():  # a killed generation's temporary, whether or not we generate now
    _remove_stale_temporaries(base, folder.name)
  manifest = read_manifest(folder, seed, image_size)
  entries = manifest["domains"] if manifest else {}
  if manifest and all(_domain_ok(folder, entries.get(s.name), s) for s in specs):
    return folder
  if folder.exists() and not manifest:
    log.warning("removing synthetic folder without a valid manifest: %s", folder)
    shutil.rmtree(folder)
    entries = {}
  wanted = {s.name: s for s in specs}
  keep = {n: e for n, e in entries.items()
          if n not in wanted or _domain_ok(folder, e, wanted[n])}
  keep = {n: e for n, e in keep.items() if (folder / n).is_dir()}
  todo = [s for s in specs if s.name not in keep]
  base.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=base))
  owner = _claim(tmp)
  try:
    log.info("generating synthetic re-ID benchmark (%s: %s) into %s",
             folder.name, ", ".join(s.name for s in todo), folder)
    out = dict(keep)
    for name in keep:
      shutil.copytree(folder / name, tmp / name)
    total = sum(len(plan_domain(s, seed)) for s in todo)
    with tqdm(total=total, desc=f"synthetic {folder.name}", unit="img",
              disable=None) as bar:  # None: off when the output is not a terminal
      for s in todo:
        counts = generate_domain(s, seed, image_size, tmp / s.name, bar)
        out[s.name] = {"role": "public" if s is public else "client",
                       "spec": _spec_json(s), "counts": counts}
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed,
                "image_size": list(image_size), "format": "png", "domains": out}
    (tmp / (MANIFEST + ".part")).write_text(json.dumps(manifest, indent=1))
    os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)
    os.remove(tmp / OWNER)  # (still held: nobody removes the folder before it is installed)
    _install(tmp, folder)
    log.info("wrote synthetic benchmark %s", folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    os.close(owner)
  return folder


def load_synthetic_benchmark(data_root: str | Path, seed: int = 0,
                             image_size: tuple[int, int] = (64, 32),
                             domains: Sequence[str | DomainSpec] | None = None, *,
                             public: DomainSpec = PUBLIC
                             ) -> tuple[list[ClientData], ReIDSplit]:
  """Generates if needed, then reads back: (clients in `domains` order, public split).

  Clients come from `load_market_folder` (images preloaded, uint8
  `[N, h, w, 3]`); the public set is a training-style split (ids relabelled).
  """
  folder = ensure_synthetic(data_root, seed, image_size, domains, public=public)
  manifest = json.loads((folder / MANIFEST).read_text())
  clients = []
  for spec in resolve_domains(domains):
    client = load_market_folder(folder / spec.name, spec.name)
    client.info.update(mimics=spec.mimics, synthetic=folder.name,
                       counts=manifest["domains"][spec.name]["counts"])
    clients.append(client)
  public_split = load_market_split(folder / public.name / SPLIT_FOLDERS["train"], train=True,
                                   desc=public.name)
  return clients, public_split


def pixel_rank1(client: ClientData) -> float:
  """Raw-pixel nearest-neighbour rank-1 (a difficulty proxy, 0..1).

  Cosine similarity of flattened, per-image mean-subtracted pixels, query vs
  gallery; junk (-1) and same-id-same-camera gallery entries are ignored.
  """
  def feats(split: ReIDSplit) -> np.ndarray:
    x = np.stack(split.read_batch(range(len(split)))).reshape(len(split), -1).astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
  q, g = client.query, client.gallery
  sim = feats(q) @ feats(g).T
  same = q.pids[:, None] == g.pids[None, :]
  bad = (g.pids[None, :] == JUNK_PID) | (same & (q.camids[:, None] == g.camids[None, :]))
  sim[bad] = -np.inf
  return float(np.mean(same[np.arange(len(q)), sim.argmax(axis=1)]))
