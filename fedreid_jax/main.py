"""Command line: `python -m fedreid_jax.main --config configs/synthetic.py --workdir runs/demo`.

Overrides follow ml_collections: `--config.fed.rounds=5`. Bad input (an
`errors.UserError`) ends with a one-line `error: ...`; set FEDREID_TRACEBACK=1
to see its traceback. Any other exception is a bug and shows its traceback.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser



class ConfigFileParser(ConfigFileFlagParser):
  """`--config` as ml_collections reads it, plus a run's saved `config.json`
  (`--config <workdir>/config.json`), read by `config_lib.load_config_file`."""

  def parse(self, path):
    if not path.split(":", 1)[0].endswith(".json"):
      return super().parse(path)
    from fedreid_jax.config_lib import load_config_file
    config = load_config_file(path.split(":", 1)[0])
    config.lock()
    return config


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py, or a run's <workdir>/config.json).",
    lock_config=True)
flags.FLAGS["config"].parser = ConfigFileParser("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (config, metrics, checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def run_or_exit(fn):
  """`fn()`; a `UserError` becomes `sys.exit("error: <message>")` (one line,
  unless FEDREID_TRACEBACK is set). Any other exception is a bug: it propagates
  with its traceback."""
  from fedreid_jax.errors import UserError
  try:
    return fn()
  except UserError as e:
    if os.environ.get("FEDREID_TRACEBACK"):
      raise
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first)
    sys.exit("error: interrupted; rerun the same command to resume from the latest checkpoint")


def use_compilation_cache() -> None:
  """Compiled XLA programs persist in ~/.cache/fedreid_jax/xla (unless
  JAX_COMPILATION_CACHE_DIR says otherwise): baselines and reruns of the same
  shapes skip compilation."""
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.expanduser("~"), ".cache", "fedreid_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _AboveProgressBars(logging.Handler):
  """Writes log records with `tqdm.write`, so they print above the progress
  bars instead of onto their line."""

  def emit(self, record: logging.LogRecord) -> None:
    import tqdm
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # logging must never raise
      self.handleError(record)


def log_above_progress_bars() -> None:
  """Replaces absl's stderr handler on the root logger with `_AboveProgressBars`
  (same line format)."""
  from absl import logging as absl_logging
  root = logging.getLogger()
  handler = _AboveProgressBars()
  handler.setFormatter(absl_logging.PythonFormatter())
  root.removeHandler(absl_logging.get_absl_handler())
  for old in [h for h in root.handlers if isinstance(h, _AboveProgressBars)]:
    root.removeHandler(old)  # called again (in one process): one handler, each line once
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter


class _DropMessage(logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefix)


def quiet_backend_probe() -> None:
  """Drops JAX's "Unable to initialize backend 'tpu'" line (its probe for a
  TPU, logged at every start on machines without one); other backend
  messages are kept."""
  probe = logging.getLogger("jax._src.xla_bridge")
  if not any(isinstance(f, _DropMessage) for f in probe.filters):
    probe.addFilter(_DropMessage("Unable to initialize backend 'tpu'"))


def main(argv):
  del argv
  from fedreid_jax import experiment
  from fedreid_jax import hosts
  quiet_backend_probe()
  log_above_progress_bars()
  use_compilation_cache()

  def run():
    hosts.initialize(_CONFIG.value)  # several hosts: join them before any device starts
    hosts.check_same_config(_CONFIG.value)
    return experiment.run(_CONFIG.value, _WORKDIR.value)  # refused: the workdir as it was
  table = run_or_exit(run)
  if hosts.is_main():
    print(table)


def unknown_override(argv: list[str]) -> str | None:
  """A one-line error for a config file that does not load, or for the first
  `--config.<path>` naming no config field; None when all is well."""
  from fedreid_jax.config_lib import load_config_file
  paths = [a for a in argv if a.startswith("--config=")] + [
      argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
  if not paths:
    return None
  from fedreid_jax.errors import ConfigError
  try:
    config = load_config_file(paths[-1].split("=", 1)[-1].split(":")[0])
  except ConfigError as e:  # missing or broken config file: one line, before absl's parser
    return f"error: {e}"
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, walked = config, "config"
    for key in arg[len("--config."):].split("=", 1)[0].split("."):
      if not hasattr(node, "keys") or key not in node:
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"error: unknown config field {walked}.{key}; valid fields of {walked}: {valid}"
      node, walked = node[key], f"{walked}.{key}"
  return None


def missing_flag(argv: list[str]) -> str | None:
  """A one-line error when `--config` or `--workdir` is not given (absl's own
  message takes two lines); None when both are, or help is asked for."""
  if any(a.split("=", 1)[0] in ("--help", "--helpshort", "--helpfull", "-h") for a in argv):
    return None
  for name, example in (("config", "configs/synthetic.py"), ("workdir", "runs/demo")):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")] + [
        argv[i + 1] for i, a in enumerate(argv[:-1]) if a == f"--{name}"]
    if not any(values):
      return f"error: --{name} is required, e.g. --{name} {example}"
  return None


def entry():
  error = missing_flag(sys.argv[1:]) or unknown_override(sys.argv[1:])
  if error:
    sys.exit(error)
  app.run(main)


if __name__ == "__main__":
  entry()
