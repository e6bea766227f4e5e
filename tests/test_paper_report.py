"""The suite report: run discovery, the final and best-3 selections, the paper
table (columns, seeds), plots and retrieval pictures, the CLI, bad input."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from fedreid_jax import errors
from fedreid_jax import report as report_cli
from fedreid_jax.evaluation import paper_report, report, suite_runs
from fedreid_jax.evaluation import retrieval_examples as rx
from fedreid_jax.evaluation.features import TestSet

# FedPav's global model, rank-1 per round: (syn_market, syn_duke, syn_viper).
# Best-3 over the big datasets (market, duke; viper ignored) within round 300:
# round 30 (mean 0.60), 50 (0.55), 20 (0.50); round 310 is outside.
FEDPAV_EVAL = {10: (0.50, 0.30, 0.90), 20: (0.60, 0.40, 0.10), 30: (0.70, 0.50, 0.20),
               40: (0.40, 0.20, 0.95), 50: (0.65, 0.45, 0.30), 310: (0.99, 0.99, 0.99)}
# FedPav's client models (market, duke): best-3 by their own rank-1 = rounds 10, 40, 50.
FEDPAV_CLIENT = {10: (0.9, 0.9), 20: (0.1, 0.1), 30: (0.1, 0.1), 40: (0.8, 0.6),
                 50: (0.7, 0.5), 310: (0.2, 0.2)}
CLIENTS = ("syn_market", "syn_duke", "syn_viper")


def _metrics(prefix: str, clients, rank1s) -> dict:
  """`<prefix>/<client>/rank1` and mAP (= rank-1 / 2) keys."""
  out = {}
  for client, r1 in zip(clients, rank1s):
    out[f"{prefix}/{client}/rank1"] = r1
    out[f"{prefix}/{client}/mAP"] = r1 / 2
  return out


def fedpav_records() -> list[dict]:
  records = []
  for rnd, r1 in FEDPAV_EVAL.items():
    records.append({"round": rnd, "kind": "train", "train/loss": 1.0,
                    "client/syn_market/weight": 0.6, "client/syn_duke/weight": 0.4})
    records.append({"round": rnd, "kind": "eval", **_metrics("eval", CLIENTS, r1),
                    **_metrics("eval_client", CLIENTS[:2], FEDPAV_CLIENT[rnd])})
  return records


# What training writes to algorithm.json for the built-in algorithms: (label, shares, order).
CARDS = {"local": ("Local training", False, 0), "fedpav": ("FedPav", True, 1),
         "fedpav_kd": ("FedPav+KD", True, 2), "fedpav_cdw": ("FedPav+CDW", True, 3),
         "fedpav_kd_cdw": ("FedPav+KD+CDW", True, 4), "fedavg": ("FedAvg", True, 5),
         "centralised": ("Centralised", True, 6)}


def write_card(folder, algorithm: str, label: str, shares: bool, order: int) -> None:
  with open(os.path.join(folder, "algorithm.json"), "w") as f:
    json.dump({"name": algorithm, "label": label, "shares": shares, "order": order}, f)


def write_run(folder, algorithm: str, records, seed: int = 0, tail: str = "",
              card: bool = True) -> str:
  """A run folder; with `card`, its algorithm.json from `CARDS`."""
  os.makedirs(folder, exist_ok=True)
  if card:
    write_card(folder, algorithm, *CARDS[algorithm])
  config = {"seed": seed, "data": {"name": "synthetic"},
            "fed": {"algorithm": algorithm, "rounds": 310},
            "eval": {"every_rounds": 10, "protocol": "standard"}}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write(tail)
  return str(folder)


def tiny_test_set() -> tuple[TestSet, np.ndarray, np.ndarray]:
  """Four queries, six gallery entries on the unit circle; image i is flat grey 10 * i.

  Gallery (pid, cam, angle): (1,0,0°) (1,1,30°) (2,1,20°) (-1,1,10°) (3,0,60°) (1,1,90°).
  """
  angles = np.deg2rad([0, 30, 20, 10, 60, 90])
  gallery = np.stack([np.cos(angles), np.sin(angles)], 1)
  q_angles = np.deg2rad([0, 90, 0, 60])
  query = np.stack([np.cos(q_angles), np.sin(q_angles)], 1)
  flat = lambda n, base: np.full((n, 8, 4, 3), 1, np.uint8) * (
      base + 10 * np.arange(n, dtype=np.uint8))[:, None, None, None]
  test = TestSet("syn_market", flat(4, 100), flat(6, 0), np.array([1, 2, 9, 3]),
                 np.array([1, 1, 2, -1, 3, 1]), np.array([0, 0, 0, 1]),
                 np.array([0, 1, 1, 1, 0, 1]))
  return test, query, gallery


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  """fedpav (with retrieval examples), local (2 evaluations), fedpav_kd with
  two seeds two levels down, fedpav_cdw, a run without evaluations, a folder
  with config.json only."""
  root = tmp_path_factory.mktemp("suite")
  fedpav = write_run(root / "fedpav", "fedpav", fedpav_records(), tail='{"round": 320, "ki')
  test, q, g = tiny_test_set()
  rx.save_examples(os.path.join(fedpav, "retrieval", "syn_market.npz"),
                   rx.retrieval_examples(q, g, test, top_k=4, thumb_size=(16, 8)))
  write_run(root / "local", "local", [
      {"round": 10, "kind": "eval", **_metrics("eval_client", CLIENTS[:2], (0.8, 0.6))},
      {"round": 20, "kind": "eval", **_metrics("eval_client", CLIENTS[:2], (0.9, 0.7))}])
  for seed, r1 in ((0, (0.6, 0.4)), (1, (0.8, 0.2))):
    write_run(root / f"seed{seed}" / "kd", "fedpav_kd", [
        {"round": 10, "kind": "eval", **_metrics("eval", CLIENTS[:2], r1),
         **_metrics("eval_before_kd", CLIENTS[:2], (0.1, 0.1))}], seed=seed)
  write_run(root / "cdw", "fedpav_cdw", [
      {"round": r, "kind": "train", "client/syn_market/weight": w,
       "client/syn_duke/weight": 1 - w} for r, w in ((1, 0.3), (2, 0.5), (3, 0.4))]
      + [{"round": 3, "kind": "eval", **_metrics("eval", CLIENTS[:2], (0.5, 0.5))}])
  write_run(root / "noeval", "fedavg", [{"round": 1, "kind": "train", "train/loss": 2.0}])
  os.makedirs(root / "broken")
  (root / "broken" / "config.json").write_text("{}")
  return root


def test_best3_selection_hand_computed():
  sel = suite_runs.select_best(fedpav_records(), "eval")
  assert sel.rounds == (20, 30, 50) and sel.complete
  expected = {"syn_market": (0.6 + 0.7 + 0.65) / 3, "syn_duke": (0.4 + 0.5 + 0.45) / 3,
              "syn_viper": (0.1 + 0.2 + 0.3) / 3}
  for client, r1 in expected.items():
    assert math.isclose(sel.values[client]["rank1"], r1)
    assert math.isclose(sel.values[client]["mAP"], r1 / 2)
  client = suite_runs.select_best(fedpav_records(), "eval_client")  # its own rank-1
  assert client.rounds == (10, 40, 50)
  assert math.isclose(client.values["syn_market"]["rank1"], 0.8)
  assert set(client.values) == {"syn_market", "syn_duke"}


def test_final_and_short_selections():
  final = suite_runs.select_final(fedpav_records(), "eval")
  assert final.rounds == (310,) and final.values["syn_viper"]["rank1"] == 0.99
  short = suite_runs.select_best(fedpav_records()[:4], "eval")  # rounds 10 and 20 only
  assert short.rounds == (10, 20) and not short.complete
  assert math.isclose(short.values["syn_market"]["rank1"], 0.55)
  # No big dataset among the clients: all clients count.
  assert suite_runs.big_clients(["viper", "ilids"]) == ["viper", "ilids"]
  assert suite_runs.big_clients(["msmt17", "viper", "cuhk03np"]) == ["msmt17", "cuhk03np"]


def test_find_runs_two_levels_deep(suite, caplog):
  runs = suite_runs.find_runs(str(suite))
  assert [r.name for r in runs] == ["cdw", "fedpav", "local", "noeval", "seed0/kd", "seed1/kd"]
  kept = suite_runs.with_evaluations(runs)
  assert "noeval" not in [r.name for r in kept] and "no evaluation records" in caplog.text
  groups = suite_runs.by_algorithm(kept)
  assert [r.seed for r in groups["fedpav_kd"]] == [0, 1]
  assert len(groups["fedpav"][0].records) == 12  # the truncated last line skipped


def test_seed_cells_mean_and_std():
  table = report.format_results_table(
      {"+KD": {"a": {"rank1": [0.6, 0.8]}, "b": {"rank1": [0.4, 0.2]}}}, metrics=("rank1",))
  lines = table.strip().splitlines()
  assert lines[2] == "| a | 70.0 ± 14.1 |"
  assert lines[3] == "| b | 30.0 ± 14.1 |"
  assert lines[4] == "| **Mean** | 50.0 ± 0.0 |"  # per seed: 0.5 and 0.5


@pytest.fixture(scope="module")
def written(suite):
  path = paper_report.write_report(str(suite))
  return path, open(path, encoding="utf-8").read()


def _table(text: str, heading: str) -> list[str]:
  """The lines of the first table after `## <heading>`."""
  block = text.split(f"## {heading}\n", 1)[1].lstrip("\n")
  table = block[block.index("\n|") + 1:]
  return table[:table.index("\n\n")].splitlines()


def test_report_tables(written):
  _, text = written
  assert text.startswith("# FedReID report: synthetic\n")
  assert "seeds 0, 1 (2 seeds)" in text and "standard protocol" in text
  best = _table(text, "Best-3")
  assert best[0] == ("| Client | Local training R-1 | Local training mAP | FedPav R-1 | FedPav mAP "
                     "| FedPav+KD R-1 | FedPav+KD mAP | FedPav+CDW R-1 | FedPav+CDW mAP |")
  assert best[2] == ("| syn_market | 85.0 | 42.5 | 65.0 | 32.5 | 70.0 ± 14.1 "
                     "| 35.0 ± 7.1 | 50.0 | 25.0 |")
  assert best[4] == "| syn_viper | - | - | 20.0 | 10.0 | - | - | - | - |"
  assert best[5].startswith("| **Mean** | 75.0 | 37.5 | 43.3 | 21.7 | 50.0 ± 0.0 ")
  final = _table(text, "Final round")
  assert final[2].startswith("| syn_market | 90.0 | 45.0 | 99.0 | 49.5 | 70.0 ± 14.1 |")
  assert "| FedPav | 0 | 310 | 20, 30, 50 |" in text
  assert "Local training (seed 0): only 2 evaluation(s) in range, all used" in text
  clients = _table(text, "Client models against local training")
  assert clients[0] == ("| Client | Local training R-1 | Local training mAP "
                        "| FedPav local R-1 | FedPav local mAP |")
  assert clients[2] == "| syn_market | 85.0 | 42.5 | 80.0 | 40.0 |"
  assert "FedPav local" not in text.split("## Client models", 1)[0]
  kd = text.split("## Knowledge distillation", 1)[1]
  assert "| syn_market | 10.0 | 5.0 | 70.0 | 35.0 |" in kd  # before / after, seeds pooled


def _eval(rnd: int, prefix: str, r1) -> dict:
  return {"round": rnd, "kind": "eval", **_metrics(prefix, CLIENTS[:2], r1)}


def _groups(root) -> dict:
  return suite_runs.by_algorithm(suite_runs.find_runs(str(root)))


def test_fallback_without_algorithm_json(tmp_path, caplog):
  write_run(tmp_path / "local", "local", [_eval(10, "eval_client", (0.5, 0.5))], card=False)
  write_run(tmp_path / "fedpav", "fedpav", [{**_eval(10, "eval", (0.4, 0.4)),
                                             **_eval(10, "eval_client", (0.3, 0.3))}],
            card=False)
  write_run(tmp_path / "kd", "fedpav_kd", [_eval(10, "eval", (0.6, 0.6))])
  write_run(tmp_path / "avg", "fedavg", [_eval(10, "eval", (0.6, 0.6))], card=False)
  (tmp_path / "avg" / "algorithm.json").write_text("{not json")
  groups = _groups(tmp_path)
  local, fedpav = groups["local"][0], groups["fedpav"][0]
  assert (local.label, local.shares, local.order) == ("local", False, suite_runs.UNKNOWN_ORDER)
  assert (fedpav.label, fedpav.shares) == ("fedpav", True)
  assert groups["fedavg"][0].label == "fedavg" and "cannot read algorithm.json" in caplog.text
  # Runs with a card first, by order; the others after, by name.
  assert [(c.label, c.prefix) for c in suite_runs.make_columns(groups)] == [
      ("FedPav+KD", "eval"), ("fedavg", "eval"), ("fedpav", "eval"), ("local", "eval_client")]
  assert [c.label for c in suite_runs.make_columns(groups, client_models=True)] == [
      "fedpav local", "local"]


def test_columns_follow_order(tmp_path):
  for alg, label, order in (("a_first", "Zed", 3), ("b_second", "Alpha", 0),
                            ("c_third", "Beta", 0), ("d_fourth", "Alpha", 9)):
    write_run(tmp_path / alg, "fedpav", [_eval(10, "eval", (0.5, 0.5))], card=False)
    write_card(tmp_path / alg, alg, label, True, order)
    config = json.loads((tmp_path / alg / "config.json").read_text())
    config["fed"]["algorithm"] = alg
    (tmp_path / alg / "config.json").write_text(json.dumps(config))
  columns = suite_runs.make_columns(_groups(tmp_path))
  assert [c.label for c in columns] == ["Alpha", "Beta", "Zed", "Alpha (d_fourth)"]
  assert [c.algorithm for c in columns] == ["b_second", "c_third", "a_first", "d_fourth"]


def test_plugin_label_is_a_column(tmp_path):
  write_run(tmp_path / "fedpav", "fedpav", fedpav_records())
  write_run(tmp_path / "local", "local", [_eval(10, "eval_client", (0.8, 0.6))])
  write_run(tmp_path / "prox", "fedprox", [{**_eval(10, "eval", (0.7, 0.7)),
                                            **_eval(10, "eval_client", (0.6, 0.6))}],
            card=False)
  write_card(tmp_path / "prox", "fedprox", "FedProx", True, 7)
  text = open(paper_report.write_report(str(tmp_path)), encoding="utf-8").read()
  assert _table(text, "Best-3")[0] == (
      "| Client | Local training R-1 | Local training mAP | FedPav R-1 | FedPav mAP "
      "| FedProx R-1 | FedProx mAP |")
  assert _table(text, "Client models against local training")[0] == (
      "| Client | Local training R-1 | Local training mAP | FedPav local R-1 | FedPav local mAP "
      "| FedProx local R-1 | FedProx local mAP |")


def test_retrieval_from_best_sharing_run(tmp_path):
  def run(folder, alg, r1, retrieval=True):
    prefix = "eval" if CARDS[alg][1] else "eval_client"
    write_run(tmp_path / folder, alg, [_eval(10, prefix, (0.9, 0.9)), _eval(20, prefix, r1)])
    if retrieval:
      os.makedirs(tmp_path / folder / "retrieval")
      (tmp_path / folder / "retrieval" / "syn_market.npz").write_bytes(b"")

  run("local", "local", (0.99, 0.99))  # the best, but without a global model
  assert paper_report.retrieval_run(_groups(tmp_path))[0] == "local"  # none shares
  run("fedpav", "fedpav", (0.5, 0.5))
  run("kd", "fedpav_kd", (0.8, 0.6))  # the last evaluation counts: mean 0.7
  run("cdw", "fedpav_cdw", (0.9, 0.9), retrieval=False)
  assert paper_report.retrieval_run(_groups(tmp_path))[0] == "fedpav_kd"
  run("avg", "fedavg", (0.7, 0.7))  # a tie: the higher order
  assert paper_report.retrieval_run(_groups(tmp_path))[0] == "fedavg"


def _not_flat_png(path, min_kb: float) -> None:
  assert os.path.getsize(path) > min_kb * 1024
  pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 20


def test_report_pictures(written):
  path, text = written
  out = os.path.dirname(path)
  for name in ("convergence_rank1.png", "convergence_mAP.png", "cdw_weights.png",
               "retrieval_syn_market.png"):
    assert f"]({name})" in text
    _not_flat_png(os.path.join(out, name), 10)
  assert "From `fedpav` (FedPav, seed 0)" in text


def test_retrieval_examples_rank_everything():
  test, q, g = tiny_test_set()
  ex = rx.retrieval_examples(q, g, test, num_queries=4, top_k=4, thumb_size=(8, 4))
  assert ex["query_index"].tolist() == [0, 1, 2, 3]
  # Query 0 (pid 1, cam 0) at 0°: junk (same pid and cam), junk (pid -1), wrong, correct.
  assert ex["gallery_index"][0].tolist() == [0, 3, 2, 1]
  assert ex["status"][0].tolist() == [2, 2, 0, 1]
  assert ex["first_match"][0] == 2 and ex["num_matches"][0] == 2
  # Query 1 (pid 2, cam 0) at 90°: pid 1 (cam 0 is wrong, not junk, for pid 2).
  assert ex["gallery_index"][1].tolist() == [5, 4, 1, 2]
  assert ex["status"][1].tolist() == [0, 0, 0, 1]
  assert ex["first_match"].tolist() == [2, 4, 0, 1]
  assert np.all(np.diff(ex["scores"], axis=1) <= 0)
  assert np.allclose(ex["scores"][3, 0], 1.0) and ex["status"][3, 0] == 1
  assert ex["gallery_images"].shape == (4, 4, 8, 4, 3)
  assert np.all(ex["gallery_images"][0, 1] == 30) and np.all(ex["query_images"][1] == 110)
  assert ex["gallery_pids"][0].tolist() == [1, -1, 2, 1] and str(ex["client"]) == "syn_market"


def test_choose_queries_prefers_one_failure_then_successes():
  test, q, g = tiny_test_set()
  ex = rx.retrieval_examples(q, g, test, num_queries=2, top_k=3)
  assert ex["query_index"].tolist() == [1, 3]  # the middle rank-1 failure, one success
  # One query: no failure quota; the middle success (candidate 0 has no match).
  assert rx.choose_queries(np.array([0, 1, 1, 1]), np.array([6, 0, 0, 0]), 1) == [2]


def test_save_load_and_draw(tmp_path):
  test, q, g = tiny_test_set()
  ex = rx.retrieval_examples(q, g, test, top_k=6, thumb_size=(32, 16))
  rx.save_examples(str(tmp_path / "r" / "a.npz"), ex)
  back = rx.load_examples(str(tmp_path / "r" / "a.npz"))
  assert set(back) == set(ex) and all(np.array_equal(back[k], ex[k]) for k in ex)
  _not_flat_png(rx.draw_retrieval(back, str(tmp_path / "a.png"), "syn_market"), 10)
  no_queries = TestSet("e", test.query_images[:0], test.gallery_images, np.zeros(0),
                       test.gallery_pids, np.zeros(0), test.gallery_cams)
  empty = rx.retrieval_examples(q[:0], g, no_queries)
  assert empty["status"].shape == (0, 6)
  assert os.path.getsize(rx.draw_retrieval(empty, str(tmp_path / "e.png"), "e")) > 0


def test_cli_end_to_end(suite, tmp_path, capsys):
  out = tmp_path / "out"
  assert report_cli.main(["--workdir", str(suite), "--out", str(out), "--metric", "mINP"]) == 0
  assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
  assert sorted(os.listdir(out)) == ["cdw_weights.png", "convergence_mINP.png", "report.md",
                                     "retrieval_syn_market.png"]


def test_missing_metrics_error(tmp_path, capsys):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "config.json").write_text("{}")
  with pytest.raises(errors.ReportInputMissing) as e:
    suite_runs.find_runs(str(tmp_path))
  message = str(e.value)
  for part in (str(tmp_path), "config.json + metrics.jsonl", "subfolders",
               "config.json without metrics.jsonl in: a", "python -m fedreid_jax.main"):
    assert part in message
  with pytest.raises(SystemExit) as e:
    report_cli.main(["--workdir", str(tmp_path / "nothing")])
  assert "is not a folder" in str(e.value.code) and str(e.value.code).startswith("error: ")


def test_runs_without_evaluations_error(tmp_path):
  write_run(tmp_path, "fedpav", [{"round": 1, "kind": "train", "train/loss": 1.0}])
  with pytest.raises(errors.ReportInputMissing, match="none has evaluation records"):
    paper_report.write_report(str(tmp_path))


def test_re_ranked_columns_beside_the_plain_ones(tmp_path):
  """Runs that logged `*_rr` / `*_aqe` metrics get those columns after the plain
  ones, in each table; a run without them shows "-" there."""
  extra = lambda rec: {**rec, **{k + "_rr": v + 0.1 for k, v in rec.items() if "/" in k},
                       **{k + "_aqe": v + 0.05 for k, v in rec.items() if "/" in k}}
  write_run(tmp_path / "fedpav", "fedpav", [extra(r) for r in fedpav_records()])
  write_run(tmp_path / "local", "local", [_eval(10, "eval_client", (0.5, 0.5))])
  text = open(paper_report.write_report(str(tmp_path)), encoding="utf-8").read()
  best = _table(text, "Best-3")
  assert best[0] == ("| Client | Local training R-1 | Local training mAP "
                     "| Local training R-1 RR | Local training mAP RR | Local training R-1 AQE "
                     "| Local training mAP AQE | FedPav R-1 | FedPav mAP | FedPav R-1 RR "
                     "| FedPav mAP RR | FedPav R-1 AQE | FedPav mAP AQE |")
  # best-3 by the plain rank-1 (rounds 20, 30, 50): market 65.0, re-ranked +10, AQE +5
  assert best[2] == ("| syn_market | 50.0 | 25.0 | - | - | - | - | 65.0 | 32.5 | 75.0 | 42.5 "
                     "| 70.0 | 37.5 |")
  assert _table(text, "Client models against local training")[0].endswith(
      "| FedPav local R-1 AQE | FedPav local mAP AQE |")
  assert report.with_variants(("rank1", "mAP"), {"mAP_rr", "rank1"}) == ["rank1", "mAP",
                                                                         "mAP_rr"]
  assert report.with_variants(("rank1", "rank5"), {"rank1_aqe", "rank5_aqe"}, of=("rank1",)) == [
      "rank1", "rank5", "rank1_aqe"]
  assert report.metric_label("rank10_aqe") == "R-10 AQE" and report.metric_label("x_rr") == "x_rr"
