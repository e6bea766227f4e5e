"""One federated training run: `Experiment` (built once) and the loop over rounds.

`run(config, workdir)` -> final evaluation results. The library takes the
config as an argument and never reads flags.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fedreid_jax import checkpoint, config_lib, hosts
from fedreid_jax import export as export_lib
from fedreid_jax import run_config
from fedreid_jax.data import registry
from fedreid_jax.data import scenarios
from fedreid_jax.errors import ConfigError, Interrupted, TrainingDiverged
from fedreid_jax.evaluation import features as features_lib
from fedreid_jax.evaluation import streamed as streamed_lib
from fedreid_jax.federated import algorithms, device_queues, execution
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import rounds as rounds_lib
from fedreid_jax.federated import sampling
from fedreid_jax.federated import state as state_lib
from fedreid_jax.input import plan as plan_lib
from fedreid_jax.input.train_input import TrainInput
from fedreid_jax.metric_writer import MetricWriter, NullWriter
from fedreid_jax.models import pretrained
from fedreid_jax.models.reid import build_model
from fedreid_jax.round_outputs import (METRICS, disk_full_guard, export_if_best, flatten_eval,
                                       round_record)
from fedreid_jax.stop_signals import StopOnSignal
from fedreid_jax.workdir import (remove_temporaries, untouched_if_refused, workdir_lock,
                                 write_atomic)

class Experiment:
  """Everything built once for a run: data streams, model, compiled round stages.

  The config's algorithm supplies its parts (`federated.algorithms`: the CDW
  measurement and weights, the KD stage); `measurements` ({name:
  `rounds.Measurement`}) and `server_stages` (`rounds.ServerStage`s) add more.
  The centralised baseline trains one client holding every training set and
  is evaluated on every client's test set.
  """

  def __init__(self, config, clients_data, public=None, *, measurements=None,
               server_stages=()):
    self.config = cfg = config
    self.spec = rounds_lib.algorithm_spec(cfg.fed)
    hosts.check_running(cfg)
    algorithms.check_input(cfg, self.spec, clients_data, public)
    rows = 1 if self.spec.centralised else len(clients_data)  # clients in the state
    self.num_selected = sampling.num_selected(cfg.fed.clients_per_round, rows)
    devices = device_queues.queue_devices(cfg.fed.num_devices)
    # `devices`: the client state split over a `clients` mesh from the start (over the
    # most devices dividing the client count; every host's)
    split = cfg.fed.strategy == "devices"
    self.state_mesh = (device_queues.state_mesh(
        rows, jax.devices() if hosts.is_multihost() else devices,
        [plan_lib.num_steps(len(c.train), cfg.train.batch_size, cfg.train.local_epochs)
         for c in clients_data] if rows == len(clients_data) else None) if split else None)
    # the clients whose rows this host holds: it reads their data and evaluates them
    self.own = (set(device_queues.lanes_by_host(jax.sharding.NamedSharding(
        self.state_mesh, jax.sharding.PartitionSpec(device_queues.AXIS)),
        rows)[jax.process_index()]) if hosts.is_multihost() else set(range(len(clients_data))))
    self.tests = [None if i not in self.own else
                  streamed_lib.StreamedTestSet.from_client(c, tuple(cfg.data.image_size))
                  if cfg.eval.streamed else features_lib.load_test_set(c, tuple(cfg.data.image_size))
                  for i, c in enumerate(clients_data)]
    self.test_names = [c.name for c in clients_data]
    if self.spec.centralised:
      clients_data = [scenarios.merged(clients_data)]
    self.clients_data = clients_data
    self.size = tuple(cfg.data.image_size)
    num_classes = np.array([c.num_train_ids for c in clients_data])
    num_examples = np.array([len(c.train) for c in clients_data])
    too_small = [c.name for c, n in zip(clients_data, num_examples) if n < cfg.train.batch_size]
    if too_small:
      raise ConfigError(
          f"clients {too_small} have fewer training images than config.train.batch_size="
          f"{cfg.train.batch_size}; lower the batch size or drop them via config.data.clients")
    self.model = build_model(cfg.model, int(num_classes.max()))
    self.tx = local_lib.make_optimizer(cfg.train)
    local_step = local_lib.make_local_step(self.model, self.tx, cfg.train)
    self.execute = execution.make_execution(
        cfg.fed.strategy, local_step, cfg.fed.chunk_steps,
        execution.make_mesh(cfg.fed.strategy, self.num_selected, cfg.fed.num_devices), devices)
    parts = algorithms.make_parts(self.spec, cfg, self.model)
    self.received_stats = parts.received_stats
    measurements = {**parts.measurements, **(measurements or {})}
    self.measurement_names = sorted(measurements)
    self.stages = rounds_lib.make_round_stages(
        self.spec, self.tx, measurements, parts.weighting,
        (*parts.server_stages, *server_stages),
        every_client_sharding=(jax.sharding.NamedSharding(
            self.state_mesh, jax.sharding.PartitionSpec(device_queues.AXIS))
                           if self.state_mesh is not None else None))
    input_kw = dict(image_size=self.size, batch_size=cfg.train.batch_size,
                    epochs=cfg.train.local_epochs, seed=cfg.seed, in_memory=cfg.data.in_memory,
                    loader_threads=cfg.data.loader_threads,
                    loader_workers=cfg.data.loader_workers)
    self.inputs = TrainInput([c.train for c in clients_data],
                             names=[c.name for c in clients_data], **input_kw)
    public_kw = dict(input_kw, epochs=1, batch_size=cfg.kd.batch_size)
    self.public = (TrainInput([public], names=["public"], **public_kw)
                   if public is not None else None)
    self.embed_fn = features_lib.make_embed_fn(self.model)
    shared = params_lib.prefix_predicate(rounds_lib.FEATURE_EXTRACTOR)
    init = lambda key: state_lib.init_states(
        self.model, self.tx, shared, key, self.size, num_classes, num_examples)
    self.server, self.clients = (
        jax.jit(init)(jax.random.key(cfg.seed)) if cfg.fed.strategy != "devices"
        else device_queues.placed_init(init, jax.random.key(cfg.seed), self.state_mesh,
                                       devices[0]))
    if cfg.model.get("pretrained"):  # ImageNet weights: server and every client's backbone
      self.server, self.clients = state_lib.load_shared(
          self.server, self.clients, pretrained.load_backbone(cfg.model), self.tx)
    self.before_server_stages = None  # the global model's evaluation before KD, on KD rounds
    self._finite = jax.jit(lambda server, clients: (
        state_lib.all_finite((server.params, server.batch_stats)),
        state_lib.finite_per_client(clients)))

  def check_finite(self, round_index: int, record: dict) -> None:
    """Raises TrainingDiverged naming the round and the client(s) whose loss,
    parameters or BatchNorm statistics are no longer finite."""
    server_ok, clients_ok = hosts.to_host(self._finite(self.server, self.clients))
    names = [c.name for c in self.clients_data]
    bad = sorted({n for n, ok in zip(names, clients_ok) if not ok} |
                 {n for n in names if not np.isfinite(record.get(f"client/{n}/loss", 0.0))})
    if bad or not server_ok or not np.isfinite(record["train/loss"]):
      raise TrainingDiverged(
          f"round {round_index + 1}: non-finite loss or parameters in client(s) "
          f"{', '.join(bad) or '(none)'}{'' if server_ok else ' and in the global model'}; "
          "nothing of this round was saved (the latest checkpoint is intact): lower the "
          "learning rates or check those clients' data, then rerun")

  def selected(self, round_index: int) -> np.ndarray:
    """Sorted ids of the clients that train in `round_index`."""
    return sampling.sample_clients(self.config.seed, round_index, len(self.clients_data),
                                   self.num_selected)

  def read_ahead(self, rounds) -> None:
    """Announces that `rounds` will train in that order: a strategy that reads
    clients one after another, streaming from files, then reads them all
    through one loader (`TrainInput.schedule`); `self.inputs.close()` stops it."""
    if getattr(self.execute, "reads_clients_in_order", False):
      self.inputs.schedule([(r, int(c)) for r in rounds for c in self.selected(r)
                            if int(c) in self.own])

  def train_round(self, round_index: int, on_steps=None) -> dict:
    """Runs one round through its stages; returns its train record."""
    cfg = self.config
    ids = self.selected(round_index)
    ids_dev = jnp.asarray(ids, jnp.int32)
    rows = self.state_mesh is not None  # a split state: the selected rows change in place
    lanes = range(len(self.clients_data)) if rows else [int(c) for c in ids]
    mask = np.isin(np.arange(len(self.clients_data)), ids)
    chosen = mask if rows else ids_dev  # what broadcast selects by
    selected = self.stages.broadcast(self.server, self.clients, chosen)
    own_ids = [int(c) for c in ids if int(c) in self.own]  # all, on one host
    measuring = self.stages.measure is not None
    # split state: each client measured where it lives (and, for the reference CDW, its
    # statistics pass run on the host holding it), on its own batch (a host may hold no
    # selected client); else the batches stacked
    batches = ({c: self.inputs.measurement_one(c, round_index, cfg.cdw.batch_size)
                for c in own_ids} if measuring and rows else {})
    batch = (self.inputs.measurement_batch(own_ids, round_index, cfg.cdw.batch_size)
             if measuring and not rows else None)
    if self.received_stats is not None:  # reference CDW: statistics changed in flight
      order = sampling.round_order(cfg.seed, round_index, len(ids))
      selected = (self.received_stats.into_rows(
          self.server, selected, {c: b["image"] for c, b in batches.items()}, ids, order, mask)
                  if rows else algorithms.with_received_stats(
          selected, self.received_stats(self.server, batch["image"], jnp.asarray(order))))
    streams = self.inputs.streams(  # several hosts: each reads its own clients' data
        [c if c in own_ids else None for c in lanes], round_index,
        in_order=getattr(self.execute, "reads_clients_in_order", False))
    trained, metrics = self.execute(
        selected, streams, [self.inputs.num_steps(c) if c in ids else 0 for c in lanes], on_steps)
    measured = {}
    if measuring:
      before = self.stages.broadcast(self.server, self.clients, chosen)
      if rows:
        measured, trained = self.execute.measure(
            self.stages.measure_one, self.measurement_names, before, trained,
            {c: (b["image"], b["label"]) for c, b in batches.items()})
      else:
        measured, trained = self.stages.measure(before, trained, batch["image"], batch["label"])
    weights = hosts.to_host(self.stages.weights(trained, measured)) * (mask if rows else 1)
    first = int(sampling.first_client(cfg.seed, round_index, len(ids)))
    self.server = self.stages.aggregate(self.server, trained, weights,
                                        jnp.int32(ids[first] if rows else first))
    self.clients = self.stages.scatter(self.clients, trained, ids_dev)
    if rows:  # the record lists the selected clients only
      metrics, measured, weights = jax.tree.map(lambda v: np.asarray(v)[ids],
                                                (metrics, measured, weights))
    names = [self.clients_data[c].name for c in ids]
    record = round_record(names, metrics, measured, weights)
    record.update(getattr(self.execute, "report", dict)())  # `devices`: the schedule
    record.update(self.run_server_stages(round_index, ids_dev))
    return record

  def run_server_stages(self, round_index: int, ids_dev) -> dict[str, float]:
    """The server stages after aggregation; on a round where one is active
    (KD) the global model is first evaluated (`before_server_stages`)."""
    stages = self.stages.server_stages
    self.before_server_stages = None
    if any(getattr(s, "active", lambda r: False)(round_index) for s in stages):
      if self.config.eval.before_kd:
        self.before_server_stages = self.evaluate(client_models=False)
    context = rounds_lib.ServerContext(round_index, self.clients, ids_dev, self.public)
    metrics = {}
    for stage in stages:
      out = stage(self.server, context)
      self.server, extra = (out, {}) if isinstance(out, state_lib.ServerState) else out
      metrics.update(extra)
    return metrics

  def evaluate(self, client_models: bool, examples_dir: str | None = None
               ) -> dict[str, dict[str, dict[str, float]]]:
    """{"global"|"client": {client name: metrics}}; a non-sharing algorithm has
    no "global" entry (each client's own model is its result). `examples_dir`:
    also save retrieval examples of the global model (else the client models)
    as `<examples_dir>/<client>.npz`."""
    out = {}
    path = lambda t: os.path.join(examples_dir, f"{t.name}.npz") if examples_dir else None
    own = [(i, t) for i, t in enumerate(self.tests) if t is not None]  # this host's clients
    if self.spec.shares:  # one model (this host's copy): features deduplicated
      variables, cache = hosts.local_copy(rounds_lib.global_variables(self.server)), {}
      out["global"] = {t.name: self.evaluate_model(variables, t, path(t), cache) for _, t in own}
    if (client_models and not self.spec.centralised) or not self.spec.shares:
      client_path = path if not self.spec.shares else lambda t: None
      out["client"] = {t.name: self.evaluate_model(rounds_lib.client_variables(
          device_queues.local_row(self.clients, i)), t, client_path(t)) for i, t in own}
    return {kind: hosts.gather_per_client(per_client, self.test_names)
            for kind, per_client in out.items()}

  def evaluate_model(self, variables, test, examples_path=None, cache=None) -> dict:
    """One model on one client's test set, streamed (`eval.streamed`) or in memory."""
    cfg = self.config
    if isinstance(test, streamed_lib.StreamedTestSet):
      return streamed_lib.evaluate_model(self.embed_fn, variables, test, cfg.eval.protocol,
                                         cfg.eval.batch_size, examples_path, cache,
                                         cfg.data.loader_threads)
    return features_lib.evaluate_model(self.embed_fn, variables, test, cfg.eval.protocol,
                                       cfg.eval.batch_size, examples_path)


def steps_per_round(exp: Experiment, round_index: int) -> int:
  """This host's local steps in the round (its progress bar's total)."""
  return sum(exp.inputs.num_steps(int(c)) for c in exp.selected(round_index) if int(c) in exp.own)


def run(config, workdir: str, clients_data=None, public=None) -> dict:
  """Trains `config.fed.rounds` rounds (resuming from the workdir's checkpoint).

  Holds the workdir's lock for the whole run. `config.json` is written only
  once the data is loaded and the experiment built, so a run rejected for bad
  input leaves no trace that would block the corrected command (nor the
  workdir it created, nor its `.lock`)."""
  config_lib.validate(config)
  main = hosts.is_main()
  with untouched_if_refused(workdir) if main else contextlib.nullcontext():
    config_lib.check_workdir(workdir)
    with workdir_lock(workdir) if main else contextlib.nullcontext():
      return _run_locked(config, workdir, clients_data, public)


def _run_locked(config, workdir: str, clients_data, public) -> dict:
  if hosts.is_main():
    remove_temporaries(workdir)  # left by a killed run
  now = json.loads(config.to_json())
  # a launch that never got to a checkpoint binds nothing
  saved = checkpoint.load_saved_config(workdir) if checkpoint.has_checkpoint(workdir) else None
  if saved is not None:
    run_config.check_meaning(saved, now, workdir)
  stored = checkpoint.saved_meaning(workdir)  # checked even when config.json was deleted
  if stored is not None:
    run_config.check_meaning(stored, now, workdir)
  if clients_data is None:
    clients_data, public = registry.load(config.data, config.seed)
  logging.info("clients: %s", ", ".join(f"{c.name} ({len(c.train)} imgs, {c.num_train_ids} ids)"
                                         for c in clients_data))
  exp = Experiment(config, clients_data, public)
  ckpts = checkpoint.Checkpoints(workdir, config.checkpoint_keep, run_config.meaning(now))
  try:
    start, (exp.server, exp.clients) = ckpts.restore_latest((exp.server, exp.clients))
  except Exception:
    ckpts.close()
    raise
  if start:
    logging.info("resumed from %s after round %d", workdir, start)
  main = hosts.is_main()  # process 0 writes the workdir's files; every process checkpoints
  if main:
    run_config.record_changes(workdir, saved, now, start)
    write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))
  writer = MetricWriter(workdir, resume_round=start) if main else NullWriter()
  bar = tqdm.tqdm(total=config.fed.rounds, initial=start, desc=f"{config.fed.algorithm} rounds",
                  unit="round", disable=not main)
  results = {}
  stop = StopOnSignal(ckpts)
  try:  # leaving `ckpts` finishes the write in flight; a full disk there is explained too
    with stop, disk_full_guard(workdir, ckpts), ckpts:
      exp.read_ahead(range(start, config.fed.rounds))  # streamed serial: one loader for all
      try:
        _train_rounds(exp, config, workdir, start, ckpts, writer, bar, stop, results)
      finally:
        exp.inputs.close()
      if not results:  # resumed a finished run: evaluate the restored state
        results.update(exp.evaluate(config.eval.client_models))
      ckpts.finish()  # results.json says the run is done: its last checkpoint is written
      if main:
        write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
      if exp.spec.shares and main:  # the global feature extractor, without training state
        export_lib.save(os.path.join(workdir, "export"), config.model, config.data.image_size,
                        rounds_lib.global_variables(hosts.local_copy(exp.server)),
                        {"algorithm": config.fed.algorithm, "rounds": config.fed.rounds,
                         "data": config.data.name})
  finally:
    bar.close()
    writer.close()
  return results


