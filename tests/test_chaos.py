"""Chaos: a short tiny run killed with SIGKILL at seeded random moments and
resumed each time ends as an uninterrupted run does (metrics.jsonl records,
results.json, export/ and export_best/), with no temporary file left.

The issue asks for 10 kills; each costs a subprocess start (imports 3-7 s on
the shared 2-core CPU) plus building the experiment from the compilation
cache and the part of the run it interrupts: 6-11 s a kill, so 10 kills (11
starts) took 81-112 s there, with the uninterrupted run 9-17 s more. The
suite runs 3 kills; `python benchmarks/chaos.py` runs the full 10 with the
same code (benchmarks/chaos.py says how the kill moments are drawn).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import chaos  # noqa: E402  (benchmarks/chaos.py)

KILLS = 3


@pytest.mark.slow
def test_seeded_kills_then_resume_end_as_an_uninterrupted_run(tmp_path):
  # seed 3: kills at moments 0.24, 0.37 and 0.54 of the run after its first round
  result = chaos.chaos(str(tmp_path), kills=KILLS, seed=3, rounds=3, log=print)
  assert result["same"], result["differs"]
  assert not result["left"], result["left"]
  # the kill schedule is seeded; an attempt may only finish first on a much faster machine
  assert result["kills"] >= 2, result["attempts"]
