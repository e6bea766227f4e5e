"""One federated training run: the loop over rounds and chunks.

`run(config, workdir)` -> final evaluation results. The library takes the
config as an argument and never reads flags.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fedreid_jax import checkpoint, config_lib
from fedreid_jax.datasets import pipeline, registry
from fedreid_jax.evaluation import features as features_lib
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import rounds as rounds_lib
from fedreid_jax.federated import sampling
from fedreid_jax.federated import state as state_lib
from fedreid_jax.metric_writer import MetricWriter
from fedreid_jax.models.reid import build_model

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def make_mesh(strategy: str, num_selected: int):
  """A 1-D `clients` mesh over the devices that divide the selected count."""
  if strategy != "sharded":
    return None
  devices = jax.devices()
  n = max(d for d in range(1, len(devices) + 1) if num_selected % d == 0)
  return jax.make_mesh((n,), ("clients",), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


class Experiment:
  """Everything built once for a run: data, model, compiled round functions."""

  def __init__(self, config, clients_data):
    self.config = config
    cfg = config
    self.clients_data = clients_data
    self.size = tuple(cfg.data.image_size)
    num_classes = np.array([c.num_train_ids for c in clients_data])
    num_examples = np.array([len(c.train) for c in clients_data])
    too_small = [c.name for c, n in zip(clients_data, num_examples) if n < cfg.train.batch_size]
    if too_small:
      raise config_lib.ConfigError(
          f"clients {too_small} have fewer training images than config.train.batch_size="
          f"{cfg.train.batch_size}; lower the batch size or drop them via config.data.clients")
    self.model = build_model(cfg.model, int(num_classes.max()))
    self.tx = local_lib.make_optimizer(cfg.train)
    self.spec = rounds_lib.algorithm_spec(cfg.fed)
    self.num_selected = sampling.num_selected(cfg.fed.clients_per_round, len(clients_data))
    mesh = make_mesh(cfg.fed.strategy, self.num_selected)
    self.fns = rounds_lib.make_round_fns(self.model, self.tx, cfg.train, self.spec,
                                         cfg.fed.strategy, mesh)
    self.embed_fn = features_lib.make_embed_fn(self.model)
    shared = params_lib.prefix_predicate(rounds_lib.FEATURE_EXTRACTOR)
    init = jax.jit(lambda key: state_lib.init_states(
        self.model, self.tx, shared, key, self.size, num_classes, num_examples))
    self.server, self.clients = init(jax.random.key(cfg.seed))
    self.sources = [pipeline.TrainImages(c.train, self.size, cfg.data.in_memory)
                    for c in clients_data]
    self.tests = [features_lib.load_test_set(c, self.size) for c in clients_data]

  def train_round(self, round_index: int, progress=None) -> dict:
    """Runs one round; returns its train metrics."""
    cfg = self.config
    selected = sampling.sample_clients(cfg.seed, round_index, len(self.clients_data),
                                       self.num_selected)
    plans = [pipeline.client_plan(len(self.clients_data[c].train), cfg.train.batch_size,
                                  cfg.train.local_epochs, cfg.seed, round_index, int(c))
             for c in selected]
    sel_ids = jnp.asarray(selected, jnp.int32)
    sel = self.fns.begin(self.server, self.clients, sel_ids)
    serial = cfg.fed.strategy == "serial"
    if serial:
      sums = [jnp.zeros(3)] * len(selected)
      if cfg.data.in_memory:
        pieces = pipeline.serial_pieces(self.sources, plans, cfg.fed.chunk_steps)
      else:
        pieces = pipeline.grain_serial_pieces(
            self.sources, plans, cfg.fed.chunk_steps, cfg.train.batch_size,
            cfg.train.local_epochs, cfg.seed, round_index, cfg.data.loader_threads,
            cfg.data.loader_workers)
      for lane, images, labels in pieces:
        sel, metrics = self.fns.train_lane(sel, lane, images, labels)
        sums[lane] = sums[lane] + metrics
        if progress is not None:
          progress.update(images.shape[0])
      sums = jnp.stack(sums)
    else:
      sums = jnp.zeros((len(selected), 3))
      for images, labels, mask in pipeline.round_chunks(self.sources, plans, cfg.fed.chunk_steps,
                                                        cfg.train.batch_size):
        sel, chunk_metrics = self.fns.train_chunk(sel, images, labels, mask)
        sums = sums + chunk_metrics
        if progress is not None:
          progress.update(int(mask.sum()))
    first = sampling.first_client(cfg.seed, round_index, len(selected))
    self.server, self.clients = self.fns.finish(self.server, self.clients, sel, sel_ids, first)
    sums = np.asarray(sums)
    steps = np.maximum(sums[:, 2], 1)
    record = {"train/loss": float(sums[:, 0].sum() / steps.sum()),
              "train/accuracy": float(sums[:, 1].sum() / steps.sum()),
              "train/padding_waste": pipeline.padding_waste(plans, cfg.fed.chunk_steps, serial),
              "train/steps": float(sums[:, 2].sum())}
    for lane, c in enumerate(selected):
      name = self.clients_data[c].name
      record[f"client/{name}/loss"] = float(sums[lane, 0] / steps[lane])
      record[f"client/{name}/accuracy"] = float(sums[lane, 1] / steps[lane])
    return record

  def evaluate(self, client_models: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{"global"|"client": {client name: metrics}}; a non-sharing algorithm has
    no global model, so its "global" entry is each client's own model."""
    cfg = self.config
    out = {}
    if self.spec.shares:
      variables = rounds_lib.global_variables(self.server)
      out["global"] = {t.name: features_lib.evaluate_model(
          self.embed_fn, variables, t, cfg.eval.protocol, cfg.eval.batch_size)
          for t in self.tests}
    if client_models or not self.spec.shares:
      out["client"] = {t.name: features_lib.evaluate_model(
          self.embed_fn, rounds_lib.client_variables(self.clients, i), t, cfg.eval.protocol,
          cfg.eval.batch_size) for i, t in enumerate(self.tests)}
    return out


