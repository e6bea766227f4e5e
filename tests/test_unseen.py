"""Unseen domains (`eval.unseen`): held-out clients never train, the global
model is evaluated on them, the report shows them, bad input is one line."""
from __future__ import annotations

import dataclasses
import json
import logging
import types

import pytest

import fakes
from fedreid_jax import config_lib, experiment, run_config, train
from fedreid_jax.data import unseen as unseen_lib
from fedreid_jax.errors import CheckpointMismatch, ConfigError


# the fake clients under names of the config's dataset, which validation checks against
NAMES = ("syn_market", "syn_duke", "syn_viper")


def spied(client, name: str, reads: list):
  """`client` named `name`, whose training images, when read, append `name` to `reads`."""
  read = client.train.read_image
  spy = lambda i: (reads.append(name), read(i))[1]
  return dataclasses.replace(client, name=name,
                             train=dataclasses.replace(client.train, read_image=spy))


class Lines(logging.Handler):
  """The messages logged while it is attached."""
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
  """Two rounds of FedPav on the first two fake clients, the third unseen;
  `(workdir, reads, log text)`."""
  reads, lines, root = [], Lines(), logging.getLogger()
  clients = [spied(c, n, reads) for c, n in zip(fakes.fake_clients(), NAMES)]
  workdir = tmp_path_factory.mktemp("unseen")
  cfg = fakes.tiny_config(**{"eval.unseen": ("syn_viper",), "eval.client_models": False})
  level, _ = root.level, root.addHandler(lines)
  root.setLevel(logging.INFO)
  try:
    train.run(cfg, str(workdir), clients)
  finally:
    root.removeHandler(lines)
    root.setLevel(level)
  return workdir, reads, "\n".join(lines.lines)


def records(workdir, kind):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_unseen_client_never_trains(held_out_run):
  workdir, reads, _ = held_out_run
  assert "syn_market" in reads and "syn_duke" in reads  # the spy sees what training reads
  assert "syn_viper" not in reads
  for record in records(workdir, "train"):
    weights = {k.split("/")[1]: v for k, v in record.items() if k.endswith("/weight")}
    assert set(weights) == {"syn_market", "syn_duke"}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert not any("syn_viper" in k for k in record)


def test_unseen_client_gets_global_model_entries(held_out_run):
  workdir, _, log = held_out_run
  assert "round 2 eval (global model on unseen domains): mean rank-1" in log
  evals = records(workdir, "eval")
  assert [r["round"] for r in evals] == [1, 2]
  for record in evals:
    assert {k.split("/")[1] for k in record if k.startswith("eval/")} == {"syn_market",
                                                                          "syn_duke"}
    assert 0.0 <= record["eval_unseen/syn_viper/rank1"] <= 1.0
    assert {k for k in record if k.startswith("eval_unseen/")} == {
        f"eval_unseen/syn_viper/{m}" for m in ("rank1", "rank5", "rank10", "mAP", "mINP")}
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"global", "unseen"} and set(results["unseen"]) == {"syn_viper"}
  assert results["unseen"]["syn_viper"]["rank1"] == evals[-1]["eval_unseen/syn_viper/rank1"]
  columns = experiment.result_columns("FedPav", results)
  assert list(columns) == ["FedPav", "FedPav (unseen domains)"]


def test_local_has_no_global_model_to_evaluate(caplog):
  local = types.SimpleNamespace(name="local", shares=False)
  unseen = fakes.fake_clients()[2:]
  with caplog.at_level(logging.INFO):
    assert unseen_lib.evaluated(unseen, local) == []
  assert "local has no global model; c2 do not train" in caplog.text
  assert unseen_lib.evaluated(unseen, types.SimpleNamespace(shares=True)) == unseen


def test_split_keeps_loaded_order():
  cfg = fakes.tiny_config(**{"eval.unseen": ("c2", "c0")})
  training, unseen = unseen_lib.split(cfg, fakes.fake_clients())
  assert [c.name for c in training] == ["c1"] and [c.name for c in unseen] == ["c0", "c2"]
  cfg.eval.unseen = ()
  assert [c.name for c in unseen_lib.split(cfg, fakes.fake_clients())[0]] == ["c0", "c1", "c2"]


ALL = ("syn_msmt17", "syn_duke", "syn_market", "syn_cuhk03", "syn_prid", "syn_cuhk01",
       "syn_viper", "syn_3dpes", "syn_ilids")


