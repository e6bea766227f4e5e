"""Benchmark clients read from prepared TFDS files through the real input pipeline.

    clients = prepared_clients(sizes, "/tmp/fixture")  # [ClientData], read lazily
    round_input_images_per_s(clients, (256, 128), 32, threads=8, workers=0)

`prepared_clients` writes one Market-style folder of `sum(sizes)` training
JPEGs at Market's native 128x64 (`input_pipeline.make_fixture`: photo-like
content, so they decode like crops), prepares it as TFDS array_record with
`fedreid_jax.data.prepare` (as a user prepares Market-1501), loads it with
`source.load_prepared_client` and cuts its training split into consecutive
clients of `sizes` images, each relabelled 0..C-1. A folder already holding
a large enough fixture is reused. With `data.in_memory=False` (the paper
config) a round then reads every batch as a user's real run does: records
from array_record, JPEG decode, bicubic resize, batching by grain threads or
worker processes. No random arrays.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from fedreid_jax.data import prepare, scenarios, source
from fedreid_jax.data.base import ClientData, ReIDSplit
from fedreid_jax.errors import DatasetNotPrepared
from fedreid_jax.input.train_input import TrainInput

import input_pipeline  # benchmarks/ is on sys.path when a benchmark runs


def _prepared(folder: Path, num_images: int) -> ClientData | None:
  """The prepared fixture under `folder` when it holds >= `num_images` training images."""
  try:
    client = source.load_prepared_client("market1501", folder / "tfds")
  except DatasetNotPrepared:
    return None
  return client if len(client.train) >= num_images else None


def prepared_clients(sizes: Sequence[int], folder: str | Path) -> list[ClientData]:
  """Clients of `sizes` training images each, cut from one prepared Market-style
  fixture under `folder` (built there first when missing or too small)."""
  folder, total = Path(folder), int(sum(sizes))
  base = _prepared(folder, total)
  if base is None:
    t0 = time.perf_counter()
    raw = input_pipeline.make_fixture(folder / f"raw{total}", total)
    prepare.prepare("market1501", raw, folder / "tfds", overwrite=True)
    base = source.load_prepared_client("market1501", folder / "tfds")
    logging.info("prepared %d fixture JPEGs as TFDS in %.1f s", total, time.perf_counter() - t0)
  clients, start = [], 0
  for i, n in enumerate(sizes):
    train = scenarios.relabelled(base.train, range(start, start + n))
    clients.append(ClientData(f"client{i}", train, base.query, base.gallery))
    start += n
  return clients


LOADER_SCOPES = ("run", "round", "client")


def round_input_images_per_s(clients: Sequence[ClientData], size: tuple[int, int], batch: int,
                             threads: int, workers: int, scope: str = "run",
                             rounds: int = 2) -> float:
  """Images/s the input of `rounds` training rounds alone delivers (no model):
  every client's streamed batches, read client after client as the `serial`
  strategy reads them. `scope`: one loader for all the rounds (`run`, what
  a training run does), one per round (`round`), or one per client and round
  (`client`); start-up and worker processes' spawn are paid once per loader."""
  if scope not in LOADER_SCOPES:
    raise ValueError(f"scope {scope!r}: use one of {LOADER_SCOPES}")
  inputs = TrainInput([c.train for c in clients], image_size=size, batch_size=batch, epochs=1,
                      seed=0, in_memory=False, loader_threads=threads, loader_workers=workers)
  everyone = list(range(len(clients)))
  if scope == "run":
    inputs.schedule([(r, c) for r in range(rounds) for c in everyone])
  t0, n = time.perf_counter(), 0
  try:
    for r in range(rounds):
      for stream in inputs.streams(everyone, r, in_order=scope != "client"):
        for b in stream:
          n += b["image"].shape[0]
  finally:
    inputs.close()
  return n / (time.perf_counter() - t0)
