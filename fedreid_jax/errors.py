"""Errors a user can fix, in a leaf module every part may import.

`main.py` turns a `UserError` into one line (`error: <message>`); any other
exception is a bug and keeps its traceback. Each subclass also derives from
the builtin a caller would expect (`ValueError`, `FileNotFoundError`, ...), so
`except ValueError` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
  """Bad input (config, data, workdir): the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value is invalid."""


class CheckpointMismatch(UserError, ValueError):
  """The workdir holds a checkpoint written under another config."""


class DatasetNotFound(UserError, FileNotFoundError):
  """A dataset folder or one of its expected sub-folders does not exist."""


class DatasetNotPrepared(UserError, FileNotFoundError):
  """A dataset was asked for but has not been prepared in the data folder."""


class CorruptImage(UserError, OSError):
  """An image file cannot be decoded."""


class TrainingDiverged(UserError, FloatingPointError):
  """A training loss became NaN or infinite."""


class WorkdirBusy(UserError):
  """Another run holds the workdir."""


class Interrupted(UserError):
  """The run was stopped by SIGTERM / SIGINT; the message says what was saved."""


class CheckpointDamaged(UserError):
  """No checkpoint in the workdir can be restored intact."""


class DiskFull(UserError, OSError):
  """No space left while writing the workdir."""


class ReportInputMissing(UserError, FileNotFoundError):
  """A report was asked for a folder holding no run (config.json + metrics.jsonl)."""


class WeightsFileError(UserError, ValueError):
  """A pretrained weights file cannot be read or does not fit the configured backbone."""