def _train_rounds(exp, config, workdir, start, ckpts, writer, bar, stop, results) -> None:
  """Rounds `start..config.fed.rounds-1`: train, log, evaluate, checkpoint
  (written while the next round trains; the last may still be in flight on
  return); `results` receives the latest evaluation. A stop signal ends the
  loop after the round in flight, with a finished checkpoint of it
  (`errors.Interrupted`)."""
  rounds = config.fed.rounds
  for r in range(start, rounds):
    t0 = time.time()
    with tqdm.tqdm(total=steps_per_round(exp, r), desc=f"round {r + 1} local steps",
                   unit="step", leave=False, disable=not hosts.is_main()) as steps_bar:
      record = exp.train_round(r, steps_bar.update)
    record["train/round_seconds"] = time.time() - t0
    writer.write(r + 1, "train", record)
    exp.check_finite(r, record)
    bar.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/accuracy']:.2f}")
    bar.update(1)
    if (r + 1) % config.log_every == 0:
      logging.info("round %d/%d loss %.4f acc %.3f waste %.2f (%.1fs)", r + 1, rounds,
                   record["train/loss"], record["train/accuracy"],
                   record["train/padding_waste"], record["train/round_seconds"])
    if "kd/loss" in record:
      logging.info("round %d: knowledge distillation, %d public batches, mean MSE %.5f "
                   "(last batch %.5f)", r + 1, record["kd/steps"], record["kd/loss"],
                   record["kd/loss_last"])
    last = r + 1 == rounds
    before = exp.before_server_stages
    if (r + 1) % config.eval.every_rounds == 0 or last or before is not None:
      results.clear()
      results.update(exp.evaluate(config.eval.client_models,
                                  os.path.join(workdir, "retrieval") if last else None))
      record = flatten_eval(results)
      if before is not None:
        record.update(flatten_eval({"global": before["global"]}, "eval_before_kd"))
        results_before = {"global before KD": before["global"]}
      for kind, per_client in ({**results, **results_before} if before else results).items():
        mean_r1 = np.mean([v["rank1"] for v in per_client.values()])
        logging.info("round %d eval (%s models): mean rank-1 %.1f%%", r + 1, kind, 100 * mean_r1)
      writer.write(r + 1, "eval", record)
      if hosts.is_main():
        export_if_best(hosts.local_copy(exp.server), config, workdir, r + 1, results)
    if hosts.any_host(bool(stop.requested)) and not stop.requested:  # a signal elsewhere
      stop.requested = "a stop signal on another host"
    if (r + 1) % config.checkpoint_every == 0 or last or stop.requested:
      ckpts.save(r + 1, (exp.server, exp.clients))
    if stop.requested and not last:
      ckpts.finish()  # the message says it is saved
      raise Interrupted(f"stopped by {stop.requested} after round {r + 1} of {rounds}; saved "
                        f"a checkpoint of round {r + 1} in {workdir!r}; rerun the same "
                        "command to resume")
