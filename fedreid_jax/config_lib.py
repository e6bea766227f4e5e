"""Config validation: one-line errors naming the problem and the valid choices,
raised before any data is touched or anything is compiled."""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile

from fedreid_jax import hosts
from fedreid_jax.data import registry
from fedreid_jax.data import unseen
from fedreid_jax.errors import ConfigError

from fedreid_jax.federated import algorithm as algorithm_lib
from fedreid_jax.federated import baselines, cdw, failures, kd, secagg, strategies
from fedreid_jax.federated import registry as algorithm_registry
from fedreid_jax.federated import sampling
from fedreid_jax.models import conv, pretrained, resnet
from fedreid_jax.privacy import settings as privacy_settings
from fedreid_jax.models.reid import build_model

PROTOCOLS = ("standard", "fedreid")


def load_config_file(path: str):
  """`get_config()` of a config file (configs/*.py), as `--config` would load it,
  or a run's saved `<workdir>/config.json` (`load_json_config`).

  Raises ConfigError (one line: file, line, what) when the file is missing,
  does not import, or has no working `get_config()`."""
  if os.path.isdir(path):
    raise ConfigError(f"config file {path!r} is a folder; pass a file such as "
                      "configs/synthetic.py or <workdir>/config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; see configs/ for the shipped ones")
  if path.endswith(".json"):
    return check_sections(load_json_config(path), path)
  return check_sections(_load_python_config(path), path)


SECTIONS = ("cdw", "data", "eval", "fed", "hosts", "kd", "model", "train")
TOP_FIELDS = ("baselines", "checkpoint_every", "checkpoint_keep", "log_every", "seed")


def check_sections(config, path: str):
  """`config` when it has every section and top-level field of the shipped
  configs, else ConfigError naming what is missing."""
  if not hasattr(config, "keys"):
    raise ConfigError(f"config file {path!r}: get_config() returned a "
                      f"{type(config).__name__}, not a ConfigDict; start from "
                      "configs/synthetic.py")
  missing = [f"config.{k}" for k in SECTIONS if not hasattr(config.get(k), "keys")]
  missing += [f"config.{k}" for k in TOP_FIELDS if k not in config]
  if missing:
    raise ConfigError(f"config file {path!r} lacks {', '.join(missing)}; start from "
                      "configs/synthetic.py, which has every section")
  return config


def _load_python_config(path: str):
  """`get_config()` of a Python config file; ConfigError naming the line that failed."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0] + "_config", path)
  if spec is None:
    raise ConfigError(f"config file {path!r} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except ConfigError:
    raise
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r} line {e.lineno}: {e.msg}; fix it and rerun") from e
  except Exception as e:  # the user's code: name the line that failed
    tb = e.__traceback__
    line = None
    while tb is not None:
      if tb.tb_frame.f_code.co_filename == path:
        line = tb.tb_lineno
      tb = tb.tb_next
    where = f" line {line}" if line else ""
    raise ConfigError(f"config file {path!r}{where} failed: {type(e).__name__}: {e}") from e


def _tuples(value):
  """JSON lists back to the tuples the Python configs use (recursively)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_json_config(path: str):
  """A config saved as JSON (`config.to_json()`, a run's `config.json`) as a
  ConfigDict equal to the one it was saved from (lists as tuples)."""
  import ml_collections
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"config file {path!r} cannot be read ({e}); pass a readable "
                      "config file") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"config file {path!r} is not valid JSON (line {e.lineno}: {e.msg}); "
                      "pass a config from configs/ instead") from None
  if not isinstance(data, dict):
    raise ConfigError(f"config file {path!r} holds a JSON {type(data).__name__}, not a "
                      "config object; pass a config from configs/ instead")
  return ml_collections.ConfigDict(_tuples(data))


def _choice(value, choices, field):
  if value not in choices:
    raise ConfigError(f"config.{field}={value!r} is not valid; choose one of {list(choices)}")


def _positive(value, field, allow_zero=False):
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"config.{field}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


def _integer(value, field, minimum):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"config.{field}={value!r} must be an integer >= {minimum}")


def _real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _devices(num_devices) -> None:
  """`fed.num_devices`: 0 (all) or at most the devices present, checked before
  anything is compiled."""
  if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 0:
    raise ConfigError(f"config.fed.num_devices={num_devices!r} must be 0 (all devices) or a "
                      "positive integer")
  import jax  # the backend starts here: only a count is read
  present = jax.device_count()
  if num_devices > present:
    raise ConfigError(f"config.fed.num_devices={num_devices} but only {present} device(s) are "
                      f"present ({jax.devices()[0].platform}); lower it, or 0 for all")


