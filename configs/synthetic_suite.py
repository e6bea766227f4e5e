"""Every algorithm of the paper side by side on the synthetic benchmark.

  python -m fedreid_jax.main --config configs/synthetic_suite.py --workdir runs/suite
  python -m fedreid_jax.report --workdir runs/suite       # (also written at the end)

FedPav, then local training, FedPav+KD, FedPav+CDW, FedPav+KD+CDW and the
centralised baseline, on the same data and seed, each in
<workdir>/baseline_<name> (resumable one by one). 30 rounds, KD every 5 and
an evaluation every 5 rounds, so the best-3 selection has 6 evaluations to
choose from. About 25 minutes on a 2-core CPU.
"""
import pathlib

from fedreid_jax.config_lib import load_config_file


def get_config():
  c = load_config_file(str(pathlib.Path(__file__).with_name("synthetic.py")))
  c.fed.rounds = 30
  c.kd.every_rounds = 5
  c.eval.every_rounds = 5
  c.checkpoint_every = 5
  c.baselines = ("local", "fedpav_kd", "fedpav_cdw", "fedpav_kd_cdw", "centralised")
  return c
