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


def _off_console(record: logging.LogRecord) -> bool:
  """A record kept out of the console: an error of a library (Orbax's and
  asyncio's tracebacks from their threads, dozens for one full disk), or one
  of ours marked `extra={"console": False}`."""
  if getattr(record, "console", True) is False:
    return True
  ours = record.name == "root" or record.name.startswith("fedreid_jax")
  return record.levelno >= logging.ERROR and not ours


class _ErrorsFile(logging.Handler):
  """Appends the records kept out of the console, tracebacks included, to
  `path` (opened per record, so nothing is created until there is one). A
  write that fails (a full disk) is dropped silently: the console stays one line."""

  def __init__(self, path: str):
    super().__init__(logging.DEBUG)
    self.path, self.written = path, 0
    self.addFilter(_off_console)
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

  def emit(self, record: logging.LogRecord) -> None:
    try:
      text = self.format(record) + "\n"
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(text)
      self.written += 1
    except Exception:  # never a "--- Logging error ---" traceback on the console
      try:  # nor an empty file left by a full disk
        if os.path.getsize(self.path) == 0:
          os.remove(self.path)
      except OSError:
        pass


def library_errors_to_file(workdir: str) -> "_ErrorsFile":
  """Library errors (and our records marked `console=False`) go to
  `<workdir>/errors.log` instead of the console: a failing write's tracebacks
  from Orbax's threads no longer bury the run's one-line error. Call it after
  `log_above_progress_bars`; returns the file's handler (`written`: records
  it holds)."""
  root = logging.getLogger()
  for old in [h for h in root.handlers if isinstance(h, _ErrorsFile)]:
    root.removeHandler(old)  # called again (in one process): one file
  for handler in root.handlers:  # the console's (not, say, a test's log capture)
    if isinstance(handler, _AboveProgressBars) and _keep_on_console not in handler.filters:
      handler.addFilter(_keep_on_console)
  errors = _ErrorsFile(os.path.join(workdir, "errors.log"))
  root.addHandler(errors)
  _uncaught_in_library_threads_to_log()
  return errors


def _uncaught_in_library_threads_to_log() -> None:
  """Exceptions Python would print itself, outside the main thread (Orbax's
  tensorstore callbacks, after the event loop they report to has closed;
  TensorBoard's writer thread) or ignored (an atexit flush on a full disk),
  become ERROR records of the `uncaught` logger: errors.log, not the console.
  The main thread's uncaught exception (a bug) keeps its traceback."""
  import threading
  log = logging.getLogger("uncaught")
  if getattr(sys.excepthook, "routes_threads", False):
    return
  default = sys.excepthook

  def excepthook(kind, value, tb):
    if threading.current_thread() is threading.main_thread():
      return default(kind, value, tb)
    log.error("uncaught in thread %s", threading.current_thread().name,
              exc_info=(kind, value, tb))
  excepthook.routes_threads = True

  def thread_excepthook(args):
    if args.exc_type is not SystemExit:
      log.error("uncaught in thread %s", getattr(args.thread, "name", "?"),
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

  def unraisablehook(unraisable):
    log.error("%s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object,
              exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
  sys.excepthook, threading.excepthook, sys.unraisablehook = (
      excepthook, thread_excepthook, unraisablehook)


def _keep_on_console(record: logging.LogRecord) -> bool:
  return not _off_console(record)


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
  library_errors_to_file(_WORKDIR.value)
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