def flatten_eval(results: dict) -> dict[str, float]:
  prefixes = {"global": "eval", "client": "eval_client"}
  return {f"{prefixes[kind]}/{name}/{m}": v[m]
          for kind, per_client in results.items() for name, v in per_client.items() for m in METRICS}


def steps_per_round(exp: Experiment) -> int:
  cfg = exp.config
  sizes = sorted((len(c.train) // cfg.train.batch_size for c in exp.clients_data), reverse=True)
  return sum(sizes[:exp.num_selected]) * cfg.train.local_epochs


def run(config, workdir: str, clients_data=None) -> dict:
  """Trains `config.fed.rounds` rounds (resuming from the workdir's checkpoint)."""
  config_lib.validate(config)
  config_lib.check_workdir(workdir)
  saved = checkpoint.load_saved_config(workdir)
  config_dict = json.loads(config.to_json())
  if saved is not None:
    checkpoint.check_compatible(saved, config_dict, workdir)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
  if clients_data is None:
    clients_data, _ = registry.load(config.data, config.seed)
  logging.info("clients: %s", ", ".join(f"{c.name} ({len(c.train)} imgs, {c.num_train_ids} ids)"
                                         for c in clients_data))
  exp = Experiment(config, clients_data)
  manager = checkpoint.make_manager(workdir)
  start, (exp.server, exp.clients) = checkpoint.restore_latest(manager, (exp.server, exp.clients))
  if start:
    logging.info("resumed from %s after round %d", workdir, start)
  writer = MetricWriter(workdir)
  rounds = config.fed.rounds
  bar = tqdm.tqdm(total=rounds, initial=start, desc=f"{config.fed.algorithm} rounds", unit="round")
  results = {}
  try:
    for r in range(start, rounds):
      t0 = time.time()
      with tqdm.tqdm(total=steps_per_round(exp), desc=f"round {r + 1} local steps",
                     unit="step", leave=False) as steps_bar:
        record = exp.train_round(r, steps_bar)
      record["train/round_seconds"] = time.time() - t0
      writer.write(r + 1, "train", record)
      if not np.isfinite(record["train/loss"]):
        raise FloatingPointError(f"round {r + 1}: training loss is {record['train/loss']}; "
                                 "lower the learning rates")
      bar.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/accuracy']:.2f}")
      bar.update(1)
      if (r + 1) % config.log_every == 0:
        logging.info("round %d/%d loss %.4f acc %.3f waste %.2f (%.1fs)", r + 1, rounds,
                     record["train/loss"], record["train/accuracy"],
                     record["train/padding_waste"], record["train/round_seconds"])
      last = r + 1 == rounds
      if (r + 1) % config.eval.every_rounds == 0 or last:
        results = exp.evaluate(config.eval.client_models and last)
        writer.write(r + 1, "eval", flatten_eval(results))
        for kind, per_client in results.items():
          mean_r1 = np.mean([v["rank1"] for v in per_client.values()])
          logging.info("round %d eval (%s models): mean rank-1 %.1f%%", r + 1, kind, 100 * mean_r1)
      if (r + 1) % config.checkpoint_every == 0 or last:
        checkpoint.save(manager, r + 1, (exp.server, exp.clients))
    if not results:  # resumed a finished run: evaluate the restored state
      results = exp.evaluate(config.eval.client_models)
  finally:
    bar.close()
    writer.close()
    manager.close()
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results
