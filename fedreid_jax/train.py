"""One federated training run: `Experiment` (built once) and the loop over rounds.

`run(config, workdir)` -> final evaluation results. The library takes the
config as an argument and never reads flags.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fedreid_jax import checkpoint, config_lib, hosts
from fedreid_jax import export as export_lib
from fedreid_jax import round_loop
from fedreid_jax import run_config
from fedreid_jax.data import registry
from fedreid_jax.data import scenarios
from fedreid_jax.data import unseen as unseen_lib
from fedreid_jax.errors import ConfigError, TrainingDiverged
from fedreid_jax.evaluation import features as features_lib
from fedreid_jax.evaluation import streamed as streamed_lib
from fedreid_jax import federated
from fedreid_jax.federated import checks, device_queues, execution, strategies
from fedreid_jax.federated import local as local_lib
from fedreid_jax.federated import params as params_lib
from fedreid_jax.federated import failures as failures_lib
from fedreid_jax.federated import placement as placement_lib
from fedreid_jax.federated import rounds as rounds_lib
from fedreid_jax.federated import sampling
from fedreid_jax.federated import state as state_lib
from fedreid_jax.input import plan as plan_lib
from fedreid_jax.input.train_input import TrainInput
from fedreid_jax.metric_writer import MetricWriter, NullWriter
from fedreid_jax.models import pretrained
from fedreid_jax.models.reid import build_model
from fedreid_jax.privacy.run import RunPrivacy
from fedreid_jax.round_outputs import disk_full_guard, round_record
from fedreid_jax.stop_signals import StopOnSignal
from fedreid_jax.workdir import (remove_temporaries, untouched_if_refused, workdir_lock,
                                 write_atomic)

class RunState(NamedTuple):
  """What a round maps: the server and every client (`[C, ...]`)."""
  server: state_lib.ServerState
  clients: state_lib.ClientStates


class Experiment:
  """Everything built once for a run: data streams, model, compiled round stages.

  The config's algorithm (`federated.build_algorithm(config.fed.algorithm)`)
  supplies its parts; `measurements` ({name: `algorithm.Measurement`}) and
  `server_stages` (`rounds.ServerStage`s) add more.
  The centralised baseline trains one client holding every training set and
  is evaluated on every client's test set.
  """

  def __init__(self, config, clients_data, public=None, *, measurements=None,
               server_stages=()):
    self.config = cfg = config
    described = config_lib.describe_algorithm(cfg.fed.algorithm, cfg)  # before the model
    hosts.check_running(cfg)
    clients_data, unseen = unseen_lib.split(cfg, clients_data)  # eval.unseen: never train
    self.privacy = RunPrivacy(cfg, clients_data, described)  # dp: checked, noise calibrated
    checks.check_input(cfg, described, clients_data, public)
    rows = 1 if described.centralised else len(clients_data)  # clients in the state
    self.num_selected = sampling.num_selected(cfg.fed.clients_per_round, rows)
    failures_lib.check(**failures_lib.settings(cfg.fed), num_selected=self.num_selected)
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
    load_test = lambda c: (streamed_lib.StreamedTestSet.from_client(c, tuple(cfg.data.image_size))
                           if cfg.eval.streamed
                           else features_lib.load_test_set(c, tuple(cfg.data.image_size)))
    self.tests = [load_test(c) if i in self.own else None for i, c in enumerate(clients_data)]
    self.unseen_tests = [load_test(c) for c in unseen_lib.evaluated(unseen, described)]
    self.test_names = [c.name for c in clients_data]
    if described.centralised:
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
    alg = self.privacy.wrap(federated.build_algorithm(cfg.fed.algorithm, cfg, self.model))
    self.algorithm = alg = dataclasses.replace(
        alg, measurements={**alg.measurements, **(measurements or {})},
        server_stages=(*alg.server_stages, *server_stages))
    local_step = self.privacy.make_local_step(self.model, self.tx, cfg.train,  # dp sgd: DP-SGD
                                              alg.client_regularizer, alg.personal_mu)
    self.topology = hosts.HostTopology()  # the federated core's collectives over hosts
    self.execute = strategies.make_execution(
        cfg.fed.strategy, local_step, cfg.fed.chunk_steps,
        execution.make_mesh(cfg.fed.strategy, self.num_selected, cfg.fed.num_devices), devices,
        self.topology)
    self.received_stats = alg.received_stats
    self.stages = rounds_lib.make_round_stages(
        alg, self.tx,
        every_client_sharding=(jax.sharding.NamedSharding(
            self.state_mesh, jax.sharding.PartitionSpec(device_queues.AXIS))
                           if self.state_mesh is not None else None), num_clients=rows)
    # where the client state lives: rows in place over the mesh, or gathered per round
    self.placement = (placement_lib.Rows(self.stages, rows, self.topology)
                      if self.state_mesh is not None
                      else placement_lib.Gathered(self.stages, rows))
    input_kw = dict(image_size=self.size, batch_size=cfg.train.batch_size,
                    epochs=cfg.train.local_epochs, seed=cfg.seed, in_memory=cfg.data.in_memory,
                    loader_threads=cfg.data.loader_threads,
                    loader_workers=cfg.data.loader_workers)
    self.inputs = self.privacy.input_class([c.train for c in clients_data],  # dp sgd: Poisson
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
    if alg.init_state is not None:  # SCAFFOLD's control variates, Ditto's personal models
      server_own, clients_own = jax.jit(alg.init_state)(self.server, self.clients)
      self.server = self.server._replace(algorithm_state=server_own)
      self.clients = self.clients._replace(algorithm_state=clients_own)
    if alg.server_optimizer is not None:  # its state is part of the server (checkpointed)
      self.server = self.server._replace(
          opt_state=jax.jit(alg.server_optimizer.init)(self.server.params))
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

  @property
  def state(self) -> RunState:
    """The run's current state (what `round_fn` maps and checkpoints hold)."""
    return RunState(self.server, self.clients)

  @state.setter
  def state(self, value: RunState) -> None:
    self.server, self.clients = value

  def train_round(self, round_index: int, on_steps=None) -> dict:
    """`round_fn` and the server stages on the experiment's own state; returns
    the round's train record (tests, tools; the loop calls the two itself)."""
    self.state, record = self.round_fn(self.state, round_index, on_steps)
    self.state, extra = self.server_fn(self.state, round_index)
    return {**record, **extra}

  def server_stages_active(self, round_index: int) -> bool:
    """Whether a server stage (KD) changes the global model after this round."""
    return any(getattr(s, "active", lambda r: False)(round_index)
               for s in self.stages.server_stages)

  def round_fn(self, state: RunState, round_index: int, on_steps=None
               ) -> tuple[RunState, dict]:
    """One round's client part on `state`, its stages in order: select
    (broadcast), train, measure, weigh, aggregate, write back. Where the
    client state lives is `self.placement`'s; how clients run, `self.execute`'s.
    Returns the new state and the round's train record; `on_steps(n)` is told
    of each dispatched piece of local steps."""
    server, clients = state
    place, ids = self.placement, self.selected(round_index)
    own = [int(c) for c in ids if int(c) in self.own]  # all, on one host
    batches = self.measurement_batches(own, round_index)  # {client: (images, labels)}
    selected = place.select(server, clients, ids)
    if self.received_stats is not None:  # reference CDW: statistics changed in flight
      selected = place.receive_stats(
          self.received_stats, server, selected, {c: b[0] for c, b in batches.items()}, ids,
          sampling.round_order(self.config.seed, round_index, len(ids)))
    lanes = place.lanes(ids)
    plan = failures_lib.round_failures(  # failing and slow clients: all run to the end if off
        self.config.seed, round_index, ids, [self.inputs.num_steps(c) for c in ids],
        **failures_lib.settings(self.config.fed))
    plan = self.privacy.round_plan(plan, round_index)  # dp client mode: Poisson-sampled
    streams = self.inputs.streams(  # several hosts: each reads its own clients' data
        [c if c in own else None for c in lanes], round_index,
        in_order=getattr(self.execute, "reads_clients_in_order", False))
    streams = [s if s is None or plan.steps[c] == self.inputs.num_steps(c) else
               failures_lib.truncated(s, plan.steps[c], self.inputs.num_steps(c))
               for c, s in zip(lanes, streams)]
    shared = federated.round_input(self.algorithm, server)
    trained, metrics = self.execute(shared, selected, streams,
                                    [plan.steps.get(c, 0) for c in lanes], on_steps)
    if self.stages.after_training is not None:  # SCAFFOLD's control variates
      trained = self.stages.after_training(trained, shared)
    measured = {}
    if self.stages.measure is not None:  # every host calls it (a host may hold none)
      measured, trained = place.measure(place.select(server, clients, ids), trained, batches)
    weights = place.weights(self.topology.to_host(self.stages.weights(trained, measured)), ids)
    if plan.failed:  # a failed client's update is lost: weight 0, its state as before
      weights = weights * np.array([c not in plan.failed for c in lanes])
      trained = place.restore(trained, clients, plan.failed, ids)
    first = int(sampling.first_client(self.config.seed, round_index, len(ids)))
    server = self.stages.aggregate(server, trained, weights, jnp.int32(place.first(ids, first)))
    clients = place.write_back(clients, trained, ids)
    metrics, measured, weights = place.of_selected((metrics, measured, weights), ids)
    names = [self.clients_data[c].name for c in ids]
    record = round_record(names, metrics, measured, weights)
    record.update(getattr(self.execute, "report", dict)())  # `devices`: the schedule
    if failures_lib.active(self.config.fed):
      record.update(failures_lib.record(plan, names, ids))
    record.update(self.privacy.record(round_index, server))  # privacy/epsilon, ... (dp on)
    return RunState(server, clients), record

  def measurement_batches(self, own: list[int], round_index: int) -> dict:
    """{client: (images `[B, H, W, 3]`, labels `[B]`)}: one batch of each of
    this host's selected clients for the algorithm's measurements (none when
    it measures nothing)."""
    if self.stages.measure is None:
      return {}
    size = self.algorithm.measurement_batch_size
    return {c: (b["image"], b["label"]) for c in own
            for b in [self.inputs.measurement_one(c, round_index, size)]}

  def server_fn(self, state: RunState, round_index: int) -> tuple[RunState, dict]:
    """The server stages after the round's aggregation, in order (KD): the new
    state and their `{name: float}` record entries."""
    server, clients = state
    ids_dev = jnp.asarray(self.selected(round_index), jnp.int32)
    context = rounds_lib.ServerContext(round_index, clients, ids_dev, self.public,
                                       self.topology)
    metrics = {}
    for stage in self.stages.server_stages:
      out = stage(server, context)
      server, extra = (out, {}) if isinstance(out, state_lib.ServerState) else out
      metrics.update(extra)
    return RunState(server, clients), metrics

  def evaluate(self, client_models: bool, examples_dir: str | None = None
               ) -> dict[str, dict[str, dict[str, float]]]:
    """{"global"|"client"|"unseen": {client name: metrics}}; a non-sharing
    algorithm has no "global" entry (each client's own model is its result);
    "unseen": the global model on the `eval.unseen` clients, when there are any. `examples_dir`:
    also save retrieval examples of the global model (else the client models)
    as `<examples_dir>/<client>.npz`."""
    out = {}
    path = lambda t: os.path.join(examples_dir, f"{t.name}.npz") if examples_dir else None
    own = [(i, t) for i, t in enumerate(self.tests) if t is not None]  # this host's clients
    if self.algorithm.shares:  # one model (this host's copy): features deduplicated
      variables, cache = hosts.local_copy(rounds_lib.global_variables(self.server)), {}
      out["global"] = {t.name: self.evaluate_model(variables, t, path(t), cache) for _, t in own}
    if (client_models and not self.algorithm.centralised) or not self.algorithm.shares:
      client_path = path if not self.algorithm.shares else lambda t: None
      out["client"] = {t.name: self.evaluate_model(rounds_lib.client_variables(
          device_queues.local_row(self.clients, i), alg=self.algorithm), t, client_path(t)) for i, t in own}
    results = {kind: hosts.gather_per_client(per_client, self.test_names)
               for kind, per_client in out.items()}
    if self.unseen_tests:  # eval.unseen: every host scores them with its copy, not gathered
      results["unseen"] = {t.name: self.evaluate_model(variables, t, None, cache)
                           for t in self.unseen_tests}
    return results

  def evaluate_model(self, variables, test, examples_path=None, cache=None) -> dict:
    """One model on one client's test set, streamed (`eval.streamed`) or in memory."""
    cfg = self.config
    if isinstance(test, streamed_lib.StreamedTestSet):
      return streamed_lib.evaluate_model(self.embed_fn, variables, test, cfg.eval.protocol,
                                         cfg.eval.batch_size, examples_path, cache,
                                         cfg.data.loader_threads, options=cfg.eval)
    return features_lib.evaluate_model(self.embed_fn, variables, test, cfg.eval.protocol,
                                       cfg.eval.batch_size, examples_path, options=cfg.eval)