def validate(config) -> None:
  """Raises ConfigError on the first invalid field."""
  _choice(config.data.name, registry.names(), "data.name")
  _choice(config.data.scenario, registry.SCENARIOS, "data.scenario")
  algorithm_registry.check_name(config.fed.algorithm)
  for b in config.baselines:
    algorithm_registry.check_name(b, "baselines")
  _choice(config.fed.strategy, strategies.registered_strategies(), "fed.strategy")
  _choice(config.fed.weighting, tuple(algorithm_lib.WEIGHTINGS), "fed.weighting")
  _choice(config.fed.bn_aggregation, algorithm_lib.BN_AGGREGATIONS, "fed.bn_aggregation")
  _choice(config.eval.protocol, PROTOCOLS, "eval.protocol")
  _choice(config.cdw.form, cdw.FORMS, "cdw.form")
  _choice(config.cdw.mode, cdw.MODES, "cdw.mode")
  _choice(config.kd.mode, kd.MODES, "kd.mode")
  _choice(config.eval.best_metric, ("rank1", "rank5", "rank10", "mAP", "mINP"), "eval.best_metric")
  _choice(config.model.backbone, tuple(resnet.ARCHITECTURES), "model.backbone")
  _choice(config.model.last_stride, (1, 2), "model.last_stride")
  _choice(config.model.conv_impl, conv.IMPLS, "model.conv_impl")
  _choice(config.model.dtype, tuple(resnet.DTYPES), "model.dtype")
  for field in ("train.batch_size", "train.local_epochs", "fed.rounds", "fed.chunk_steps",
                "eval.batch_size", "eval.every_rounds", "model.width", "model.embed_dim",
                "checkpoint_every", "checkpoint_keep", "log_every", "cdw.batch_size",
                "kd.batch_size", "kd.every_rounds"):
    value = config
    for key in field.split("."):
      value = value[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.{field}={value!r} must be a positive integer")
  for field in ("train.lr_backbone", "train.lr_head", "kd.lr"):
    section, key = field.split(".")
    _positive(config[section][key], field)
  _positive(config.fed.clients_per_round, "fed.clients_per_round", allow_zero=True)
  count = registry.expected_clients(config.data)  # known before any data is loaded
  if count is not None and config.fed.clients_per_round >= 1:
    sampling.num_selected(config.fed.clients_per_round, count)  # one line when too many
  failures.check(**failures.settings(config.fed))  # the round's count: when the data is known
  unseen.check_config(config)  # eval.unseen (absent in older saved configs): names, count
  baselines.check_settings(config)  # prox.mu, server_opt (absent in older saved configs)
  privacy_settings.check_settings(config, count)  # dp (absent in older saved configs: off)
  hosts.check_settings(config)
  _devices(config.fed.num_devices)
  _choice(config.eval.get("re_ranking", False), (False, True), "eval.re_ranking")  # older
  _integer(config.eval.get("rr_k1", 20), "eval.rr_k1", minimum=1)  # configs lack these
  _integer(config.eval.get("rr_k2", 6), "eval.rr_k2", minimum=1)   # fields: defaults
  _integer(config.eval.get("aqe_k", 0), "eval.aqe_k", minimum=0)
  _positive(config.eval.get("aqe_alpha", 3.0), "eval.aqe_alpha")
  if not _real(config.eval.get("rr_lambda", 0.3)) or not 0 <= config.eval.get("rr_lambda", 0.3) <= 1:
    raise ConfigError(f"config.eval.rr_lambda={config.eval.rr_lambda!r} must be in [0, 1]")
  if not isinstance(config.eval.streamed, bool):
    raise ConfigError(f"config.eval.streamed={config.eval.streamed!r} must be True or False")
  if len(config.data.image_size) != 2 or min(config.data.image_size) <= 0:
    raise ConfigError(f"config.data.image_size={tuple(config.data.image_size)!r} must be (height, width)")
  erasing = config.train.get("random_erasing", 0.0)
  if isinstance(erasing, bool) or not isinstance(erasing, (int, float)) or not 0 <= erasing <= 1:
    raise ConfigError(f"config.train.random_erasing={erasing!r} must be a probability in "
                      "[0, 1] (0: off; 0.5 is the usual re-ID setting)")
  if not 0.0 <= config.model.dropout < 1.0:
    raise ConfigError(f"config.model.dropout={config.model.dropout!r} must be in [0, 1)")
  _choice(config.model.get("bn_unbiased_variance", False), (False, True),
          "model.bn_unbiased_variance")
  if config.model.get("pretrained"):  # exists, known format; contents: when the model is built
    pretrained.check_file(config.model)
  secagg.check_settings(config, count)  # secagg (absent in older saved configs: off)
  for name in (config.fed.algorithm, *config.baselines):  # each factory gives an Algorithm
    describe_algorithm(name, config)


def describe_algorithm(name: str, config):
  """The registered algorithm `name` as `config` would build it, on a stand-in
  model (one class; its parts are never run): its label and fields, and
  the factory checked before anything real is built."""
  sub = config.copy_and_resolve_references()
  sub.fed.algorithm = name
  return algorithm_registry.build_algorithm(name, sub, build_model(sub.model, 1))


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, or raises a one-line error; also
  refuses a file where the run writes a folder (`workdir.check_layout`)."""
  from fedreid_jax import workdir as workdir_lib
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir!r} is a file, not a folder; pass --workdir with "
                      "a new or existing folder")
  workdir_lib.check_layout(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror}); "
                      "pass --workdir with a folder you can write to") from None
