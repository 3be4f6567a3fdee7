"""The expected failures of the pipeline: one base class, caught once by the command line.

A :class:`PipelineError` is a failure the user can act on (a bad parameter, bad or missing data,
an unreachable tracking store, a batch that does not fit in memory, a training run that could
not finish); ``frcnn`` prints its message on one line (``frcnn <command>: <message>``) and exits
with 1 (2 for a :class:`ConfigError`). Any other exception is a bug and keeps its traceback.

Each subclass also derives from the built-in exception it refines, so code that catches
``ValueError`` or ``FileNotFoundError`` keeps working.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An expected failure; its message names the file, key or value at fault."""


class ConfigError(PipelineError, ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


class DataError(PipelineError, ValueError):
    """Input data (a dataset, a prepared table, a model file) is wrong; names the file."""


class MissingInputError(PipelineError, FileNotFoundError):
    """A file a stage needs is not there; names it and the command that writes it."""


class TrackingError(PipelineError, RuntimeError):
    """The MLflow tracking store cannot be used (unreachable server, bad URI)."""


class InsufficientMemoryError(PipelineError, MemoryError):
    """A training step does not fit in the worker's memory; names the batch size and memory."""


class RunFailedError(PipelineError, RuntimeError):
    """A Ray Train run or Tune sweep failed for good (after its restarts); names the cause."""