def algorithm_card(algorithm) -> str:
  """`algorithm.json`: what the report needs of a run's algorithm without
  importing it: name, label, whether it has a global model, registry order."""
  names = federated.registered()
  return json.dumps({"name": algorithm.name, "label": algorithm.label,
                     "shares": algorithm.shares,
                     "order": names.index(algorithm.name) if algorithm.name in names
                     else len(names)}, indent=2)


@contextlib.contextmanager
def run_entry(config, workdir: str):
  """The one way into a run (`experiment.run`, and `run` below for each of its
  algorithms): the config validated, the workdir proved writable and its lock
  held throughout; a run refused before it starts leaves the workdir as it
  found it (nor the folder it created, nor its `.lock`). Re-entrant: the
  suite's runs enter again inside the suite's."""
  config_lib.validate(config)
  main = hosts.is_main()
  with untouched_if_refused(workdir) if main else contextlib.nullcontext():
    config_lib.check_workdir(workdir)
    with workdir_lock(workdir) if main else contextlib.nullcontext():
      yield


def run(config, workdir: str, clients_data=None, public=None) -> dict:
  """Trains `config.fed.rounds` rounds (resuming from the workdir's checkpoint).

  `config.json` is written only once the data is loaded and the experiment
  built, so a run rejected for bad input leaves no trace that would block the
  corrected command."""
  with run_entry(config, workdir):
    return _run_locked(config, workdir, clients_data, public)


