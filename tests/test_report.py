"""Result tables and convergence plots."""
from __future__ import annotations

import json

from fedreid_jax.evaluation import report

RESULTS = {
    "global": {
        "market1501": dict(rank1=0.832, rank5=0.93, rank10=0.96, mAP=0.6),
        "viper": dict(rank1=0.48, rank5=0.70, rank10=0.80, mAP=0.5),
    },
    "local": {
        "market1501": dict(rank1=0.9, rank5=0.95, rank10=0.97, mAP=0.75),
    },
}


def test_table_contents():
  table = report.format_results_table(RESULTS, title="FedPav, E=1")
  lines = table.strip().splitlines()
  assert lines[0] == "**FedPav, E=1**"
  assert lines[2] == ("| Client | global R-1 | global R-5 | global R-10 | global mAP "
                      "| local R-1 | local R-5 | local R-10 | local mAP |")
  assert lines[3].count("|") == 10
  assert lines[4] == "| market1501 | 83.2 | 93.0 | 96.0 | 60.0 | 90.0 | 95.0 | 97.0 | 75.0 |"
  # viper has no local result: dashes.
  assert lines[5] == "| viper | 48.0 | 70.0 | 80.0 | 50.0 | - | - | - | - |"
  # Mean row: global over two clients ((83.2+48)/2 = 65.6, (60+50)/2 = 55.0);
  # local over the one client it has.
  assert lines[6] == "| **Mean** | 65.6 | 81.5 | 88.0 | 55.0 | 90.0 | 95.0 | 97.0 | 75.0 |"
  assert len(lines) == 7


def test_table_metric_choice_and_no_title():
  table = report.format_results_table({"global": {"a": {"mINP": 0.25}}},
                                      metrics=("rank1", "mINP"))
  lines = table.strip().splitlines()
  assert lines[0] == "| Client | global R-1 | global mINP |"
  assert lines[2] == "| a | - | 25.0 |"
  assert lines[3] == "| **Mean** | - | 25.0 |"


def write_log(path, extra_lines=()):
  records = [
      {"round": 1, "kind": "train", "train/loss": 3.0, "client/syn_market/loss": 3.2,
       "client/syn_duke/loss": 2.8},
      {"round": 1, "kind": "eval", "eval/syn_market/rank1": 0.2,
       "eval/syn_duke/rank1": 0.1, "eval/syn_market/mAP": 0.1},
      {"round": 2, "kind": "train", "train/loss": 2.0},
      {"round": 2, "kind": "eval", "eval/syn_market/rank1": 0.4},
  ]
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write("\n")
    for line in extra_lines:
      f.write(line)
  return records


def test_read_metrics_jsonl_skips_truncated_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = write_log(path, extra_lines=['{"round": 3, "kind": "ev'])
  assert report.read_metrics_jsonl(path) == records
  assert report.eval_clients(records, "rank1") == ["syn_market", "syn_duke"]
  assert report.eval_clients(records, "mAP") == ["syn_market"]


def test_plot_convergence_writes_png(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_log(path)
  out = report.plot_convergence(path, tmp_path / "plots" / "rank1.png")
  assert out == str(tmp_path / "plots" / "rank1.png")
  data = (tmp_path / "plots" / "rank1.png").read_bytes()
  assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_plot_convergence_empty_log(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("")
  out = report.plot_convergence(path, tmp_path / "empty.png", metric="mAP")
  assert (tmp_path / "empty.png").stat().st_size > 0
  assert out.endswith("empty.png")


def test_terminal_table_fits_100_columns():
  from fedreid_jax.evaluation.report import format_terminal_table
  per = {f"syn_{n}": {"rank1": 0.123, "mAP": 1.0} for n in ("msmt17", "duke", "ilids")}
  table = format_terminal_table({"FedPav": per, "FedPav (client models)": per,
                                 "Local training": per, "FedAvg": per}, "a title")
  lines = table.splitlines()
  assert max(len(l) for l in lines) <= 100
  assert "(client models)" in table and "12.3 / 100.0" in lines[-1]


def test_convergence_plot_of_a_run_without_global_model(tmp_path):
  """The local baseline logs only `eval_client/...`: the rank-1 panel uses it."""
  from fedreid_jax.evaluation import report
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"round": 1, "kind": "eval", "eval_client/a/rank1": 0.5}\n'
                 '{"round": 2, "kind": "eval", "eval_client/a/rank1": 0.6}\n')
  records = report.read_metrics_jsonl(log)
  assert report.eval_prefix(records) == "eval_client"
  assert report.eval_clients(records, "rank1", "eval_client") == ["a"]