@pytest.mark.parametrize("overrides, message", [
    ({"eval.unseen": ("syn_nope",)},
     "config.eval.unseen names ['syn_nope'], not client(s) of this run; its clients are "
     "['syn_msmt17', 'syn_duke'"),
    ({"eval.unseen": ("syn_viper",), "data.clients": ("syn_market", "syn_duke")},
     "config.eval.unseen names ['syn_viper'], which config.data.clients=('syn_market', "
     "'syn_duke') does not load; an unseen client must be loaded: add it"),
    ({"eval.unseen": ("syn_market",), "data.clients": ("syn_market",)},
     "config.eval.unseen holds every client this run loads (['syn_market']), so none would "
     "train"),
    ({"eval.unseen": ALL}, "holds every client this run loads"),
    ({"eval.unseen": ("syn_viper", "syn_viper")}, "names ['syn_viper'] more than once"),
    ({"eval.unseen": (3,)}, "must hold client names (strings), not [3]"),
    ({"eval.unseen": ("syn_viper",), "fed.clients_per_round": 9},
     "config.fed.clients_per_round=9 exceeds the 8 clients that train (9 loaded, 1 in "
     "config.eval.unseen)"),
])
def test_bad_unseen_is_one_line_before_loading(overrides, message):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(fakes.tiny_config(**overrides))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_unseen_after_loading_names_the_clients():
  cfg = fakes.tiny_config(**{"eval.unseen": ("c9",)})
  with pytest.raises(ConfigError, match=r"names \['c9'\], not client\(s\) of this run; its "
                                        r"clients are \['c0', 'c1', 'c2'\]"):
    unseen_lib.split(cfg, fakes.fake_clients())
  cfg.eval.unseen = ("c0", "c1", "c2")
  with pytest.raises(ConfigError, match="holds every client this run loads"):
    unseen_lib.split(cfg, fakes.fake_clients())


def test_valid_unseen_and_older_configs_validate():
  config_lib.validate(fakes.tiny_config(**{"eval.unseen": ("syn_viper", "syn_ilids")}))
  config_lib.validate(fakes.tiny_config(**{"eval.unseen": ("syn_viper",),
                                           "data.clients": ("syn_viper", "syn_market")}))
  older = fakes.tiny_config()
  del older.eval["unseen"]
  config_lib.validate(older)
  assert unseen_lib.names(older) == ()


def test_resume_with_another_unseen_is_refused():
  saved = json.loads(fakes.tiny_config(**{"eval.unseen": ("syn_viper",)}).to_json())
  now = json.loads(fakes.tiny_config(**{"eval.unseen": ("syn_ilids",)}).to_json())
  with pytest.raises(CheckpointMismatch, match="eval.unseen: saved"):
    run_config.check_meaning(saved, now, "runs/x")
  run_config.check_meaning(saved, saved, "runs/x")


def test_report_shows_unseen_domains_at_the_rounds_chosen_on_training_clients(tmp_path):
  from fedreid_jax.evaluation import paper_report
  from test_paper_report import fedpav_records, write_run
  # the unseen rank-1 grows with the round: chosen by itself, best-3 would be 40, 50, 310
  records = [{**r, "eval_unseen/syn_ilids/rank1": r["round"] / 1000,
              "eval_unseen/syn_ilids/mAP": r["round"] / 2000} if r["kind"] == "eval" else r
             for r in fedpav_records()]
  write_run(tmp_path / "fedpav", "fedpav", records)
  write_run(tmp_path / "local", "local", [
      {"round": 10, "kind": "eval", "eval_client/syn_market/rank1": 0.5}])
  text = open(paper_report.write_report(str(tmp_path)), encoding="utf-8").read()
  section = text.split("## Unseen domains\n", 1)[1].split("\n## ", 1)[0]
  final, best = (part.split("\n\n")[1].splitlines()
                 for part in section.split("**Final round**")[1].split("**Best-3**"))
  assert final[0] == "| Client | FedPav R-1 | FedPav mAP |"  # local: no global model
  assert final[2:] == ["| syn_ilids | 31.0 | 15.5 |", "| **Mean** | 31.0 | 15.5 |"]
  assert best[2] == "| syn_ilids | 3.3 | 1.7 |"  # rounds 20, 30, 50 (by the training clients)
  assert "syn_ilids" not in text.split("## Unseen domains", 1)[0]