def check_resume(config, workdir: str) -> dict | None:
  """Refuses (one line), before any data is loaded or generated, a launch whose
  config means another run than the checkpoints in `workdir`: checked against
  its `config.json`, and against the fields stored with each checkpoint even
  when that file was deleted. Returns the saved config (None when no
  checkpoint binds the workdir: a launch that never got to one)."""
  now = json.loads(config.to_json())
  saved = checkpoint.load_saved_config(workdir) if checkpoint.has_checkpoint(workdir) else None
  if saved is not None:
    run_config.check_meaning(saved, now, workdir)
  stored = checkpoint.saved_meaning(workdir)
  if stored is not None:
    run_config.check_meaning(stored, now, workdir)
  return saved


def _run_locked(config, workdir: str, clients_data, public) -> dict:
  if hosts.is_main():
    remove_temporaries(workdir)  # left by a killed run
  now = json.loads(config.to_json())
  saved = check_resume(config, workdir)
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
    write_atomic(os.path.join(workdir, "algorithm.json"), algorithm_card(exp.algorithm))
  writer = MetricWriter(workdir, resume_round=start) if main else NullWriter()
  bar = tqdm.tqdm(total=config.fed.rounds, initial=start, desc=f"{config.fed.algorithm} rounds",
                  unit="round", disable=round_loop.bars_disabled())
  results = {}
  stop = StopOnSignal(ckpts)
  try:  # leaving `ckpts` finishes the write in flight; a full disk there is explained too
    with stop, disk_full_guard(workdir, ckpts), ckpts:
      exp.read_ahead(range(start, config.fed.rounds))  # streamed serial: one loader for all
      try:
        round_loop.train_rounds(round_loop.Loop(exp, config, workdir, ckpts, writer, bar, stop,
                                                results), start)
      finally:
        exp.inputs.close()
      if not results:  # resumed a finished run: evaluate the restored state
        results.update(exp.evaluate(config.eval.client_models))
      ckpts.finish()  # results.json says the run is done: its last checkpoint is written
      if main:
        write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
      if exp.algorithm.shares and main:  # the global feature extractor, without training state
        export_lib.save(os.path.join(workdir, "export"), config.model, config.data.image_size,
                        rounds_lib.global_variables(hosts.local_copy(exp.server)),
                        {"algorithm": config.fed.algorithm, "rounds": config.fed.rounds,
                         "data": config.data.name})
  except BaseException:
    bar.close()
    with contextlib.suppress(Exception):  # (a full disk again): the run's error is reported
      writer.close()
    raise
  bar.close()
  with disk_full_guard(workdir, ckpts):  # the last TensorBoard flush
    writer.close()
  return results
