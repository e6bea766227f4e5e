"""Every baseline of the federated-learning literature against FedPav on the
synthetic benchmark.

  python -m fedreid_jax.main --config configs/synthetic_baselines.py --workdir runs/baselines
  python -m fedreid_jax.report --workdir runs/baselines   # (also written at the end)

FedPav, then FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedBN,
SCAFFOLD and Ditto (docs/algorithms.md, "Baselines"), on the same data and
seed, each in <workdir>/baseline_<name> (resumable one by one), with their
default settings. 15 rounds (the default run's), an evaluation every 3 so
that the best-3 selection has 5 to choose from, the client models evaluated
too (Ditto's are its personal models). About 15 minutes on a 2-core CPU.
Failing and slow clients: add --config.fed.dropout=0.2
--config.fed.straggler_fraction=0.3 (docs/baselines_report.md).
"""
import pathlib

from fedreid_jax.config_lib import load_config_file


def get_config():
  c = load_config_file(str(pathlib.Path(__file__).with_name("synthetic.py")))
  c.fed.rounds = 15
  c.eval.every_rounds = 3
  c.eval.client_models = True
  c.checkpoint_every = 3
  c.baselines = ("fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedbn",
                 "scaffold", "ditto")
  return c
